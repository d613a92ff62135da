"""Helpers of the worker tests: a supervisor with two real workers, and what it reports.

What lives here: ``write_config`` (crash_support's configuration with ``[server] workers``, a
metrics port and the demo ZPK, so that /readyz can pass), ``Supervised`` (the running
supervisor: its process, port, metrics port and log), the reads of its /status and /metrics
(``worker_pids``, ``samples``), and ``spread_connections`` (client connections opened until
every worker holds one).

What does not: the tests (test_workers.py), the load and the database checks
(crash_support.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
import ssl
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import trio
from crash_support import START_TIMEOUT, switch_env
from crash_support import write_config as crash_config
from prometheus_client.parser import text_string_to_metric_families
from test_health import get

from switch import config, testing
from switch.client import Client
from switch.config import MetricsConfig, StoreConfig
from switch.pki import PkiPaths


def write_config(
    tmp: Path, pki: PkiPaths, workers: int = 2, *, store: StoreConfig | None = None
) -> Path:
    """crash_support's switch (on ``store``, by default its SQLite file) with ``workers``
    workers, a metrics port and the demo ZPK."""
    path = crash_config(tmp, pki, store=store)
    cfg = config.load(path)
    listeners = tuple(dataclasses.replace(lst, zpk="demo-zpk") for lst in cfg.listeners)
    cfg = dataclasses.replace(
        cfg,
        listeners=listeners,
        server=dataclasses.replace(cfg.server, workers=workers),
        metrics=MetricsConfig(port=testing.free_port()),
    )
    return testing.write_config(cfg, path)


@dataclass(frozen=True)
class Supervised:
    """A running supervisor and where it answers."""

    switch: testing.SwitchProcess
    metrics_port: int
    log: Path

    @property
    def port(self) -> int:
        return self.switch.port

    async def get(self, path: str) -> tuple[int, dict[str, object]]:
        reply = await trio.to_thread.run_sync(get, self.metrics_port, path)
        return reply.status, reply.json()

    async def scrape(self) -> str:
        reply = await trio.to_thread.run_sync(get, self.metrics_port, "/metrics")
        assert reply.status == 200
        return reply.body.decode()

    def events(self) -> list[dict[str, object]]:
        """Every JSON log line of the supervisor and its workers (one file, several
        writers: two lines may share a line of the file, so objects are decoded in turn)."""
        decoder = json.JSONDecoder()
        text, at, out = self.log.read_text(), 0, []
        while (start := text.find("{", at)) >= 0:
            try:
                event, at = decoder.raw_decode(text, start)
            except ValueError:
                at = start + 1
                continue
            out.append(event)
        return out


@asynccontextmanager
async def supervised(cfg_path: Path, tmp: Path, tag: str) -> AsyncIterator[Supervised]:
    """``python -m switch serve`` (workers from the configuration) for the block; killed
    (the whole process group of each worker too) if the test left it running."""
    log = tmp / f"supervisor-{tag}.log"
    with log.open("ab") as out:  # O_APPEND: the processes' writes do not overwrite
        switch = await testing.start_switch(
            cfg_path, tmp / f"ready-{tag}.json", env=switch_env(tmp), output=out,
            ready_within=START_TIMEOUT * 2,
        )  # fmt: skip
    metrics_port = config.load(cfg_path).metrics.port
    try:
        yield Supervised(switch, metrics_port, log)
    finally:
        raw = json.loads((tmp / f"ready-{tag}.json").read_text())
        pids = [int(w["pid"]) for w in raw.get("workers", []) if w.get("pid")]
        switch.kill()
        with trio.move_on_after(10):
            await switch.process.wait()
        for pid in pids:  # a worker outlives a killed supervisor by up to a second
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


async def worker_pids(sup: Supervised) -> dict[str, int | None]:
    """Each worker's pid as the supervisor's /status reports it."""
    _, status = await sup.get("/status")
    workers = status["workers"]
    assert isinstance(workers, dict)
    return {index: view.get("pid") for index, view in workers.items()}


def samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample called ``name`` of a Prometheus page, by its sorted labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name:
                out[tuple(sorted(s.labels.items()))] = s.value
    return out


def by_worker(text: str, name: str) -> dict[str, float]:
    """The sum of the samples ``name`` per value of their ``worker`` label."""
    totals: dict[str, float] = {}
    for labels, value in samples(text, name).items():
        worker = dict(labels).get("worker", "")
        totals[worker] = totals.get(worker, 0.0) + value
    return totals


async def connections_by_worker(sup: Supervised) -> dict[str, int]:
    """Open connections of each worker (its /status, through the supervisor's)."""
    _, status = await sup.get("/status")
    workers = status["workers"]
    assert isinstance(workers, dict)
    out = {}
    for index, view in workers.items():
        listeners = view.get("listeners") or {}
        out[index] = sum(int(lst["connections"]) for lst in listeners.values())
    return out


@asynccontextmanager
async def spread_connections(
    sup: Supervised, ctx: ssl.SSLContext, workers: int, *, batch: int = 6, batches: int = 10
) -> AsyncIterator[list[Client]]:
    """Client connections, opened ``batch`` at a time until each of ``workers`` workers holds
    at least one (the kernel hashes each connection to one listening socket), at most
    ``batches`` batches."""
    async with AsyncExitStack() as stack:
        clients: list[Client] = []
        for _ in range(batches):
            for _ in range(batch):
                client = Client.connect("127.0.0.1", sup.port, ctx, connect_timeout=5.0)
                clients.append(await stack.enter_async_context(client))
            with trio.move_on_after(5):
                while True:  # /status is published every second
                    held = await connections_by_worker(sup)
                    if sum(held.values()) >= len(clients):
                        break
                    await trio.sleep(0.2)
            if len([n for n in held.values() if n > 0]) >= workers:
                break
        yield clients
