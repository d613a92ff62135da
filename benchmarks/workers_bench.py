"""Authorizations per second and CPU per authorization by deployment shape: 1 or 2 worker
processes, SQLite or PostgreSQL, one or two instances, spread or hot accounts.

What lives here: a small driver over ``benchmarks.load``'s pieces (its configuration, seed,
request builder, phase and CPU readers, used as they are), run as
``python -m benchmarks.workers_bench --setups sqlite:1,sqlite:2,pg:1,pg:2,pg:1x2,pg:1:hot``
from the repository root. A setup is ``STORE:WORKERS[xINSTANCES][:hot]``: the store
(``sqlite``: one file; ``pg``: a throwaway PostgreSQL cluster, fsync on, started once from
tests/pg_fixtures.py), ``[server] workers`` per instance (2: a supervisor and two workers
sharing the port through SO_REUSEPORT), the number of separate ``serve`` processes on their
own ports (PostgreSQL only; the connections are split between them), and where the load
lands: by default spread over ``SPREAD_CARDS`` cards on as many accounts, with ``hot`` all
on the one load card and its account (the contention figure: every decision locks that
account's row). One throw-away directory is seeded once (dev PKI, SoftHSM token with the
demo keys, the cards in the SQLite file and in the PostgreSQL database); then the setups
run one after the other, ``--rounds`` times, each switch driven by this process over
``--connections`` mutual-TLS connections with ``--level`` authorizations in flight (track 2
with its CVV, through SoftHSM) and stopped with SIGTERM (exit status reported). Nothing is
pinned: the workers need both cores, and the generator shares them, so its CPU per request
is reported as well.

Server CPU is the sum over every switch process (supervisors and workers, ``/proc/PID/stat``),
PostgreSQL's the sum over the cluster's processes (reported apart); each run's figures come
from the same invocation, and the report gives the ratios against ``sqlite:1`` and
``pg:1``. For SQLite, the store's group-commit histograms (scraped before and after the
phase) give transactions, decisions per transaction and time per transaction, which shows
what two writers on one SQLite file cost. It writes ``scale.md`` and ``scale.json`` to
``--out`` (default ``benchmarks/reports``).

What does not: assertions, switch code, the general load harness (``benchmarks/load.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from prometheus_client.parser import text_string_to_metric_families

from benchmarks import load
from benchmarks.procstat import cpu_seconds, machine_info
from hsm.algorithms.cvv import cvv
from hsm.algorithms.primitive import TdesKey
from hsm.software import SoftKey, SoftwareCipher
from switch import config, testing
from switch.acquirer import build_auth, transmission_time
from switch.client import Client
from switch.config import MetricsConfig, StoreConfig
from switch.pki import pki_paths
from switch.tls import client_context
from switch.wire.messages import Message, Track2

# The cluster helper is the tests' own (tests/ is not a package), as in benchmarks.pg_store.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pg_fixtures import pg_server

#: Cards (each on its own account) the load is spread over when a setup is not ``hot``.
SPREAD_CARDS = 16
#: The demo CVK (config/demo/keys.json, the Visa CVV test key): the spread cards' CVVs.
DEMO_CVK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
DEFAULT_SETUPS = "sqlite:1,sqlite:2,pg:1,pg:2,pg:1x2,sqlite:1:hot,pg:1:hot,pg:2:hot"
_SETUP = re.compile(r"^(sqlite|pg):([12])(?:x([12]))?(:hot)?$")


@dataclass(frozen=True)
class Setup:
    """One deployment shape: ``STORE:WORKERS[xINSTANCES][:hot]``."""

    store: str
    workers: int
    instances: int
    hot: bool

    @property
    def name(self) -> str:
        inst = f"x{self.instances}" if self.instances > 1 else ""
        return f"{self.store}:{self.workers}{inst}{':hot' if self.hot else ''}"

    @classmethod
    def parse(cls, text: str) -> Setup:
        m = _SETUP.match(text.strip())
        if m is None:
            raise ValueError(f"setup {text!r}: expected STORE:WORKERS[xINSTANCES][:hot]")
        setup = cls(m[1], int(m[2]), int(m[3] or 1), bool(m[4]))
        if setup.store == "sqlite" and setup.instances > 1:
            raise ValueError(f"setup {text!r}: several instances need PostgreSQL")
        return setup


@dataclass(frozen=True)
class Run:
    """One measured phase against one setup."""

    setup: str
    requests: int
    answered: int
    errors: dict[str, int]
    codes: dict[str, int]
    elapsed_s: float
    per_second: float
    p50_ms: float
    p99_ms: float
    server_cpu_ms_per_auth: float
    postgres_cpu_ms_per_auth: float
    client_cpu_ms_per_auth: float
    #: Connections each worker held during the phase (from the supervisors' /status).
    connections_by_worker: dict[str, int]
    #: SQLite group commit over the phase, all workers: transactions, mean decisions per
    #: transaction, mean milliseconds per transaction (BEGIN IMMEDIATE to COMMIT: includes
    #: waiting for the other worker's write lock). NaN on PostgreSQL.
    commits: int
    mean_batch: float
    mean_commit_ms: float
    exit_status: list[int | None]
    load_average: float


def _luhn(stem: str) -> str:
    """``stem`` with its Luhn check digit."""
    total = 0
    for i, ch in enumerate(reversed(stem)):
        d = int(ch) * (2 if i % 2 == 0 else 1)
        total += d - 9 if d > 9 else d
    return stem + str(-total % 10)


def _spread_pans() -> list[str]:
    return [_luhn(f"412345678901{i:03d}") for i in range(SPREAD_CARDS)]


def _cvv(pan: str) -> str:
    key = TdesKey(SoftKey(DEMO_CVK), SoftKey(DEMO_CVK[:8] * 2))
    return cvv(SoftwareCipher(), key, pan, load.LOAD_EXPIRY, load.LOAD_SERVICE_CODE)


def _write_cards(work: Path) -> Path:
    """The load card (the hot setups' only card) and the spread cards, each on its own
    account, big balances, no spend limits."""
    path = load._write_cards(work)
    doc = json.loads(path.read_text())
    template = doc["cards"][0]
    for i, pan in enumerate(_spread_pans()):
        doc["cards"].append({**template, "pan": pan, "account": f"spread-{i:02d}"})
    path.write_text(json.dumps(doc))
    return path


class _Requests(load._Requests):
    """The load's requests, over the spread cards (round robin) unless the setup is hot."""

    def __init__(self, hot: bool) -> None:
        super().__init__(None)
        pans = [load.LOAD_PAN] if hot else _spread_pans()
        self._cards = [
            Track2(pan=pan, expiry=load.LOAD_EXPIRY, service_code=load.LOAD_SERVICE_CODE,
                   discretionary=load.LOAD_PVKI + "0000" + _cvv(pan))
            for pan in pans
        ]  # fmt: skip
        self._turn = 0

    def build(self, mode: load.Mode, connection: int) -> Message:
        if mode == "echo":
            return super().build(mode, connection)
        track2 = self._cards[self._turn % len(self._cards)]
        self._turn += 1
        stan = self._next_stan()
        when = transmission_time()
        return build_auth(
            track2.pan, load.LOAD_AMOUNT, stan=stan, when=when,
            terminal=f"LOAD{connection:04d}", rrn=f"{when[:4]}{stan}{connection % 100:02d}",
            track2=track2, pos_entry_mode=load.LOAD_POS_ENTRY_MODE,
        )  # fmt: skip


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


def _postgres_cpu() -> dict[int, float]:
    """CPU seconds of every PostgreSQL server process on the machine (the throwaway cluster's:
    nothing else runs one here)."""
    out: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
            out[int(entry.name)] = cpu_seconds(int(entry.name))
        except (OSError, ValueError):
            continue
    return out


def _cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    return sum(v - before.get(pid, 0.0) for pid, v in after.items())


@contextlib.asynccontextmanager
async def _switch(cfg: config.Config, work: Path, tag: str) -> Any:
    path = testing.write_config(cfg, work / f"switch-{tag}.toml")
    ready = work / f"ready-{tag}.json"
    with (work / f"switch-{tag}.log").open("ab") as log_file:
        switch = await testing.start_switch(
            path, ready, cwd=load.REPO, output=log_file, ready_within=60
        )
    codes: list[int | None] = []
    try:
        yield switch, codes
    finally:
        with trio.CancelScope(shield=True):
            codes.append(await switch.stop(load.STOP_TIMEOUT))


async def _one(
    work: Path, bases: dict[str, Path], setup: Setup, opts: argparse.Namespace, tag: str
) -> Run:
    cfg = config.load(bases[setup.store])
    # One peer (the dev client certificate) holds every connection: lift its per-peer bound.
    listeners = tuple(
        dataclasses.replace(lst, max_connections_per_peer=opts.connections) for lst in cfg.listeners
    )
    cfg = dataclasses.replace(
        cfg, listeners=listeners, server=dataclasses.replace(cfg.server, workers=setup.workers)
    )
    pki = pki_paths(work / "pki")
    ctx = client_context(pki.ca, pki.client_cert, pki.client_key)
    requests = _Requests(setup.hot)
    metrics_ports = [testing.free_port() for _ in range(setup.instances)]
    per_instance = max(1, opts.connections // setup.instances)
    async with contextlib.AsyncExitStack() as stack:
        switches = []
        for i, mport in enumerate(metrics_ports):
            icfg = dataclasses.replace(cfg, metrics=MetricsConfig(port=mport))
            sw, codes = await stack.enter_async_context(_switch(icfg, work, f"{tag}-{i}"))
            switches.append((sw, codes))
        clients: list[Client] = []
        for sw, _ in switches:
            clients += await stack.enter_async_context(
                load._connections(sw.port, ctx, per_instance)
            )
        await trio.sleep(1.2)  # /status is published every second
        pids: list[int] = []
        held: dict[str, int] = {}
        for i, mport in enumerate(metrics_ports):
            doc = await trio.to_thread.run_sync(_status, mport)
            pids += _pids(doc)
            held.update({f"{i}.{w}": n for w, n in _held(doc).items()})
        await load._phase(clients, requests, mode="auth", level=opts.level,
                          count=opts.warmup, issue_for=60)  # fmt: skip
        store0 = [await trio.to_thread.run_sync(_store_totals, m) for m in metrics_ports]
        pg0 = _postgres_cpu() if setup.store == "pg" else {}
        cpu0 = sum(cpu_seconds(p) for p in pids)
        own0 = time.process_time()
        tally, elapsed, _ = await load._phase(
            clients, requests, mode="auth", level=opts.level, count=opts.requests,
            issue_for=120,
        )  # fmt: skip
        cpu1 = sum(cpu_seconds(p) for p in pids)
        own1 = time.process_time()
        pg_cpu = _cpu_delta(pg0, _postgres_cpu()) if setup.store == "pg" else math.nan
        store1 = [await trio.to_thread.run_sync(_store_totals, m) for m in metrics_ports]
    answered = sum(tally.codes.values())
    delta = [sum(b[k] - a[k] for a, b in zip(store0, store1, strict=True)) for k in range(3)]
    commits = delta[0] if setup.store == "sqlite" else 0
    ms = sorted(v * 1000 for v in tally.latencies) or [math.nan]
    return Run(
        setup=setup.name,
        requests=tally.sent,
        answered=answered,
        errors=dict(tally.errors),
        codes=dict(tally.codes),
        elapsed_s=elapsed,
        per_second=answered / elapsed,
        p50_ms=load.percentile(ms, 50),
        p99_ms=load.percentile(ms, 99),
        server_cpu_ms_per_auth=(cpu1 - cpu0) * 1000 / answered,
        postgres_cpu_ms_per_auth=pg_cpu * 1000 / answered,
        client_cpu_ms_per_auth=(own1 - own0) * 1000 / answered,
        connections_by_worker=held,
        commits=int(commits),
        mean_batch=delta[1] / commits if commits else math.nan,
        mean_commit_ms=delta[2] * 1000 / commits if commits else math.nan,
        exit_status=[c for _, codes in switches for c in codes],
        load_average=os.getloadavg()[0],
    )


@contextlib.contextmanager
def _postgres(needed: bool) -> Iterator[Any]:
    if not needed:
        yield None
        return
    with pg_server(fsync=True) as server, server.database() as dsn:
        yield dsn


async def _main(opts: argparse.Namespace, setups: Sequence[Setup]) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="cardswitch-workers-bench-"))
    base = load._write_config(work, "info")
    cards = _write_cards(work)
    await trio.to_thread.run_sync(load._seed, base, cards, work)
    runs: list[Run] = []
    load_before = os.getloadavg()
    with _postgres(any(s.store == "pg" for s in setups)) as dsn:
        bases = {"sqlite": base}
        if dsn is not None:
            cfg = config.load(base)
            pg_cfg = dataclasses.replace(cfg, store=StoreConfig(backend="postgres", dsn=dsn))
            bases["pg"] = testing.write_config(pg_cfg, work / "switch-pg.toml")
            # The same token and PKI; the cards into the database (dev-setup migrates it).
            await trio.to_thread.run_sync(load._seed, bases["pg"], cards, work)
        for round_ in range(opts.rounds):
            for setup in setups:
                run = await _one(
                    work, bases, setup, opts, f"{setup.name}-{round_}".replace(":", "_")
                )
                print(f"{setup.name} round={round_}: {run.per_second:.0f} auth/s, "
                      f"{run.server_cpu_ms_per_auth:.2f} server CPU-ms/auth, "
                      f"connections {run.connections_by_worker}, exit {run.exit_status}, "
                      f"codes {run.codes}, errors {run.errors or '-'}",
                      file=sys.stderr)  # fmt: skip
                runs.append(run)
    return {"work_dir": str(work), "runs": runs, "load_before": load_before,
            "load_after": os.getloadavg()}  # fmt: skip


def _median(runs: Sequence[Run], attr: str) -> float:
    return float(statistics.median(getattr(r, attr) for r in runs))


_FIGURES = ("per_second", "p50_ms", "p99_ms", "server_cpu_ms_per_auth",
            "postgres_cpu_ms_per_auth", "client_cpu_ms_per_auth")  # fmt: skip


def _ratio(summary: dict[str, dict[str, float]], a: str, b: str, key: str) -> float | None:
    if a in summary and b in summary and summary[b][key]:
        return summary[a][key] / summary[b][key]
    return None


def report(
    result: dict[str, Any], setups: Sequence[Setup], opts: argparse.Namespace, command: str
) -> dict[str, Any]:
    runs: list[Run] = result["runs"]
    summary = {
        s.name: {f: _median([r for r in runs if r.setup == s.name], f) for f in _FIGURES}
        for s in setups
    }
    pairs = [
        ("sqlite:2", "sqlite:1"), ("pg:2", "pg:1"), ("pg:1x2", "pg:1"), ("pg:1:hot", "pg:1"),
        ("sqlite:1:hot", "sqlite:1"), ("pg:2:hot", "pg:1:hot"),
    ]  # fmt: skip
    ratios = {
        f"{a} / {b}": {
            "throughput": _ratio(summary, a, b, "per_second"),
            "server_cpu_per_auth": _ratio(summary, a, b, "server_cpu_ms_per_auth"),
        }
        for a, b in pairs
        if a in summary and b in summary
    }
    return {
        "command": command,
        "machine": machine_info(),
        "load_average_before": result["load_before"],
        "load_average_after": result["load_after"],
        "settings": {k: v for k, v in vars(opts).items() if k != "out"},
        "summary": summary,
        "ratios": ratios,
        "runs": [dataclasses.asdict(r) for r in runs],
    }


def _f(v: float | None, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def to_markdown(doc: dict[str, Any]) -> str:
    m, st = doc["machine"], doc["settings"]
    lines = [
        "# Scale: workers, stores, instances and a hot account",
        "",
        f"`{doc['command']}`: {st['requests']} authorizations per run ({st['warmup']} warm-up),"
        f" {st['level']} in flight over {st['connections']} mutual-TLS connections (split"
        f" between the instances), medians of {st['rounds']} rounds of every setup in turn."
        " Approval 0100 with track 2 and its CVV through SoftHSM; SQLite WAL"
        " synchronous=FULL or PostgreSQL 15 (local socket, fsync on, synchronous_commit on);"
        f" spread load over {SPREAD_CARDS} cards on as many accounts, `hot`: every request on"
        " one card and account. Nothing is pinned: the switch processes, PostgreSQL and this"
        " generator share the 2 cores.",
        "",
        f"Machine: {json.dumps(m)}; load average before {_f(doc['load_average_before'][0])},"
        f" after {_f(doc['load_average_after'][0])}.",
        "",
        "| setup | auth/s | p50 ms | p99 ms | switch CPU-ms/auth | PostgreSQL CPU-ms/auth |"
        " generator CPU-ms/auth |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in doc["summary"].items():
        lines.append(
            f"| {name} | {_f(r['per_second'], 0)} | {_f(r['p50_ms'], 1)} | {_f(r['p99_ms'], 1)}"
            f" | {_f(r['server_cpu_ms_per_auth'])} | {_f(r['postgres_cpu_ms_per_auth'])}"
            f" | {_f(r['client_cpu_ms_per_auth'])} |"
        )
    lines += ["", "| ratio | throughput | switch CPU per auth |", "|---|---:|---:|"]
    for name, r in doc["ratios"].items():
        lines.append(f"| {name} | {_f(r['throughput'])} | {_f(r['server_cpu_per_auth'])} |")
    lines += [
        "",
        "| run | setup | auth/s | switch CPU-ms/auth | connections per worker | commits |"
        " auth/commit | ms/commit | codes | errors | exit | load |",
        "|---|---|---:|---:|---|---:|---:|---:|---|---|---|---:|",
    ]
    for i, r in enumerate(doc["runs"]):
        lines.append(
            f"| {i} | {r['setup']} | {_f(r['per_second'], 0)} | "
            f"{_f(r['server_cpu_ms_per_auth'])} | {r['connections_by_worker']} | "
            f"{r['commits'] or '-'} | {_f(r['mean_batch'], 1)} | {_f(r['mean_commit_ms'])} | "
            f"{r['codes']} | {r['errors'] or '-'} | {r['exit_status']} | {_f(r['load_average'])} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.workers_bench")
    p.add_argument("--setups", default=DEFAULT_SETUPS,
                   help="comma-separated STORE:WORKERS[xINSTANCES][:hot]")  # fmt: skip
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--level", type=int, default=64)
    p.add_argument("--connections", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", type=Path, default=load.REPORT_DIR)
    p.add_argument("--name", default="scale", help="report file stem under --out")
    opts = p.parse_args(argv)
    try:
        setups = [Setup.parse(t) for t in opts.setups.split(",") if t.strip()]
    except ValueError as exc:
        print(f"workers_bench: {exc}", file=sys.stderr)
        return 2
    command = "python -m benchmarks.workers_bench " + " ".join(argv or sys.argv[1:])
    result = trio.run(_main, opts, setups)
    doc = report(result, setups, opts, command.strip())
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / f"{opts.name}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (opts.out / f"{opts.name}.md").write_text(to_markdown(doc))
    print(to_markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
