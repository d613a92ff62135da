"""PostgreSQL crashed under load with a real switch process, then started again.

One ``python -m switch serve`` (SoftHSM, mutual TLS) on a PostgreSQL cluster of its own is
loaded with crash_support's mix. The cluster is stopped with ``pg_ctl stop -m immediate``
(every backend killed, crash recovery at the next start), left down for a few seconds and
started again; the switch is never restarted. While the database is down every request is
answered, with the stand-in code (91), within the budget plus a small margin; once it is
back approvals come again from the same process, which then drains on SIGTERM and exits 0.
Afterwards ``crash_support.check_database`` holds the database to every answer: no 00
without its journal row and hold, answers to one key all the same, balances, holds,
reversals and PIN tries consistent. A decision whose COMMIT was cut by the crash may be
committed although its answer was 91 (the outcome was unknown to the switch; the network's
repeat gets what was committed): the test reports how many.
"""

from __future__ import annotations

import dataclasses
import random
import ssl
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import trio
from crash_support import (
    CONNECTIONS,
    Exchange,
    Load,
    RoundStats,
    check_database,
    pin_tries,
    seed,
    switch_env,
    write_config,
)
from pg_fixtures import INSTALL_HINT, LocalCluster, find_bindir, store_config

from switch import config as config_mod
from switch import testing
from switch.config import PipelineConfig, StoreConfig
from switch.pki import PkiPaths
from switch.store import postgres

#: The switch's budget, and what an answer may take beyond it as the client sees it (TLS,
#: the client's own loop on a loaded 2-core machine).
BUDGET = 1.5
MARGIN = 0.75
#: Seconds of load before the crash, and the database stays down.
BEFORE = 2.0
DOWN = 4.0
#: Seconds after the restart within which approvals must come again.
RECOVER_WITHIN = 30.0


@pytest.fixture
def own_cluster() -> Iterator[tuple[LocalCluster, str]]:
    """A PostgreSQL cluster of this test's own (it is crashed), with a migrated database."""
    if find_bindir() is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    cluster = LocalCluster.create()
    try:
        cluster.start()
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE outage")
        dsn = cluster.dsn("outage")
        postgres.migrate(store_config(dsn))
        yield cluster, dsn
    finally:
        cluster.destroy()


def _config(tmp: Path, pki: PkiPaths, dsn: str) -> Path:
    store = StoreConfig(
        backend="postgres", dsn=dsn, pool_size=4, statement_timeout=0.8, lock_timeout=0.4
    )
    path = write_config(tmp, pki, store=store)
    cfg = config_mod.load(path)
    pipeline = PipelineConfig(budget=BUDGET, breaker_cool_down=1.0)
    return testing.write_config(dataclasses.replace(cfg, pipeline=pipeline), path)


async def test_postgres_crash_under_load_stands_in_then_recovers_without_restart(
    pki: PkiPaths, client_ctx: ssl.SSLContext, tmp_path: Path, own_cluster: tuple[LocalCluster, str]
) -> None:
    cluster, dsn = own_cluster
    cfg = _config(tmp_path, pki, dsn)
    await seed(cfg, tmp_path)
    load = Load(random.Random(20_261_203), pins=True)
    stats = RoundStats(0)
    with (tmp_path / "switch.log").open("wb") as logfile:
        switch = await testing.start_switch(
            cfg, tmp_path / "ready.json", env=switch_env(tmp_path), output=logfile
        )
    samples: list[dict[str, int]] = []
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(CONNECTIONS):
                nursery.start_soon(load._connection, switch.port, client_ctx, stats)
            await trio.sleep(BEFORE)
            samples.append(pin_tries(dsn))
            crash_at = trio.current_time()
            await trio.to_thread.run_sync(cluster.stop, "immediate")
            down_at = trio.current_time()
            await trio.sleep(DOWN)
            restart_at = trio.current_time()
            await trio.to_thread.run_sync(cluster.start)
            up_at = trio.current_time()
            with trio.fail_after(RECOVER_WITHIN):
                while True:
                    if _approved_after(load.exchanges, up_at):
                        break
                    await trio.sleep(0.1)
            recovered_at = trio.current_time()
            await trio.sleep(1.0)
            samples.append(pin_tries(dsn))
            assert switch.process.poll() is None, "the switch died"
            exit_code = await switch.stop()
            nursery.cancel_scope.deadline = trio.current_time() + 10
    finally:
        switch.kill()

    down = [
        x
        for x in load.exchanges
        if x.sent_at >= down_at and x.answered_at is not None and x.answered_at <= restart_at
    ]
    answered = [x for x in load.exchanges if x.response is not None]
    slow = [x for x in answered if _seconds(x) > BUDGET + MARGIN]
    report = check_database(dsn, load.exchanges, pin_samples=samples)
    cut = _stood_in_but_committed(dsn, load.exchanges)
    print(
        f"pg-outage: crash took {down_at - crash_at:.2f}s, down {restart_at - down_at:.1f}s, "
        f"start took {up_at - restart_at:.1f}s, approvals again {recovered_at - up_at:.1f}s "
        f"after; {len(load.exchanges)} requests, {len(answered)} answered, "
        f"{len(down)} answered while down (codes {sorted({_code(x) for x in down})}, "
        f"slowest {max((_seconds(x) for x in down), default=0):.2f}s), slowest of all "
        f"{max((_seconds(x) for x in answered), default=0):.2f}s (budget {BUDGET}s), "
        f"codes {report.codes}, {report.approvals_checked} approvals checked, "
        f"{cut} answered 91 but committed (COMMIT cut by the crash), "
        f"{len(report.violations)} violations"
    )
    problems = "\n".join(report.violations[:40])
    assert not report.violations, f"{len(report.violations)} violations:\n{problems}"
    assert len(down) > 10 and {_code(x) for x in down} == {"91"}
    assert not slow, [(x.request.stan, _code(x), round(_seconds(x), 2)) for x in slow[:10]]
    assert report.codes.get("00", 0) > 0 and load.timeouts == 0
    assert exit_code == 0


def _seconds(x: Exchange) -> float:
    assert x.answered_at is not None
    return x.answered_at - x.sent_at


def _code(x: Exchange) -> str:
    assert x.response is not None
    return x.response.response_code


def _approved_after(exchanges: list[Exchange], moment: float) -> bool:
    return any(
        x.sent_at >= moment and x.response is not None and x.response.response_code == "00"
        for x in exchanges
    )


def _stood_in_but_committed(dsn: str, exchanges: list[Exchange]) -> int:
    """Requests answered 91 whose decision is nevertheless journaled (and no other answer
    for the same request was received)."""
    with psycopg.connect(dsn) as conn:
        keys = {
            (stan, mti_class)
            for stan, mti_class in conn.execute(
                "SELECT stan, mti_class FROM journal WHERE kind <> 'duplicate'"
            ).fetchall()
        }
    answered: dict[tuple[str, str], set[str]] = {}
    for x in exchanges:
        if x.response is not None:
            key = (x.request.stan, x.request.mti[:3])
            answered.setdefault(key, set()).add(x.response.response_code)
    return sum(1 for key, codes in answered.items() if codes == {"91"} and key in keys)
