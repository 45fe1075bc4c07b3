"""The bound on the work ``clipid serve`` has in flight: at most ``slots`` decodes/embeddings at
once and a short queue behind them; what does not fit is refused at once (503), so the memory a
burst of uploads can take is bounded and every request is answered quickly, if only with "busy".

The cost of a request is the pixel count its upload's header promises (a text costs nothing).
Requests costing more than ``large`` take at most ``slots - 1`` slots (one, if there is only
one slot): one always stays for the ordinary queries. The queue is served cheapest first, and
when it overflows the most expensive waiting request is the one refused. A client sending
images just under the pixel limit slows itself down, not the ordinary queries sent alongside.
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
    large: bool
    order: int
    refused: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return self.cost, self.order  # cheapest first, then first come


class Admission:
    """``with admission.slot(cost): ...`` runs the block once a slot is free, or raises
    :class:`Busy` when the queue is full or the wait is over ``wait_s``."""

    def __init__(self, slots: int, queue: int, wait_s: float, large: int):
        self.slots, self.queue, self.wait_s, self.large = slots, queue, wait_s, large
        self.large_slots = max(1, slots - 1)
        self._cond = threading.Condition()
        self._running: list[_Ticket] = []
        self._waiting: list[_Ticket] = []
        self._order = itertools.count()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @contextmanager
    def slot(self, cost: int) -> Iterator[None]:
        ticket = self.acquire(cost)
        try:
            yield
        finally:
            self.release(ticket)

    def release(self, ticket: _Ticket) -> None:
        with self._cond:
            self._running.remove(ticket)
            self._cond.notify_all()

    def acquire(self, cost: int) -> _Ticket:
        """Take a slot (after waiting in the queue), or raise :class:`Busy`; hand the ticket
        back to :meth:`release`."""
        ticket = _Ticket(cost, cost > self.large, next(self._order))
        with self._cond:
            self._waiting.append(ticket)
            if len(self._waiting) > self.queue + self._free():  # refuse the dearest waiting
                dearest = max(self._waiting, key=lambda t: t.key)
                self._waiting.remove(dearest)
                dearest.refused = True
                self._cond.notify_all()
            self._wait_turn(ticket, time.monotonic() + self.wait_s)
        return ticket

    def _free(self) -> int:
        return self.slots - len(self._running)

    def _next(self) -> _Ticket | None:
        """The cheapest waiting ticket that may start now."""
        large_running = sum(t.large for t in self._running)
        ready = [t for t in self._waiting if not t.large or large_running < self.large_slots]
        return min(ready, key=lambda t: t.key) if ready and self._free() > 0 else None

    def _wait_turn(self, ticket: _Ticket, deadline: float) -> None:
        while not ticket.refused:
            if self._next() is ticket:
                self._waiting.remove(ticket)
                self._running.append(ticket)
                self._cond.notify_all()  # another slot may still be free for the next one
                return
            left = deadline - time.monotonic()
            if left <= 0:
                self._waiting.remove(ticket)
                self._cond.notify_all()  # the next in line may be first now
                break
            self._cond.wait(left)
        raise Busy(f"{len(self._running)} requests in work and {len(self._waiting)} waiting")
