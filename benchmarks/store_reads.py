"""Cost of the store's point lookups on the trio thread against a hop to a worker thread.

What lives here: ``python -m benchmarks.store_reads [--iterations N]`` opens a SQLite store in
a temporary directory, provisions a few thousand cards, and times the card lookup by fingerprint
through the store's inline read path (point lookups) and its worker-thread path (scans), in
the same process. It writes
``benchmarks/reports/store_reads.md`` and ``.json``.

What does not: writes (group commit is measured by the load benchmark), assertions.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

import trio

from switch.config import StoreConfig
from switch.store import open_store
from switch.store.models import Account, Card, CardStatus
from switch.store.sqlite import _CARD_SELECT, SqliteStore

#: Cards provisioned for the lookups (enough that the index has a few levels).
CARDS = 5000
REPORTS = Path(__file__).resolve().parent / "reports"


def _fingerprint(i: int) -> bytes:
    return hashlib.sha256(f"card-{i}".encode()).digest()


async def _provision(store: SqliteStore) -> None:
    await store.put_account(Account("acct", "978", 10**9, 10**9))
    for i in range(CARDS):
        card = Card(
            id=f"card-{i}",
            account_id="acct",
            pan_fingerprint=_fingerprint(i),
            pan_ciphertext=b"\x00" * 48,
            first6="400000",
            last4=f"{i % 10000:04d}",
            pan_length=16,
            expiry="3012",
            status=CardStatus.ACTIVE,
            service_code="101",
        )
        await store.put_card(card)


def _summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_us": statistics.median(ordered) * 1e6,
        "p99_us": ordered[int(len(ordered) * 0.99) - 1] * 1e6,
        "ops_per_s": len(ordered) / sum(ordered),
    }


async def run(iterations: int) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        async with open_store(StoreConfig(path=Path(tmp) / "bench.db")) as store:
            assert isinstance(store, SqliteStore)
            await _provision(store)
            inline: list[float] = []
            hop: list[float] = []
            for n in range(iterations):
                fp = _fingerprint(n % CARDS)

                def query(conn: sqlite3.Connection, fp: bytes = fp) -> object:
                    sql = f"{_CARD_SELECT} WHERE pan_fingerprint = ?"
                    return conn.execute(sql, (fp,)).fetchone()

                # The same query through the store's two read paths.
                t0 = time.perf_counter()
                await store._read(query)
                inline.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                await store._read_offloaded(query)
                hop.append(time.perf_counter() - t0)
    return {"inline": _summary(inline), "thread_hop": _summary(hop)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=5000)
    args = parser.parse_args()
    results = trio.run(run, args.iterations)
    ratio = results["thread_hop"]["median_us"] / results["inline"]["median_us"]
    lines = [
        "# Store point lookups: inline against a thread hop",
        "",
        f"`python -m benchmarks.store_reads --iterations {args.iterations}`, "
        f"{CARDS} cards, Python {platform.python_version()}, same process.",
        "",
        "| path | median µs | p99 µs | ops/s |",
        "|---|---:|---:|---:|",
    ]
    for name, row in results.items():
        lines.append(
            f"| {name} | {row['median_us']:.1f} | {row['p99_us']:.1f} | {row['ops_per_s']:.0f} |"
        )
    lines += ["", f"Thread hop / inline (median): {ratio:.1f}x", ""]
    REPORTS.mkdir(exist_ok=True)
    (REPORTS / "store_reads.md").write_text("\n".join(lines))
    (REPORTS / "store_reads.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
