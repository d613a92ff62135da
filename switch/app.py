"""A running switch assembled from its configuration: what ``cardswitch serve`` runs.

What lives here: process wiring only. Given the loaded configuration: start the metrics
endpoint, open the HSM, the card-data vault and the store, build the pipeline and the server,
and translate signals: SIGTERM/SIGINT drain and exit 0, SIGHUP reloads the TLS certificates
(and CRL). During a drain a SIGHUP is logged and ignored (no connection is accepted any more),
and a second SIGTERM/SIGINT cuts the drain short: the answers already queued are still
written and the process still exits 0.

What does not: the command line (switch.cli.serve), any protocol or decision logic
(server.py, pipeline.py).
"""

from __future__ import annotations

import json
import os
import signal
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path

import trio

from hsm.carddata import open_vault
from hsm.token import open_hsm
from switch import log as log_mod
from switch import metrics
from switch.config import Config
from switch.handler import Dispatcher, Engine, RequestHandler, UnavailableEngine
from switch.pipeline import Pipeline
from switch.server import Server
from switch.store import open_store
from switch.tls import TlsContextHolder

log = log_mod.get_logger("switch.app")


async def serve(
    cfg: Config,
    ready_file: Path | None = None,
    engine: bool = True,
    handler: RequestHandler | None = None,
) -> None:
    """Run the switch until SIGTERM/SIGINT, then drain and return.

    Args:
        cfg: the configuration.
        ready_file: where to write the bound listeners once accepting.
        engine: open the HSM, vault and store and decide with the pipeline; without it every
            authorization is answered 91.
        handler: decide with this handler instead (tests); ``engine`` is then ignored.
    """
    tls = TlsContextHolder(cfg.tls)
    if cfg.metrics.port:
        metrics.serve(cfg.metrics.host, cfg.metrics.port)
    async with AsyncExitStack() as stack:
        if handler is None:
            handler = Dispatcher(await _open_engine(cfg, stack) if engine else UnavailableEngine())
        server = Server(cfg, handler, tls.get)
        # Held until the server has stopped, so that no signal meets its default action
        # (SIGHUP's kills the process) while the switch is still draining.
        with trio.open_signal_receiver(*_SIGNALS) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_signals, signals, server, tls)
                async with trio.open_nursery() as serving:
                    bound = await serving.start(server.serve)
                    if ready_file is not None:
                        _write_ready(ready_file, bound)
                nursery.cancel_scope.cancel()  # the server has stopped: stop listening
        log.info("exit", reason="drained")


async def _open_engine(cfg: Config, stack: AsyncExitStack) -> Engine:
    """Open the HSM, the vault and the store and return the pipeline over them."""
    hsm = open_hsm(cfg.hsm)  # opens the token and logs in once, at start-up
    stack.push_async_callback(hsm.aclose)
    vault = open_vault(cfg.card_data, hsm)
    store = await stack.enter_async_context(open_store(cfg.store))
    return Pipeline(cfg, store=store, hsm=hsm, vault=vault)


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


def _write_ready(path: Path, bound: list[tuple[str, str, int]]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(
        json.dumps(
            {
                "pid": os.getpid(),
                "listeners": [{"name": n, "host": h, "port": p} for n, h, p in bound],
            }
        )
    )
    tmp.replace(path)
