"""Authorizations per second and CPU per authorization with 1 and with 2 worker processes.

What lives here: a small driver over ``benchmarks.load``'s pieces (its configuration, seed,
request builder, phase and CPU readers, used as they are), run as
``python -m benchmarks.workers_bench`` from the repository root. One throw-away directory is
seeded once (dev PKI, SoftHSM token with the demo keys, the load card); then, alternating,
the switch is started with ``[server] workers = 1`` (one process) and ``= 2`` (a supervisor
and two workers sharing the port through SO_REUSEPORT), driven by this process over
``--connections`` mutual-TLS connections with ``--level`` authorizations in flight, and
stopped with SIGTERM (exit status reported). Nothing is pinned: the workers need both cores,
and the generator shares them, so its CPU per request is reported as well.

Server CPU is the sum over the supervisor and every worker (``/proc/PID/stat``); each run's
figures come from the same invocation, and the report gives the 2-worker/1-worker ratios.
The store's group-commit histograms (scraped before and after the phase) give transactions,
decisions per transaction and time per transaction, which shows what two writers on one
SQLite file cost. It writes ``workers.md`` and ``workers.json`` to ``--out`` (default
``benchmarks/reports``).

What does not: assertions, switch code, the general load harness (``benchmarks/load.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import load
from benchmarks.procstat import cpu_seconds
from switch import config, testing
from switch.config import MetricsConfig
from switch.pki import pki_paths
from switch.tls import client_context


@dataclass(frozen=True)
class Run:
    """One measured phase against one switch."""

    workers: int
    requests: int
    answered: int
    errors: dict[str, int]
    codes: dict[str, int]
    elapsed_s: float
    per_second: float
    p50_ms: float
    p99_ms: float
    server_cpu_ms_per_auth: float
    client_cpu_ms_per_auth: float
    #: Connections each worker held during the phase (from the supervisor's /status).
    connections_by_worker: dict[str, int]
    #: SQLite group commit over the phase, all workers: transactions, mean decisions per
    #: transaction, mean milliseconds per transaction (BEGIN IMMEDIATE to COMMIT: includes
    #: waiting for the other worker's write lock).
    commits: int
    mean_batch: float
    mean_commit_ms: float
    exit_status: int | None


def _free_port() -> int:
    import socket  # noqa: PLC0415

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/status", timeout=5) as reply:
        doc: dict[str, Any] = json.loads(reply.read())
        return doc


def _store_totals(port: int) -> tuple[float, float, float]:
    """(transactions, decisions, seconds) of the store's group commit, summed over workers."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    wanted = {
        "cardswitch_store_batch_size_count": 0.0,
        "cardswitch_store_batch_size_sum": 0.0,
        "cardswitch_store_commit_seconds_sum": 0.0,
    }
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                wanted[sample.name] += sample.value
    return tuple(wanted.values())  # type: ignore[return-value]


def _pids(doc: dict[str, Any]) -> list[int]:
    """The supervisor and its workers (or the one process) from /status."""
    pids = [int(doc["pid"])]
    for view in (doc.get("workers") or {}).values():
        if view.get("pid"):
            pids.append(int(view["pid"]))
    return pids


def _held(doc: dict[str, Any]) -> dict[str, int]:
    workers = doc.get("workers")
    if not workers:
        return {"0": sum(int(x["connections"]) for x in doc["listeners"].values())}
    return {
        i: sum(int(x["connections"]) for x in (v.get("listeners") or {}).values())
        for i, v in workers.items()
    }


async def _one(work: Path, base: Path, workers: int, opts: argparse.Namespace, tag: str) -> Run:
    cfg = config.load(base)
    # One peer (the dev client certificate) holds every connection: lift its per-peer bound.
    listeners = tuple(
        dataclasses.replace(lst, max_connections_per_peer=opts.connections) for lst in cfg.listeners
    )
    cfg = dataclasses.replace(
        cfg,
        listeners=listeners,
        server=dataclasses.replace(cfg.server, workers=workers),
        metrics=MetricsConfig(port=_free_port()),
    )
    path = testing.write_config(cfg, work / f"switch-{tag}.toml")
    ready = work / f"ready-{tag}.json"
    with (work / f"switch-{tag}.log").open("ab") as log_file:
        switch = await testing.start_switch(
            path, ready, cwd=load.REPO, output=log_file, ready_within=60
        )
    try:
        pki = pki_paths(work / "pki")
        ctx = client_context(pki.ca, pki.client_cert, pki.client_key)
        requests = load._Requests(None)
        async with load._connections(switch.port, ctx, opts.connections) as clients:
            await trio.sleep(1.2)  # /status is published every second
            doc = await trio.to_thread.run_sync(_status, cfg.metrics.port)
            pids, held = _pids(doc), _held(doc)
            await load._phase(clients, requests, mode="auth", level=opts.level,
                              count=opts.warmup, issue_for=60)  # fmt: skip
            store0 = await trio.to_thread.run_sync(_store_totals, cfg.metrics.port)
            cpu0 = sum(cpu_seconds(p) for p in pids)
            own0 = time.process_time()
            tally, elapsed, _ = await load._phase(
                clients, requests, mode="auth", level=opts.level, count=opts.requests,
                issue_for=120,
            )  # fmt: skip
            cpu1 = sum(cpu_seconds(p) for p in pids)
            own1 = time.process_time()
            store1 = await trio.to_thread.run_sync(_store_totals, cfg.metrics.port)
    finally:
        with trio.CancelScope(shield=True):
            code = await switch.stop(load.STOP_TIMEOUT)
    answered = sum(tally.codes.values())
    commits = store1[0] - store0[0]
    ms = sorted(v * 1000 for v in tally.latencies) or [math.nan]
    return Run(
        workers=workers,
        requests=tally.sent,
        answered=answered,
        errors=dict(tally.errors),
        codes=dict(tally.codes),
        elapsed_s=elapsed,
        per_second=answered / elapsed,
        p50_ms=load.percentile(ms, 50),
        p99_ms=load.percentile(ms, 99),
        server_cpu_ms_per_auth=(cpu1 - cpu0) * 1000 / answered,
        client_cpu_ms_per_auth=(own1 - own0) * 1000 / answered,
        connections_by_worker=held,
        commits=int(commits),
        mean_batch=(store1[1] - store0[1]) / commits if commits else math.nan,
        mean_commit_ms=(store1[2] - store0[2]) * 1000 / commits if commits else math.nan,
        exit_status=code,
    )


async def _main(opts: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="cardswitch-workers-bench-"))
    base = load._write_config(work, "info")
    await trio.to_thread.run_sync(load._seed, base, load._write_cards(work), work)
    runs: list[Run] = []
    for round_ in range(opts.rounds):
        for workers in (1, 2):
            run = await _one(work, base, workers, opts, f"{workers}-{round_}")
            print(f"workers={workers} round={round_}: {run.per_second:.0f} auth/s, "
                  f"{run.server_cpu_ms_per_auth:.2f} server CPU-ms/auth, "
                  f"connections {run.connections_by_worker}, exit {run.exit_status}",
                  file=sys.stderr)  # fmt: skip
            runs.append(run)
    return {"work_dir": str(work), "runs": runs}


def _median(runs: Sequence[Run], attr: str) -> float:
    return float(statistics.median(getattr(r, attr) for r in runs))


def report(runs: Sequence[Run], opts: argparse.Namespace, command: str) -> dict[str, Any]:
    one = [r for r in runs if r.workers == 1]
    two = [r for r in runs if r.workers == 2]
    summary = {
        str(n): {
            "auth_per_second": _median(rs, "per_second"),
            "server_cpu_ms_per_auth": _median(rs, "server_cpu_ms_per_auth"),
            "client_cpu_ms_per_auth": _median(rs, "client_cpu_ms_per_auth"),
            "p50_ms": _median(rs, "p50_ms"),
            "p99_ms": _median(rs, "p99_ms"),
        }
        for n, rs in (("1", one), ("2", two))
    }
    ratio = summary["2"]["auth_per_second"] / summary["1"]["auth_per_second"]
    return {
        "command": command,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "settings": {k: v for k, v in vars(opts).items() if k != "out"},
        "summary": summary,
        "throughput_ratio_2_over_1": ratio,
        "runs": [dataclasses.asdict(r) for r in runs],
    }


def to_markdown(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    lines = [
        "# Workers: 1 against 2 worker processes",
        "",
        f"`{doc['command']}` on {doc['machine']['cpus']} CPUs ({doc['machine']['platform']}),"
        f" level {doc['settings']['level']} in flight over {doc['settings']['connections']}"
        f" connections, {doc['settings']['requests']} authorizations per run, medians of"
        f" {doc['settings']['rounds']} alternating runs. SoftHSM, SQLite (WAL,"
        " synchronous=FULL), mutual TLS; nothing pinned; the generator shares the cores.",
        "",
        "| workers | auth/s | server CPU-ms/auth | client CPU-ms/auth | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|",
    ]
    for n in ("1", "2"):
        r = s[n]
        lines.append(
            f"| {n} | {r['auth_per_second']:.0f} | {r['server_cpu_ms_per_auth']:.2f} | "
            f"{r['client_cpu_ms_per_auth']:.2f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} |"
        )
    lines += [
        "",
        f"Throughput 2 workers / 1 worker: **{doc['throughput_ratio_2_over_1']:.2f}x**.",
        "",
        "| run | workers | auth/s | server CPU-ms/auth | connections per worker |"
        " commits | auth/commit | ms/commit | errors | exit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(doc["runs"]):
        lines.append(
            f"| {i} | {r['workers']} | {r['per_second']:.0f} | "
            f"{r['server_cpu_ms_per_auth']:.2f} | {r['connections_by_worker']} | "
            f"{r['commits']} | {r['mean_batch']:.1f} | {r['mean_commit_ms']:.2f} | "
            f"{r['errors'] or '-'} | {r['exit_status']} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.workers_bench")
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--level", type=int, default=64)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=load.REPORT_DIR)
    opts = p.parse_args(argv)
    command = "python -m benchmarks.workers_bench " + " ".join(argv or sys.argv[1:])
    result = trio.run(_main, opts)
    doc = report(result["runs"], opts, command.strip())
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "workers.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (opts.out / "workers.md").write_text(to_markdown(doc))
    print(to_markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
