"""When a request that has to wait for a slot would start: the forecast behind early shedding.

What lives here: ``WaitForecast``, plain arithmetic with no I/O and no clock of its own (the
connection passes ``trio.current_time()`` values in). It counts the requests waiting for one
pool of slots (the switch's ``server.max_in_flight``, shared by every connection; or one
connection's ``listener.max_in_flight`` when there is no shared pool), keeps a moving average
of how long a started request holds its slot, and answers one question on a request's
arrival: with every slot busy and ``waiting`` requests ahead of it, can it start and finish
before its budget runs out? When it cannot, the connection answers it at once with the
overload code instead of letting it wait in the queue until its start-by instant and then
answering the same code, late (``benchmarks/RESULTS.md``: at twice the capacity, the excess
waited ~1.9 s of a 2 s budget before its 91). The start-by check at the slot stays as the
backstop: the forecast only decides earlier, never later.

The forecast is deliberately pessimistic: it assumes the slots free up in rounds (the
waiter k-th in line starts after ``ceil(k / slots)`` service times), which is exact when the
requests in flight started together and at most one service time early when they are
staggered. Until a first request has finished there is no estimate and nothing is forecast.

What does not: the slots themselves and the queue (connection.py), the overload answer
(connection.py ``_shed``), the per-request budget (pipeline.py).
"""

from __future__ import annotations

import math
from typing import Final

#: Weight of the newest service time in the moving average: about the last 20 requests.
_ALPHA: Final = 0.05


class WaitForecast:
    """Requests waiting for a pool of ``slots`` and the average time a slot is held.

    Args:
        slots: the size of the pool the waiting requests compete for (at least 1).
    """

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("a slot pool has at least one slot")
        self._slots = slots
        #: Requests queued for a slot now, over every connection sharing the pool.
        self.waiting = 0
        #: Seconds a started request holds its slot, moving average; None before the first.
        self.service: float | None = None

    def queued(self) -> None:
        """One more request waits for a slot."""
        self.waiting += 1

    def dequeued(self) -> None:
        """A waiting request left the queue (started, or answered without starting)."""
        self.waiting = max(0, self.waiting - 1)

    def finished(self, seconds: float) -> None:
        """A started request released its slot after holding it ``seconds``."""
        seconds = max(0.0, seconds)
        if self.service is None:
            self.service = seconds
        else:
            self.service += _ALPHA * (seconds - self.service)

    def expected_start(self, now: float) -> float:
        """When a request arriving ``now`` behind the ``waiting`` ones would get a slot,
        every slot being busy; ``now`` when there is no estimate yet."""
        if self.service is None:
            return now
        rounds = math.ceil((self.waiting + 1) / self._slots)
        return now + rounds * self.service

    def too_late(self, now: float, *, start_by: float, deadline: float) -> bool:
        """Whether a request arriving ``now`` with every slot busy is forecast either to
        start after ``start_by`` or to finish after ``deadline`` (its budget's end)."""
        if self.service is None:
            return False
        start = self.expected_start(now)
        return start > start_by or start + self.service > deadline
