"""Several switch instances on one PostgreSQL database (bounded, CI-sized).

Two ``Pipeline``s, each with its own ``PostgresStore`` (its own pool: two sessions sets, as two
processes would have) and nothing else shared but the software HSM, receive the same
requests at the same moment, reversals racing their originals, over an account that can pay
for only some of them and a card whose PIN is wrong. Afterwards the database must hold what
one instance alone would have written: every approval answered journaled once with the code
answered, available = ledger - active holds, one money row per key, nothing released twice,
no reversal left unmatched beside an approved original, PIN tries counted once per request
and never going back.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import psycopg
import trio
from pg_fixtures import store_config

from hsm.api import KeyAlgorithm, KeyGeneration, KeyImport, KeyUsage
from hsm.carddata import HsmVault
from hsm.config import HsmConfig
from hsm.token import open_hsm
from switch.acquirer import build_auth, build_reversal, encipher_pin
from switch.config import Config, ListenerConfig, PipelineConfig
from switch.handler import Decision
from switch.pipeline import Pipeline
from switch.provision import CardRow, import_cards, load_keys
from switch.store import open_store
from switch.testing import DEMO_KEYS, PINNED_NOW, context_for

HOT_PAN = "4000009876543210"
PIN_PAN = "4000005555555555"
PRICE = 700
AFFORDABLE = 12
DEMO_ZPK = "0123456789ABCDEFFEDCBA9876543210"
ROWS = [
    {"pan": HOT_PAN, "expiry": "3012", "service_code": "101", "account": "acct-hot",
     "currency": "978", "balance": AFFORDABLE * PRICE, "cvk": "demo-cvk"},
    {"pan": PIN_PAN, "expiry": "3012", "service_code": "101", "account": "acct-pin",
     "currency": "978", "balance": 1_000_000, "cvk": "demo-cvk", "pvk": "demo-pvk",
     "pvki": "1", "pin": "2468"},
]  # fmt: skip


@contextlib.asynccontextmanager
async def instances(dsn: str, count: int = 2) -> AsyncIterator[tuple[list[Pipeline], Config]]:
    hsm = open_hsm(HsmConfig(backend="software"))
    for key in load_keys(DEMO_KEYS):
        algorithm = KeyAlgorithm(key.algorithm) if key.algorithm else None
        value = bytes.fromhex(key.clear_hex)
        await hsm.import_key(KeyImport(key.label, KeyUsage(key.usage), value, algorithm))
    await hsm.generate_key(KeyGeneration("fp", KeyUsage.HMAC))
    await hsm.generate_key(KeyGeneration("pan", KeyUsage.DATA))
    vault = HsmVault(hsm, "fp", "pan")
    listener = ListenerConfig(name="visa", network="visa", port=0, zpk="demo-zpk")
    cfg = Config(
        listeners=(listener,),
        pipeline=PipelineConfig(budget=10.0),
        store=store_config(dsn, statement_timeout=9.0, lock_timeout=8.0),
    )
    rows = [CardRow.from_mapping(r, f"row {i}") for i, r in enumerate(ROWS)]
    async with open_store(cfg.store) as provisioning:
        report = await import_cards(provisioning, hsm, vault, rows)
        assert report.ok, report.failures
    async with contextlib.AsyncExitStack() as stack:
        pipelines = []
        for _ in range(count):
            store = await stack.enter_async_context(open_store(cfg.store))
            pipelines.append(
                Pipeline(cfg, store=store, hsm=hsm, vault=vault, clock=lambda: PINNED_NOW)
            )
        yield pipelines, cfg


async def test_two_instances_on_one_database_decide_as_one(pg_dsn: str) -> None:
    answers: dict[tuple[str, int], Decision] = {}
    async with instances(pg_dsn) as (pipelines, cfg):
        originals = [build_auth(HOT_PAN, PRICE, stan=f"{100 + i:06d}") for i in range(30)]
        # The first ten are reversed at the moment they arrive (0400 to one instance, its
        # 0401 repeat to the other); the PIN card gets five wrong PINs.
        reversals = [build_reversal(o, stan=f"{500 + i:06d}") for i, o in enumerate(originals[:10])]
        repeats = [
            build_reversal(o, mti="0401", stan=f"{500 + i:06d}", when=r.transmission_time)
            for i, (o, r) in enumerate(zip(originals[:10], reversals, strict=True))
        ]
        wrong = encipher_pin("1111", PIN_PAN, DEMO_ZPK)
        pins = [build_auth(PIN_PAN, 100, stan=f"{800 + i:06d}", pin_block=wrong) for i in range(5)]
        tries_seen: list[int] = []

        async def ask(which: int, request: Any, key: tuple[str, int]) -> None:
            ctx = context_for(cfg)
            pipeline = pipelines[which]
            if request.mti.startswith("04"):
                answers[key] = await pipeline.reverse(request, ctx)
            else:
                answers[key] = await pipeline.authorize(request, ctx)

        async def watch_pin_tries(done: trio.Event) -> None:
            async with open_store(cfg.store) as reader:
                while not done.is_set():
                    cards = {c.last4: c for c in await reader.list_cards()}
                    tries_seen.append(cards["5555"].pin_tries)
                    await trio.sleep(0.005)

        done = trio.Event()
        with trio.fail_after(60):
            async with trio.open_nursery() as watcher:
                watcher.start_soon(watch_pin_tries, done)
                async with trio.open_nursery() as nursery:
                    for i, request in enumerate([*originals, *pins]):
                        for which in (0, 1):  # the same request to both at once
                            nursery.start_soon(ask, which, request, (f"a{i}", which))
                    for i, (rev, rep) in enumerate(zip(reversals, repeats, strict=True)):
                        nursery.start_soon(ask, 1, rev, (f"r{i}", 1))
                        nursery.start_soon(ask, 0, rep, (f"r{i}", 0))
                done.set()

    # Both instances gave every request the same answer (one decided, one replayed).
    for i in range(len(originals) + len(pins)):
        a, b = answers[(f"a{i}", 0)].response, answers[(f"a{i}", 1)].response
        assert (a.response_code, getattr(a, "approval_code", None)) == (
            b.response_code,
            getattr(b, "approval_code", None),
        ), i
    assert all(answers[(f"r{i}", w)].response_code == "00" for i in range(10) for w in (0, 1))

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        q = conn.execute
        # every approval answered is journaled exactly once, with the code that was answered
        approved = {
            o.stan: getattr(answers[(f"a{i}", 0)].response, "approval_code", None)
            for i, o in enumerate(originals)
            if answers[(f"a{i}", 0)].response_code == "00"
        }
        rows = q(
            "SELECT stan, approval_code FROM journal WHERE mti_class = '010' "
            "AND reason = 'approved' AND card_id IS NOT NULL AND masked_pan LIKE '400000%%3210'"
        ).fetchall()
        assert sorted(rows) == sorted(approved.items())
        # The account covers AFFORDABLE holds at once; an approval whose reversal released its
        # hold left room for another, so the bound is on the approvals that kept their hold
        # (the first ten originals are reversed, and every reversal was answered 00).
        reversed_stans = {o.stan for o in originals[:10]}
        kept = [stan for stan in approved if stan not in reversed_stans]
        assert len(approved) > 0 and len(kept) <= AFFORDABLE
        assert not q(
            "SELECT 1 FROM journal WHERE kind <> 'duplicate' GROUP BY network, acquirer_id, "
            "transmission_time, stan, rrn, terminal_id, mti_class HAVING count(*) > 1"
        ).fetchall()
        # available = ledger - active holds on every account
        for acct, ledger, available in q(
            "SELECT id, ledger_balance, available_balance FROM accounts"
        ).fetchall():
            (held,) = q(
                "SELECT coalesce(sum(remaining), 0) FROM holds WHERE account_id = %s "
                "AND kind = 'hold'",
                (acct,),
            ).fetchone() or (0,)
            assert available == ledger - held, acct
        # no duplicate key has two money rows
        assert not q(
            "SELECT 1 FROM holds h JOIN journal j ON j.id = h.journal_id GROUP BY j.network, "
            "j.acquirer_id, j.transmission_time, j.stan, j.mti_class HAVING count(*) > 1"
        ).fetchall()
        # nothing released twice: what reversals gave back is exactly what left each hold
        for hold_id, amount, remaining, released in q(
            "SELECT h.id, h.amount, h.remaining, coalesce(sum(r.released_amount), 0) FROM holds h "
            "LEFT JOIN journal r ON r.original_journal_id = h.journal_id AND r.kind = 'reversal' "
            "GROUP BY h.id, h.amount, h.remaining"
        ).fetchall():
            assert released == amount - remaining, hold_id
        # a reversal racing its original: never an unmatched reversal beside an approved one
        assert not q(
            "SELECT u.journal_id FROM unmatched_reversals u JOIN journal r ON r.id = u.journal_id "
            "JOIN journal o ON o.network = r.orig_network AND o.acquirer_id = r.orig_acquirer_id "
            "AND o.transmission_time = r.orig_transmission_time AND o.stan = r.orig_stan "
            "AND o.mti_class = r.orig_mti_class AND o.reason = 'approved' "
            "WHERE u.resolved_journal_id IS NULL"
        ).fetchall()
        for i in range(10):
            original = answers[(f"a{i}", 0)]
            reversal = answers[(f"r{i}", 0)]
            # either reversed after approval (released) or declined after the reversal (05),
            # or declined for funds: never approved and left held
            (remaining,) = q(
                "SELECT coalesce(sum(h.remaining), 0) FROM holds h JOIN journal j "
                "ON j.id = h.journal_id WHERE j.stan = %s",
                (originals[i].stan,),
            ).fetchone() or (0,)
            assert remaining == 0, (i, original.reason, reversal.reason)
        # PIN tries: five distinct wrong PINs count to the limit (3), never back down
        codes = sorted(answers[(f"a{len(originals) + i}", 0)].response_code for i in range(5))
        assert codes == ["55", "55", "75", "75", "75"]
        (tries,) = q("SELECT pin_tries FROM cards WHERE last4 = '5555'").fetchone() or (None,)
        assert tries == 3
    assert tries_seen == sorted(tries_seen)
