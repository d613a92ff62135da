"""Commit deadlines on SQLite: a database locked by another connection longer than the budget.

The pipeline runs over the real ``SqliteStore`` (software HSM, no TLS). While another
connection holds ``BEGIN EXCLUSIVE`` on the file for several budgets, every request is
answered about at its budget (the writer's busy timeout comes from the deadline, not the
5 s default) with the stand-in code; afterwards the journal and holds agree with every
answer sent: no 00 without its journal row, no journal row for a stand-in answer.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import trio

from hsm.api import KeyAlgorithm, KeyGeneration, KeyImport, KeyUsage
from hsm.carddata import HsmVault
from hsm.config import HsmConfig
from hsm.token import open_hsm
from switch.acquirer import build_auth
from switch.config import Config, ListenerConfig, PipelineConfig, StoreConfig
from switch.handler import Decision
from switch.pipeline import Pipeline
from switch.provision import CardRow, import_cards, load_keys
from switch.store.sqlite import open_sqlite_store
from switch.testing import DEMO_KEYS, PINNED_NOW, context_for

REPO = Path(__file__).resolve().parents[1]
PAN = "4123456789012345"
ACCOUNT = "demo-acct-main"
BUDGET = 0.5
#: Seconds the other connection holds the lock: several budgets.
LOCK_SECONDS = 2.5
#: What an answer may take beyond its budget: a thread hop and a rollback, far below the
#: 5 s busy timeout that used to hold answers.
MARGIN = 0.4


async def test_locked_database_answers_within_the_budget_and_the_journal_agrees(
    tmp_path: Path,
) -> None:
    hsm = open_hsm(HsmConfig(backend="software"))
    for key in load_keys(DEMO_KEYS):
        algorithm = KeyAlgorithm(key.algorithm) if key.algorithm else None
        await hsm.import_key(
            KeyImport(key.label, KeyUsage(key.usage), bytes.fromhex(key.clear_hex), algorithm)
        )
    await hsm.generate_key(KeyGeneration("fp", KeyUsage.HMAC))
    await hsm.generate_key(KeyGeneration("enc", KeyUsage.DATA))
    vault = HsmVault(hsm, "fp", "enc")
    demo = json.loads((REPO / "config" / "demo" / "cards.json").read_text())["cards"]
    rows = [CardRow.from_mapping(r, f"row {i}") for i, r in enumerate(demo)]
    db = tmp_path / "switch.db"
    cfg = Config(
        listeners=(ListenerConfig(port=0, zpk="demo-zpk"),),
        pipeline=PipelineConfig(budget=BUDGET, min_remaining=0.05, breaker_failures=100),
        store=StoreConfig(path=db),
    )
    answers: dict[str, tuple[Decision, float]] = {}
    async with open_sqlite_store(cfg.store) as store:
        assert (await import_cards(store, hsm, vault, rows)).ok
        pipeline = Pipeline(cfg, store=store, hsm=hsm, vault=vault, clock=lambda: PINNED_NOW)

        async def one(stan: str) -> None:
            t0 = trio.current_time()
            decision = await pipeline.authorize(
                build_auth(PAN, 100, stan=stan), context_for(cfg, received_at=t0)
            )
            answers[stan] = (decision, trio.current_time() - t0)

        await one("000001")  # before the lock: approved
        locker = sqlite3.connect(db, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            locked_until = trio.current_time() + LOCK_SECONDS
            async with trio.open_nursery() as nursery:
                i = 2
                while trio.current_time() < locked_until - BUDGET - MARGIN:
                    for _ in range(3):
                        nursery.start_soon(one, f"{i:06d}")
                        i += 1
                    await trio.sleep(BUDGET / 3)
        finally:
            locker.rollback()
            locker.close()
        await one("000999")  # after the lock: approved again
        journal = {
            r["stan"]: dict(r)
            for r in store._readers[0].execute(
                "SELECT j.stan, j.response_code, j.stand_in, h.remaining FROM journal j "
                "LEFT JOIN holds h ON h.journal_id = j.id"
            )
        }
        holds = await store.active_holds_total(ACCOUNT)
    locked = {s: a for s, a in answers.items() if s not in ("000001", "000999")}
    assert len(locked) >= 6
    for stan, (decision, seconds) in answers.items():
        assert seconds <= BUDGET + MARGIN, (stan, seconds)
        row = journal.get(stan)
        if decision.response_code == "00":
            assert row is not None and row["response_code"] == "00" and row["remaining"] == 100
        else:
            assert row is None and decision.stand_in in ("store", "budget"), stan
    assert all(d.response_code == "91" for d, _ in locked.values())
    assert answers["000001"][0].response_code == answers["000999"][0].response_code == "00"
    assert set(journal) == {"000001", "000999"}
    assert holds == 200
