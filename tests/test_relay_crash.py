"""SIGKILL of real switch processes publishing events: no event lost, none invented.

Each round starts ``python -m switch serve`` with ``[events] backend = "sqs"`` pointed at a
``moto_server`` FIFO queue on loopback, loads it as test_crash_safety.py does (new 0100s and
0200s, duplicates, reversals and their repeats, from several mutual-TLS connections) and
kills it with SIGKILL at a random moment (commits, relay calls and marks in flight). A last
process runs until its relay has published the outbox (the dead instances' leases expire
first). Then:

- every journal row has exactly one outbox row, and every outbox row a journal row: an event
  exists iff its decision committed (read straight from the SQLite file);
- every outbox row arrived on the queue (duplicates allowed: at least once), with the body
  the outbox holds, valid against the schema, first arrivals in order per account;
- every answer a client received (other than a 91 stand-in) has its event with the same DE39,
  and no event belongs to a request that was not sent;
- the database passes the crash-safety checks of ``crash_support.check_database``.

The seed is printed (``CARDSWITCH_CRASH_SEED`` replays another). ``ROUNDS`` is CI-sized; the
``slow`` variant runs more rounds.
"""

from __future__ import annotations

import json
import os
import random
import ssl
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
from crash_support import (
    Load,
    check_database,
    open_readonly,
    seed,
    stop_now,
    switch_env,
    write_config,
)
from test_events_support import (  # noqa: F401 - fixtures
    AWS_ENV,
    REGION,
    Consumer,
    MotoSqs,
    check_order,
    fifo_queue,
    moto_sqs,
    schema_validator,
    strip_transport,
)

from switch import testing
from switch.config import EventsConfig, load
from switch.pki import PkiPaths
from switch.wire.messages import ReversalRequest

SEED_ENV = "CARDSWITCH_CRASH_SEED"
DEFAULT_SEED = 20_261_201
#: Seconds of load before each kill.
KILL_AFTER = (0.2, 1.5)
#: Waiting for the last switch to publish the whole outbox, and for the consumer to receive
#: it: moto's FIFO queue takes 10-40 messages a second on this machine (slower as it grows),
#: so the wait goes on while the count moves, and fails after ``STALL_TIMEOUT`` seconds
#: without progress or ``DRAIN_BOUND`` seconds in all.
STALL_TIMEOUT = 30.0
DRAIN_BOUND = 900.0
#: Lease of the relays: a restarted switch waits this long for the killed one's to expire.
LEASE_SECONDS = 2.0


def _config(tmp: Path, pki: PkiPaths, moto: MotoSqs, queue_url: str) -> Path:
    path = write_config(tmp, pki)
    events = EventsConfig(
        backend="sqs", queue_url=queue_url, region=REGION, endpoint_url=moto.endpoint,
        batch_size=100, poll_interval=0.05, lease_seconds=LEASE_SECONDS,
    )  # fmt: skip
    return testing.write_config(replace(load(path), events=events), path)


async def _start(config: Path, tmp: Path, tag: str) -> testing.SwitchProcess:
    with (tmp / f"switch-{tag}.log").open("wb") as logfile:
        return await testing.start_switch(
            config,
            tmp / f"ready-{tag}.json",
            env={**switch_env(tmp), **AWS_ENV},
            output=logfile,
            ready_within=20.0,
        )


def _outbox_pending(db: Path) -> int:
    with open_readonly(db) as conn:
        row = conn.execute(
            "SELECT count(*) FROM events WHERE published_at IS NULL AND parked_at IS NULL"
        ).fetchone()
    return int(row[0])


async def _until_done(left: Callable[[], int], what: str) -> None:
    """Until ``left()`` (another process's or thread's backlog) is 0; fails when it has not
    gone down for ``STALL_TIMEOUT`` seconds, or after ``DRAIN_BOUND`` seconds in all."""
    with trio.fail_after(DRAIN_BOUND):
        best, since = left(), trio.current_time()
        while best > 0:
            await trio.sleep(0.1)
            now = left()
            if now < best:
                best, since = now, trio.current_time()
            assert trio.current_time() - since < STALL_TIMEOUT, f"{what}: {best} left, stuck"


async def _crash_rounds(
    rounds: int, pki: PkiPaths, ctx: ssl.SSLContext, tmp: Path, *, moto: MotoSqs, queue: str
) -> None:
    seed_value = int(os.environ.get(SEED_ENV) or DEFAULT_SEED)
    print(f"relay crash seed={seed_value} (replay: {SEED_ENV}={seed_value}); logs in {tmp}")
    rng = random.Random(seed_value)
    config = _config(tmp, pki, moto, queue)
    await seed(config, tmp)
    db = tmp / "cardswitch.db"
    load_ = Load(rng)
    with Consumer(moto.client, queue) as consumer:
        for number in range(rounds):
            switch = await _start(config, tmp, f"{number:02d}")
            try:
                kill_after = rng.uniform(*KILL_AFTER)
                await load_.round(number, switch.process, switch.port, ctx, kill_after)
            finally:
                stop_now(switch.process)
                with trio.move_on_after(10):
                    await switch.process.wait()
        last = await _start(config, tmp, "last")
        try:
            await _until_done(lambda: _outbox_pending(db), "the outbox")
        finally:
            await last.stop()

        with open_readonly(db) as conn:
            journal = {r["id"]: r for r in conn.execute("SELECT * FROM journal")}
            outbox = {r["event_id"]: r for r in conn.execute("SELECT * FROM events")}
        await _until_done(lambda: len(set(outbox) - consumer.received()), "the consumer")
    bodies = list(consumer.bodies)
    assert journal, "the load committed nothing"
    by_journal: dict[int, list[str]] = {}
    for event_id, row in outbox.items():
        by_journal.setdefault(row["journal_id"], []).append(event_id)
    assert set(by_journal) == set(journal), "an event without its decision, or the reverse"
    assert all(len(ids) == 1 for ids in by_journal.values())
    assert all(row["parked_at"] is None for row in outbox.values())

    received = {b["event_id"] for b in bodies}
    assert received >= set(outbox), f"{len(set(outbox) - received)} events never arrived"
    assert received <= set(outbox), "an event the outbox never held"
    validator = schema_validator()
    for body in bodies:
        row = outbox[body["event_id"]]
        assert strip_transport(body) == {**json.loads(row["payload"]), "sequence": row["id"]}
        assert not list(validator.iter_errors(strip_transport(body)))
    assert not check_order(bodies)

    events_by_key: dict[tuple[str, str], dict[str, Any]] = {}
    for body in bodies:
        events_by_key[(body["stan"], body["mti"][:3])] = body
    sent = {x.request.stan for x in load_.exchanges}
    assert {stan for stan, _ in events_by_key} <= sent
    for x in load_.exchanges:
        if x.response is None or x.response.response_code == "91":
            continue
        req = x.request
        event = events_by_key.get((req.stan, req.mti[:3]))
        assert event is not None, f"answered stan={req.stan} mti={req.mti}: no event"
        assert event["response_code"] == x.response.response_code, req.stan
        assert event["type"] == (
            "reversal" if isinstance(req, ReversalRequest) else "authorization"
        )
    report = check_database(db, load_.exchanges)
    assert not report.violations, report.violations[:10]
    print(f"{rounds} kills: {len(journal)} decisions, {len(bodies)} messages "
          f"({len(bodies) - len(received)} duplicates)")  # fmt: skip


async def test_sigkill_under_load_loses_no_event(
    pki: PkiPaths,
    client_ctx: ssl.SSLContext,
    tmp_path: Path,
    moto_sqs: MotoSqs,  # noqa: F811
    fifo_queue: str,  # noqa: F811
) -> None:
    await _crash_rounds(3, pki, client_ctx, tmp_path, moto=moto_sqs, queue=fifo_queue)


@pytest.mark.slow
async def test_sigkill_under_load_loses_no_event_long(
    pki: PkiPaths,
    client_ctx: ssl.SSLContext,
    tmp_path: Path,
    moto_sqs: MotoSqs,  # noqa: F811
    fifo_queue: str,  # noqa: F811
) -> None:
    await _crash_rounds(12, pki, client_ctx, tmp_path, moto=moto_sqs, queue=fifo_queue)
