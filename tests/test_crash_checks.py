"""The crash tests' database checker finds what it claims to, on SQLite and on PostgreSQL.

Real decisions are written through the pipeline (software HSM, the real ``SqliteStore`` or
``PostgresStore``) for crash_support's cards: approvals, a partial reversal, an
insufficient-funds decline, wrong PINs. ``crash_support.check_database`` finds nothing in
that database; after the rows are tampered with as a money defect would leave them (a
balance off by one, a hold shrunk without a reversal, a journaled code other than the one
answered, a PIN-try counter gone back) it names each defect. The same checker reads both
backends: this is what the kill -9 tests rely on when they report 0 violations.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
from crash_support import (
    DEMO_ZPK,
    PIN_CARDS,
    PIN_TRY_LIMIT,
    RIGHT_PIN,
    SEED_CARDS,
    WRONG_PIN,
    Exchange,
    check_database,
    pin_tries,
)

from hsm.api import KeyAlgorithm, KeyGeneration, KeyImport, KeyUsage
from hsm.carddata import HsmVault
from hsm.config import HsmConfig
from hsm.token import open_hsm
from switch.acquirer import build_auth, build_reversal, encipher_pin
from switch.config import Config, ListenerConfig, PipelineConfig, StoreConfig
from switch.pipeline import Pipeline
from switch.provision import CardRow, import_cards, load_keys
from switch.store import open_store
from switch.testing import DEMO_KEYS, PINNED_NOW, context_for
from switch.wire.messages import AuthResponse


async def _decide(store_cfg: StoreConfig) -> list[Exchange]:
    """A few real decisions on crash_support's cards; the exchanges as a client saw them."""
    hsm = open_hsm(HsmConfig(backend="software"))
    for key in load_keys(DEMO_KEYS):
        algorithm = KeyAlgorithm(key.algorithm) if key.algorithm else None
        value = bytes.fromhex(key.clear_hex)
        await hsm.import_key(KeyImport(key.label, KeyUsage(key.usage), value, algorithm))
    await hsm.generate_key(KeyGeneration("fp", KeyUsage.HMAC))
    await hsm.generate_key(KeyGeneration("pan", KeyUsage.DATA))
    vault = HsmVault(hsm, "fp", "pan")
    rows = [
        {"pan": c.pan, "expiry": "3012", "service_code": "101", "account": c.account,
         "currency": "978", "balance": c.balance}
        for c in SEED_CARDS
    ] + [
        {"pan": c.pan, "expiry": "3012", "service_code": "101", "account": c.account,
         "currency": "978", "balance": c.balance, "pvk": "demo-pvk", "pvki": "1",
         "pin": RIGHT_PIN, "pin_try_limit": PIN_TRY_LIMIT}
        for c in PIN_CARDS
    ]  # fmt: skip
    cfg = Config(
        listeners=(ListenerConfig(name="visa", network="visa", port=0, zpk="demo-zpk"),),
        pipeline=PipelineConfig(budget=10.0),
        store=store_cfg,
    )
    exchanges: list[Exchange] = []
    async with open_store(store_cfg) as store:
        report = await import_cards(
            store, hsm, vault, [CardRow.from_mapping(r, f"row {i}") for i, r in enumerate(rows)]
        )
        assert report.ok, report.failures
        pipeline = Pipeline(cfg, store=store, hsm=hsm, vault=vault, clock=lambda: PINNED_NOW)
        ctx = context_for(cfg)
        rich, low, pin = SEED_CARDS[0], SEED_CARDS[3], PIN_CARDS[0]
        block = encipher_pin(WRONG_PIN, pin.pan, DEMO_ZPK)
        auths = [
            build_auth(rich.pan, 1000, stan="000001"),
            build_auth(rich.pan, 2000, stan="000002"),
            build_auth(rich.pan, 3000, mti="0200", stan="000003"),
            build_auth(low.pan, 999_999, stan="000004"),
            build_auth(pin.pan, 100, stan="000005", pin_block=block),
            build_auth(pin.pan, 100, stan="000006", pin_block=block),
        ]
        for request in auths:
            decision = await pipeline.authorize(request, ctx)
            exchanges.append(Exchange(request, 0, decision.response))  # type: ignore[arg-type]
        reversal = build_reversal(auths[1], replacement_amount=500, stan="000007")
        decision = await pipeline.reverse(reversal, ctx)
        exchanges.append(Exchange(reversal, 0, decision.response))  # type: ignore[arg-type]
    codes = [x.response.response_code for x in exchanges if x.response is not None]
    assert codes == ["00", "00", "00", "51", "55", "55", "00"], codes
    return exchanges


def _sqlite_writer(db: Path) -> Callable[[str], None]:
    def run(statement: str) -> None:
        with sqlite3.connect(db) as conn:
            conn.execute(statement)

    return run


def _pg_writer(dsn: str) -> Callable[[str], None]:
    def run(statement: str) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(statement)

    return run


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_checker_is_silent_on_real_decisions_and_names_each_defect(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    db: Path | str
    if backend == "postgres":
        dsn: str = request.getfixturevalue("pg_dsn")
        db, store_cfg, write = dsn, StoreConfig(backend="postgres", dsn=dsn), _pg_writer(dsn)
    else:
        path = tmp_path / "cardswitch.db"
        db, store_cfg, write = path, StoreConfig(path=path), _sqlite_writer(path)
    exchanges = await _decide(store_cfg)
    sample = pin_tries(db)
    assert sorted(sample.values()) == [0, 0, 0, 0, 0, 0, 2]

    clean = check_database(db, exchanges, pin_samples=[sample])
    assert clean.violations == []
    assert clean.approvals_checked == 3 and clean.pin_tries == 2
    assert clean.codes == {"00": 4, "51": 1, "55": 2}

    approved = exchanges[0].response
    assert isinstance(approved, AuthResponse) and approved.approval_code
    write("UPDATE accounts SET available_balance = available_balance - 1 WHERE id = 'crash-acct-b'")
    write("UPDATE holds SET remaining = remaining - 100 WHERE amount = 3000")
    write("UPDATE journal SET response_code = '05' WHERE stan = '000001'")
    write("UPDATE cards SET pin_tries = 1 WHERE pin_tries = 2")
    found = "\n".join(check_database(db, exchanges, pin_samples=[sample]).violations)
    assert "account crash-acct-b: available 19999999 != ledger 20000000" in found, found
    assert "hold of stan=000003: reversals released 0, the hold lost 100" in found, found
    assert "crash-acct-a: ledger 49997000 != opening 50000000 - debits 2900" in found, found
    assert "stan=000001 mti=0100: answered 00/" in found and "journal has 05/" in found, found
    assert "PIN tries went back from 2 to 1" in found, found
    assert ": 1 PIN tries, 2 wrong PINs journaled" in found, found
