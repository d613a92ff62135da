"""What the benchmarks (and the flood and soak tests) read from the machine: CPU time, open
file descriptors and resident memory of a process, busy ticks of a core, and the description
of the machine a report was measured on.

What lives here: ``cpu_times``/``cpu_seconds`` (``/proc/PID/stat``, all threads),
``open_fds`` (``/proc/PID/fd``), ``rss_bytes`` (``VmRSS`` of ``/proc/PID/status``),
``ProcSample``/``sample`` (both at once), ``core_ticks`` (``/proc/stat``), ``busy_share``,
``machine_info`` (CPU model, cores, Python, kernel, commit, load average) and
``pin_command`` (``taskset -c N`` before a command).

What does not: any measurement loop or report layout (load.py, generator.py, results.py).
"""

from __future__ import annotations

import math
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

#: The repository root (git commands run there).
REPO = Path(__file__).resolve().parents[1]


def cpu_times(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of process ``pid`` (all its threads), from /proc/PID/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the parenthesised command name (which may itself contain spaces).
    rest = stat[stat.rindex(")") + 2 :].split()
    # utime and stime are fields 14 and 15 of stat(5); rest starts at field 3.
    tick = os.sysconf("SC_CLK_TCK")
    return int(rest[14 - 3]) / tick, int(rest[15 - 3]) / tick


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` (all its threads)."""
    return sum(cpu_times(pid))


def open_fds(pid: int) -> int:
    """How many file descriptors process ``pid`` holds open now (entries of /proc/PID/fd)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def rss_bytes(pid: int) -> int:
    """Resident set size of process ``pid`` now, bytes (``VmRSS`` of /proc/PID/status).

    Raises:
        ValueError: the status file has no VmRSS line (a zombie, or not Linux).
    """
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            value, unit = line.split()[1:3]
            if unit != "kB":
                raise ValueError(f"VmRSS in {unit!r}, expected kB")
            return int(value) * 1024
    raise ValueError(f"no VmRSS in /proc/{pid}/status")


@dataclass(frozen=True)
class ProcSample:
    """Open file descriptors and resident memory of a process at one moment."""

    fds: int
    rss: int

    @property
    def rss_mb(self) -> float:
        """``rss`` in MiB."""
        return self.rss / 2**20

    def __str__(self) -> str:
        return f"fds={self.fds} rss={self.rss_mb:.1f}MiB"


def sample(pid: int) -> ProcSample:
    """``open_fds`` and ``rss_bytes`` of ``pid`` now."""
    return ProcSample(open_fds(pid), rss_bytes(pid))


def core_ticks(cpu: int | None) -> tuple[int, int]:
    """Busy and total ticks of CPU ``cpu`` since boot, from /proc/stat ((0, 0) if unknown)."""
    if cpu is None:
        return 0, 0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name == f"cpu{cpu}":
            # user nice system idle iowait irq softirq steal (guest time is inside user).
            # Busy leaves out irq and softirq: loopback TCP of our own traffic lands there.
            user, nice, system, _idle, _iowait, _irq, _softirq, steal = map(int, values[:8])
            return user + nice + system + steal, sum(int(v) for v in values[:8])
    return 0, 0


def busy_share(before: tuple[int, int], after: tuple[int, int]) -> float:
    """Busy share of a core between two ``core_ticks`` readings (NaN when unknown)."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total if total else math.nan


def pin_command(cpu: int | None) -> list[str]:
    """``taskset -c CPU`` to pin a child process to one core from its first instruction.

    The child is pinned at exec, so every thread it starts later inherits the mask (pinning a
    running process with ``os.sched_setaffinity`` sets only the thread it names).

    Raises:
        RuntimeError: taskset (util-linux) is not installed.
    """
    if cpu is None:
        return []
    taskset = shutil.which("taskset")
    if taskset is None:
        raise RuntimeError("taskset not found (util-linux); run unpinned instead")
    return [taskset, "-c", str(cpu)]


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: CPUs, model, Python, kernel, commit, load."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def git(*args: str) -> str:
        try:
            out = subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return ""
        return out.stdout.strip()

    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "load_average_at_start": list(os.getloadavg()),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }
