"""Liveness and readiness of a running switch, and the HTTP port that reports them.

What lives here:

- ``Heartbeat``: a timestamp the trio loop refreshes every ``BEAT_INTERVAL`` s
  (``run_heartbeat``); the HTTP side reads its age, so a loop that is blocked (a stuck
  PKCS#11 call, a CPU-bound bug) shows as a stale heartbeat.
- ``Readiness``: the latest result of each readiness check, written by the probe task on the
  loop and read by the HTTP threads (a lock between them). Checks are small ``Probe`` objects
  (``ListenersProbe``: the listeners are bound and not draining; ``HsmProbe``: the HSM session
  answers a key check value; ``StoreProbe``: the store answers a point read;
  ``BreakerProbe``: a dependency's circuit breaker is closed, else "not ready" with why and
  until when, and the ``cardswitch_breaker_state`` gauge is brought up to date), run by
  ``run_probes`` every ``PROBE_INTERVAL`` s, each under ``PROBE_TIMEOUT``.
- ``HealthServer``: a stdlib ``ThreadingHTTPServer`` on ``[metrics] host/port``, in its own
  daemon thread so it keeps answering (and saying 503) while the loop is blocked. Routes:
  ``/healthz`` (200 while the heartbeat is fresh, else 503), ``/readyz`` (200 when every check
  passed at its last run and the heartbeat is fresh, else 503 with
  ``{"ready": false, "failed": {check: "Error: detail"}}``), ``/status`` (what the loop last
  published: listeners, connections, peers, in-flight, draining, with readiness; read by
  ``cardswitch status``), ``/metrics`` (the Prometheus page
  of ``switch.metrics``); anything else is 404.

A test hook: when the environment names a file in ``CARDSWITCH_TEST_BLOCK_LOOP_FILE`` and that
file appears, the heartbeat task removes it and blocks the loop with ``time.sleep`` for the
number of seconds the file holds (default 5). Without the variable nothing is looked at.

What does not: what the metrics are (switch.metrics), opening the HSM or the store, the
listeners themselves (server.py), process wiring (app.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol
from urllib.parse import urlsplit

import trio

from switch import metrics
from switch.breaker import Breaker, State
from switch.log import get_logger

__all__ = [
    "BLOCK_LOOP_FILE_ENV",
    "BreakerProbe",
    "HealthServer",
    "Heartbeat",
    "HsmProbe",
    "ListenersProbe",
    "NotReady",
    "Probe",
    "Readiness",
    "ReadyState",
    "StoreProbe",
    "block_file_from_env",
    "run_heartbeat",
    "run_probes",
]

log = get_logger("switch.health")

#: Seconds between two heartbeats of the loop.
BEAT_INTERVAL = 0.5
#: Seconds without a heartbeat after which the loop counts as stuck (/healthz says 503). Six
#: beats: far above scheduling noise, and above the 2 s network budget a stuck loop breaks.
STALE_AFTER = 3.0
#: Seconds between the start of two rounds of readiness checks.
PROBE_INTERVAL = 1.0
#: Seconds one readiness check may take before it counts as failed.
PROBE_TIMEOUT = 1.0
#: Environment variable naming the test hook's file (see the module docstring).
BLOCK_LOOP_FILE_ENV = "CARDSWITCH_TEST_BLOCK_LOOP_FILE"
#: Seconds the test hook blocks the loop when its file is empty or unreadable as a number.
_DEFAULT_BLOCK_SECONDS = 5.0
#: Seconds an HTTP client may take to send its request before its connection is dropped.
_HTTP_TIMEOUT = 5.0
#: What a check says before its first run.
_NOT_CHECKED = "NotChecked: no result yet"


# ------------------------------------------------------------------------- liveness


class Heartbeat:
    """When the loop was last seen running; written on the loop, read from any thread.

    Args:
        clock: monotonic seconds (a fake clock in tests).
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._last = clock()

    def beat(self) -> None:
        """Record that the loop is running now."""
        self._last = self._clock()  # one float store: atomic under the GIL

    def age(self) -> float:
        """Seconds since the last beat."""
        return max(0.0, self._clock() - self._last)


def block_file_from_env(environ: Mapping[str, str] = os.environ) -> Path | None:
    """The test hook's file, when ``CARDSWITCH_TEST_BLOCK_LOOP_FILE`` is set."""
    name = environ.get(BLOCK_LOOP_FILE_ENV)
    return Path(name) if name else None


def _block_seconds(path: Path) -> float | None:
    """Seconds to block for when the hook file exists (it is removed), else None."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    with contextlib.suppress(OSError):
        path.unlink()
    try:
        seconds = float(text) if text else _DEFAULT_BLOCK_SECONDS
    except ValueError:
        seconds = _DEFAULT_BLOCK_SECONDS
    return seconds if math.isfinite(seconds) and seconds > 0 else _DEFAULT_BLOCK_SECONDS


async def run_heartbeat(
    heartbeat: Heartbeat, *, interval: float = BEAT_INTERVAL, block_file: Path | None = None
) -> None:
    """Beat every ``interval`` s until cancelled; with ``block_file``, the test hook."""
    while True:
        heartbeat.beat()
        if block_file is not None:
            seconds = _block_seconds(block_file)
            if seconds is not None:
                log.warning("test_hook_blocking_loop", seconds=seconds)
                time.sleep(seconds)  # noqa: ASYNC251 - the point of the hook: block the loop
        await trio.sleep(interval)


# ------------------------------------------------------------------------- readiness


class NotReady(Exception):
    """A check found its component not ready; the message says why (no card data)."""


class Probe(Protocol):
    """One readiness check: ``check`` returns when the component is usable, else raises."""

    @property
    def name(self) -> str:
        """The check's name in ``/readyz`` and in the ``cardswitch_ready_check`` metric."""
        ...

    async def check(self) -> None:
        """Return if ready; raise (any exception) with a one-line reason if not."""
        ...


class ListenerState(Protocol):
    """What ``ListenersProbe`` reads of the server (``switch.server.Server``)."""

    @property
    def bound(self) -> Sequence[tuple[str, str, int]]: ...

    @property
    def draining(self) -> bool: ...


class KeyCheck(Protocol):
    """The HSM command ``HsmProbe`` sends (``hsm.api.KeyAdmin.key_check_value``)."""

    async def key_check_value(self, label: str) -> str: ...


class AccountReader(Protocol):
    """The store read ``StoreProbe`` sends (``switch.store.Store.get_account``)."""

    async def get_account(self, account_id: str) -> Any: ...


@dataclass(frozen=True)
class ListenersProbe:
    """Ready when every configured listener is bound and the server is not draining."""

    server: ListenerState
    expected: frozenset[str]
    name: str = "listeners"

    async def check(self) -> None:
        if self.server.draining:
            raise NotReady("draining: the server stopped accepting")
        missing = self.expected - {name for name, _, _ in self.server.bound}
        if missing:
            raise NotReady(f"not bound: {', '.join(sorted(missing))}")


@dataclass(frozen=True)
class HsmProbe:
    """Ready when the HSM session returns the check value of ``label`` (a listener's ZPK)."""

    hsm: KeyCheck
    label: str
    name: str = "hsm"

    async def check(self) -> None:
        await self.hsm.key_check_value(self.label)


#: Account id of the store's readiness read; no account carries it, so the answer is None.
READY_ACCOUNT = "__readyz__"


@dataclass(frozen=True)
class StoreProbe:
    """Ready when the store answers a point read (``get_account`` of an absent id)."""

    store: AccountReader
    name: str = "store"

    async def check(self) -> None:
        await self.store.get_account(READY_ACCOUNT)


@dataclass(frozen=True)
class BreakerProbe:
    """Ready while the circuit breaker of a dependency is closed (switch/breaker.py).

    Open or half-open (no probe has succeeded yet) is not ready, with the breaker's own
    description. Reading the state also moves an open breaker past its cool-down to
    half-open, so the gauge shows it without waiting for a request.
    """

    breaker: Breaker

    @property
    def name(self) -> str:
        return f"{self.breaker.name}_breaker"

    async def check(self) -> None:
        state = self.breaker.state
        metrics.observe_breaker(self.breaker.name, int(state))
        if state is not State.CLOSED:
            raise NotReady(self.breaker.describe())


@dataclass(frozen=True)
class ReadyState:
    """A snapshot of readiness: ready only when nothing failed."""

    failed: Mapping[str, str]

    @property
    def ready(self) -> bool:
        return not self.failed

    def body(self) -> dict[str, Any]:
        """The JSON body of ``/readyz``."""
        return {"ready": self.ready, "failed": dict(self.failed)}


class Readiness:
    """The last result of each check; written on the loop, read by the HTTP threads.

    Args:
        checks: names of the checks expected; each is failed until its first result.
    """

    def __init__(self, checks: Iterable[str]) -> None:
        self._lock = threading.Lock()
        self._failed: dict[str, str] = dict.fromkeys(checks, _NOT_CHECKED)

    def record(self, check: str, error: str | None) -> None:
        """Record the result of ``check``: None when it passed, else why it failed."""
        with self._lock:
            if error is None:
                self._failed.pop(check, None)
            else:
                self._failed[check] = error
        metrics.observe_ready(check, error is None)

    def state(self) -> ReadyState:
        """The current snapshot."""
        with self._lock:
            return ReadyState(MappingProxyType(dict(self._failed)))


def _describe(exc: BaseException) -> str:
    """``Type: message`` on one line (HSM and store errors carry no card data)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def check_once(
    readiness: Readiness, probes: Sequence[Probe], *, probe_timeout: float = PROBE_TIMEOUT
) -> None:
    """Run every probe once, concurrently, each under ``probe_timeout``, and record the results."""

    async def one(probe: Probe) -> None:
        error: str | None = None
        try:
            with trio.fail_after(probe_timeout):
                await probe.check()
        except trio.TooSlowError:
            error = f"Timeout: no answer within {probe_timeout:g} s"
        except Exception as exc:  # any failure of the component is a reason, not a crash
            error = _describe(exc)
        previous = readiness.state().failed.get(probe.name)
        if error != previous:
            emit = log.info if error is None else log.warning
            emit("readiness_changed", check=probe.name, ok=error is None, error=error)
        readiness.record(probe.name, error)

    async with trio.open_nursery() as nursery:
        for probe in probes:
            nursery.start_soon(one, probe)


async def run_probes(
    readiness: Readiness,
    probes: Sequence[Probe],
    *,
    interval: float = PROBE_INTERVAL,
    probe_timeout: float = PROBE_TIMEOUT,
    each_round: Callable[[], None] | None = None,
) -> None:
    """Run the probes every ``interval`` s until cancelled; ``each_round`` runs first each time."""
    while True:
        started = trio.current_time()
        if each_round is not None:
            each_round()
        await check_once(readiness, probes, probe_timeout=probe_timeout)
        await trio.sleep_until(started + interval)


# ------------------------------------------------------------------------- HTTP


class StatusBoard:
    """The running switch's status as the loop last published it, for ``/status``.

    The loop publishes a fresh snapshot every second; the HTTP thread reads the latest (one
    reference assignment: no lock needed).
    """

    def __init__(self) -> None:
        self._snapshot: Mapping[str, Any] = {}

    def publish(self, snapshot: Mapping[str, Any]) -> None:
        self._snapshot = dict(snapshot)

    def snapshot(self) -> Mapping[str, Any]:
        return self._snapshot


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    heartbeat: Heartbeat
    readiness: Readiness
    board: StatusBoard
    stale_after: float


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = _HTTP_TIMEOUT
    server_version = "cardswitch-health"

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        age = self.server.heartbeat.age()
        stale = age > self.server.stale_after
        if path == "/healthz":
            status = HTTPStatus.SERVICE_UNAVAILABLE if stale else HTTPStatus.OK
            body = {"alive": not stale, "heartbeat_age_seconds": round(age, 3)}
            self._send_json(status, body)
        elif path == "/readyz":
            failed = dict(self.server.readiness.state().failed)
            if stale:
                failed["loop"] = f"Stale: event loop heartbeat {age:.1f} s old"
            state = ReadyState(failed)
            status = HTTPStatus.OK if state.ready else HTTPStatus.SERVICE_UNAVAILABLE
            self._send_json(status, state.body())
        elif path == "/status":
            ready = self.server.readiness.state()
            snapshot: dict[str, Any] = {
                **self.server.board.snapshot(),
                "alive": not stale,
                "ready": ready.ready and not stale,
                "failed": dict(ready.failed),
            }
            self._send_json(HTTPStatus.OK, snapshot)
        elif path == "/metrics":
            metrics.observe_heartbeat_age(age)
            self._send(HTTPStatus.OK, metrics.exposition(), metrics.CONTENT_TYPE)
        else:
            self._send_json(HTTPStatus.NOT_FOUND, {"error": "not found", "paths": _PATHS})

    def _send_json(self, status: HTTPStatus, body: Mapping[str, Any]) -> None:
        self._send(status, json.dumps(body).encode() + b"\n", "application/json")

    def _send(self, status: HTTPStatus, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Requests are not logged (scrapes and probes every few seconds)."""


_PATHS = ["/healthz", "/readyz", "/status", "/metrics"]


class HealthServer:
    """``/healthz``, ``/readyz`` and ``/metrics`` on one port, served from a daemon thread.

    The socket is bound by the constructor, so an address in use fails at start-up.

    Args:
        host, port: where to listen (port 0: any free port, see ``address``).
        heartbeat: the loop's heartbeat.
        readiness: the checks' latest results.
        stale_after: heartbeat age, in seconds, past which the loop counts as stuck.

    Raises:
        OSError: the address cannot be bound.
    """

    def __init__(
        self,
        host: str,
        port: int,
        heartbeat: Heartbeat,
        readiness: Readiness,
        *,
        board: StatusBoard | None = None,
        stale_after: float = STALE_AFTER,
    ) -> None:
        self._httpd = _Server((host, port), _Handler)
        self._httpd.heartbeat = heartbeat
        self._httpd.readiness = readiness
        self._httpd.board = board or StatusBoard()
        self._httpd.stale_after = stale_after
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="cardswitch-health", daemon=True
        )

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port)."""
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    def start(self) -> None:
        """Serve in the background thread."""
        self._thread.start()

    def close(self) -> None:
        """Stop serving and close the socket (blocks until the serving loop has stopped)."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()
