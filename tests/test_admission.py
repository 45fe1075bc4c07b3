"""The serve queue with real threads: slots, one of them kept from large uploads, the cheapest
waiting first, the dearest refused when the queue overflows, a bounded wait."""

from __future__ import annotations

import threading
import time

import pytest

from clipid.serve.admission import Admission, Busy


class Worker:
    """A thread that takes a slot at ``cost`` and holds it until released."""

    def __init__(self, admission: Admission, cost: int, log: list):
        self.release, self.outcome = threading.Event(), None
        self.thread = threading.Thread(target=self.run, args=(admission, cost, log))
        self.thread.start()

    def run(self, admission: Admission, cost: int, log: list) -> None:
        try:
            with admission.slot(cost):
                log.append(cost)
                self.release.wait(10)
            self.outcome = "done"
        except Busy:
            self.outcome = "busy"

    def finish(self) -> str:
        self.release.set()
        self.thread.join(10)
        return self.outcome


def until(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def line_up(gate: Admission, costs: list[int], started: list) -> list[Worker]:
    """Workers started one at a time, each running or waiting before the next comes."""
    workers = []
    for cost in costs:
        before = gate.running + gate.waiting
        workers.append(Worker(gate, cost, started))
        until(lambda before=before: gate.running + gate.waiting > before)
    return workers


def test_the_queue_is_served_cheapest_first_and_overflow_refuses_the_dearest():
    gate, started = Admission(slots=1, queue=2, wait_s=10, large=10**9), []
    holder, big, small = line_up(gate, [5, 1_000, 10], started)
    assert (gate.running, gate.waiting) == (1, 2)
    text = Worker(gate, 0, started)  # the queue overflows: the dearest waiting one goes
    big.thread.join(5)
    assert big.outcome == "busy" and gate.waiting == 2
    assert holder.finish() == "done"
    until(lambda: started[1:] == [0])  # the text was last in, first out of the queue
    assert text.finish() == "done" and small.finish() == "done"
    assert started == [5, 0, 10] and (gate.running, gate.waiting) == (0, 0)


def test_a_newcomer_dearer_than_every_waiting_one_is_refused_at_once():
    gate, started = Admission(slots=1, queue=1, wait_s=10, large=10**9), []
    holder, waiting = line_up(gate, [0, 1], started)
    began = time.monotonic()
    with pytest.raises(Busy, match="1 requests in work and 1 waiting"), gate.slot(2):
        pass
    assert time.monotonic() - began < 1
    assert holder.finish() == "done" and waiting.finish() == "done"


def test_no_queue_refuses_all_beyond_the_slots_and_a_long_wait_ends():
    gate, started = Admission(slots=2, queue=0, wait_s=10, large=10**9), []
    holders = line_up(gate, [0, 0], started)
    assert gate.running == 2
    with pytest.raises(Busy), gate.slot(0):
        pass
    patient = Admission(slots=1, queue=4, wait_s=0.2, large=10**9)
    holder = Worker(patient, 0, started)
    until(lambda: patient.running == 1)
    began = time.monotonic()
    with pytest.raises(Busy), patient.slot(0):
        pass
    assert 0.2 <= time.monotonic() - began < 2 and patient.waiting == 0
    assert [h.finish() for h in [*holders, holder]] == ["done"] * 3


def test_large_uploads_leave_one_slot_to_the_ordinary_queries():
    gate, started = Admission(slots=3, queue=4, wait_s=10, large=100), []
    *large, third = line_up(gate, [1_000, 1_001, 5_000], started)
    assert (gate.running, gate.waiting) == (2, 1)  # a slot is free, but not for a third large
    (small,) = line_up(gate, [100], started)
    until(lambda: started[-1:] == [100])
    assert (gate.running, gate.waiting) == (3, 1)
    assert large[0].finish() == "done"
    until(lambda: started[-1:] == [5_000])
    assert [w.finish() for w in (large[1], third, small)] == ["done"] * 3
    assert sorted(started[:2]) == [1_000, 1_001] and started[2:] == [100, 5_000]
    solo = Admission(slots=1, queue=0, wait_s=10, large=100)  # one slot: large ones take it
    with solo.slot(10**6):
        assert solo.running == 1
