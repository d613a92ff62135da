"""``cardswitch serve --workers N``: a supervisor process and N worker processes on shared ports.

What lives here: ``Supervisor``, which prepares what must happen once (the HSM token and the
store's schema are opened and closed again, the listening ports are chosen and reserved),
starts N workers (``python -m switch serve --worker-index I ...``, each its own process: its
own trio loop, HSM session and store connections), keeps them running, and serves the
configured health and metrics port on their behalf (``switch.health.HealthServer`` with
``workers=``: every route asks each worker's own internal port and aggregates).

Ports: every listener of every worker is bound with ``SO_REUSEPORT`` (``switch.server``); the
kernel spreads new connections over the workers' listening sockets. A configured port 0 is
resolved here first, so that all workers share one port. The supervisor keeps one bound but
never listening ``SO_REUSEPORT`` socket per address for its whole life: it holds the port
while a worker restarts (a bound socket that does not listen receives no connection).

Lifecycle:

- start: the ready file (``--ready-file``) is written once every worker has written its own
  (a private directory; each reports its pid, listeners and internal metrics port). A worker
  that exits before every worker was ready once ends the start: the others are stopped and
  the supervisor exits with that worker's status (it has printed its one line).
- running: a worker that exits (kill -9, a crash) is started again after a back-off
  (``RESTART_BACKOFF`` doubling to ``RESTART_BACKOFF_MAX``, back to the start once a worker
  stayed up ``STABLE_AFTER`` s), counted in ``cardswitch_worker_restarts_total{worker}``.
- SIGTERM/SIGINT: sent on to every worker as SIGTERM (each drains) and no worker is started
  again; the supervisor exits 0 once every worker has exited 0. A second SIGTERM/SIGINT is
  sent on too: it cuts each worker's drain short. SIGHUP is sent on (TLS reload).
- Workers run in their own process group (a terminal's Ctrl-C reaches only the supervisor,
  which sends one SIGTERM on) and watch their parent: a worker whose supervisor is gone
  drains and exits (``switch.app``).

What does not: the worker itself (``switch.app.serve`` in worker mode), the aggregation of
health and metrics (``switch.health``, ``switch.metrics``), the command line
(``switch.cli.serve``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio

from hsm.token import open_hsm
from switch import health, metrics
from switch import log as log_mod
from switch.config import Config
from switch.store import open_store

log = log_mod.get_logger("switch.supervisor")

#: Seconds before the first restart of a worker that exited; doubled at each further exit.
RESTART_BACKOFF = 0.5
#: Longest wait between two restarts of one worker.
RESTART_BACKOFF_MAX = 10.0
#: Seconds a worker must stay up for its back-off to start again from ``RESTART_BACKOFF``.
STABLE_AFTER = 30.0
#: Seconds between two looks at a starting worker's ready file.
_POLL_INTERVAL = 0.05
#: The status of a supervisor whose workers did not all exit 0 (``ExitStatus.FAILED``).
_FAILED = 1
#: Signals the supervisor handles (see the module docstring).
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


@dataclass
class _Slot:
    """One worker index and the process currently running for it."""

    index: int
    #: Touched only from the trio loop: reading ``trio.Process.returncode`` of an exited
    #: process closes its pidfd, which only the loop's thread may do.
    process: trio.Process | None = None
    #: Pid of the current process while it runs (None before it started and once its exit
    #: was seen): what the health server's threads read instead of ``process``.
    pid: int | None = None
    #: Internal health/metrics address reported by the current process, once it is ready.
    address: tuple[str, int] | None = None
    ever_ready: bool = False
    restarts: int = 0
    #: Exit status of the last process (None while one runs or before any exited).
    last_exit: int | None = None
    #: Whether the last exit happened after the process had been ready.
    exited_ready: bool = False


@dataclass
class _Reservation:
    """The bound, never listening sockets that hold the listeners' ports."""

    ports: dict[str, int] = field(default_factory=dict)
    sockets: list[socket.socket] = field(default_factory=list)

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


def reserve_ports(cfg: Config) -> _Reservation:
    """Choose each listener's port (port 0: one the kernel picks) and hold it.

    Raises:
        OSError: an address cannot be bound (in use without ``SO_REUSEPORT``).
    """
    held = _Reservation()
    try:
        for lst in cfg.listeners:
            port = lst.port
            infos = socket.getaddrinfo(
                lst.host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )
            for family, kind, proto, _, address in infos:
                sock = socket.socket(family, kind, proto)
                held.sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address[0], port, *address[2:]))
                port = sock.getsockname()[1]  # port 0: every further address takes this one
            held.ports[lst.name] = port
    except BaseException:
        held.close()
        raise
    return held


class Supervisor:
    """Runs ``workers`` worker processes of the switch configured by ``cfg``.

    Args:
        cfg: the loaded configuration (``cfg.server.workers`` is not read: ``workers`` is).
        config_path: the file the workers load (None: their default lookup, as ours).
        workers: how many worker processes.
        ready_file: where to write the ready file once every worker is ready.
        engine: False runs the workers with ``--no-engine``.
        python: the interpreter the workers run under.
    """

    def __init__(
        self,
        cfg: Config,
        config_path: Path | None,
        workers: int,
        *,
        ready_file: Path | None = None,
        engine: bool = True,
        python: str = sys.executable,
    ) -> None:
        self._cfg = cfg
        self._config_path = config_path
        self._ready_file = ready_file
        self._engine = engine
        self._python = python
        self._slots = [_Slot(i) for i in range(workers)]
        self._stopping = False
        self._stop = trio.Event()
        self._all_ready = trio.Event()
        self._failed_start: int | None = None
        self._ports: dict[str, int] = {}
        self._dir = Path(".")

    # -- what the health server reads (from its threads) ---------------------------------

    def endpoints(self) -> list[health.WorkerEndpoint]:
        """Each worker's pid and internal address as of now (None while it is not up)."""
        out = []
        for slot in self._slots:
            pid, address = slot.pid, slot.address  # plain attributes: never slot.process here
            address = address if pid is not None else None
            out.append(health.WorkerEndpoint(slot.index, pid, address, slot.restarts))
        return out

    # -- running -------------------------------------------------------------------------

    async def run(self) -> int:
        """Prepare, run the workers until SIGTERM/SIGINT, return the exit status."""
        metrics.configure_workers(len(self._slots))
        await self._prepare()
        reservation = reserve_ports(self._cfg)
        self._ports = reservation.ports
        self._dir = Path(tempfile.mkdtemp(prefix="cardswitch-workers-"))
        heartbeat = health.Heartbeat()
        http: health.HealthServer | None = None
        try:
            if self._cfg.metrics.port:
                http = health.HealthServer(
                    self._cfg.metrics.host,
                    self._cfg.metrics.port,
                    heartbeat,
                    health.Readiness([]),
                    workers=self.endpoints,
                )
                http.start()
            log.info("supervisor_start", workers=len(self._slots), ports=self._ports)
            if self._engine and self._cfg.store.backend == "sqlite":
                log.warning("sqlite_shared_by_workers", workers=len(self._slots),
                            hint="correct, but one write lock: see benchmarks/reports/"
                            "workers.md; use PostgreSQL to scale writes")  # fmt: skip
            with trio.open_signal_receiver(*_SIGNALS) as signals:
                async with trio.open_nursery() as services:
                    services.start_soon(self._signals, signals)
                    services.start_soon(health.run_heartbeat, heartbeat)
                    services.start_soon(self._announce, http)
                    async with trio.open_nursery() as keepers:
                        for slot in self._slots:
                            keepers.start_soon(self._keep, slot)
                    services.cancel_scope.cancel()
        finally:
            if http is not None:
                http.close()
            reservation.close()
            shutil.rmtree(self._dir, ignore_errors=True)
        return self._status()

    def _status(self) -> int:
        if self._failed_start is not None:
            return self._failed_start
        bad = {s.index: s.last_exit for s in self._slots if s.exited_ready and s.last_exit != 0}
        log.info("exit", reason="drained", workers_failed=bad or None)
        return _FAILED if bad else 0

    async def _prepare(self) -> None:
        """Open the HSM token (created once if it is SoftHSM's dev token) and the store
        (its schema created or checked once), then close both: N workers must not race."""
        if not self._engine:
            return
        hsm = await trio.to_thread.run_sync(open_hsm, self._cfg.hsm)
        await hsm.aclose()
        async with open_store(self._cfg.store):
            pass

    def _command(self, slot: _Slot, ready: Path) -> list[str]:
        cmd = [self._python, "-m", "switch", "serve"]
        if self._config_path is not None:
            cmd += ["--config", str(self._config_path)]
        cmd += ["--ready-file", str(ready), "--worker-index", str(slot.index)]
        cmd += ["--supervisor-pid", str(os.getpid())]
        for name, port in self._ports.items():
            cmd += ["--worker-port", f"{name}={port}"]
        if not self._engine:
            cmd.append("--no-engine")
        return cmd

    async def _keep(self, slot: _Slot) -> None:
        """Run worker ``slot`` until the supervisor stops, restarting it when it exits."""
        failures = 0
        while not self._stopping:
            started = trio.current_time()
            ready = self._dir / f"worker-{slot.index}.json"
            ready.unlink(missing_ok=True)
            proc = await trio.lowlevel.open_process(self._command(slot, ready), process_group=0)
            slot.process, slot.last_exit, slot.exited_ready = proc, None, False
            slot.pid = proc.pid
            log.info("worker_started", worker=slot.index, worker_pid=proc.pid)
            was_ready = False
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._await_ready, slot, proc, ready)
                code = await proc.wait()
                slot.pid = None
                was_ready = slot.address is not None
                nursery.cancel_scope.cancel()
            slot.address, slot.last_exit, slot.exited_ready = None, code, was_ready
            if self._stopping:
                log.info("worker_exited", worker=slot.index, worker_pid=proc.pid, status=code)
                return
            if not self._all_ready.is_set():
                self._fail_start(slot, code)
                return
            uptime = trio.current_time() - started
            failures = 0 if uptime >= STABLE_AFTER else failures
            delay = backoff(failures)
            failures += 1
            slot.restarts += 1
            metrics.observe_worker_restart(slot.index)
            log.warning("worker_exited", worker=slot.index, worker_pid=proc.pid, status=code,
                        uptime=round(uptime, 3), restart_in=delay)  # fmt: skip
            with trio.move_on_after(delay):
                await self._stop.wait()

    async def _await_ready(self, slot: _Slot, proc: trio.Process, ready: Path) -> None:
        """Wait for the worker's ready file and record its internal address."""
        path = trio.Path(ready)
        while True:
            if await path.exists():
                break
            await trio.sleep(_POLL_INTERVAL)
        raw = json.loads(await path.read_text())
        http = raw.get("metrics") or {}
        slot.address = (str(http.get("host", "127.0.0.1")), int(http.get("port", 0)))
        slot.ever_ready = True
        log.info("worker_ready", worker=slot.index, worker_pid=proc.pid)
        if all(s.address is not None for s in self._slots):
            self._all_ready.set()

    def _fail_start(self, slot: _Slot, code: int) -> None:
        """A worker exited before every worker was ready: stop them all, keep its status."""
        if self._failed_start is None:
            self._failed_start = code if code > 0 else _FAILED
            if code <= 0:  # killed by a signal: it printed nothing
                sig = signal.Signals(-code).name if code < 0 else "status 0"
                print(f"cardswitch: worker {slot.index} ended ({sig}) before it was ready",
                      file=sys.stderr)  # fmt: skip
            log.error("worker_start_failed", worker=slot.index, status=code)
        self._begin_stop()

    def _begin_stop(self) -> None:
        self._stopping = True
        self._stop.set()
        self._send_all(signal.SIGTERM)

    def _send_all(self, signum: int) -> None:
        for slot in self._slots:
            proc = slot.process
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)

    async def _signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            name = signal.Signals(signum).name
            if signum == signal.SIGHUP:
                log.info("signal", signal=name, action="forward")
                self._send_all(signal.SIGHUP)
            elif self._stopping:
                log.warning("signal", signal=name, action="drain_cut_short")
                self._send_all(signal.SIGTERM)
            else:
                log.info("signal", signal=name, action="drain")
                self._begin_stop()

    async def _announce(self, http: health.HealthServer | None) -> None:
        """Write the ready file once every worker has been ready."""
        await self._all_ready.wait()
        log.info("workers_ready", workers=len(self._slots))
        if self._ready_file is None:
            return
        ready: dict[str, object] = {
            "pid": os.getpid(),
            "listeners": [
                {"name": lst.name, "host": lst.host, "port": self._ports[lst.name]}
                for lst in self._cfg.listeners
            ],
            "workers": [{"index": e.index, "pid": e.pid} for e in self.endpoints()],
        }
        if http is not None:
            ready["metrics"] = {"host": http.address[0], "port": http.address[1]}
        tmp = self._ready_file.with_suffix(self._ready_file.suffix + ".tmp")
        tmp.write_text(json.dumps(ready))
        tmp.replace(self._ready_file)


def backoff(failures: int) -> float:
    """Seconds before restarting a worker that already failed ``failures`` times in a row.

    >>> [backoff(n) for n in range(6)]
    [0.5, 1.0, 2.0, 4.0, 8.0, 10.0]
    """
    return float(min(RESTART_BACKOFF * 2 ** max(0, failures), RESTART_BACKOFF_MAX))


def worker_ports(specs: Sequence[str]) -> dict[str, int]:
    """``NAME=PORT`` options of a worker's command line as a mapping.

    >>> worker_ports(["visa=8583", "mc=8584"])
    {'visa': 8583, 'mc': 8584}
    """
    out: dict[str, int] = {}
    for spec in specs:
        name, sep, port = spec.rpartition("=")
        if not sep or not name or not port.isdigit():
            raise ValueError(f"expected NAME=PORT, got {spec!r}")
        out[name] = int(port)
    return out
