"""The outbox relay against a real SQS endpoint (``moto_server`` on loopback) and its rules.

- The scripted session of test_events.py through the real server (mutual TLS, SQLite,
  SoftHSM): every decision arrives once, in order per account, with the answer's fields,
  valid against the schema, and the queue holds none of the requests' card data.
- SQS frozen (SIGSTOP) then killed during load: every answer is the one an engine without
  any relay gives, the events wait in the outbox (the pending gauge counts them), and all
  arrive once SQS is back.
- Parking (a stub SendMessageBatch, since moto accepts every entry): a message SQS rejects
  is parked at once, one that keeps failing after ``max_attempts``; neither stops other
  accounts, and the same account's later events flow on; a failed call counts no attempt.
- Two relays on one database: one active at a time; the other takes over when the active
  one's lease expires, or at once when it stops cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
from e2e_fixtures import running_switch
from test_events import (
    CVV2,
    SENTINELS,
    Session,
    backend_config,
    check_decision_events,
    cvv_values,
    run_session,
    session_store,
)
from test_events_support import (  # noqa: F401 - fixtures
    MotoServer,
    MotoSqs,
    check_order,
    create_fifo_queue,
    fifo_queue,
    moto_sqs,
    receive_all,
    schema_validator,
    sentinels_found,
    sqs_client,
    strip_transport,
)

from hsm.pkcs11 import Pkcs11Hsm
from switch import metrics
from switch.acquirer import build_auth, build_reversal
from switch.client import Client
from switch.config import EventsConfig
from switch.events import EventFailure, OutboxEvent
from switch.pki import PkiPaths
from switch.relay import (
    BatchResult,
    PublishUnavailable,
    Relay,
    SqsPublisher,
    lane_of,
    make_client,
)
from switch.store import open_store
from switch.store.memory import MemoryStore
from switch.wire.messages import AuthRequest, AuthResponse, ReversalRequest, ReversalResponse

Request = AuthRequest | ReversalRequest
Response = AuthResponse | ReversalResponse


def events_config(moto: MotoSqs | MotoServer, queue_url: str, **changes: Any) -> EventsConfig:
    endpoint = moto.endpoint
    cfg = EventsConfig(
        backend="sqs", queue_url=queue_url, region="eu-west-1", endpoint_url=endpoint,
        batch_size=50, poll_interval=0.05, lease_seconds=5.0,
    )  # fmt: skip
    return replace(cfg, **changes)


def publisher(cfg: EventsConfig) -> SqsPublisher:
    import boto3

    session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing")
    return SqsPublisher(make_client(cfg, session), cfg.queue_url)


def decisions_received(expected: int) -> Any:
    def done(bodies: list[dict[str, Any]]) -> bool:
        return len({b["event_id"] for b in bodies}) >= expected

    return done


async def test_a_session_through_the_real_server_arrives_once_in_order(  # noqa: PLR0917
    pki: PkiPaths,
    demo_hsm: Pkcs11Hsm,
    card_rows: list[Any],
    client_ctx: ssl.SSLContext,
    tmp_path: Path,
    moto_sqs: MotoSqs,  # noqa: F811
    fifo_queue: str,  # noqa: F811
) -> None:
    cfg = events_config(moto_sqs, fifo_queue)
    async with running_switch(pki, demo_hsm, card_rows, tmp_path) as sw:
        relay = Relay(sw.store, cfg, publisher(cfg).send, backoff_max=0.5)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.run)
            async with Client.connect("127.0.0.1", sw.port, client_ctx) as client:

                async def ask(request: Request) -> Response:
                    with trio.fail_after(10):
                        answer = await client.request(request)
                    assert isinstance(answer, AuthResponse | ReversalResponse)
                    return answer

                answers = await run_session(ask)
            outbox = await sw.store.events_since("")
            bodies = await trio.to_thread.run_sync(
                lambda: receive_all(moto_sqs.client, fifo_queue, decisions_received(len(outbox)))
            )
            nursery.cancel_scope.cancel()
        pending = await sw.store.pending_events(100)

    assert not pending
    assert len(bodies) == len(outbox), "each event once (no crash, no duplicate)"
    assert {b["event_id"] for b in bodies} == {e.event_id for e in outbox}
    assert not check_decision_events(bodies, answers)
    assert not check_order(bodies)
    assert all(b["_group"] == (b["account_id"] or b["card_id"] or "none") for b in bodies)
    validator = schema_validator()
    for body in bodies:
        assert not [e.message for e in validator.iter_errors(strip_transport(body))]
    texts = [json.dumps(b) for b in bodies]
    assert not sentinels_found(texts, SENTINELS)
    assert not cvv_values([strip_transport(b) for b in bodies], CVV2)
    # the journal ids published are those of the journal (SQLite's own rows, read directly)
    import sqlite3

    with sqlite3.connect(sw.db_path) as conn:
        journal = {r[0] for r in conn.execute("SELECT id FROM journal")}
    assert {b["journal_id"] for b in bodies} == journal


def _load(prefix: str, count: int) -> list[Request]:
    """Approvals, declines and reversals on two accounts; STANs from ``prefix``."""
    requests: list[Request] = []
    for i in range(count):
        pan = "4123456789012345" if i % 3 else "4666655554444111"  # main / small (51s)
        auth = build_auth(pan, 40 + i, stan=f"{prefix}{i:04d}", when="1201120000")
        requests.append(auth)
        if i % 4 == 0:
            requests.append(build_reversal(auth, stan=f"{prefix}{i + 5000:04d}", when="1201120000"))
    return requests


async def _answers(session: Session, requests: Sequence[Request]) -> list[str]:
    return [(await session.ask(r)).response_code for r in requests]


async def _wait_for(predicate: Any, within: float = 30.0) -> None:
    """Poll ``predicate`` (state of another task or process) until it holds."""
    with trio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 - no event to wait on: a condition to poll
            await trio.sleep(0.05)


def sample(name: str, **labels: str) -> float:
    value = metrics.REGISTRY.get_sample_value(name, labels or None)
    return 0.0 if value is None else value


async def test_sqs_frozen_then_killed_changes_no_answer_and_loses_no_event(
    tmp_path: Path,
) -> None:
    server = MotoServer(tmp_path / "moto.log")
    server.start()
    client = sqs_client(server.endpoint)
    queue = create_fifo_queue(client, "outage.fifo")
    cfg = events_config(server, queue)
    phase1, phase2, phase3 = _load("11", 8), _load("22", 12), _load("33", 12)
    try:
        async with (
            session_store("memory", tmp_path) as session,
            session_store("memory", tmp_path) as reference,  # no relay, nothing published
        ):
            assert isinstance(session.store, MemoryStore)
            outbox = session.store.events
            relay = Relay(session.store, cfg, publisher(cfg).send, backoff_max=0.2)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(relay.run)
                assert await _answers(session, phase1) == await _answers(reference, phase1)
                first = len(outbox)
                got1 = await trio.to_thread.run_sync(
                    lambda: receive_all(client, queue, decisions_received(first))
                )
                failed_calls = sample("cardswitch_events_publish_failures_total", kind="call")
                assert server.proc is not None
                os.kill(server.proc.pid, signal.SIGSTOP)  # slow: connects, never answers
                assert await _answers(session, phase2) == await _answers(reference, phase2)
                server.kill()  # absent: killed while frozen, so it acknowledged nothing more
                assert await _answers(session, phase3) == await _answers(reference, phase3)
                later = {e.event_id for e in outbox.values() if e.id > first}
                assert len(later) == len(outbox) - first > 0
                await _wait_for(
                    lambda: (
                        sample("cardswitch_events_publish_failures_total", kind="call")
                        > failed_calls
                    )
                )
                await _wait_for(lambda: sample("cardswitch_events_pending") == len(later))
                assert all(e.published_at is None for e in outbox.values() if e.id > first)
                assert sample("cardswitch_events_oldest_pending_seconds") > 0

                server.start()  # on the same port; a new server has no queue: create it again
                assert create_fifo_queue(client, "outage.fifo") == queue
                got2 = await trio.to_thread.run_sync(
                    lambda: receive_all(client, queue, decisions_received(len(later)), 60)
                )
                await _wait_for(lambda: all(e.published_at for e in outbox.values()))
                nursery.cancel_scope.cancel()
    finally:
        server.stop()
    assert {b["event_id"] for b in got1} == {e.event_id for e in outbox.values() if e.id <= first}
    assert {b["event_id"] for b in got2} == later
    assert not check_order(got1) and not check_order(got2)


class StubSqs:
    """SendMessageBatch as SQS answers it, per entry: rows in ``invalid`` are refused as the
    sender's fault, rows in ``flaky`` fail on SQS's side; ``down`` fails the whole call."""

    def __init__(self) -> None:
        self.invalid: set[int] = set()
        self.flaky: set[int] = set()
        self.down = False
        self.taken: list[OutboxEvent] = []
        self.calls = 0

    def send(self, rows: Sequence[OutboxEvent], suffix: str = "") -> BatchResult:
        self.calls += 1
        if self.down:
            raise PublishUnavailable("EndpointConnectionError")
        ok, failed = [], []
        for row in rows:
            if row.id in self.invalid:
                failed.append(EventFailure(row.id, "InvalidParameterValue: bad", poison=True))
            elif row.id in self.flaky:
                failed.append(EventFailure(row.id, "InternalError: try again"))
            else:
                ok.append(row.id)
                self.taken.append(row)
        return BatchResult(ok, failed)


async def test_poison_and_failing_events_are_parked_without_stopping_anyone(
    tmp_path: Path,
) -> None:
    async with session_store("sqlite", tmp_path) as session:
        store = session.store
        requests = _load("44", 30)  # two accounts, ~40 events: several batches
        await _answers(session, requests)
        rows = await store.pending_events(1000)
        main = [r for r in rows if r.group_key == "demo-acct-main"]
        small = [r for r in rows if r.group_key == "demo-acct-small"]
        assert len(main) > 12 and len(small) > 5
        stub = StubSqs()
        stub.invalid = {main[1].id}
        stub.flaky = {small[0].id}
        # One lane: the batches below are the first ten rows of both accounts, and so on.
        cfg = EventsConfig(
            backend="sqs", queue_url="q.fifo", max_attempts=3, batch_size=1000, publishers=1
        )
        relay = Relay(store, cfg, stub.send, owner="r1")

        stub.down = True
        try:
            await relay.round()
        except PublishUnavailable:
            pass
        else:  # pragma: no cover - the stub is down
            raise AssertionError("a failed call must be raised")
        assert {r.attempts for r in await store.pending_events(1000)} == {0}

        stub.down = False
        await relay.round()
        taken1 = {r.id for r in stub.taken}
        # the first SendMessageBatch (rows 1-10 of both accounts) went through but for the
        # two rows; then both accounts wait: their later rows are not sent this round
        assert {main[1].id, small[0].id} <= {r.id for r in rows[:10]}
        assert taken1 == {r.id for r in rows[:10]} - {main[1].id, small[0].id}
        stats = await store.outbox_stats()
        assert stats.parked == 1
        assert sample("cardswitch_events_parked") == 1
        parked = next(e for e in await store.events_since("") if e.id == main[1].id)
        assert parked.attempts == 1 and parked.parked_at is not None

        await relay.round()  # progress: main's later events flow past its parked one
        taken = {r.id for r in stub.taken}
        assert {r.id for r in main} - {main[1].id} <= taken
        assert main[1].id not in taken
        assert not {r.id for r in small[1:]} - taken1 & taken  # small waits behind its row
        await relay.round()  # the flaky row's third failure parks it
        await relay.round()  # and its account's later events flow
        flaky = next(e for e in await store.events_since("") if e.id == small[0].id)
        assert flaky.attempts == 3 and flaky.parked_at is not None
        assert "InternalError" in (flaky.last_error or "")
        assert {r.id for r in small[1:]} <= {r.id for r in stub.taken}
        assert (await store.outbox_stats()).parked == 2
        assert (await store.outbox_stats()).pending == 0
        assert sample("cardswitch_events_parked") == 2
        # within each account, what SQS took is in commit order
        for group in ("demo-acct-main", "demo-acct-small"):
            ids = [r.id for r in stub.taken if r.group_key == group]
            assert ids == sorted(ids), group


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_two_relays_one_database_one_active_and_failover(
    backend: str,
    tmp_path: Path,
    moto_sqs: MotoSqs,  # noqa: F811
    fifo_queue: str,  # noqa: F811
    request: pytest.FixtureRequest,
) -> None:
    dsn = request.getfixturevalue("pg_dsn") if backend == "postgres" else None
    cfg = events_config(moto_sqs, fifo_queue, lease_seconds=10.0)
    now = [1_000_000.0]

    def clock() -> float:
        return now[0]

    async with (
        session_store(backend, tmp_path, dsn) as session,
        open_store(backend_config(backend, tmp_path, dsn)) as other,  # a second instance
    ):
        send = publisher(cfg).send
        a = Relay(session.store, cfg, send, owner="instance-a", clock=clock)
        b = Relay(other, cfg, send, owner="instance-b", clock=clock)
        await _answers(session, _load("55", 4))
        assert await a._hold_lease() and not await b._hold_lease()
        published_a = await a.round()
        assert published_a == len(await session.store.events_since(""))

        # a freezes (no renewal): b stays passive until the lease has expired
        await _answers(session, _load("56", 4))
        now[0] += 9.0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(b.run)
            await trio.sleep(0.3)
            assert not b.active and b.published == 0
            now[0] += 2.0  # a's lease (10 s from its claim) is over
            await _wait_for(lambda: b.active)
            await _wait_for(lambda: b.published > 0)
            assert not await a._hold_lease()  # a wakes up: the lease is b's
            await _answers(session, _load("57", 2))
            assert await a.round() == 0, "a relay without the lease sends nothing"
            with trio.fail_after(30):
                while await session.store.pending_events(100):  # noqa: ASYNC110 - b publishes
                    await trio.sleep(0.05)
            assert not a.active and b.active
            nursery.cancel_scope.cancel()  # b stops cleanly and gives the lease up
        assert await a._hold_lease(), "a clean stop frees the lease at once"
        pending = await session.store.pending_events(100)
        assert not pending
    bodies = await trio.to_thread.run_sync(
        lambda: receive_all(
            moto_sqs.client, fifo_queue, decisions_received(published_a + b.published)
        )
    )
    assert len({x["event_id"] for x in bodies}) == published_a + b.published
    assert not check_order(bodies)


async def test_lanes_publish_at_once_each_account_in_order_and_a_failed_lane_stops_the_round(
    tmp_path: Path,
) -> None:
    """Two accounts in two lanes: their first calls are in flight together (a barrier both
    must reach), each call holds one lane's rows, every row is published once and in commit
    order per account. When one lane's call fails, the round raises that failure (not a
    group of them), and what the other lane had acknowledged stays marked."""
    main, small = "demo-acct-main", "demo-acct-small"
    lanes = next(n for n in range(2, 33) if lane_of(main, n) != lane_of(small, n))
    async with session_store("sqlite", tmp_path) as session:
        store = session.store
        await _answers(session, _load("61", 30))
        rows = await store.pending_events(1000)
        assert {r.group_key for r in rows} == {main, small}
        together = threading.Barrier(2, timeout=10)
        stub = StubSqs()
        calls: list[set[str]] = []

        def send(batch: Sequence[OutboxEvent], suffix: str = "") -> BatchResult:
            calls.append({r.group_key for r in batch})
            if len(calls) <= 2:
                together.wait()  # BrokenBarrierError unless the other lane's call is in flight
            return stub.send(batch, suffix)

        cfg = EventsConfig(backend="sqs", queue_url="q.fifo", batch_size=1000, publishers=lanes)
        relay = Relay(store, cfg, send, owner="r1")
        assert await relay.round() == len(rows)
        assert all(len(groups) == 1 for groups in calls)
        assert sorted(r.id for r in stub.taken) == sorted(r.id for r in rows)
        for group in (main, small):
            ids = [r.id for r in stub.taken if r.group_key == group]
            assert ids == sorted(ids), group
        assert not await store.pending_events(1000)

        # Later rows; the small account's lane is down: its call fails, main's goes on.
        await _answers(session, _load("62", 12))
        later = await store.pending_events(1000)
        taken_before = len(stub.taken)

        def half_down(batch: Sequence[OutboxEvent], suffix: str = "") -> BatchResult:
            if batch[0].group_key == small:
                raise PublishUnavailable("EndpointConnectionError")
            return stub.send(batch, suffix)

        relay = Relay(store, cfg, half_down, owner="r1")
        with pytest.raises(PublishUnavailable):
            await relay.round()
        pending = await store.pending_events(1000)
        sent = stub.taken[taken_before:]
        assert {r.group_key for r in sent} <= {main}
        # Nothing lost or doubled: every later row is either acknowledged or still pending.
        assert sorted([r.id for r in sent] + [r.id for r in pending]) == sorted(r.id for r in later)
        assert {r.group_key for r in pending} >= {small}
        assert {r.attempts for r in pending} == {0}  # a failed call counts no attempt
