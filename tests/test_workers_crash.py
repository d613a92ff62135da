"""Crash safety of ``serve --workers 2`` on one host, on PostgreSQL and on SQLite.

``serve`` accepts workers on SQLite (the supervisor only warns that they share one write
lock: every worker commits through ``BEGIN IMMEDIATE`` with a busy timeout), so both backends
are crashed. Each round starts a supervisor with two real workers (SoftHSM, mutual TLS, one
SO_REUSEPORT port), loads it with crash_support's mix (approvals, insufficient-funds
declines, wrong PINs, duplicates and repeats, reversals and their repeats) over several
connections, SIGKILLs one worker (chosen at random) with requests in flight, keeps loading
until the supervisor has started it again, then SIGKILLs the whole group at once
(supervisor and both workers, as the kernel ends a container's processes) with requests in
flight. After the last round a fresh supervisor answers an echo and an approval and drains
on SIGTERM (exit 0); then ``crash_support.check_database`` holds the database to every
answer the clients received (each approval journaled once with its hold, answers to one key
the same, available = ledger - active holds, one hold per key, no reversal releasing more
than was held, velocity equal to the holds, PIN-try counters equal to the wrong PINs
journaled and never down between the samples taken after each kill).

CARDSWITCH_CRASH_ROUNDS=N runs N rounds (two kills each) instead of ``ROUNDS``.
"""

from __future__ import annotations

import os
import random
import signal
import ssl
from pathlib import Path

import pytest
import trio
from cluster_support import kill_group, recover
from crash_support import (
    CONNECTIONS,
    Load,
    RoundStats,
    available_balance,
    check_database,
    crash_rounds,
    pin_tries,
    seed,
)
from workers_support import Supervised, supervised, worker_pids, write_config

from switch.config import StoreConfig
from switch.pki import PkiPaths

#: Rounds of (kill a worker, kill the group) in the default run (CI-sized: a round is about
#: 12 s on the shared 2-core machine).
ROUNDS = 1
#: Seconds of load before each kill are drawn from this range.
KILL_AFTER = (0.3, 1.5)
#: Seconds for the supervisor to start a killed worker again.
RESTART_WITHIN = 30.0


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
async def test_kill_a_worker_and_the_whole_group_keeps_every_answer(
    backend: str,
    pki: PkiPaths,
    client_ctx: ssl.SSLContext,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> None:
    db: Path | str
    if backend == "postgres":
        dsn: str = request.getfixturevalue("pg_dsn")
        db = dsn
        store = StoreConfig(
            backend="postgres", dsn=dsn, pool_size=4, statement_timeout=3.0, lock_timeout=2.0
        )
    else:
        db = tmp_path / "cardswitch.db"
        store = StoreConfig(path=db)
    cfg = write_config(tmp_path, pki, workers=2, store=store)
    await seed(cfg, tmp_path)
    rng = random.Random(20_261_204)
    load = Load(rng, pins=True)
    stats = RoundStats(0)
    samples: list[dict[str, int]] = []
    in_flight_at_kills: list[int] = []
    worker_kills = group_kills = 0
    rounds = crash_rounds(ROUNDS)
    started = trio.current_time()
    for number in range(rounds):
        async with supervised(cfg, tmp_path, f"{number:03d}") as sup:
            async with trio.open_nursery() as nursery:
                stop = trio.Event()
                for _ in range(CONNECTIONS):
                    nursery.start_soon(_keep_connected, sup, client_ctx, load, stats, stop)
                # One worker, chosen at random, with requests in flight.
                await trio.sleep(rng.uniform(*KILL_AFTER))
                await load.wait_in_flight()
                pids = await worker_pids(sup)
                victim = rng.choice(sorted(pids))
                old = pids[victim]
                assert old is not None
                in_flight_at_kills.append(load.in_flight)
                os.kill(old, signal.SIGKILL)
                worker_kills += 1
                await _restarted(sup, victim, old)
                samples.append(await trio.to_thread.run_sync(pin_tries, db))
                # Then the supervisor and both workers at once.
                await trio.sleep(rng.uniform(*KILL_AFTER))
                await load.wait_in_flight()
                group = [sup.switch.pid, *(p for p in (await worker_pids(sup)).values() if p)]
                in_flight_at_kills.append(load.in_flight)
                kill_group(group)
                group_kills += 1
                stop.set()
                with trio.fail_after(15):
                    await sup.switch.process.wait()
                    await _gone(group)
                nursery.cancel_scope.deadline = trio.current_time() + 15
        assert sup.switch.process.returncode == -signal.SIGKILL
        samples.append(await trio.to_thread.run_sync(pin_tries, db))
    loop_seconds = trio.current_time() - started

    recovery = await recover(cfg, tmp_path, client_ctx, load)
    report = await trio.to_thread.run_sync(
        lambda: check_database(db, load.exchanges, pin_samples=samples)
    )
    answered = sum(1 for x in load.exchanges if x.response is not None)
    print(
        f"workers-crash[{backend}]: {rounds} rounds, {worker_kills} worker kills and "
        f"{group_kills} group kills in {loop_seconds:.1f}s, in flight at each kill "
        f"{in_flight_at_kills}, {len(load.exchanges)} requests, {answered} answered, "
        f"{report.approvals_checked} approvals checked, codes {report.codes}, "
        f"{report.pin_tries} wrong PINs over {report.pin_samples} samples, "
        f"{report.approvals_unanswered} approvals committed but unanswered, "
        f"timeouts {load.timeouts}, {len(report.violations)} violations"
    )
    problems = "\n".join(report.violations[:40])
    assert not report.violations, f"{len(report.violations)} violations:\n{problems}"
    assert recovery.echo_code == "00" and recovery.exit_code == 0
    assert recovery.approval.response_code == "00"
    balance = recovery.approval.available_balance
    assert balance is not None and balance.amount == available_balance(db, "crash-acct-a")
    assert all(n > 0 for n in in_flight_at_kills), in_flight_at_kills
    assert report.codes.get("00", 0) > 0 and report.codes.get("51", 0) > 0, report.codes
    assert report.pin_tries > 0 and load.timeouts == 0


async def _keep_connected(
    sup: Supervised, ctx: ssl.SSLContext, load: Load, stats: RoundStats, stop: trio.Event
) -> None:
    """One loaded connection at a time to the supervisor's port until ``stop`` (a new one
    after a worker's death closed the last)."""
    while not stop.is_set() and sup.switch.process.poll() is None:
        await load._connection(sup.port, ctx, stats)
        await trio.sleep(0.05)


async def _restarted(sup: Supervised, victim: str, old: int) -> None:
    """Wait until the supervisor reports worker ``victim`` running again with a new pid."""
    with trio.fail_after(RESTART_WITHIN):
        while True:
            pid = (await worker_pids(sup)).get(victim)
            status, _ = await sup.get("/readyz")
            if pid not in (None, old) and status == 200:
                return
            await trio.sleep(0.2)


async def _gone(pids: list[int]) -> None:
    """Wait until none of ``pids`` runs any more (the workers are not our children: a dead
    one may stay a zombie until whoever adopted it reaps it)."""
    while True:
        if not any(_running(pid) for pid in pids):
            return
        await trio.sleep(0.05)


def _running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")
