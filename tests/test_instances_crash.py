"""Three switch processes on one PostgreSQL database, SIGKILLed one at a time under load.

Three real ``python -m switch serve`` processes (SoftHSM through PKCS#11, PostgreSQL, mutual
TLS) share one database. Clients load all three with crash_support's mix over a few hot
accounts (approvals, insufficient-funds declines on the low account, wrong PINs, duplicates
and 0101 repeats, reversals and their repeats) and two races between instances: the same new
request sent to two instances at once, and a full reversal sent to another instance while
its original is in flight. A killer SIGKILLs a random instance with requests in flight at
random moments; each is started again at once. After the load a fresh process answers an
echo and an approval, and ``crash_support.check_database`` reads the database: every
approval a client received journaled exactly once with its hold, answers to one key all
the same, available = ledger - active holds and ledger = opening - debits on every account,
one hold per duplicate key, no reversal releasing more than was held (an overtaking
reversal leaves its original declined), velocity counters equal to the holds, and every
PIN-try counter equal to the wrong PINs journaled and never going down across the samples
taken during the load.

The default run is the issue's figure: at least 20 kills and 60 s of load.
CARDSWITCH_CRASH_ROUNDS=N sets the number of kills (``make soak``: 100); the load lasts
until both are reached. CARDSWITCH_CRASH_SEED replays other random choices (the timing of
the kills depends on the machine); the logs of every process stay in the test's tmp dir.
"""

from __future__ import annotations

import os
import random
import ssl
from pathlib import Path

import trio
from cluster_support import Cluster, pg_config, recover
from crash_support import Load, available_balance, check_database, crash_rounds, seed

from switch.pki import PkiPaths

SEED_ENV = "CARDSWITCH_CRASH_SEED"
DEFAULT_SEED = 20_261_202
INSTANCES = 3
#: Kills (SIGKILL of one instance) at least, and seconds of load at least.
KILLS = 20
LOAD_SECONDS = 60.0


async def test_three_instances_on_postgres_survive_kills_under_load(
    pki: PkiPaths, client_ctx: ssl.SSLContext, tmp_path: Path, pg_dsn: str
) -> None:
    seed_value = int(os.environ.get(SEED_ENV) or DEFAULT_SEED)
    kills = crash_rounds(KILLS)
    print(f"instances-crash seed={seed_value} kills={kills}; logs in {tmp_path}")
    config = pg_config(tmp_path, pki, pg_dsn)
    await seed(config, tmp_path)

    load = Load(random.Random(seed_value), pins=True)
    cluster = Cluster(config, tmp_path, client_ctx, load, INSTANCES, db=pg_dsn)
    started = trio.current_time()
    seconds = await cluster.run(kills=kills, seconds=LOAD_SECONDS)
    recovery = await recover(config, tmp_path, client_ctx, load)
    report = await trio.to_thread.run_sync(
        lambda: check_database(pg_dsn, load.exchanges, pin_samples=cluster.pin_samples)
    )
    total = trio.current_time() - started

    answered = [x for x in load.exchanges if x.response is not None]
    twins_agreeing = cluster.twins_answered
    print(
        f"instances-crash: {len(cluster.kills)} kills over {seconds:.1f}s of load "
        f"({total:.1f}s with recovery and checks), kills per instance "
        f"{[sum(1 for k in cluster.kills if k.instance == i) for i in range(INSTANCES)]}, "
        f"in flight at each kill {[k.in_flight for k in cluster.kills]}, starts took "
        f"{min(cluster.start_seconds):.1f}-{max(cluster.start_seconds):.1f}s, "
        f"{len(load.exchanges)} requests, {len(answered)} answered, "
        f"{report.approvals_checked} approvals checked, codes {report.codes}, "
        f"{cluster.twins} sent to two instances ({twins_agreeing} answered by both), "
        f"{cluster.races} racing reversals ({report.unmatched_reversals} overtook), "
        f"{report.pin_tries} wrong PINs over {report.pin_samples} samples, "
        f"{report.approvals_unanswered} approvals committed but unanswered, "
        f"{report.journal_rows} journal rows, {report.holds} holds, "
        f"timeouts {load.timeouts}, {len(report.violations)} violations"
    )
    problems = "\n".join(report.violations[:40])
    assert not report.violations, (
        f"seed {seed_value}: {len(report.violations)} violations:\n{problems}"
    )

    assert recovery.echo_code == "00" and recovery.exit_code == 0
    assert recovery.approval.response_code == "00" and recovery.approval.approval_code
    balance = recovery.approval.available_balance
    assert balance is not None
    assert balance.amount == available_balance(pg_dsn, "crash-acct-a")

    # The run exercised what it claims.
    assert len(cluster.kills) >= kills and seconds >= LOAD_SECONDS
    assert {k.instance for k in cluster.kills} == set(range(INSTANCES))
    assert all(k.in_flight > 0 for k in cluster.kills), [k.in_flight for k in cluster.kills]
    assert report.codes.get("00", 0) > 0 and report.codes.get("51", 0) > 0, report.codes
    assert report.pin_tries > 0 and report.pin_samples > 1
    assert twins_agreeing > 0 and cluster.races > 0
    assert load.timeouts == 0
