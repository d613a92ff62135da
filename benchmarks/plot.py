"""PNG plots of the load reports (matplotlib, from the ``bench`` extra; imported lazily).

What lives here: ``percentiles_against_rate`` (p50/p90/p99/p99.9 of open-loop phases against
the offered rate, one colour per target, log latency axis) and ``model_against_measured``
(the slowed target: measured p99 against the FIFO queue model's p99 for the same schedule).

What does not: measuring (generator.py), the Markdown report (results.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.generator import PhaseResult

#: Percentiles drawn, with their line styles.
_STYLES = (("p50", ":"), ("p90", "-."), ("p99", "-"), ("p999", "--"))


def _pyplot() -> Any:
    import matplotlib  # noqa: PLC0415 (the bench extra, only when a plot is asked for)

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def percentiles_against_rate(
    path: Path, series: Mapping[str, Sequence[PhaseResult]], title: str
) -> Path:
    """Latency percentiles of open-loop ``series`` (label -> phases) against offered rate."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    for n, (label, results) in enumerate(series.items()):
        points = sorted((r for r in results if r.latency), key=lambda r: r.offered_rate)
        xs = [r.offered_rate for r in points]
        for name, style in _STYLES:
            ys = [getattr(r.latency, name) for r in points]
            ax.plot(xs, ys, style, marker="o", color=f"C{n}", label=f"{label} {name}")
    ax.set_yscale("log")
    ax.set_xlabel("offered rate (requests/s, open loop, Poisson)")
    ax.set_ylabel("latency from scheduled send (ms)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def model_against_measured(
    path: Path, rows: Sequence[tuple[float, float, float]], title: str
) -> Path:
    """``rows`` of (offered rate, measured p99 ms, model p99 ms) as two lines."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5), dpi=100)
    rows = sorted(rows)
    ax.plot([r[0] for r in rows], [r[1] for r in rows], "-o", label="measured p99 (open loop)")
    ax.plot([r[0] for r in rows], [r[2] for r in rows], "--x", label="FIFO model p99")
    ax.set_yscale("log")
    ax.set_xlabel("offered rate (requests/s)")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
