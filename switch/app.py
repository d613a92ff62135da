"""A running switch assembled from its configuration: what ``cardswitch serve`` runs.

What lives here: process wiring only. Given the loaded configuration: start the health and
metrics endpoint (switch.health), open the HSM, the card-data vault and the store, build the
pipeline and the server, freeze the startup heap (``freeze_startup_heap``), run the loop's
heartbeat and the readiness probes beside it, and translate signals: SIGTERM/SIGINT drain
and exit 0, SIGHUP reloads the TLS certificates (and CRL). During a drain a SIGHUP is logged
and ignored (no connection is accepted any more), and a second SIGTERM/SIGINT cuts the drain
short: the answers already queued are still written and the process still exits 0.

Worker mode (``worker=WorkerRole(...)``, a worker of ``switch.supervisor``): the listeners
are bound with ``SO_REUSEPORT`` on the ports the supervisor chose, the health and metrics
endpoint listens on an internal loopback port (port 0; the ready file reports it) for the
supervisor to aggregate, every log line carries ``worker`` (the index), and the worker drains
as on SIGTERM when its supervisor is gone.

What does not: the command line (switch.cli.serve), any protocol or decision logic
(server.py, pipeline.py), supervising workers (switch.supervisor).
"""

from __future__ import annotations

import gc
import json
import os
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import structlog
import trio

from hsm.api import Hsm, KeyUsage
from hsm.carddata import open_vault
from hsm.errors import HsmError
from hsm.token import RequiredKey, open_hsm, require_keys, session_status
from switch import health, metrics
from switch import log as log_mod
from switch.config import Config
from switch.handler import Dispatcher, Engine, RequestHandler, UnavailableEngine
from switch.keys import ListenerSessions
from switch.pipeline import Pipeline
from switch.relay import run_relay
from switch.server import Server
from switch.store import Store, open_store
from switch.sweeper import run_sweeper
from switch.tls import TlsContextHolder

log = log_mod.get_logger("switch.app")


@dataclass(frozen=True)
class WorkerRole:
    """What makes a process one worker of ``switch.supervisor`` (its command line)."""

    #: The worker's index, 0 to N-1: its ``worker`` label and log key.
    index: int
    #: The supervisor's pid; when the parent is another process, the worker drains.
    supervisor_pid: int
    #: Port of each listener, by name, as the supervisor reserved it.
    ports: dict[str, int]


async def serve(
    cfg: Config,
    ready_file: Path | None = None,
    engine: bool = True,
    handler: RequestHandler | None = None,
    worker: WorkerRole | None = None,
) -> None:
    """Run the switch until SIGTERM/SIGINT, then drain and return.

    Args:
        cfg: the configuration.
        ready_file: where to write the bound listeners once accepting.
        engine: open the HSM, vault and store and decide with the pipeline; without it every
            authorization is answered 91.
        handler: decide with this handler instead (tests); ``engine`` is then ignored.
        worker: run as this worker of a supervisor (see the module docstring).
    """
    if worker is not None:
        cfg = _worker_config(cfg, worker)
        structlog.contextvars.bind_contextvars(worker=worker.index)
    tls = TlsContextHolder(cfg.tls)
    metrics.configure_listeners(lst.name for lst in cfg.listeners)
    metrics.observe_budget(cfg.pipeline.budget)
    heartbeat = health.Heartbeat()
    opens_engine = engine and handler is None
    readiness = health.Readiness(["listeners", "hsm", "store"] if opens_engine else ["listeners"])
    async with AsyncExitStack() as stack, trio.open_nursery() as monitors:
        board = health.StatusBoard()
        http = _start_health(cfg, heartbeat, readiness, board, stack, internal=worker is not None)
        probes: list[health.Probe] = []  # run_probes reads the list at each round
        # The heartbeat runs while the engine opens (a long store recovery is alive); the
        # monitors stop once the server has drained, before the engine is closed.
        monitors.start_soon(_monitor, heartbeat, readiness, probes, tls)
        try:
            async with AsyncExitStack() as engine_stack:
                sessions = ListenerSessions(cfg.listeners)
                if handler is None:
                    if engine:
                        opened = await _open_engine(cfg, engine_stack, probes, monitors)
                        pipeline, hsm, store = opened
                        await sessions.restore(hsm)  # key exchanges before a restart hold
                        if worker is not None:
                            # A key exchange another worker accepted is taken up here too.
                            monitors.start_soon(_follow_key_exchanges, sessions, hsm)
                        handler = Dispatcher(pipeline, keys=hsm, journal=store)
                    else:
                        readiness.record("engine", "Disabled: serving without an engine (91)")
                        handler = Dispatcher(UnavailableEngine())
                server = Server(cfg, handler, tls.get, sessions, reuse_port=worker is not None)
                # Held until the server has stopped, so that no signal meets its default
                # action (SIGHUP's kills the process) while the switch is still draining.
                with trio.open_signal_receiver(*_SIGNALS) as signals:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(_signals, signals, server, tls)
                        async with trio.open_nursery() as serving:
                            bound = await serving.start(server.serve)
                            # Once bound (a refused port logs its one error line, nothing
                            # more) and before the ready file says the switch accepts.
                            log.info("startup_heap_frozen", objects=freeze_startup_heap())
                            names = frozenset(x.name for x in cfg.listeners)
                            probes.append(health.ListenersProbe(server, names))
                            monitors.start_soon(_publish_status, board, server)
                            if worker is not None:
                                nursery.start_soon(_watch_supervisor, worker, server)
                            if ready_file is not None:
                                _write_ready(ready_file, bound, http, worker)
                        nursery.cancel_scope.cancel()  # the server has stopped
                monitors.cancel_scope.cancel()
        finally:
            monitors.cancel_scope.cancel()
    # Here, not inside the monitors' nursery: closing the engine there meets its cancelled
    # scope at the first checkpoint, and a line after it was never reached with an engine.
    log.info("exit", reason="drained")


def freeze_startup_heap() -> int:
    """Collect once, then move every object alive (modules, configuration, the key index,
    what the engine opened) into the collector's permanent generation; the number frozen.

    Those objects live as long as the process, yet every full collection would walk them
    all, every request in flight waiting behind it. With the demo engine open (about 92,000
    objects) a full collection took 42 ms, and 63 ms when one fell inside a measurement
    under load; with the startup heap frozen, 0.4 ms (``python -m benchmarks.layers
    --phases 1x8 --only switch-full``, with and without ``--no-freeze``: its last line).
    CPU is unchanged: the collector takes about 1 % either way.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _start_health(
    cfg: Config,
    heartbeat: health.Heartbeat,
    readiness: health.Readiness,
    board: health.StatusBoard,
    stack: AsyncExitStack,
    *,
    internal: bool = False,
) -> tuple[str, int] | None:
    """Bind and start /healthz, /readyz, /status and /metrics (port 0: none); its address.

    ``internal`` (a worker): on any free loopback port, whatever ``[metrics]`` says.
    """
    host, port = ("127.0.0.1", 0) if internal else (cfg.metrics.host, cfg.metrics.port)
    if not (port or internal):
        return None
    http = health.HealthServer(host, port, heartbeat, readiness, board=board)
    http.start()
    stack.callback(http.close)
    return http.address


#: Seconds between two looks, in a worker, for a ZPK generation another worker imported.
_KEY_FOLLOW_INTERVAL = 2.0


async def _follow_key_exchanges(sessions: ListenerSessions, hsm: Hsm) -> None:
    """Put in force the newest ZPK generation the HSM holds, until cancelled: the worker
    that answered a key exchange imported it into the shared token; the others follow
    within ``_KEY_FOLLOW_INTERVAL`` (requests already read keep the key they started with)."""
    while True:
        await trio.sleep(_KEY_FOLLOW_INTERVAL)
        try:
            await sessions.restore(hsm)
        except HsmError as exc:  # the HSM's own recovery and readiness report it
            log.warning("zpk_follow_failed", error=type(exc).__name__)


#: Seconds between two status snapshots published for ``/status``.
_STATUS_INTERVAL = 1.0


async def _publish_status(board: health.StatusBoard, server: Server) -> None:
    """Publish the server's status for ``/status`` until cancelled."""
    while True:
        board.publish({"pid": os.getpid(), **server.status()})
        await trio.sleep(_STATUS_INTERVAL)


async def _monitor(
    heartbeat: health.Heartbeat,
    readiness: health.Readiness,
    probes: list[health.Probe],
    tls: TlsContextHolder,
) -> None:
    """The loop's heartbeat and the readiness probes, until cancelled."""
    generation = 0

    def certificates() -> None:  # read at start and after each successful reload
        nonlocal generation
        if tls.generation != generation:
            generation = tls.generation
            metrics.observe_certificates(tls.cfg.cert, tls.cfg.ca)

    async with trio.open_nursery() as nursery:
        block_file = health.block_file_from_env()
        nursery.start_soon(partial(health.run_heartbeat, heartbeat, block_file=block_file))
        nursery.start_soon(partial(health.run_probes, readiness, probes, each_round=certificates))


async def _open_engine(
    cfg: Config,
    stack: AsyncExitStack,
    probes: list[health.Probe],
    background: trio.Nursery,
) -> tuple[Engine, Hsm, Store]:
    """Open the HSM, the vault and the store; the pipeline over them, the HSM (key exchange
    imports into it) and the store (undelivered answers are marked in its journal).

    Opens only what exists (``hsm.token.open_hsm``: a missing module, SoftHSM configuration or
    token is an ``HsmConfigError``) and checks the keys the configuration names: each
    listener's ZPK and, for ``card-data`` backend ``hsm``, the fingerprint and encryption keys.
    Keys named by provisioned cards (CVK, PVK, IMK) are checked when a request needs them
    (``KeyNotFound`` then declines that request), not at start. Exports the HSM session state
    to the metrics, appends the readiness probes of the HSM (check value of the first
    listener's ZPK), of the store (a point read) and of the pipeline's circuit breakers to
    ``probes``, and starts the hold-expiry
    sweeper in ``background`` (stopped, like the probes, before the store closes), and the
    events relay when ``[events] backend = "sqs"``.
    """
    hsm = open_hsm(cfg.hsm)  # opens the token and logs in once, at start-up
    stack.push_async_callback(hsm.aclose)
    required = [RequiredKey(f"listener[{x.name}].zpk", x.zpk, KeyUsage.ZPK) for x in cfg.listeners]
    if cfg.card_data.backend == "hsm":
        fp, enc = cfg.card_data.fingerprint_key, cfg.card_data.encryption_key
        required += [
            RequiredKey("card-data.fingerprint_key", fp, KeyUsage.HMAC),
            RequiredKey("card-data.encryption_key", enc, KeyUsage.DATA),
        ]
    await require_keys(hsm, required)
    metrics.watch_hsm_session(lambda: session_status(hsm))
    stack.callback(metrics.watch_hsm_session, None)
    vault = open_vault(cfg.card_data, hsm)
    store = await stack.enter_async_context(open_store(cfg.store))
    probes += [health.HsmProbe(hsm, cfg.listeners[0].zpk), health.StoreProbe(store)]
    if cfg.holds.sweep_interval:
        background.start_soon(run_sweeper, store, cfg.holds)
    if cfg.events.backend == "sqs":  # off the hot path: it only reads and marks the outbox
        background.start_soon(run_relay, store, cfg.events)
    pipeline = Pipeline(cfg, store=store, hsm=hsm, vault=vault)
    probes += [health.BreakerProbe(breaker) for breaker in pipeline.breakers.values()]
    return pipeline, hsm, store


#: The signals the switch handles (see the module docstring).
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


async def _signals(signals: AsyncIterator[int], server: Server, tls: TlsContextHolder) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            if server.draining:
                log.warning("signal_ignored", signal=name, reason="draining")
                continue
            ok = tls.reload()
            log.info("tls_reload", ok=ok.reloaded, error=ok.error, generation=ok.generation)
        elif server.draining:
            log.warning("signal", signal=name, action="drain_cut_short")
            server.hurry()
        else:
            log.info("signal", signal=name, action="drain")
            server.shutdown()


def _write_ready(
    path: Path,
    bound: list[tuple[str, str, int]],
    http: tuple[str, int] | None,
    worker: WorkerRole | None = None,
) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    ready: dict[str, object] = {
        "pid": os.getpid(),
        "listeners": [{"name": n, "host": h, "port": p} for n, h, p in bound],
    }
    if worker is not None:
        ready["worker"] = worker.index
    if http is not None:
        ready["metrics"] = {"host": http[0], "port": http[1]}
    tmp.write_text(json.dumps(ready))
    tmp.replace(path)


# -- worker mode (switch.supervisor) ----------------------------------------------------------

#: Seconds between two looks at whether the supervisor is still this worker's parent.
_PARENT_CHECK_INTERVAL = 1.0


def _worker_config(cfg: Config, worker: WorkerRole) -> Config:
    """``cfg`` with each listener on the port the supervisor reserved for it."""
    listeners = tuple(
        replace(lst, port=worker.ports.get(lst.name, lst.port)) for lst in cfg.listeners
    )
    return replace(cfg, listeners=listeners)


async def _watch_supervisor(worker: WorkerRole, server: Server) -> None:
    """Drain, as on SIGTERM, once the supervisor is no longer this process's parent."""
    while True:
        if os.getppid() != worker.supervisor_pid:
            break
        await trio.sleep(_PARENT_CHECK_INTERVAL)
    log.warning("supervisor_gone", supervisor_pid=worker.supervisor_pid, action="drain")
    server.shutdown()
