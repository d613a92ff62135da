"""Commit throughput of the PostgreSQL store: worker threads over a pool against one batching
writer thread, in the same invocation on the same throwaway cluster (fsync on).

What lives here: ``python -m benchmarks.pg_store [--decisions N] [--concurrency C]`` starts a
cluster from Debian's binaries (``tests/pg_fixtures.py``), provisions accounts and cards, and
times ``commit_auth`` of ``PostgresStore`` (design a: one transaction per decision, sync psycopg
in ``trio.to_thread`` workers, pool sizes 1/4/8/16) against design b (one dedicated thread
that takes everything queued and commits it as one transaction, one savepoint per decision,
the same ``_apply_auth``), on spread accounts and on one hot account. Writes
``benchmarks/reports/pg_store.md`` and ``.json``.

What does not: assertions; the full authorization path (``benchmarks.load``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import psycopg
import trio

from switch.store import Account, open_store
from switch.store.postgres import _apply_auth, connection_kwargs

# The cluster helper and the intent builders are the tests' own (tests/ is not a package).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pg_fixtures import pg_server, store_config
from test_store_support import CURRENCY, auth, dup_key, make_card

REPORTS = Path(__file__).resolve().parent / "reports"
ACCOUNTS = 64


async def _provision(dsn: str) -> None:
    async with open_store(store_config(dsn)) as store:
        for i in range(ACCOUNTS):
            await store.put_account(Account(f"acct-{i}", CURRENCY, 10**12, 10**12))
            await store.put_card(make_card(f"card-{i}", f"4000{i:012d}", f"acct-{i}"))


def _intent(n: int, hot: bool, run: str) -> Any:
    """Decision ``n`` of a run (the run names the network, so every key is new)."""
    i = 0 if hot else n % ACCOUNTS
    key = replace(dup_key(f"{n:06d}"), network=run)
    return auth(f"{n:06d}", 1, card_id=f"card-{i}", account_id=f"acct-{i}", dup_key=key)


async def _drive(
    commit: Callable[[Any], Any], decisions: int, concurrency: int, hot: bool, run: str
) -> dict[str, float]:
    latencies: list[float] = []
    queue = iter(range(decisions))

    async def worker() -> None:
        for n in queue:
            t0 = time.perf_counter()
            await commit(_intent(n, hot, run))
            latencies.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(worker)
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return {
        "per_second": round(decisions / elapsed),
        "p50_ms": round(statistics.median(latencies) * 1000, 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2),
    }


class _BatchWriter:
    """Design b: one thread commits everything queued as one transaction (savepoints)."""

    def __init__(self, dsn: str) -> None:
        self._conn = psycopg.connect(dsn, **connection_kwargs(store_config(dsn)))
        self._send, self._recv = trio.open_memory_channel[tuple[Any, trio.Event, list[Any]]](
            float("inf")
        )
        self.batches = 0

    async def commit(self, intent: Any) -> Any:
        done = trio.Event()
        box: list[Any] = []
        self._send.send_nowait((intent, done, box))
        await done.wait()
        return box[0]

    def _apply(self, intents: list[Any]) -> list[Any]:
        out = []
        with self._conn.transaction():
            for intent in intents:
                with self._conn.transaction():  # a savepoint
                    out.append(_apply_auth(self._conn, intent))
        return out

    async def run(self) -> None:
        limiter = trio.CapacityLimiter(1)
        async for first in self._recv:
            batch = [first]
            while len(batch) < 128:
                try:
                    batch.append(self._recv.receive_nowait())
                except trio.WouldBlock:
                    break
            results = await trio.to_thread.run_sync(
                self._apply, [b[0] for b in batch], limiter=limiter
            )
            self.batches += 1
            for (_, done, box), result in zip(batch, results, strict=True):
                box.append(result)
                done.set()


async def _bench(decisions: int, concurrency: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with pg_server(fsync=True) as server, server.database() as dsn:
        await _provision(dsn)
        for hot in (False, True):
            load = "hot account" if hot else f"{ACCOUNTS} accounts"
            for size in (1, 4, 8, 16):
                cfg = store_config(dsn, pool_size=size, statement_timeout=30.0, lock_timeout=30.0)
                async with open_store(cfg) as store:
                    name = f"a: threads, pool {size}, {load}"
                    run = f"a{size}{int(hot)}"
                    results[name] = await _drive(store.commit_auth, decisions, concurrency, hot,
                                                 run)  # fmt: skip
                    print(name, results[name], flush=True)
            writer = _BatchWriter(dsn)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(writer.run)
                name = f"b: one batching writer, {load}"
                results[name] = await _drive(writer.commit, decisions, concurrency, hot,
                                             f"b{int(hot)}")  # fmt: skip
                results[name]["batches"] = writer.batches
                print(name, results[name], flush=True)
                writer._send.close()
            with contextlib.suppress(Exception):
                writer._conn.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--decisions", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    results = trio.run(_bench, args.decisions, args.concurrency)
    REPORTS.mkdir(exist_ok=True)
    meta = {"decisions": args.decisions, "concurrency": args.concurrency,
            "machine": platform.platform(), "python": platform.python_version()}  # fmt: skip
    (REPORTS / "pg_store.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    lines = [
        "# PostgreSQL store: commit_auth throughput",
        "",
        f"`python -m benchmarks.pg_store --decisions {args.decisions} --concurrency "
        f"{args.concurrency}`, fsync on, synchronous_commit on, Unix socket, {meta['machine']}.",
        "",
        "| design | decisions/s | p50 ms | p99 ms |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['per_second']} | {r['p50_ms']} | {r['p99_ms']} |")
    (REPORTS / "pg_store.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
