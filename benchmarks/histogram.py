"""Latency histograms of the load generator: HDR histograms in microseconds and their summary.

What lives here: ``LatencyHistogram`` over the ``hdrhistogram`` package (1 us to 10 min,
3 significant digits, so a percentile is within 0.1 % of the recorded value; values above the
range are clamped to it and counted in ``clamped``), ``LatencySummary`` (count, mean and
p50/p90/p99/p99.9/max in milliseconds) and the base64 form that goes into the result JSON so a
report can be re-read and histograms merged.

What does not: clocks (the caller passes seconds), reports (generator.py, results.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from hdrh.histogram import HdrHistogram

#: Range of the recorded values, microseconds, and the digits of precision kept.
LOWEST_US = 1
HIGHEST_US = 600_000_000
SIGNIFICANT_DIGITS = 3
#: The percentiles of a summary, with their field names.
PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 50.0),
    ("p90", 90.0),
    ("p99", 99.0),
    ("p999", 99.9),
)


@dataclass(frozen=True)
class LatencySummary:
    """Latency of the answered requests of a phase, milliseconds."""

    count: int
    mean: float
    p50: float
    p90: float
    p99: float
    p999: float
    max: float

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> LatencySummary:
        return cls(
            count=int(raw["count"]),
            mean=float(raw["mean"]),
            p50=float(raw["p50"]),
            p90=float(raw["p90"]),
            p99=float(raw["p99"]),
            p999=float(raw["p999"]),
            max=float(raw["max"]),
        )


class LatencyHistogram:
    """An HDR histogram of latencies recorded in seconds, kept in microseconds."""

    def __init__(self) -> None:
        self._h = HdrHistogram(LOWEST_US, HIGHEST_US, SIGNIFICANT_DIGITS)
        #: Values above ``HIGHEST_US`` recorded as ``HIGHEST_US``.
        self.clamped = 0

    def record(self, seconds: float) -> None:
        """Record one latency (negative values, from clock skew, count as the lowest)."""
        us = max(LOWEST_US, round(seconds * 1_000_000))
        if us > HIGHEST_US:
            us = HIGHEST_US
            self.clamped += 1
        self._h.record_value(us)

    @property
    def count(self) -> int:
        return int(self._h.get_total_count())

    def percentile_ms(self, pct: float) -> float:
        """The value at percentile ``pct`` (0-100), milliseconds; NaN when empty."""
        if not self.count:
            return math.nan
        return float(self._h.get_value_at_percentile(pct)) / 1000

    def summary(self) -> LatencySummary | None:
        """The summary, or None when nothing was recorded."""
        if not self.count:
            return None
        values = {name: self.percentile_ms(pct) for name, pct in PERCENTILES}
        return LatencySummary(
            count=self.count,
            mean=float(self._h.get_mean_value()) / 1000,
            max=float(self._h.get_max_value()) / 1000,
            **values,
        )

    def add(self, other: LatencyHistogram) -> None:
        """Add the counts of ``other`` to this histogram."""
        self._h.add(other._h)
        self.clamped += other.clamped

    def encode(self) -> str:
        """The compressed base64 form of the HDR histogram (the standard HdrHistogram codec)."""
        raw = self._h.encode()
        return raw.decode("ascii") if isinstance(raw, bytes) else str(raw)

    @classmethod
    def decode(cls, text: str) -> LatencyHistogram:
        """A histogram from ``encode``'s text."""
        out = cls()
        if text:
            out._h.decode_and_add(text)
        return out
