"""The bound on the work ``clipid serve`` has in flight: at most ``slots`` decodes/embeddings at
once and a short queue behind them; what does not fit is refused at once (503), so the memory a
burst of uploads can take is bounded and every request is answered quickly, if only with "busy".

The queue is served cheapest first (the cost of an upload is the pixel count its header
promises; a text costs nothing), and when it overflows the most expensive waiting request is the
one refused: a client sending images just under the pixel limit slows itself down, not the
ordinary queries sent alongside.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

__all__ = ["Admission", "Busy"]


class Busy(Exception):
    """No slot for this request now; the client may retry."""


@dataclass
class _Ticket:
    cost: int
    order: int
    refused: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return self.cost, self.order  # cheapest first, then first come


class Admission:
    """``with admission.slot(cost): ...`` runs the block once a slot is free, or raises
    :class:`Busy` when the queue is full or the wait is over ``wait_s``."""

    def __init__(self, slots: int, queue: int, wait_s: float):
        self.slots, self.queue, self.wait_s = slots, queue, wait_s
        self._cond = threading.Condition()
        self._running = 0
        self._waiting: list[_Ticket] = []
        self._order = itertools.count()

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @contextmanager
    def slot(self, cost: int) -> Iterator[None]:
        self.acquire(cost)
        try:
            yield
        finally:
            self.release()

    def release(self) -> None:
        with self._cond:
            self._running -= 1
            self._cond.notify_all()

    def acquire(self, cost: int) -> None:
        """Take a slot (after waiting in the queue), or raise :class:`Busy`."""
        with self._cond:
            if self._running < self.slots and not self._waiting:
                self._running += 1
                return
            ticket = _Ticket(cost, next(self._order))
            self._waiting.append(ticket)
            if len(self._waiting) > self.queue:  # refuse the dearest, maybe this very one
                dearest = max(self._waiting, key=lambda t: t.key)
                self._waiting.remove(dearest)
                dearest.refused = True
                self._cond.notify_all()
            self._wait_turn(ticket, time.monotonic() + self.wait_s)

    def _wait_turn(self, ticket: _Ticket, deadline: float) -> None:
        while not ticket.refused:
            if self._running < self.slots and ticket is min(self._waiting, key=lambda t: t.key):
                self._waiting.remove(ticket)
                self._running += 1
                return
            left = deadline - time.monotonic()
            if left <= 0:
                self._waiting.remove(ticket)
                self._cond.notify_all()  # the next in line may be first now
                break
            self._cond.wait(left)
        raise Busy(f"{self._running} requests in work and {len(self._waiting)} waiting")
