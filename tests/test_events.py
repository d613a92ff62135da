"""The transactional outbox: every committed decision writes its event in the same transaction.

A scripted session (approvals, declines, a PIN, a chip cryptogram, a repeat, reversals, an
advice, a pre-authorization and its completion, an unknown card's advice) goes through the
real pipeline (software HSM) over the in-memory store and over SQLite, then holds are
released by an operator and by expiry and a card is changed. Expected values come from what
the requests were and what the pipeline answered, never from the event builders: one event
per answered request that was not a replay (with its DE39, masked PAN computed here, account
and amounts), one per hold released, one per card change, all valid against the published
JSON Schema, none holding a PAN, track 2, PIN block, CVV2 or ARQC of the requests.
"""

from __future__ import annotations

import doctest
import json
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trio
from e2e_fixtures import CVN10_ARQC, EMV_PAN, cvn10_request
from pg_fixtures import store_config
from test_events_support import schema_validator, sentinels_found

from hsm.carddata import HsmVault
from switch import events as events_module
from switch import testing
from switch.acquirer import build_auth, build_reversal, encipher_pin
from switch.config import Config, EventsConfig, StoreConfig
from switch.decisions import profile
from switch.events import OutboxEvent
from switch.handler import Dispatcher
from switch.pipeline import Pipeline
from switch.provision import CardRow, import_cards
from switch.store import Store, migrations, open_store
from switch.store.models import (
    AuthIntent,
    DuplicateKey,
    StoreError,
)
from switch.testing import context_for, software_engine
from switch.wire.messages import (
    AuthRequest,
    AuthResponse,
    OriginalData,
    ReversalRequest,
    ReversalResponse,
    Track2,
)

REPO = Path(__file__).resolve().parents[1]
APPROVAL_PAN = "4123456789012345"  # demo-acct-main; CVV 561 (8701/101), PIN 1234 (PVV)
APPROVAL_TRACK2 = Track2(APPROVAL_PAN, "8701", "101", "1" + "0000" + "561" + "0000")
SMALL_PAN = "4666655554444111"  # demo-acct-small, balance 1.00
BLOCKED_PAN = "4333322221111222"  # demo-acct-main, blocked
UNKNOWN_PAN = "4999999999999999"
DEMO_ZPK = "0123456789ABCDEFFEDCBA9876543210"
PIN_BLOCK = encipher_pin("1234", APPROVAL_PAN, DEMO_ZPK)
CVV2 = "123"
WHEN = "1201120000"
ACCOUNT_OF = {
    APPROVAL_PAN: "demo-acct-main",
    SMALL_PAN: "demo-acct-small",
    BLOCKED_PAN: "demo-acct-main",
    EMV_PAN: "demo-acct-emv",
}
#: Card data of the session's requests that no event may carry (upper and lower hex alike);
#: the CVV2, three digits, is looked for as a whole value (``cvv_values``), not a substring.
SENTINELS = [
    APPROVAL_PAN, SMALL_PAN, BLOCKED_PAN, EMV_PAN, UNKNOWN_PAN, APPROVAL_TRACK2.to_text(),
    APPROVAL_TRACK2.to_text()[len(APPROVAL_PAN) :], PIN_BLOCK.hex(), CVN10_ARQC,
]  # fmt: skip

Request = AuthRequest | ReversalRequest
Response = AuthResponse | ReversalResponse


def masked(pan: str) -> str:
    """First six, last four (written here, not taken from the switch)."""
    return pan[:6] + "*" * (len(pan) - 10) + pan[-4:]


@dataclass(frozen=True)
class Step:
    request: Request
    #: A repeat of an earlier request (same duplicate key and content): no new event.
    repeat: bool = False


def session_steps() -> list[Step]:
    """The scripted session; STANs are unique to it (except the repeats)."""
    approved = build_auth(APPROVAL_PAN, 1500, stan="100001", when=WHEN, track2=APPROVAL_TRACK2)
    financial = build_auth(APPROVAL_PAN, 2500, mti="0200", stan="100002", when=WHEN,
                           cvv2=CVV2, expiry="8701")  # fmt: skip
    pin = build_auth(APPROVAL_PAN, 700, stan="100005", when=WHEN, pin_block=PIN_BLOCK)
    pre = build_auth(APPROVAL_PAN, 5000, stan="100007", when=WHEN)
    completion = replace(
        build_auth(APPROVAL_PAN, 4200, mti="0220", stan="100008", when="1201180000"),
        rrn=pre.rrn,
        original=OriginalData(pre.mti, pre.stan, pre.transmission_time, "12345678", "0"),
    )
    partial = build_auth(APPROVAL_PAN, 3000, stan="100011", when=WHEN)
    return [
        Step(approved),
        Step(financial),
        Step(build_auth(SMALL_PAN, 5000, stan="100003", when=WHEN)),  # 51
        Step(build_auth(BLOCKED_PAN, 100, stan="100004", when=WHEN)),  # blocked
        Step(pin),
        Step(approved, repeat=True),
        Step(build_reversal(approved, stan="100006", when=WHEN)),
        Step(replace(pin, mti="0120")),  # advice of an approval: nothing moves twice
        Step(pre),
        Step(completion),
        Step(build_auth(UNKNOWN_PAN, 100, mti="0120", stan="100009", when=WHEN)),
        Step(cvn10_request(stan="100010")),
        Step(partial),
        Step(build_reversal(partial, replacement_amount=1000, stan="100012", when=WHEN)),
    ]


def event_type(request: Request, response: Response) -> str:
    if isinstance(request, ReversalRequest):
        return "reversal"
    if request.mti.startswith("02") and request.mti != "0200":
        return "completion" if request.original is not None else "advice"
    return "advice" if request.mti.startswith("012") else "authorization"


Ask = Callable[[Request], Awaitable[Response]]


async def run_session(ask: Ask) -> list[tuple[Step, Response]]:
    """Send every step in order; the answers."""
    return [(step, await ask(step.request)) for step in session_steps()]


def expected_decisions(answers: list[tuple[Step, Response]]) -> dict[tuple[str, str], Any]:
    """(STAN, MTI) -> what the event of that answered request must say."""
    expected = {}
    for step, response in answers:
        if step.repeat:
            continue
        req = step.request
        pan = req.pan or ""
        expected[(req.stan, req.mti)] = {
            "type": event_type(req, response),
            "mti": req.mti,
            "response_code": response.response_code,
            "masked_pan": masked(pan),
            "account_id": ACCOUNT_OF.get(pan),
            "amount": req.amount,
            "currency": req.currency,
        }
    return expected


def check_decision_events(
    events: list[dict[str, Any]], answers: list[tuple[Step, Response]]
) -> list[str]:
    """Violations: a decision without exactly one event, or an event that disagrees."""
    bad = []
    expected = expected_decisions(answers)
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for event in events:
        if event["type"] in ("authorization", "advice", "completion", "reversal"):
            by_key.setdefault((event["stan"], event["mti"]), []).append(event)
    if set(by_key) != set(expected):
        bad.append(f"events for {sorted(set(by_key) ^ set(expected))} differ from the answers")
    for key, want in expected.items():
        got = by_key.get(key, [])
        if len(got) != 1:
            bad.append(f"{key}: {len(got)} events")
            continue
        event = got[0]
        for name, value in want.items():
            if name == "account_id" and value is None:
                continue  # an unknown card, or a reversal whose original moved nothing
            if event[name] != value:
                bad.append(f"{key}: {name} is {event[name]!r}, answer says {value!r}")
        approved = event["response_code"] == "00" and event["type"] != "reversal"
        if approved and event["type"] == "authorization":
            moved = event["held"] if key[1] == "0100" else event["debited"]
            if moved != event["amount"]:
                bad.append(f"{key}: approved for {event['amount']}, moved {moved}")
    return bad


@dataclass
class Session:
    """A pipeline (``switch.testing.software_engine``'s) over one store, and how to ask it."""

    dispatcher: Dispatcher
    store: Store
    config: Config

    async def ask(self, request: Request) -> Response:
        decision = await self.dispatcher.handle(request, context_for(self.config))
        assert decision is not None
        response = decision.response
        assert isinstance(response, AuthResponse | ReversalResponse)
        return response


def backend_config(backend: str, tmp: Path, dsn: str | None = None) -> StoreConfig:
    """The store of ``backend``: SQLite ``tmp/events.db``, or the PostgreSQL database ``dsn``."""
    if backend == "postgres":
        assert dsn is not None
        return store_config(dsn)
    return StoreConfig(path=tmp / "events.db")


@asynccontextmanager
async def session_store(backend: str, tmp: Path, dsn: str | None = None) -> AsyncIterator[Session]:
    """The scripted session's engine over ``backend`` (``memory``, ``sqlite``, ``postgres``
    with ``dsn``)."""
    rows = [CardRow.from_mapping(r, f"row {i}") for i, r in enumerate(_demo_rows())]
    engine = await software_engine(rows)
    if backend == "memory":
        yield Session(Dispatcher(engine.pipeline), engine.store, engine.config)
        return
    vault = HsmVault(engine.hsm, testing.FINGERPRINT_KEY, testing.ENCRYPTION_KEY)
    async with open_store(backend_config(backend, tmp, dsn)) as store:
        report = await import_cards(store, engine.hsm, vault, rows)
        assert report.ok, report.failures
        pipeline = Pipeline(engine.config, store=store, hsm=engine.hsm, vault=vault,
                            clock=lambda: testing.PINNED_NOW)  # fmt: skip
        yield Session(Dispatcher(pipeline), store, engine.config)


def _demo_rows() -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads((REPO / "config/demo/cards.json").read_text())["cards"]
    return rows


def payloads(events: list[OutboxEvent]) -> list[dict[str, Any]]:
    return [json.loads(e.body()) for e in events]


def cvv_values(events: list[dict[str, Any]], cvv: str) -> list[str]:
    """Fields of ``events`` whose value is the CVV2 (as text or as a number)."""
    return [
        f"{e['event_id']}.{k}" for e in events for k, v in e.items()
        if not isinstance(v, bool) and str(v) == cvv
    ]  # fmt: skip


@pytest.mark.parametrize("backend", ["memory", "sqlite", "postgres"])
async def test_every_committed_decision_writes_one_valid_event(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    dsn = request.getfixturevalue("pg_dsn") if backend == "postgres" else None
    async with session_store(backend, tmp_path, dsn) as session:
        store = session.store
        answers = await run_session(session.ask)
        codes = {a[0].request.stan: a[1].response_code for a in answers}
        assert codes["100001"] == "00" and codes["100003"] == "51", codes
        decisions = payloads(await store.events_since(""))
        assert not check_decision_events(decisions, answers)

        # holds given back by an operator and by expiry; a card changed
        active = await store.list_holds(limit=100)
        assert len(active) >= 2
        released = await store.release_hold(active[0].id, actor="ops-test")
        assert released is not None
        expiring = {h.id: h.remaining for h in active[1:]}
        assert await store.expire_holds("2999-01-01T00:00:00+00:00")
        card = next(c for c in await store.list_cards() if c.last4 == BLOCKED_PAN[-4:])
        assert await store.update_card(card.id, {"status": "active"}, actor="ops-test")

        events = payloads(await store.events_since(""))
    new = events[len(decisions) :]
    releases = [e for e in new if e["type"] == "hold_released"]
    assert {e["hold_id"]: e["released"] for e in releases} == {
        active[0].id: active[0].remaining, **expiring,
    }  # fmt: skip
    assert [e["released_by"] for e in releases] == ["ops-test"] + ["expiry"] * len(expiring)
    (change,) = [e for e in new if e["type"] == "card_changed"]
    assert (change["card_id"], change["status"], change["changed_fields"]) == (
        card.id, "active", ["status"],
    )  # fmt: skip
    assert change["account_id"] == "demo-acct-main" and change["actor"] == "ops-test"

    validator = schema_validator()
    for event in events:
        errors = [e.message for e in validator.iter_errors(event)]
        assert not errors, (event["type"], errors)
    assert [e["sequence"] for e in events] == sorted({e["sequence"] for e in events})
    assert len({e["event_id"] for e in events}) == len(events)
    assert not sentinels_found([json.dumps(e) for e in events], SENTINELS)
    assert not cvv_values(events, CVV2)


async def test_a_failed_operation_leaves_no_event_and_spares_its_batch(tmp_path: Path) -> None:
    """SQLite group commit: an intent the store refuses rolls back its own savepoint, the
    journal row and the event together; the other intents of the batch keep theirs."""
    async with session_store("sqlite", tmp_path) as session:
        store = session.store
        good = await _intent(store, "200001", "978")
        bad = await _intent(store, "200002", "840")  # not the account's currency
        results: dict[str, Any] = {}

        async def commit(name: str, intent: AuthIntent) -> None:
            try:
                results[name] = await store.commit_auth(intent)
            except StoreError as exc:
                results[name] = exc

        async with trio.open_nursery() as nursery:  # queued together: one batch
            nursery.start_soon(commit, "good", good)
            nursery.start_soon(commit, "bad", bad)
        assert isinstance(results["bad"], StoreError) and results["bad"].kind == "invalid"
        assert results["good"].reason.value == "approved"
        events = await store.events_since("")
        journal = _rows(tmp_path, "SELECT id, stan FROM journal")
    assert [json.loads(e.payload)["stan"] for e in events] == ["200001"]
    assert [r[1] for r in journal] == ["200001"]
    assert events[0].journal_id == journal[0][0]


async def _intent(store: Store, stan: str, currency: str) -> AuthIntent:
    card = next(c for c in await store.list_cards() if c.last4 == APPROVAL_PAN[-4:])
    return AuthIntent(
        dup_key=DuplicateKey("visa", "12345678", WHEN, stan, "R" + stan, "T1", "0100"),
        digest="d" + stan,
        mti="0100",
        card_id=card.id,
        account_id=card.account_id,
        masked_pan=card.masked_pan,
        amount=100,
        currency=currency,
        kind="hold",
        profile=profile("visa"),
    )


def _rows(tmp: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(tmp / "events.db") as conn:
        return conn.execute(sql).fetchall()


async def test_a_database_before_the_outbox_gains_it_and_keeps_its_rows(tmp_path: Path) -> None:
    """The outbox is its own migration (``0005_events.sql``): a file at the schema before it
    is brought forward with its rows."""
    (outbox,) = [m for m in migrations.migrations("sqlite") if m.name == "events"]
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:
        for migration in migrations.migrations("sqlite"):
            if migration.version < outbox.version:
                for statement in migrations.split_statements(migration.sql):
                    conn.execute(statement)
        conn.execute("INSERT INTO accounts VALUES ('acct-old', '978', 100, 100)")
        conn.execute(f"PRAGMA user_version = {outbox.version - 1}")
    async with open_store(StoreConfig(path=path)) as store:
        account = await store.get_account("acct-old")
        assert account is not None and account.available_balance == 100
        assert await store.events_since("") == []
        assert await store.claim_lease("x", "me", 1.0, 10.0)
        assert not await store.claim_lease("x", "other", 5.0, 10.0)
        assert await store.claim_lease("x", "other", 11.0, 10.0)  # expired: taken over
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] >= outbox.version


def test_event_builders_doctests() -> None:
    result = doctest.testmod(events_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_events_configuration_is_checked() -> None:
    from switch.config import ConfigError, from_mapping, load

    assert load(REPO / "config" / "switch.toml").events == EventsConfig()
    with pytest.raises(ConfigError, match=r"events\.queue_url"):
        from_mapping({"events": {"backend": "sqs", "queue_url": "https://sqs/q"}})
    with pytest.raises(ConfigError, match=r"events\.backend"):
        from_mapping({"events": {"backend": "kafka"}})
    with pytest.raises(ConfigError, match=r"events\.batch_size"):
        from_mapping({"events": {"batch_size": 0}})
    ok = from_mapping({"events": {"backend": "sqs", "queue_url": "https://sqs/1/q.fifo"}})
    assert ok.events.backend == "sqs" and ok.events.endpoint_url == ""
