"""Load test of the whole switch: authorizations against the echo-only baseline, on one core.

What lives here: a load generator and its report, run as ``python -m benchmarks.load`` from the
repository root. It seeds a throw-away directory with ``cardswitch dev-setup`` (dev PKI, a
SoftHSM token with the public demo keys, one load card), starts the switch as a real process
(``python -m switch serve``) pinned to one core with ``taskset``, pins itself to another core,
and drives the same connections with the same number of requests in two modes at each
concurrency level:

- ``echo``: 0800 echo (DE70 301), answered by the server itself: TLS, framing, codec, writer;
- ``auth``: 0100 with track 2 (and optionally a PIN block), the full path: TLS, codec,
  pipeline, card lookup (HMAC fingerprint in the HSM), CVV (and PVV) on SoftHSM through
  PKCS#11, spend rules, funds, SQLite group commit (WAL, synchronous=FULL), answer.

Latency is taken per request on the client (``trio.current_time`` around ``Client.request``),
server CPU time from ``/proc/PID/stat`` (all threads of the switch), client CPU time from
``time.process_time``. Warm-up requests are excluded; errors and every response code are
counted and reported. It writes ``<name>.md`` and ``<name>.json`` to ``--out`` (default
``benchmarks/reports``). With ``--py-spy PATH`` it also samples the switch with py-spy during
one extra authorization phase and reports where the time goes per authorization.

What does not: assertions (tests/ verify correctness; tests/test_benchmarks_smoke.py only
checks that the harness runs and its counts add up), switch code (it only drives it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import trio

from benchmarks.procstat import (
    busy_share,
    core_ticks,
    cpu_seconds,
    cpu_times,
    machine_info,
    pin_command,
)
from hsm.config import HsmConfig
from switch import testing
from switch.acquirer import build_auth, encipher_pin, transmission_time
from switch.client import Client, ClientError
from switch.config import Config, ListenerConfig, LogConfig, MetricsConfig, StoreConfig, TlsConfig
from switch.pki import pki_paths
from switch.provision import load_keys
from switch.tls import client_context
from switch.wire.messages import AuthResponse, Message, NetworkRequest, NetworkResponse, Track2

Mode = Literal["echo", "auth"]
#: The modes of each level, in the order they run: the baseline first.
MODES: tuple[Mode, ...] = ("echo", "auth")

#: The repository root (the switch is started with it as working directory).
REPO = Path(__file__).resolve().parents[1]
#: Where reports go unless ``--out`` says otherwise.
REPORT_DIR = Path(__file__).resolve().parent / "reports"
#: Public demo keys (published test vectors) imported into the throw-away token.
DEMO_KEYS = REPO / "config" / "demo" / "keys.json"
#: The demo card of the Visa CVV test vector: expiry 8701 and service code 101 give CVV 561.
LOAD_PAN = "4123456789012345"
LOAD_EXPIRY = "8701"
LOAD_SERVICE_CODE = "101"
LOAD_CVV = "561"
#: Its PIN (PVV method, PVKI 1 under demo-pvk), sent in DE52 with ``--pin``.
LOAD_PIN = "1234"
LOAD_PVKI = "1"
#: Track 2 discretionary data: PVKI (1) PVV (4, not checked: the store holds the PVV) CVV (3).
LOAD_DISCRETIONARY = LOAD_PVKI + "0000" + LOAD_CVV
#: DE22: magnetic stripe read in full, so the track-2 CVV (not the iCVV) is verified.
LOAD_POS_ENTRY_MODE = "901"
#: Minor units per authorization and the balance of the load account (no decline for funds;
#: below 10**12 because DE54 carries the available balance in 12 digits).
LOAD_AMOUNT = 100
LOAD_BALANCE = 10**11
#: HSM label of the zone PIN key of the listener (one of the demo keys).
ZPK_LABEL = "demo-zpk"
#: Largest STAN (DE11 is six digits); STANs count up from 1 and wrap past it.
MAX_STAN = 999_999
#: Seconds one request may take before it counts as a timeout.
REQUEST_TIMEOUT = 10.0
#: Seconds the switch may take to start (token open, store open, listener bound).
START_TIMEOUT = 30.0
#: Seconds the switch may take to drain and exit after SIGTERM.
STOP_TIMEOUT = 20.0
#: Seconds dev-setup may take.
SETUP_TIMEOUT = 60.0
#: Client CPU share of wall time above which a phase is flagged as client-bound.
CLIENT_BOUND_SHARE = 0.9
#: Share of the switch's core used by other processes above which a phase gets a note.
OTHERS_NOTE_SHARE = 0.1
#: Samples per second asked of py-spy.
PY_SPY_RATE = 200
#: Frames shown per profile table.
PROFILE_TOP = 12


@dataclass(frozen=True)
class LoadOptions:
    """One run of the harness (the command-line options as data)."""

    #: In-flight requests per phase, one phase pair (echo, auth) per level.
    levels: tuple[int, ...] = (1, 8, 64)
    #: Requests per phase (the same in both modes); a phase also stops at ``phase_timeout``.
    requests: int = 3000
    #: Untimed requests per mode before the measured phases.
    warmup: int = 200
    #: TLS connections opened once and shared by every phase.
    connections: int = 4
    #: Seconds a phase may run before it stops issuing requests (it is then marked truncated).
    phase_timeout: float = 60.0
    #: Send a PIN block (DE52) as well, so the PIN translation and PVV check run in the HSM.
    pin: bool = False
    #: Force the switch's PKCS#11 calls into a worker thread (true) or onto the event loop
    #: (false); None leaves the switch's configuration default.
    hsm_offload: bool | None = None
    #: CPUs for the switch and for this generator; None leaves affinity alone.
    server_cpu: int | None = 0
    client_cpu: int | None = 1
    #: Log level of the switch (its logs go to a file in the work directory).
    log_level: str = "info"
    #: Where the reports go and their base name.
    out: Path = REPORT_DIR
    name: str = "load"
    #: Keep the throw-away directory here instead of a temporary one (it is not removed).
    work_dir: Path | None = None
    #: py-spy executable; when set, one extra auth phase is profiled.
    py_spy: Path | None = None
    #: Concurrency and requests of the profiled phase.
    profile_level: int = 8
    profile_requests: int = 4000


@dataclass(frozen=True)
class Latency:
    """Client-side latency of the answered requests of one phase, milliseconds."""

    p50: float
    p90: float
    p99: float
    max: float
    mean: float


@dataclass(frozen=True)
class PhaseResult:
    """The measured figures of one mode at one concurrency level."""

    mode: Mode
    level: int
    connections: int
    planned: int
    #: Requests sent (planned unless the phase was truncated by time).
    sent: int
    #: Requests answered with a matching response.
    answered: int
    #: Requests with no answer, by cause (timeout, closed, unexpected).
    errors: dict[str, int]
    #: DE39 of the answered requests.
    codes: dict[str, int]
    elapsed_s: float
    per_second: float
    latency_ms: Latency | None
    server_cpu_ms: float
    #: The system (kernel) part of ``server_cpu_ms``.
    server_sys_ms: float
    client_cpu_ms: float
    #: Busy share of the switch's CPU over the phase, by the switch and anything else the
    #: kernel ran there (other processes on a shared machine); NaN when unpinned.
    server_core_busy: float
    #: The same for the generator's CPU.
    client_core_busy: float
    truncated: bool

    @property
    def server_cpu_ms_per_request(self) -> float:
        return self.server_cpu_ms / self.answered if self.answered else math.nan

    @property
    def server_cpu_share(self) -> float:
        return self.server_cpu_ms / 1000 / self.elapsed_s if self.elapsed_s else math.nan

    @property
    def client_cpu_share(self) -> float:
        return self.client_cpu_ms / 1000 / self.elapsed_s if self.elapsed_s else math.nan


@dataclass(frozen=True)
class ProfileEntry:
    """One frame of the sampled profile: its share of samples and its cost per request."""

    frame: str
    samples: int
    share: float
    ms_per_request: float


@dataclass(frozen=True)
class ProfileResult:
    requests: int
    level: int
    samples: int
    rate: int
    #: Frames where the samples were taken (leaf), most first.
    self_top: list[ProfileEntry]
    #: Frames of this repository's code (switch/, hsm/) by inclusive samples, most first.
    inclusive_top: list[ProfileEntry]
    #: Samples by coarse category (HSM, store, TLS, codec, log, ...).
    categories: list[ProfileEntry]
    #: CPU of the switch per request (all threads, /proc) in the sampled phase, to set the
    #: GIL-held samples against.
    server_cpu_ms_per_request: float


@dataclass(frozen=True)
class LoadReport:
    machine: dict[str, Any]
    settings: dict[str, Any]
    command: str
    phases: list[PhaseResult]
    server_exit: int | None
    profile: ProfileResult | None = None
    notes: list[str] = field(default_factory=list)

    def ratios(self) -> list[dict[str, Any]]:
        """Auth against echo at each level: throughput, latency and CPU per request."""
        out = []
        for level in self.settings["levels"]:
            pair = {p.mode: p for p in self.phases if p.level == level}
            echo, auth = pair.get("echo"), pair.get("auth")
            if echo is None or auth is None:
                continue
            row: dict[str, Any] = {"level": level}
            row["throughput"] = _ratio(auth.per_second, echo.per_second)
            if auth.latency_ms and echo.latency_ms:
                row["p50"] = _ratio(auth.latency_ms.p50, echo.latency_ms.p50)
                row["p99"] = _ratio(auth.latency_ms.p99, echo.latency_ms.p99)
            row["server_cpu_per_request"] = _ratio(
                auth.server_cpu_ms_per_request, echo.server_cpu_ms_per_request
            )
            # Derived, not measured: requests per second if the switch had its core to itself
            # and only its own CPU time per request limited it.
            row["cpu_capacity_auth"] = _ratio(1000, auth.server_cpu_ms_per_request)
            row["cpu_capacity_echo"] = _ratio(1000, echo.server_cpu_ms_per_request)
            out.append(row)
        return out


def _ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


# -- the switch process ---------------------------------------------------------------------


def _write_config(work: Path, log_level: str, hsm_offload: bool | None = None) -> Path:
    """A switch configuration whose every file lives under ``work``; port 0, metrics off."""
    pki = pki_paths(work / "pki")
    hsm = HsmConfig(softhsm_conf=work / "softhsm" / "softhsm2.conf")
    if hsm_offload is not None:
        hsm = dataclasses.replace(hsm, offload=hsm_offload)
    cfg = Config(
        listeners=(ListenerConfig(host="127.0.0.1", port=0, zpk=ZPK_LABEL),),
        tls=TlsConfig(ca=pki.ca, cert=pki.server_cert, key=pki.server_key),
        hsm=hsm,
        store=StoreConfig(path=work / "cardswitch.db"),
        metrics=MetricsConfig(port=0),
        log=LogConfig(level=log_level, format="json"),  # type: ignore[arg-type]
    )
    return testing.write_config(cfg, work / "switch.toml")


def _write_cards(work: Path) -> Path:
    """The load card: the CVV vector card on its own account, big balance, no spend limits."""
    card = {
        "pan": LOAD_PAN,
        "expiry": LOAD_EXPIRY,
        "service_code": LOAD_SERVICE_CODE,
        "account": "load-account",
        "currency": "978",
        "balance": LOAD_BALANCE,
        "status": "active",
        "cvk": "demo-cvk",
        "pvk": "demo-pvk",
        "pvki": LOAD_PVKI,
        "pin": LOAD_PIN,
    }
    path = work / "cards.json"
    path.write_text(json.dumps({"cards": [card]}))
    return path


def _seed(config: Path, cards: Path, work: Path) -> None:
    """``cardswitch dev-setup`` into the work directory.

    Raises:
        RuntimeError: dev-setup failed (its output is in ``work/dev-setup.log``).
    """
    log_path = work / "dev-setup.log"
    cmd = [sys.executable, "-m", "switch", "dev-setup", "--config", str(config)]
    cmd += ["--cards", str(cards), "--keys", str(DEMO_KEYS)]
    with log_path.open("wb") as log_file:
        done = subprocess.run(
            cmd,
            cwd=REPO,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            timeout=SETUP_TIMEOUT,
            check=False,
        )
    if done.returncode != 0:
        raise RuntimeError(f"dev-setup exited {done.returncode}, see {log_path}")


async def _serve_and_drive(
    config: Path, work: Path, opts: LoadOptions, pin_block: bytes | None
) -> tuple[list[PhaseResult], ProfileResult | None, int | None]:
    """Start the switch (log in ``work/switch.log``), drive it, stop it with SIGTERM.

    Returns the phases, the profile and the switch's exit status (None: it had to be killed).
    """
    ready = work / "ready.json"
    log_path = work / "switch.log"
    command = testing.serve_command(config, ready, prefix=pin_command(opts.server_cpu))
    with log_path.open("wb") as log_file:
        try:
            switch = await testing.start_switch(
                config,
                ready,
                command=command,
                cwd=REPO,
                output=log_file,
                ready_within=START_TIMEOUT,
            )
        except testing.SwitchStartError as exc:
            raise RuntimeError(f"{exc}, see {log_path}") from None
        try:
            phases, profile = await _drive(switch.port, work, opts, switch.ready.pid, pin_block)
        finally:
            with trio.CancelScope(shield=True):
                server_exit = await switch.stop(STOP_TIMEOUT)
    return phases, profile, server_exit


# -- the load -------------------------------------------------------------------------------


class _Requests:
    """Builds the requests of a run: unique STANs and RRNs, one terminal per connection."""

    def __init__(self, pin_block: bytes | None) -> None:
        self._stan = 0
        self._pin_block = pin_block
        self._track2 = Track2(
            pan=LOAD_PAN,
            expiry=LOAD_EXPIRY,
            service_code=LOAD_SERVICE_CODE,
            discretionary=LOAD_DISCRETIONARY,
        )

    def _next_stan(self) -> str:
        self._stan = self._stan % MAX_STAN + 1
        return f"{self._stan:06d}"

    def build(self, mode: Mode, connection: int) -> Message:
        stan = self._next_stan()
        when = transmission_time()
        if mode == "echo":
            return NetworkRequest(mti="0800", transmission_time=when, stan=stan, code="301")
        return build_auth(
            LOAD_PAN,
            LOAD_AMOUNT,
            stan=stan,
            when=when,
            terminal=f"LOAD{connection:04d}",
            rrn=f"{when[:4]}{stan}{connection % 100:02d}",
            track2=self._track2,
            pos_entry_mode=LOAD_POS_ENTRY_MODE,
            pin_block=self._pin_block,
        )


@dataclass
class _Tally:
    latencies: list[float] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    sent: int = 0


async def _phase(
    clients: Sequence[Client],
    requests: _Requests,
    *,
    mode: Mode,
    level: int,
    count: int,
    issue_for: float,
) -> tuple[_Tally, float, bool]:
    """Keep ``level`` requests in flight over ``clients`` until ``count`` were sent.

    Returns:
        The tally, the elapsed seconds and whether the time limit stopped the phase.
    """
    tally = _Tally()
    expected = NetworkResponse if mode == "echo" else AuthResponse
    start = trio.current_time()
    stop_issuing = start + issue_for

    async def worker(index: int) -> None:
        connection = index % len(clients)
        client = clients[connection]
        while tally.sent < count and trio.current_time() < stop_issuing:
            tally.sent += 1
            message = requests.build(mode, connection)
            t0 = trio.current_time()
            with trio.move_on_after(REQUEST_TIMEOUT) as scope:
                try:
                    answer = await client.request(message)
                except ClientError:
                    tally.errors[f"closed: {client.closed_reason}"] += 1
                    if client.closed:
                        return  # this worker's connection is gone; the others go on
                    continue
            if scope.cancelled_caught:
                tally.errors["timeout"] += 1
                continue
            elapsed = trio.current_time() - t0
            if not isinstance(answer, expected):
                tally.errors["unexpected:" + type(answer).__name__] += 1
                continue
            tally.latencies.append(elapsed)
            tally.codes[answer.response_code] += 1

    async with trio.open_nursery() as nursery:
        for i in range(level):
            nursery.start_soon(worker, i)
    elapsed = trio.current_time() - start
    return tally, elapsed, tally.sent < count and trio.current_time() >= stop_issuing


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _latency(values: list[float]) -> Latency | None:
    if not values:
        return None
    ms = sorted(v * 1000 for v in values)
    return Latency(
        p50=percentile(ms, 50),
        p90=percentile(ms, 90),
        p99=percentile(ms, 99),
        max=ms[-1],
        mean=sum(ms) / len(ms),
    )


async def _measured(
    clients: Sequence[Client],
    requests: _Requests,
    *,
    mode: Mode,
    level: int,
    opts: LoadOptions,
    pid: int,
) -> PhaseResult:
    (user0, sys0), own0 = cpu_times(pid), time.process_time()
    core0, client0 = core_ticks(opts.server_cpu), core_ticks(opts.client_cpu)
    tally, elapsed, truncated = await _phase(
        clients,
        requests,
        mode=mode,
        level=level,
        count=opts.requests,
        issue_for=opts.phase_timeout,
    )
    (user1, sys1), own1 = cpu_times(pid), time.process_time()
    core1, client1 = core_ticks(opts.server_cpu), core_ticks(opts.client_cpu)
    answered = sum(tally.codes.values())
    return PhaseResult(
        mode=mode,
        level=level,
        connections=min(level, len(clients)),
        planned=opts.requests,
        sent=tally.sent,
        answered=answered,
        errors=dict(tally.errors),
        codes=dict(sorted(tally.codes.items())),
        elapsed_s=elapsed,
        per_second=answered / elapsed if elapsed else math.nan,
        latency_ms=_latency(tally.latencies),
        server_cpu_ms=(user1 + sys1 - user0 - sys0) * 1000,
        server_sys_ms=(sys1 - sys0) * 1000,
        client_cpu_ms=(own1 - own0) * 1000,
        server_core_busy=busy_share(core0, core1),
        client_core_busy=busy_share(client0, client1),
        truncated=truncated,
    )


async def _drive(
    port: int, work: Path, opts: LoadOptions, pid: int, pin_block: bytes | None
) -> tuple[list[PhaseResult], ProfileResult | None]:
    pki = pki_paths(work / "pki")
    ctx = client_context(pki.ca, pki.client_cert, pki.client_key)
    requests = _Requests(pin_block)
    results: list[PhaseResult] = []
    profile = None
    async with _connections(port, ctx, opts.connections) as clients:
        warm_level = min(8, max(opts.levels))
        for mode in MODES:
            await _phase(
                clients,
                requests,
                mode=mode,
                level=warm_level,
                count=opts.warmup,
                issue_for=opts.phase_timeout,
            )
        for level in opts.levels:
            for mode in MODES:
                result = await _measured(
                    clients, requests, mode=mode, level=level, opts=opts, pid=pid
                )
                results.append(result)
                print(_progress(result), file=sys.stderr)
        if opts.py_spy is not None:
            profile = await _profiled(clients, requests, opts, pid, work)
    return results, profile


@asynccontextmanager
async def _connections(port: int, ctx: ssl.SSLContext, n: int) -> AsyncIterator[list[Client]]:
    """Open ``n`` clients on the switch and keep them open for the block."""
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(Client.connect("127.0.0.1", port, ctx))
            for _ in range(n)
        ]
        yield clients


def _progress(r: PhaseResult) -> str:
    lat = r.latency_ms
    p50 = f"{lat.p50:.2f}" if lat else "-"
    p99 = f"{lat.p99:.2f}" if lat else "-"
    errors = sum(r.errors.values())
    return (
        f"{r.mode:>4} level {r.level:>3}: {r.answered}/{r.sent} answered, {errors} errors, "
        f"{r.per_second:.0f}/s, p50 {p50} ms, p99 {p99} ms, "
        f"server CPU {r.server_cpu_ms_per_request:.2f} ms/req, codes {r.codes}"
    )


# -- profiling ------------------------------------------------------------------------------


async def _profiled(
    clients: Sequence[Client], requests: _Requests, opts: LoadOptions, pid: int, work: Path
) -> ProfileResult:
    """One more auth phase with py-spy attached to the switch; its collapsed stacks summed."""
    assert opts.py_spy is not None
    raw = work / "py-spy.txt"
    cmd = [str(opts.py_spy), "record", "--pid", str(pid), "--format", "raw"]
    # --gil: only samples of the thread holding the GIL, i.e. where the interpreter spends
    # CPU (py-spy's idle detection misreads threads parked on locks as busy). Work done with
    # the GIL released (fdatasync, SQLite, SoftHSM if it releases it) is not in these samples.
    cmd += ["--rate", str(PY_SPY_RATE), "--output", str(raw), "--gil"]
    spy = await trio.lowlevel.open_process(
        cmd, stdout=subprocess.DEVNULL, stderr=(work / "py-spy.log").open("wb")
    )
    await trio.sleep(1.0)  # py-spy attaches and starts sampling
    if spy.poll() is not None:
        raise RuntimeError(f"py-spy exited {spy.returncode}, see {work / 'py-spy.log'}")
    cpu0 = cpu_seconds(pid)
    tally, _elapsed, _truncated = await _phase(
        clients,
        requests,
        mode="auth",
        level=opts.profile_level,
        count=opts.profile_requests,
        issue_for=opts.phase_timeout,
    )
    cpu_ms = (cpu_seconds(pid) - cpu0) * 1000
    spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
    with trio.fail_after(30):
        await spy.wait()
    answered = sum(tally.codes.values())
    per_request = cpu_ms / answered if answered else math.nan
    return summarize_profile(raw.read_text(), answered, opts.profile_level, per_request)


#: Coarse categories of profile frames: a sample goes to the innermost frame that matches one
#: (trio's own frames are looked through, so a thread hop is charged to its caller's step).
_CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("HSM commands (PKCS#11 on SoftHSM, with thread hop)", ("(hsm/", "(pkcs11/")),
    ("store (SQLite, with thread hop and group commit)", ("(switch/store/", "sqlite3")),
    ("TLS (ssl module)", ("(ssl.py)",)),
    ("logging (structlog)", ("(structlog/", "(switch/log.py)", "(logging/")),
    ("metrics (prometheus_client)", ("(prometheus_client/", "(switch/metrics.py)")),
    ("codec (pyiso8583 and typed messages)", ("(iso8583/", "(switch/wire/")),
    ("pipeline steps and decisions", ("(switch/pipeline.py)", "(switch/decisions.py)")),
    ("server connection loop", ("(switch/server.py)",)),
)
#: Frames every sample of the main thread passes through (start-up of the process).
_ROOT_FRAMES = ("(switch/__main__.py)", "_cmd_serve (switch/app.py)")
#: Samples in trio frames only (run loop, epoll, scheduling, thread cache).
_TRIO_CATEGORY = "trio run loop and scheduling"


def _frames(stack: str) -> list[str]:
    """The Python frames of one py-spy raw stack (process and thread entries dropped)."""
    return [
        f
        for f in stack.split(";")
        if f and not f.startswith("process ") and not f.startswith("thread ")
    ]


def _short(frame: str) -> str:
    """``func (path:line)`` -> ``func (path)`` with the path cut to its package part."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            if marker == "/lib/python3":
                path = path.split("/", 1)[-1]
    return f"{name} ({path})"


def summarize_profile(
    raw: str, requests: int, level: int, server_cpu_ms_per_request: float = math.nan
) -> ProfileResult:
    """Sum py-spy ``--format raw`` collapsed stacks into self, inclusive and category tables.

    Args:
        raw: lines of ``frame;frame;... count``.
        requests: authorizations answered while sampling (the denominator per request).
        level: the in-flight level of the sampled phase.
        server_cpu_ms_per_request: CPU of the switch per request in the sampled phase.
    """
    self_counts: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    categories: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in _frames(stack)]
        if not frames:
            continue
        total += count
        self_counts[frames[-1]] += count
        for f in set(frames):
            if ("(switch/" in f or "(hsm/" in f) and not f.endswith(_ROOT_FRAMES):
                inclusive[f] += count
        categories[_category(frames)] += count

    def entries(counter: Counter[str], top: int) -> list[ProfileEntry]:
        return [
            ProfileEntry(
                frame=f,
                samples=n,
                share=n / total if total else math.nan,
                ms_per_request=n / PY_SPY_RATE * 1000 / requests if requests else math.nan,
            )
            for f, n in counter.most_common(top)
        ]

    return ProfileResult(
        requests=requests,
        level=level,
        samples=total,
        rate=PY_SPY_RATE,
        self_top=entries(self_counts, PROFILE_TOP),
        inclusive_top=entries(inclusive, PROFILE_TOP),
        categories=entries(categories, len(_CATEGORIES) + 2),
        server_cpu_ms_per_request=server_cpu_ms_per_request,
    )


def _category(frames: list[str]) -> str:
    """The category of the innermost frame that has one, trio's frames looked through."""
    for frame in reversed(frames):
        if "(trio/" in frame or "(outcome/" in frame:
            continue
        for name, needles in _CATEGORIES:
            if any(n in frame for n in needles):
                return name
    if any("(trio/" in f for f in frames):
        return _TRIO_CATEGORY
    return "other"


# -- the report -----------------------------------------------------------------------------


def _notes(report: LoadReport) -> list[str]:
    notes = []
    for p in report.phases:
        tag = f"{p.mode} at level {p.level}"
        if p.truncated:
            notes.append(f"{tag}: stopped by the time limit after {p.sent} of {p.planned}")
        if p.errors:
            notes.append(f"{tag}: errors {p.errors}")
        if p.mode == "auth" and set(p.codes) - {"00"}:
            notes.append(f"{tag}: non-approvals in the mix {p.codes}")
        others = p.server_core_busy - p.server_cpu_share
        if others > OTHERS_NOTE_SHARE:
            notes.append(
                f"{tag}: other processes used about {others:.0%} of the switch's core "
                "(shared machine): throughput and tail latency are lower than alone"
            )
        client_others = p.client_core_busy - p.client_cpu_share
        if client_others > OTHERS_NOTE_SHARE:
            notes.append(
                f"{tag}: other processes used about {client_others:.0%} of the load "
                "generator's core (shared machine)"
            )
        if p.client_cpu_share > CLIENT_BOUND_SHARE:
            notes.append(
                f"{tag}: load generator used {p.client_cpu_share:.0%} of its core: "
                "the client may be the bottleneck"
            )
    if report.server_exit not in (0, None):
        notes.append(f"switch exited {report.server_exit} after SIGTERM")
    if report.server_exit is None:
        notes.append("switch did not exit within the drain deadline and was killed")
    return notes


def to_json(report: LoadReport) -> dict[str, Any]:
    data: dict[str, Any] = dataclasses.asdict(report)
    for phase, src in zip(data["phases"], report.phases, strict=True):
        phase["server_cpu_ms_per_request"] = src.server_cpu_ms_per_request
        phase["server_cpu_share"] = src.server_cpu_share
        phase["client_cpu_share"] = src.client_cpu_share
    data["ratios"] = report.ratios()
    finite: dict[str, Any] = _finite(data)
    return finite


def _finite(value: Any) -> Any:
    """NaN (nothing to divide) as null, so the JSON stays standard."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _f(value: float, digits: int = 2) -> str:
    return "-" if math.isnan(value) else f"{value:.{digits}f}"


def to_markdown(report: LoadReport) -> str:
    m, s = report.machine, report.settings
    lines = [
        "# Load test: authorizations against the echo-only path",
        "",
        f"Command: `{report.command}`",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}, commit "
        f"`{m['git_commit'][:12]}`{' (dirty tree)' if m['git_dirty'] else ''}, load average "
        f"at start {', '.join(f'{x:.2f}' for x in m['load_average_at_start'])}, {m['when']}.",
        "",
        f"Switch pinned to CPU {s['server_cpu']}, load generator to CPU {s['client_cpu']}; "
        f"{s['connections']} mutual-TLS connections shared by every phase; {s['requests']} "
        f"requests per phase after {s['warmup']} warm-up requests per mode (excluded). "
        f"Auth requests: 0100 with track 2 (CVV checked in SoftHSM), DE22 "
        f"{LOAD_POS_ENTRY_MODE}{', PIN block in DE52 (PVV)' if s['pin'] else ''}; "
        f"switch log level {s['log_level']}.",
        "",
        "| in flight | mode | answered/sent | errors | per s | p50 ms | p90 ms | p99 ms "
        "| max ms | switch CPU ms/req (sys) | switch CPU | its core busy | client CPU "
        "| its core busy | DE39 |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in report.phases:
        lat = p.latency_ms
        nan = math.nan
        codes = ", ".join(f"{c}: {n}" for c, n in p.codes.items())
        lines.append(
            f"| {p.level} | {p.mode} | {p.answered}/{p.sent} | {sum(p.errors.values())} "
            f"| {_f(p.per_second, 0)} | {_f(lat.p50 if lat else nan)} "
            f"| {_f(lat.p90 if lat else nan)} | {_f(lat.p99 if lat else nan)} "
            f"| {_f(lat.max if lat else nan)} | {_f(p.server_cpu_ms_per_request, 3)} "
            f"({_f(p.server_sys_ms / p.answered if p.answered else nan, 3)}) "
            f"| {_f(p.server_cpu_share * 100, 0)}% | {_f(p.server_core_busy * 100, 0)}% "
            f"| {_f(p.client_cpu_share * 100, 0)}% | {_f(p.client_core_busy * 100, 0)}% "
            f"| {codes} |"
        )
    lines += [
        "",
        "Auth relative to echo (auth / echo):",
        "",
        "| in flight | throughput | p50 | p99 | switch CPU per request "
        "| derived: auth/s at 100% of one core | echo/s at 100% of one core |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report.ratios():
        lines.append(
            f"| {r['level']} | {_f(r['throughput'])} | {_f(r.get('p50', math.nan))} "
            f"| {_f(r.get('p99', math.nan))} | {_f(r['server_cpu_per_request'])} "
            f"| {_f(r['cpu_capacity_auth'], 0)} | {_f(r['cpu_capacity_echo'], 0)} |"
        )
    lines += [
        "",
        "The derived columns are 1000 / (switch CPU ms per request): the rate the switch "
        "would reach if its own CPU time were the only limit. On a shared machine the measured "
        "rate is lower when other processes take the switch's core (column 'its core busy' "
        "minus 'switch CPU').",
    ]
    if report.profile is not None:
        lines += _profile_markdown(report.profile)
    lines += ["", "Notes:", ""]
    lines += [f"- {n}" for n in report.notes] or ["- none"]
    return "\n".join(lines) + "\n"


def _profile_markdown(prof: ProfileResult) -> list[str]:
    lines = [
        "",
        f"## Profile: py-spy on the switch, auth at {prof.level} in flight, "
        f"{prof.requests} authorizations, {prof.samples} samples at {prof.rate} Hz",
        "",
        "Samples are taken only from the thread holding the GIL (`py-spy --gil`): they show "
        "where the interpreter spends CPU. Work with the GIL released (fdatasync, SQLite "
        "internals, native code that releases it) is not in them. GIL-held time: "
        f"{_f(prof.samples / prof.rate * 1000 / prof.requests if prof.requests else math.nan, 3)}"
        f" ms per auth; CPU of the switch in that phase (all threads, /proc): "
        f"{_f(prof.server_cpu_ms_per_request, 3)} ms per auth (py-spy pauses the process to "
        "sample, so the phase itself runs slower).",
        "",
    ]
    for title, rows in (
        ("By category (innermost matching frame)", prof.categories),
        ("Self time (leaf frame)", prof.self_top),
        ("Inclusive time of switch/ and hsm/ frames", prof.inclusive_top),
    ):
        lines += [f"{title}:", "", "| frame | share | ms per auth |", "|---|---:|---:|"]
        lines += [f"| `{e.frame}` | {e.share:.1%} | {_f(e.ms_per_request, 3)} |" for e in rows]
        lines.append("")
    return lines


# -- entry point ----------------------------------------------------------------------------


def run(opts: LoadOptions, command: str = "python -m benchmarks.load") -> LoadReport:
    """Seed, start the switch, drive it, stop it, and return the report (not yet written)."""
    machine = machine_info()
    with tempfile.TemporaryDirectory(prefix="cardswitch-load-") as tmp:
        work = opts.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        config = _write_config(work, opts.log_level, opts.hsm_offload)
        _seed(config, _write_cards(work), work)
        pin_block = None
        if opts.pin:
            zpk = next(k for k in load_keys(DEMO_KEYS) if k.label == ZPK_LABEL)
            pin_block = encipher_pin(LOAD_PIN, LOAD_PAN, zpk.clear_hex, 0)
        if opts.client_cpu is not None:
            os.sched_setaffinity(0, {opts.client_cpu})
        phases, profile, server_exit = trio.run(_serve_and_drive, config, work, opts, pin_block)
    settings = dataclasses.asdict(opts)
    settings["levels"] = list(opts.levels)
    for key in ("out", "work_dir", "py_spy"):
        settings[key] = str(settings[key]) if settings[key] is not None else None
    report = LoadReport(machine, settings, command, phases, server_exit, profile)
    return dataclasses.replace(report, notes=_notes(report))


def write(report: LoadReport, out: Path, name: str) -> tuple[Path, Path]:
    """Write ``name.md`` and ``name.json`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / f"{name}.md", out / f"{name}.json"
    md.write_text(to_markdown(report))
    js.write_text(json.dumps(to_json(report), indent=2) + "\n")
    return md, js


def _levels(text: str) -> tuple[int, ...]:
    levels = tuple(int(x) for x in text.split(",") if x.strip())
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("levels are positive integers, e.g. 1,8,64")
    return levels


def parse_args(argv: Sequence[str] | None = None) -> LoadOptions:
    d = LoadOptions()
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.load", description=__doc__.split("\n")[0]
    )
    p.add_argument("--levels", type=_levels, default=d.levels, help="in flight, e.g. 1,8,64")
    p.add_argument("--requests", type=int, default=d.requests, help="requests per phase")
    p.add_argument("--warmup", type=int, default=d.warmup, help="untimed requests per mode")
    p.add_argument("--connections", type=int, default=d.connections)
    p.add_argument("--phase-timeout", type=float, default=d.phase_timeout, help="seconds")
    p.add_argument("--pin", action="store_true", help="send a PIN block too (PVV check)")
    p.add_argument(
        "--hsm-offload",
        choices=["true", "false"],
        default=None,
        help="force the switch's PKCS#11 calls into a worker thread or onto its event loop",
    )
    p.add_argument("--server-cpu", type=int, default=d.server_cpu)
    p.add_argument("--client-cpu", type=int, default=d.client_cpu)
    p.add_argument("--no-pin-cpus", action="store_true", help="leave CPU affinity alone")
    p.add_argument("--log-level", default=d.log_level, choices=["debug", "info", "warning"])
    p.add_argument("--out", type=Path, default=d.out, help="report directory")
    p.add_argument("--name", default=d.name, help="report base name")
    p.add_argument("--work-dir", type=Path, default=None, help="keep the switch files here")
    p.add_argument("--py-spy", type=Path, default=None, help="py-spy binary: profile one phase")
    p.add_argument("--profile-level", type=int, default=d.profile_level)
    p.add_argument("--profile-requests", type=int, default=d.profile_requests)
    a = p.parse_args(argv)
    if a.requests < 1 or a.connections < 1 or a.warmup < 0:
        p.error("--requests and --connections must be at least 1, --warmup at least 0")
    server_cpu, client_cpu = (None, None) if a.no_pin_cpus else (a.server_cpu, a.client_cpu)
    if server_cpu is not None and server_cpu == client_cpu:
        p.error("--server-cpu and --client-cpu must differ (or pass --no-pin-cpus)")
    available = os.sched_getaffinity(0)
    for cpu in (server_cpu, client_cpu):
        if cpu is not None and cpu not in available:
            p.error(f"CPU {cpu} is not available here ({sorted(available)}); see --no-pin-cpus")
    return LoadOptions(
        levels=a.levels,
        requests=a.requests,
        warmup=a.warmup,
        connections=a.connections,
        phase_timeout=a.phase_timeout,
        pin=a.pin,
        hsm_offload=None if a.hsm_offload is None else a.hsm_offload == "true",
        server_cpu=server_cpu,
        client_cpu=client_cpu,
        log_level=a.log_level,
        out=a.out,
        name=a.name,
        work_dir=a.work_dir,
        py_spy=a.py_spy,
        profile_level=a.profile_level,
        profile_requests=a.profile_requests,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    opts = parse_args(args)
    command = " ".join(["python -m benchmarks.load", *args])
    report = run(opts, command)
    md, js = write(report, opts.out, opts.name)
    print(to_markdown(report))
    print(f"wrote {md} and {js}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
