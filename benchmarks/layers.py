"""CPU per message of the switch's own layers, in one process, without sockets or TLS.

What lives here: ``python -m benchmarks.layers``. It seeds a throw-away directory as
``make bench`` does (dev PKI, SoftHSM token with the demo keys, the demo cards on load
accounts, SQLite), then drives four targets over in-memory streams (``trio.testing``'s
memory stream pairs: no kernel, no TLS), one after the other and repeated in turn:

1. ``echo``: the echo baseline's handler (framing only);
2. ``bare``: the bare baseline's handler (pyiso8583 decode, encode the answer);
3. ``switch-echo``: the switch's ``Connection`` answering 0800 301 itself;
4. ``switch-full``: the switch's ``Connection`` over the real engine (SoftHSM through
   PKCS#11, SQLite WAL group commit) answering the ``full`` mix.

Each phase sends the same frames with C connections x W in flight and reads every answer;
the figure is process CPU (all threads: the SQLite writer included) per message, the median
over the repetitions. Beside it, the cyclic collector: its share of that CPU and its longest
pause (``gc.callbacks``). The startup heap is frozen as ``serve`` freezes it
(``switch.app.freeze_startup_heap``); ``--no-freeze`` leaves it to the collector, to see
what a full collection over it costs. The driver's own CPU is in every figure alike (the
``echo`` row is almost only the driver), so the table also gives each target's CPU above
``echo``.

This is the tool for speed work on the switch's code: it is quieter than the socket
harness (``benchmarks.results``), which remains the figure of record (TLS, kernel, a
separate load-generator process).

What does not live here: assertions, socket I/O, switch code.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio
import trio.testing

from benchmarks import baselines
from benchmarks.load import _seed
from benchmarks.procstat import machine_info
from benchmarks.results import load_cards, write_config
from benchmarks.scenarios import Mix, load_mix
from switch import app
from switch.config import Config
from switch.config import load as load_config
from switch.connection import Connection
from switch.decisions import profile
from switch.handler import Dispatcher
from switch.keys import ListenerSessions
from switch.log import configure as configure_logging
from switch.wire.framing import FrameDecoder, encode_frame

HERE = Path(__file__).resolve().parent
MIXES = HERE / "mixes"
#: Bytes asked of a stream per read by the driver.
RECEIVE_SIZE = 65536

Target = Callable[[trio.abc.Stream], Awaitable[None]]
#: The targets, in the order they run.
TARGETS = ("echo", "bare", "switch-echo", "switch-full")


@dataclass(frozen=True)
class Phase:
    name: str
    mix: str
    connections: int
    window: int


@dataclass(frozen=True)
class Sample:
    name: str
    messages: int
    cpu_s: float
    wall_s: float
    #: Time in cyclic collections during the measurement, in all and the longest (seconds).
    gc_s: float = 0.0
    gc_longest_s: float = 0.0

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.messages * 1e6


def frames_of(mix_name: str, count: int, seed: int) -> list[bytes]:
    """``count`` request bodies of the mix (unique STAN/RRN: nothing is a duplicate)."""
    mix = Mix(load_mix(MIXES / f"{mix_name}.toml"), "ascii", seed=seed, first_seq=seed * 10**6)
    out: list[bytes] = []
    while len(out) < count and not mix.exhausted:
        out.append(mix.next().body)
    return out


async def _drive(target: Target, bodies: Sequence[bytes], connections: int, window: int) -> int:
    """Send ``bodies`` over ``connections`` memory streams, ``window`` in flight each; the
    number of answers read."""
    answered = 0
    share = [bodies[i::connections] for i in range(connections)]

    async def one(mine: Sequence[bytes], client: trio.abc.Stream) -> None:
        nonlocal answered
        credit = trio.Semaphore(window)
        decoder = FrameDecoder("binary2", 8192)

        async def reader() -> None:
            nonlocal answered
            got = 0
            while got < len(mine):
                data = await client.receive_some(RECEIVE_SIZE)
                if not data:
                    return
                n = len(decoder.feed(bytes(data)))
                got += n
                answered += n
                for _ in range(n):
                    credit.release()

        async with trio.open_nursery() as inner:
            inner.start_soon(reader)
            for body in mine:
                await credit.acquire()
                await client.send_all(encode_frame(body, "binary2"))
        await client.aclose()

    async with trio.open_nursery() as nursery:
        for mine in share:
            client, server = trio.testing.memory_stream_pair()
            nursery.start_soon(target, server)
            nursery.start_soon(one, mine, client)
    return answered


class _GcWatch:
    """Times every cyclic collection while installed (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.total = self.longest = 0.0
        self._started = 0.0

    def __call__(self, phase: str, _info: dict[str, int]) -> None:
        now = time.perf_counter()
        if phase == "start":
            self._started = now
            return
        took = now - self._started
        self.total += took
        self.longest = max(self.longest, took)


async def _measure(name: str, target: Target, bodies: Sequence[bytes], ph: Phase) -> Sample:
    await _drive(target, bodies[: max(len(bodies) // 10, 1)], ph.connections, ph.window)
    watch = _GcWatch()
    gc.callbacks.append(watch)
    try:
        cpu0, wall0 = time.process_time(), time.perf_counter()
        n = await _drive(target, bodies, ph.connections, ph.window)
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    finally:
        gc.callbacks.remove(watch)
    if n != len(bodies):
        raise RuntimeError(f"{name}: {n} answers to {len(bodies)} requests")
    return Sample(name, n, cpu, wall, watch.total, watch.longest)


async def _run(
    cfg: Config,
    phases: Sequence[Phase],
    count: int,
    reps: int,
    only: frozenset[str],
    *,
    freeze: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The rows of every phase, and what a full collection cost after them."""
    lst = cfg.listeners[0]
    prof = profile(lst.network)
    opts = baselines.Options(kind="bare")
    bare_lock = trio.Lock()
    out: list[dict[str, Any]] = []
    async with trio.open_nursery() as background, AsyncExitStack() as stack:
        stack.callback(background.cancel_scope.cancel)  # the sweeper, before the store closes
        probes: list[Any] = []
        engine, hsm, store = await app._open_engine(cfg, stack, probes, background)
        handler = Dispatcher(engine, hsm, journal=store)
        sessions = ListenerSessions(cfg.listeners)
        if freeze:
            app.freeze_startup_heap()  # as ``serve`` does once it is bound

        async def switch_target(stream: trio.abc.Stream) -> None:
            conn = Connection(
                stream,
                handler,
                lst,
                prof,
                linger=1.0,
                peer=frozenset({"bench"}),
                session=sessions[lst.name],
                budget=cfg.pipeline.budget,
                min_remaining=cfg.pipeline.min_remaining,
            )
            await conn.run()

        targets: dict[str, Target] = {
            "echo": lambda s: baselines.handle_echo(s, opts),
            "bare": lambda s: baselines.handle_bare(s, opts, bare_lock),
            "switch-echo": switch_target,
            "switch-full": switch_target,
        }
        if only:
            targets = {k: v for k, v in targets.items() if k in only}
        seed = 1
        for ph in phases:
            samples: dict[str, list[Sample]] = {k: [] for k in targets}
            for _ in range(reps):
                for name, target in targets.items():
                    mix = "echo" if name == "switch-echo" else ph.mix
                    seed += 1
                    bodies = frames_of(mix, count, seed)
                    samples[name].append(await _measure(name, target, bodies, ph))
            row: dict[str, Any] = {"phase": f"{ph.connections}x{ph.window}", "mix": ph.mix}
            for name, got in samples.items():
                row[name] = statistics.median(s.cpu_us for s in got)
                row[f"{name}/s"] = statistics.median(s.messages / s.wall_s for s in got)
                row[f"{name}/gc%"] = statistics.median(100 * s.gc_s / s.cpu_s for s in got)
                row[f"{name}/gc_longest_ms"] = max(1000 * s.gc_longest_s for s in got)
            out.append(row)
            print(_row_text(row) if len(samples) == len(TARGETS) else row, flush=True)
        # What a full collection costs with the engine open: the pause every request in
        # flight would wait behind when the collector's thresholds call one.
        started = time.perf_counter()
        gc.collect()
        took = (time.perf_counter() - started) * 1000
        tracked, frozen = len(gc.get_objects()), gc.get_freeze_count()
        print(
            f"a full collection now: {took:.2f} ms ({tracked:,} objects tracked, {frozen:,} "
            "frozen)",
            flush=True,
        )
    return out, {"ms": took, "tracked": tracked, "frozen": frozen}


def _row_text(row: dict[str, Any]) -> str:
    e, b, se, sf = (row[k] for k in ("echo", "bare", "switch-echo", "switch-full"))
    return (
        f"{row['phase']:>6}  echo {e:7.1f}  bare {b:7.1f}  switch-echo {se:7.1f}  "
        f"switch-full {sf:8.1f} us/msg | full/bare {sf / b:5.2f}  (net of driver "
        f"{(sf - e) / max(b - e, 1e-9):5.2f})  switch-echo/echo {se / e:5.2f} | collector "
        f"{row['switch-full/gc%']:.1f} % of switch-full, longest pause "
        f"{row['switch-full/gc_longest_ms']:.2f} ms"
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.layers", description=__doc__[:80])
    p.add_argument("--count", type=int, default=3000, help="messages per measurement")
    p.add_argument("--reps", type=int, default=3, help="repetitions of every target, in turn")
    p.add_argument("--phases", default="32x1,1x8,1x64", help="connections x window, comma list")
    p.add_argument("--mix", default="full", help="mix of the full-path phases (benchmarks/mixes)")
    p.add_argument("--cpu", type=int, default=None, help="pin this process to one CPU")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning"))
    p.add_argument("--only", default="", help=f"comma list of targets among {', '.join(TARGETS)}")
    p.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    p.add_argument(
        "--no-freeze",
        action="store_true",
        help="leave the startup heap to the collector (serve freezes it once bound)",
    )
    a = p.parse_args(argv)
    if a.cpu is not None:
        os.sched_setaffinity(0, {a.cpu})
    phases = []
    for item in a.phases.split(","):
        c, w = item.split("x")
        phases.append(Phase(item, a.mix, int(c), int(w)))
    with tempfile.TemporaryDirectory(prefix="cardswitch-layers-") as tmp:
        work = Path(tmp)
        config = write_config(work, a.log_level)
        _seed(config, load_cards(work), work)
        cfg = load_config(config)
        with open(os.devnull, "w") as sink:
            configure_logging(cfg.log.level, cfg.log.format, stream=sink)
            only = frozenset(x for x in a.only.split(",") if x)
            run = partial(_run, freeze=not a.no_freeze)
            rows, collection = trio.run(run, cfg, phases, a.count, a.reps, only)
    if a.out is not None:
        report = {"machine": machine_info(), "rows": rows, "full_collection": collection}
        a.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
