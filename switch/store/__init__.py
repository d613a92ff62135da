"""The durable store of cards, accounts and the authorization journal.

What lives here: the public names of the store package, ``open_store``, which opens the
backend a ``StoreConfig`` names, and ``migrate``, which brings its schema to this code's
version (``cardswitch db migrate``). What does not: SQL (``sqlite.py``, ``postgres.py``,
``migrations/``), the Protocol and its PostgreSQL mapping (``api.py``), the records
(``models.py``).

Usage::

    async with open_store(cfg.store) as store:
        outcome = await store.commit_auth(intent)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import trio

from switch.config import StoreConfig
from switch.store import postgres, sqlite
from switch.store.api import Store
from switch.store.models import (
    Account,
    AuthIntent,
    AuthKind,
    AuthOutcome,
    Card,
    CardStatus,
    DeliveryMark,
    DuplicateKey,
    JournalRef,
    OriginalKey,
    PinCheck,
    PinMethod,
    ReversalIntent,
    ReversalOutcome,
    SpendControls,
    StoredOutcome,
    StoreError,
    mask_fields,
    mti_class,
    normalise_acquirer_id,
)
from switch.store.postgres import PostgresStore, open_postgres_store
from switch.store.sqlite import SqliteStore, WriterStats, open_sqlite_store

__all__ = [
    "Account",
    "AuthIntent",
    "AuthKind",
    "AuthOutcome",
    "Card",
    "CardStatus",
    "DeliveryMark",
    "DuplicateKey",
    "JournalRef",
    "MigrationReport",
    "OriginalKey",
    "PinCheck",
    "PinMethod",
    "PostgresStore",
    "ReversalIntent",
    "ReversalOutcome",
    "SpendControls",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoredOutcome",
    "WriterStats",
    "mask_fields",
    "migrate",
    "mti_class",
    "normalise_acquirer_id",
    "open_store",
]


@asynccontextmanager
async def open_store(cfg: StoreConfig) -> AsyncIterator[Store]:
    """Open the store ``cfg.backend`` names for the duration of the ``async with`` block.

    Raises:
        StoreError: the backend cannot be opened.
    """
    if cfg.backend == "sqlite":
        async with open_sqlite_store(cfg) as store:
            yield store
    elif cfg.backend == "postgres":
        async with open_postgres_store(cfg) as pg_store:
            yield pg_store
    else:  # pragma: no cover - config.py only admits known backends
        raise StoreError("invalid", f"unknown store backend {cfg.backend!r}")


@dataclass(frozen=True, slots=True)
class MigrationReport:
    """What ``migrate`` did: the backend and its schema version before and after."""

    backend: str
    before: int
    after: int


async def migrate(cfg: StoreConfig) -> MigrationReport:
    """Apply the migrations the database of ``cfg`` lacks (idempotent).

    SQLite also migrates when a store is opened (one file, one process); PostgreSQL only
    here, once for every instance sharing the database: an instance refuses to open a
    schema other than its own.

    Raises:
        StoreError: the database cannot be reached, a migration fails, or its schema is
            newer than this code (``unavailable``).
    """
    if cfg.backend == "postgres":
        before, after = await trio.to_thread.run_sync(postgres.migrate, cfg)
    else:
        before, after = await trio.to_thread.run_sync(sqlite.migrate_file, cfg.path)
    return MigrationReport(cfg.backend, before, after)
