"""When an open-loop generator sends, and what a FIFO server does with it: pure functions.

What lives here: ``arrivals`` (the send offsets of a phase: constant spacing, or Poisson with
a seeded RNG), ``fifo_latencies`` (Lindley's recursion: the latency of each request at a
single FIFO server with a fixed service time, measured from its scheduled arrival) and
``closed_loop_latency`` (what a closed-loop client sees at the same server). The model is
what the harness is checked against (tests/test_bench_harness.py) and what the slowed-target
report line compares the measured p99 with: an open-loop harness that measures from the
scheduled send time shows the queue the model predicts; a closed loop never shows more than
``window`` service times, however slow the server, because it stops sending.

What does not: I/O, clocks, the generator (generator.py).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

#: Arrival processes of an open-loop phase.
ArrivalKind = Literal["constant", "poisson"]
ARRIVAL_KINDS: tuple[ArrivalKind, ...] = ("constant", "poisson")


def arrivals(kind: ArrivalKind, rate: float, duration: float, *, seed: int = 0) -> list[float]:
    """Send offsets in seconds from the start of a phase, all in ``[0, duration)``.

    Args:
        kind: ``constant`` (one request every ``1/rate`` s, from 0) or ``poisson``
            (exponential gaps of mean ``1/rate`` from a ``random.Random(seed)``).
        rate: requests per second, > 0.
        duration: seconds, > 0.
        seed: the RNG seed of a Poisson schedule (the same seed, the same schedule).

    Raises:
        ValueError: a rate or duration that is not positive, or an unknown kind.
    """
    if not rate > 0 or not duration > 0:
        raise ValueError("rate and duration must be positive")
    if kind == "constant":
        gap = 1.0 / rate
        count = int(rate * duration)
        # i * gap, not a running sum: no accumulated rounding over long phases.
        return [i * gap for i in range(count) if i * gap < duration]
    if kind == "poisson":
        rng = random.Random(seed)
        out: list[float] = []
        t = rng.expovariate(rate)
        while t < duration:
            out.append(t)
            t += rng.expovariate(rate)
        return out
    raise ValueError(f"unknown arrival kind {kind!r} (one of {', '.join(ARRIVAL_KINDS)})")


def fifo_latencies(offsets: Sequence[float], service: float) -> list[float]:
    """Latency of each request at one FIFO server taking ``service`` s per request.

    Lindley's recursion: a request starts when it arrives or when the one before it ends,
    whichever is later; its latency is its end minus its (scheduled) arrival.
    """
    out: list[float] = []
    free_at = float("-inf")
    for t in offsets:
        start = max(t, free_at)
        free_at = start + service
        out.append(free_at - t)
    return out


def closed_loop_latency(window: int, service: float) -> float:
    """Latency every request sees once ``window`` requests are kept in flight at that server:
    it waits behind the ``window - 1`` others, whatever the offered demand would have been."""
    return window * service
