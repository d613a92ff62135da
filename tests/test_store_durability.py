"""Group commit under concurrency, durability across reopen, schema versioning, and the
absence of card data in the database files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio
from test_store_support import ACCOUNT_ID, CARD_ID, PAN, auth, dup_key, reversal, seeded_store

from switch import metrics
from switch.config import StoreConfig
from switch.store import AuthOutcome, StoreError, open_store
from switch.store.sqlite import SCHEMA_VERSION, open_sqlite_store

AMOUNT = 1500
#: Concurrent requests and how many of them the balance covers.
REQUESTS = 50
COVERED = 20


async def test_concurrent_holds_on_one_account_approve_exactly_what_funds_cover(
    tmp_path: Path,
) -> None:
    balance = COVERED * AMOUNT + AMOUNT - 1  # covers 20, not 21
    async with seeded_store(tmp_path / "s.db", balance) as store:
        outcomes: list[AuthOutcome] = []

        async def one(i: int) -> None:
            outcomes.append(await store.commit_auth(auth(f"{i:06d}", AMOUNT)))

        async with trio.open_nursery() as nursery:
            for i in range(REQUESTS):
                nursery.start_soon(one, i)

        codes = sorted(o.response_code for o in outcomes)
        assert codes == ["00"] * COVERED + ["51"] * (REQUESTS - COVERED)
        account = await store.get_account(ACCOUNT_ID)
        assert account is not None
        assert account.available_balance == balance - COVERED * AMOUNT
        assert account.ledger_balance == balance
        assert await store.active_holds_total(ACCOUNT_ID) == COVERED * AMOUNT
        assert len({o.hold_id for o in outcomes if o.approved}) == COVERED
        # Group commit: concurrent intents shared transactions.
        assert store.stats.largest_batch > 1
        assert store.stats.batches < store.stats.operations


async def test_group_commit_is_visible_in_the_batch_size_metric(tmp_path: Path) -> None:
    def observed() -> tuple[float, float]:
        count = metrics.REGISTRY.get_sample_value("cardswitch_store_batch_size_count") or 0.0
        total = metrics.REGISTRY.get_sample_value("cardswitch_store_batch_size_sum") or 0.0
        return count, total

    async with seeded_store(tmp_path / "s.db") as store:
        count0, sum0 = observed()
        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(store.commit_auth, auth(f"{i:06d}", 10))
        count1, sum1 = observed()
    assert sum1 - sum0 == 30  # every intent committed in some batch
    assert count1 - count0 < 30  # in fewer transactions than intents


async def test_batch_max_bounds_the_transaction_size(tmp_path: Path) -> None:
    async with seeded_store(tmp_path / "s.db", batch_max=4) as store:
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(store.commit_auth, auth(f"{i:06d}", 10))
        assert 1 < store.stats.largest_batch <= 4


async def test_committed_state_survives_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with seeded_store(path, 10_000) as store:
        first = await store.commit_auth(auth("000001", 1000))
        await store.commit_auth(auth("000002", 700, pin_check="bad"))
        await store.commit_reversal(reversal("000101", "000009", 50))  # unmatched
    async with open_store(StoreConfig(path=path)) as reopened:
        account = await reopened.get_account(ACCOUNT_ID)
        assert account is not None and account.available_balance == 9_000
        card = await reopened.get_card(CARD_ID)
        assert card is not None and card.pin_tries == 1
        stored = await reopened.find_outcome(dup_key("000001"), auth("000001", 1000).digest)
        assert isinstance(stored, AuthOutcome) and stored.hold_id == first.hold_id
        replay = await reopened.commit_auth(auth("000001", 1000))
        assert replay.replayed and replay.approval_code == first.approval_code
        late = await reopened.commit_auth(auth("000009", 50))
        assert late.response_code == "05"
        assert await reopened.active_holds_total(ACCOUNT_ID) == 1000


async def test_database_uses_wal_full_sync_and_versioned_schema(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    async with seeded_store(path):
        pass
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        conn.commit()
    finally:
        conn.close()
    with pytest.raises(StoreError, match="newer"):
        async with open_sqlite_store(StoreConfig(path=path)):
            pass


def _files_bytes(directory: Path) -> bytes:
    """Everything in the database directory: the main file, its WAL and shared memory."""
    return b"".join(p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file())


async def test_database_files_hold_no_card_data(tmp_path: Path) -> None:
    """The store keeps only what it is given; this checks nothing else leaks into the files
    (journal rows get masked PANs, cards a fingerprint and ciphertext)."""
    track2 = f"{PAN}=87011010000012300000"
    pin_block = "041261AAAAEDCBA9"  # ISO 0 block of a published vector, never handed over
    path = tmp_path / "s.db"
    async with seeded_store(path) as store:
        for i in range(5):
            await store.commit_auth(auth(f"{i:06d}", 100, pin_check="ok"))
        await store.commit_reversal(reversal("000101", "000001", 100))
        # Keep the WAL: read the files while the store is open, then after checkpoint on close.
        live = _files_bytes(tmp_path)
    closed = _files_bytes(tmp_path)
    for blob in (live, closed):
        assert b"412345******2345" in blob  # the masked form is there, so the search works
        for sentinel in (PAN, track2, pin_block):
            assert sentinel.encode() not in blob
            assert sentinel.encode("utf-16-le") not in blob


async def test_schema_1_database_is_refused_with_one_line(tmp_path: Path) -> None:
    """A development database of schema 1 cannot be migrated (it kept neither reasons nor
    full original keys): opening it fails with a message saying what to do."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    with pytest.raises(StoreError) as err:
        async with open_sqlite_store(StoreConfig(path=path)):
            pass  # pragma: no cover
    assert err.value.kind == "unavailable"
    assert "schema 1" in str(err.value) and "dev-setup" in str(err.value)
    assert "\n" not in str(err.value)
