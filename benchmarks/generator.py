"""The load generator: any ISO 8583 target, open loop or closed loop, HDR latencies.

What lives here:

- ``Target``: host, port, TLS files (or none: plain TCP), the length header, the wire spec,
  and optionally the target's pid (its CPU per message is then read from /proc).
- ``PhaseSpec``: one measured phase. ``open`` loop: requests are sent at the instants of an
  arrival schedule (``constant`` or ``poisson``, ``benchmarks.schedule``) at ``rate`` per
  second, spread round-robin over the connections, whether or not earlier answers came, and
  each latency is measured from the request's SCHEDULED send time, so a queue anywhere (the
  target, the network, this generator falling behind) shows in the figures instead of being
  hidden by sending less (coordinated omission). ``closed`` loop: ``connections`` x
  ``window`` requests kept in flight; latency from the actual send.
- ``run_phase`` over ``Target`` (or ``run_on_streams`` over any trio streams, which the unit
  tests use with a virtual clock): warm-up, then the measured window: sent, answered, DE39
  counts, errors and timeouts, HDR latency (p50/p90/p99/p99.9/max), the send lag behind the
  schedule, the target's and the generator's own CPU per message.
- ``PhaseResult`` with ``to_json``/``from_json`` (the HDR histogram travels in the JSON),
  ``table`` (Markdown), and the command line (``python -m benchmarks.generator``, also
  ``cardswitch bench``): one phase or a sweep of open-loop rates, a one-line progress
  display, JSON results, a table, and a PNG of the percentiles against the offered rate.

Answers are matched to requests by STAN per connection (the mix gives every request its own).
An answer without DE39 (the echo baseline returns the request) counts under code ``-``.

What does not: start targets (results.py, baselines.py), build messages (scenarios.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import ssl
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import iso8583
import trio

from benchmarks import schedule
from benchmarks.histogram import LatencyHistogram, LatencySummary
from benchmarks.procstat import cpu_seconds
from benchmarks.scenarios import Mix, MixError, load_mix
from switch.wire.framing import FrameDecoder, FramingError, HeaderKind, encode_frame
from switch.wire.spec import SpecChoice, SpecKind, shared_spec, wire_spec

Mode = Literal["open", "closed"]
#: Bytes asked of a stream per read.
RECEIVE_SIZE = 65536
#: Largest answer frame accepted.
MAX_FRAME = 65535
#: Seconds between two looks for requests past their timeout.
SWEEP_INTERVAL = 0.25
#: Seconds between the start of an open-loop phase and its first scheduled send.
LEAD_IN = 0.05
#: Seconds between two refreshes of the progress line.
PROGRESS_INTERVAL = 0.5
#: Seconds a connection (TCP connect and TLS handshake) may take.
CONNECT_TIMEOUT = 10.0
#: The code counted for an answer without DE39.
NO_CODE = "-"


@dataclass(frozen=True)
class Target:
    """Where the load goes and how it is framed."""

    host: str = "127.0.0.1"
    port: int = 8583
    #: CA bundle the server certificate must chain to; None: plain TCP (no TLS at all).
    ca: Path | None = None
    #: Client certificate and key for mutual TLS (both or neither).
    cert: Path | None = None
    key: Path | None = None
    #: Name checked against the server certificate (default: ``host``).
    server_hostname: str | None = None
    header: HeaderKind = "binary2"
    spec: SpecKind = "ascii"
    #: ISO 9564 format of the PIN blocks (4: 16-byte DE52).
    pin_block_format: int = 0
    #: The target's process id, to read its CPU time (None: not measured).
    pid: int | None = None

    @property
    def wire(self) -> SpecChoice:
        return wire_spec(self.spec, pin_block_format=self.pin_block_format)

    def ssl_context(self) -> ssl.SSLContext | None:
        if self.ca is None:
            return None
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if self.cert is not None and self.key is not None:
            ctx.load_cert_chain(str(self.cert), str(self.key))
        return ctx


@dataclass(frozen=True)
class PhaseSpec:
    """One measured phase."""

    name: str
    mode: Mode = "closed"
    connections: int = 1
    #: Closed loop: requests in flight per connection.
    window: int = 1
    #: Open loop: requests per second and the arrival process.
    rate: float = 0.0
    arrival: schedule.ArrivalKind = "poisson"
    seed: int = 0
    #: Seconds measured; closed loop may also stop at ``max_requests``.
    duration: float = 3.0
    max_requests: int | None = None
    #: Seconds of closed-loop traffic on the same connections before the measurement.
    warmup: float = 0.5
    warmup_window: int = 8
    #: Seconds after its scheduled send an answer may come; later, it is a timeout.
    timeout: float = 10.0
    #: The target's latency budget (seconds), if known: answers later than it are tallied
    #: by DE39 in ``PhaseResult.over_budget`` (an approval there is one the network has
    #: already stood in for). Counted from the scheduled send in the open loop.
    budget: float | None = None

    def __post_init__(self) -> None:
        if self.connections < 1 or self.window < 1 or not self.duration > 0:
            raise ValueError("connections, window and duration must be positive")
        if self.mode == "open" and not self.rate > 0:
            raise ValueError("an open-loop phase needs a positive rate")


@dataclass(frozen=True)
class PhaseResult:
    """The measured figures of one phase (``spec`` as given)."""

    spec: PhaseSpec
    target: str
    sent: int
    answered: int
    #: Answers by DE39 (``-``: an answer without DE39).
    codes: dict[str, int]
    #: Requests by scenario.
    scenarios: dict[str, int]
    #: Requests without a timely answer: timeouts, closed connections, bad answers.
    errors: dict[str, int]
    #: Seconds from the first send to the last answer or timeout.
    elapsed: float
    latency: LatencySummary | None
    #: Answers that came after their request was counted as a timeout (not errors again).
    late_answers: int
    #: Open loop: how late sends went out behind their schedule (the generator's own queue).
    send_lag: LatencySummary | None
    target_cpu_ms_per_msg: float
    generator_cpu_ms_per_msg: float
    #: The HDR histogram of the latencies (``LatencyHistogram.encode``).
    histogram: str = ""
    #: Answers later than ``spec.budget`` by DE39 (empty when no budget was given).
    over_budget: dict[str, int] = field(default_factory=dict)

    @property
    def offered_rate(self) -> float:
        """Open loop: the scheduled rate; closed loop: what was sent per second."""
        if self.spec.mode == "open":
            return self.spec.rate
        return self.sent / self.elapsed if self.elapsed else math.nan

    @property
    def rate(self) -> float:
        """Answers per second."""
        return self.answered / self.elapsed if self.elapsed else math.nan

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["offered_rate"] = self.offered_rate
        data["rate"] = self.rate
        out: dict[str, Any] = _finite(data)
        return out

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> PhaseResult:
        """A result from ``to_json`` output (derived keys are recomputed, not read).

        Raises:
            KeyError, TypeError, ValueError: not a result of this version.
        """
        spec_raw = dict(raw["spec"])
        known = {f.name for f in dataclasses.fields(PhaseSpec)}
        spec = PhaseSpec(**{k: v for k, v in spec_raw.items() if k in known})

        def summary(key: str) -> LatencySummary | None:
            value = raw.get(key)
            return LatencySummary.from_json(value) if value else None

        def num(key: str) -> float:
            value = raw.get(key)
            return math.nan if value is None else float(value)

        return cls(
            spec=spec,
            target=str(raw["target"]),
            sent=int(raw["sent"]),
            answered=int(raw["answered"]),
            codes={str(k): int(v) for k, v in raw["codes"].items()},
            scenarios={str(k): int(v) for k, v in raw["scenarios"].items()},
            errors={str(k): int(v) for k, v in raw["errors"].items()},
            late_answers=int(raw.get("late_answers", 0)),
            elapsed=float(raw["elapsed"]),
            latency=summary("latency"),
            send_lag=summary("send_lag"),
            target_cpu_ms_per_msg=num("target_cpu_ms_per_msg"),
            generator_cpu_ms_per_msg=num("generator_cpu_ms_per_msg"),
            histogram=str(raw.get("histogram", "")),
            over_budget={str(k): int(v) for k, v in raw.get("over_budget", {}).items()},
        )


def _finite(value: Any) -> Any:
    """NaN (nothing to divide) as null, so the JSON stays standard."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


# -- one connection -------------------------------------------------------------------------


@dataclass
class _Tally:
    """What the connections of a phase record while it is measured."""

    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    lag: LatencyHistogram = field(default_factory=LatencyHistogram)
    codes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    scenarios: Counter[str] = field(default_factory=Counter)
    #: Answers later than the phase's budget, by DE39.
    over_budget: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    answered: int = 0
    #: Answers to requests already counted as timeouts.
    late: int = 0
    last_event: float = 0.0
    #: False during warm-up: nothing is counted.
    measuring: bool = False


class _Connection:
    """One stream to the target: pending requests by STAN, a reader, sends."""

    def __init__(
        self, stream: trio.abc.Stream, header: HeaderKind, spec: SpecChoice, tally: _Tally
    ) -> None:
        self.stream = stream
        self.header: HeaderKind = header
        self.spec = shared_spec(spec)
        self.tally = tally
        #: STAN -> (scheduled or actual send time, counted in the tally).
        self.pending: dict[str, tuple[float, bool]] = {}
        #: STANs settled as timeouts: their answer, if it still comes, is late, not unmatched.
        self.timed_out: set[str] = set()
        self.window: trio.Semaphore | None = None
        self.closed = False
        self.timeout = 10.0
        self.budget: float | None = None
        self._send_lock = trio.Lock()

    async def send(self, data: bytes) -> None:
        async with self._send_lock:
            await self.stream.send_all(data)

    def frame(self, body: bytes) -> bytes:
        return encode_frame(body, self.header)

    def _settle(self, stan: str, error: str | None, code: str | None) -> None:
        entry = self.pending.pop(stan, None)
        if entry is None:
            return
        sent_at, counted = entry
        now = trio.current_time()
        if counted:
            t = self.tally
            t.last_event = max(t.last_event, now)
            if error is None and now - sent_at > self.timeout:
                error = "timeout"
            if error is None:
                t.answered += 1
                t.codes[code or NO_CODE] += 1
                t.latency.record(now - sent_at)
                if self.budget is not None and now - sent_at > self.budget:
                    t.over_budget[code or NO_CODE] += 1
            else:
                t.errors[error] += 1
        if self.window is not None:
            self.window.release()

    async def read_loop(self) -> None:
        decoder = FrameDecoder(self.header, MAX_FRAME)
        reason = "closed"
        try:
            while True:
                data = await self.stream.receive_some(RECEIVE_SIZE)
                if not data:
                    break
                for body in decoder.feed(bytes(data)):
                    try:
                        doc, _ = iso8583.decode(body, self.spec)
                    except iso8583.DecodeError:
                        self.tally.errors["undecodable answer"] += 1
                        continue
                    stan = doc.get("11")
                    if stan in self.timed_out:
                        self.timed_out.discard(stan)
                        self.tally.late += 1
                        continue
                    if stan is None or stan not in self.pending:
                        self.tally.errors["unmatched answer"] += 1
                        continue
                    self._settle(stan, None, doc.get("39"))
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError) as e:
            reason = f"closed: {type(e).__name__}"
        except FramingError:
            reason = "closed: bad framing"
        finally:
            self.closed = True
            for stan in list(self.pending):
                self._settle(stan, reason, None)

    def sweep(self, now: float) -> None:
        """Settle the requests past their timeout (their answer, if it comes, is unmatched)."""
        late = [s for s, (t, _c) in self.pending.items() if now - t > self.timeout]
        for stan in late:
            self.timed_out.add(stan)
            self._settle(stan, "timeout", None)


@asynccontextmanager
async def _open(target: Target, n: int) -> AsyncIterator[list[trio.abc.Stream]]:
    """``n`` streams to ``target``, opened one after the other (no handshake storm)."""
    ctx = target.ssl_context()
    async with AsyncExitStack() as stack:
        streams: list[trio.abc.Stream] = []
        for _ in range(n):
            with trio.fail_after(CONNECT_TIMEOUT):
                tcp = await trio.open_tcp_stream(target.host, target.port)
                stream: trio.abc.Stream = tcp
                if ctx is not None:
                    tls = trio.SSLStream(
                        tcp, ctx, server_hostname=target.server_hostname or target.host
                    )
                    await tls.do_handshake()
                    stream = tls
            stack.push_async_callback(trio.aclose_forcefully, stream)
            streams.append(stream)
        yield streams


# -- the loops ------------------------------------------------------------------------------


async def _closed_loop(
    conns: Sequence[_Connection], mix: Mix, window: int, until: float, budget: int | None
) -> None:
    sent = 0

    async def sender(conn: _Connection) -> None:
        nonlocal sent
        conn.window = trio.Semaphore(window)
        while not conn.closed and trio.current_time() < until and not mix.exhausted:
            await conn.window.acquire()
            if trio.current_time() >= until or (budget is not None and sent >= budget):
                conn.window.release()
                return
            sent += 1
            req = mix.next()
            now = trio.current_time()
            conn.pending[req.stan] = (now, conn.tally.measuring)
            if conn.tally.measuring:
                conn.tally.sent += 1
                conn.tally.scenarios[req.scenario] += 1
            await conn.send(conn.frame(req.body))

    async with trio.open_nursery() as nursery:
        for conn in conns:
            nursery.start_soon(sender, conn)


async def _open_loop(
    conns: Sequence[_Connection], mix: Mix, offsets: Sequence[float], start: float
) -> None:
    n = len(conns)

    async def sender(index: int, conn: _Connection) -> None:
        mine = offsets[index::n]
        i = 0
        t = conn.tally
        while i < len(mine) and not conn.closed:
            due = start + mine[i]
            now = trio.current_time()
            if now < due:
                await trio.sleep_until(due)
                now = trio.current_time()
            # Everything already due goes out in one write (the generator catching up).
            batch = []
            while i < len(mine) and start + mine[i] <= now and not mix.exhausted:
                scheduled = start + mine[i]
                req = mix.next()
                conn.pending[req.stan] = (scheduled, True)
                t.sent += 1
                t.scenarios[req.scenario] += 1
                t.lag.record(now - scheduled)
                batch.append(conn.frame(req.body))
                i += 1
            if not batch:  # the mix ran out
                return
            await conn.send(b"".join(batch))

    async with trio.open_nursery() as nursery:
        for index, conn in enumerate(conns):
            nursery.start_soon(sender, index, conn)


async def _drain(conns: Sequence[_Connection], deadline: float) -> None:
    """Wait until every pending request is settled or ``deadline`` passes."""
    # Polled: an Event set on every settle would cost more than this 10 ms look.
    while any(c.pending and not c.closed for c in conns) and trio.current_time() < deadline:  # noqa: ASYNC110
        await trio.sleep(min(0.01, SWEEP_INTERVAL))


ProgressFn = Callable[[str], None]


async def run_on_streams(
    streams: Sequence[trio.abc.Stream],
    spec: PhaseSpec,
    mix: Mix,
    *,
    header: HeaderKind = "binary2",
    wire: SpecChoice = "ascii",
    target_name: str = "",
    target_pid: int | None = None,
    progress: ProgressFn | None = None,
) -> PhaseResult:
    """Run one phase (warm-up, then the measurement) over already open ``streams``."""
    tally = _Tally()
    conns = [_Connection(s, header, wire, tally) for s in streams[: spec.connections]]
    for c in conns:
        c.timeout = spec.timeout
        c.budget = spec.budget

    async def sweeper() -> None:
        while True:
            await trio.sleep(SWEEP_INTERVAL)
            now = trio.current_time()
            for c in conns:
                c.sweep(now)

    async def show() -> None:
        assert progress is not None
        t0 = trio.current_time()
        while True:
            await trio.sleep(PROGRESS_INTERVAL)
            progress(_progress_line(spec, tally, trio.current_time() - t0))

    async with trio.open_nursery() as nursery:
        for c in conns:
            nursery.start_soon(c.read_loop)
        nursery.start_soon(sweeper)
        if spec.warmup > 0:
            until = trio.current_time() + spec.warmup
            await _closed_loop(conns, mix, spec.warmup_window, until, None)
            await _drain(conns, trio.current_time() + spec.timeout)
        tally.measuring = True
        if progress is not None:
            nursery.start_soon(show)
        cpu0 = cpu_seconds(target_pid) if target_pid else math.nan
        own0 = time.process_time()
        start = trio.current_time()
        if spec.mode == "closed":
            until = start + spec.duration
            await _closed_loop(conns, mix, spec.window, until, spec.max_requests)
            await _drain(conns, trio.current_time() + spec.timeout)
            first = start
        else:
            offsets = schedule.arrivals(spec.arrival, spec.rate, spec.duration, seed=spec.seed)
            first = start + LEAD_IN
            await _open_loop(conns, mix, offsets, first)
            await _drain(conns, first + spec.duration + spec.timeout + SWEEP_INTERVAL)
        for c in conns:  # what is still pending now has had its whole timeout
            c.sweep(trio.current_time() + spec.timeout + 1)
        end = max(tally.last_event, first)
        own = time.process_time() - own0
        cpu = cpu_seconds(target_pid) - cpu0 if target_pid else math.nan
        nursery.cancel_scope.cancel()
    handled = tally.answered or math.nan
    return PhaseResult(
        spec=spec,
        target=target_name,
        sent=tally.sent,
        answered=tally.answered,
        codes=dict(sorted(tally.codes.items())),
        scenarios=dict(sorted(tally.scenarios.items())),
        errors=dict(sorted(tally.errors.items())),
        late_answers=tally.late,
        elapsed=end - first,
        latency=tally.latency.summary(),
        send_lag=tally.lag.summary(),
        target_cpu_ms_per_msg=cpu * 1000 / handled,
        generator_cpu_ms_per_msg=own * 1000 / (tally.sent or math.nan),
        histogram=tally.latency.encode(),
        over_budget=dict(sorted(tally.over_budget.items())),
    )


async def run_phase(
    target: Target,
    spec: PhaseSpec,
    mix: Mix,
    *,
    name: str = "",
    progress: ProgressFn | None = None,
) -> PhaseResult:
    """Open ``spec.connections`` connections to ``target``, run the phase, close them."""
    async with _open(target, spec.connections) as streams:
        return await run_on_streams(
            streams,
            spec,
            mix,
            header=target.header,
            wire=target.wire,
            target_name=name or f"{target.host}:{target.port}",
            target_pid=target.pid,
            progress=progress,
        )


def _progress_line(spec: PhaseSpec, t: _Tally, elapsed: float) -> str:
    p99 = t.latency.percentile_ms(99)
    rate = t.answered / elapsed if elapsed else 0.0
    return (
        f"{spec.name}: {elapsed:5.1f}/{spec.duration:g} s  sent {t.sent}  answered "
        f"{t.answered}  {rate:,.0f}/s  p99 {p99:.2f} ms  errors {sum(t.errors.values())}"
    )


def terminal_progress(stream: Any = None) -> ProgressFn:
    """A progress callback that rewrites one line of ``stream`` (stderr) in place."""
    out = stream or sys.stderr

    def show(line: str) -> None:
        out.write("\r" + line[:150].ljust(100))
        out.flush()

    return show


# -- reports --------------------------------------------------------------------------------


def _f(value: float | None, digits: int = 2) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.{digits}f}"


TABLE_HEADER = (
    "| phase | target | loop | offered/s | answered/s | sent | errors | p50 ms | p90 ms "
    "| p99 ms | p99.9 ms | max ms | target CPU ms/msg | generator CPU ms/msg | DE39 |"
)


def table(results: Sequence[PhaseResult]) -> str:
    """A Markdown table of ``results``, one row per phase."""
    lines = [
        TABLE_HEADER,
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        s, lat = r.spec, r.latency
        loop = (
            f"open {s.arrival} x{s.connections}"
            if s.mode == "open"
            else f"closed {s.connections}x{s.window}"
        )
        codes = ", ".join(f"{c}: {n}" for c, n in r.codes.items())
        errors = f"{r.error_count}" + (f" ({', '.join(r.errors)})" if r.errors else "")
        lines.append(
            f"| {s.name} | {r.target} | {loop} | {_f(r.offered_rate, 0)} | {_f(r.rate, 0)} "
            f"| {r.sent} | {errors} | {_f(lat.p50 if lat else None)} "
            f"| {_f(lat.p90 if lat else None)} | {_f(lat.p99 if lat else None)} "
            f"| {_f(lat.p999 if lat else None)} | {_f(lat.max if lat else None)} "
            f"| {_f(r.target_cpu_ms_per_msg, 3)} | {_f(r.generator_cpu_ms_per_msg, 3)} "
            f"| {codes} |"
        )
    return "\n".join(lines) + "\n"


def write_json(path: Path, results: Sequence[PhaseResult], extra: dict[str, Any]) -> None:
    """``{"phases": [...], **extra}`` to ``path``."""
    data = {**extra, "phases": [r.to_json() for r in results]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_finite(data), indent=1) + "\n")


def read_json(path: Path) -> list[PhaseResult]:
    """The phases of a results file written by ``write_json``."""
    raw = json.loads(path.read_text())
    return [PhaseResult.from_json(p) for p in raw["phases"]]


# -- command line ---------------------------------------------------------------------------


def _fractions(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError("rates are numbers, e.g. 500,1000,2000") from None
    if not values or min(values) <= 0:
        raise argparse.ArgumentTypeError("rates are positive numbers, e.g. 500,1000,2000")
    return values


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of the generator (``python -m benchmarks.generator``, ``cardswitch bench``)."""
    p.add_argument("--host", default="127.0.0.1", help="target host")
    p.add_argument("--port", type=int, required=True, help="target port")
    p.add_argument("--ca", type=Path, help="CA bundle of the server certificate (no TLS without)")
    p.add_argument("--cert", type=Path, help="client certificate (mutual TLS)")
    p.add_argument("--key", type=Path, help="client key (mutual TLS)")
    p.add_argument("--server-hostname", help="name checked on the server certificate")
    p.add_argument(
        "--header",
        default="binary2",
        choices=["binary2", "ascii4", "bcd2"],
        help="length header of each frame",
    )
    p.add_argument("--spec", default="ascii", choices=["ascii", "binary", "bcd"], help="wire spec")
    p.add_argument("--pin-format", type=int, default=0, help="ISO 9564 PIN block format (0-4)")
    p.add_argument("--mix", default="full", help="mix file (TOML/JSON) or a name in mixes/")
    p.add_argument("--mode", choices=["open", "closed"], default="closed", help="loop")
    p.add_argument("--connections", type=int, default=1, help="connections")
    p.add_argument("--window", type=int, default=1, help="closed loop: in flight per connection")
    p.add_argument("--rate", type=_fractions, help="open loop: rate(s) per second, e.g. 500,1000")
    p.add_argument("--arrival", choices=schedule.ARRIVAL_KINDS, default="poisson", help="arrivals")
    p.add_argument("--duration", type=float, default=5.0, help="seconds measured per phase")
    p.add_argument("--warmup", type=float, default=0.5, help="seconds of warm-up per phase")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds before a timeout")
    p.add_argument(
        "--budget", type=float, help="target's latency budget: count later answers by DE39"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of arrivals and scenario draw")
    p.add_argument("--target-pid", type=int, help="pid of the target: report its CPU per message")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--plot", type=Path, help="open-loop sweep: PNG of percentiles against rate")
    p.add_argument("--quiet", action="store_true", help="no progress line")


def options(a: argparse.Namespace) -> tuple[Target, list[PhaseSpec]]:
    """The target and phases of parsed options.

    Raises:
        ValueError: an inconsistent combination (open loop without rate, ...).
    """
    target = Target(
        host=a.host,
        port=a.port,
        ca=a.ca,
        cert=a.cert,
        key=a.key,
        server_hostname=a.server_hostname,
        header=a.header,
        spec=a.spec,
        pin_block_format=a.pin_format,
        pid=a.target_pid,
    )
    if (a.cert is None) != (a.key is None):
        raise ValueError("--cert and --key go together")
    if a.mode == "open" and not a.rate:
        raise ValueError("--mode open needs --rate")
    common = {
        "connections": a.connections,
        "duration": a.duration,
        "warmup": a.warmup,
        "timeout": a.timeout,
        "budget": a.budget,
        "seed": a.seed,
    }
    if a.mode == "closed":
        return target, [PhaseSpec(f"closed {a.connections}x{a.window}", window=a.window, **common)]
    phases = [
        PhaseSpec(f"open {rate:g}/s", mode="open", rate=rate, arrival=a.arrival, **common)
        for rate in a.rate
    ]
    return target, phases


def run_cli(a: argparse.Namespace) -> int:
    """Run the phases of parsed options; print the table; write JSON and PNG if asked.

    Returns 0, or 1 when a phase had errors (all answers missing counts too).
    """
    target, phases = options(a)
    mix = Mix(load_mix(a.mix), target.wire, seed=a.seed)
    progress = None if a.quiet or not sys.stderr.isatty() else terminal_progress()

    async def main() -> list[PhaseResult]:
        out = []
        for spec in phases:
            result = await run_phase(target, spec, mix, progress=progress)
            if progress is not None:
                sys.stderr.write("\n")
            out.append(result)
        return out

    results = trio.run(main)
    print(table(results), end="")
    if a.json:
        write_json(a.json, results, {"command": " ".join(sys.argv)})
    if a.plot:
        from benchmarks.plot import percentiles_against_rate  # noqa: PLC0415 (matplotlib: bench extra)

        percentiles_against_rate(a.plot, {target.host: results}, "open-loop latency")
    return 1 if any(r.error_count or not r.answered for r in results) else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.generator", description=__doc__.split("\n")[0]
    )
    add_arguments(p)
    a = p.parse_args(argv)
    try:
        return run_cli(a)
    except (ValueError, MixError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
