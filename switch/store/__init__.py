"""The durable store of cards, accounts and the authorization journal.

What lives here: the public names of the store package and ``open_store``, which opens the
backend a ``StoreConfig`` names. What does not: SQL (``sqlite.py``), the Protocol and its
PostgreSQL mapping (``api.py``), the records (``models.py``).

Usage::

    async with open_store(cfg.store) as store:
        outcome = await store.commit_auth(intent)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from switch.config import StoreConfig
from switch.store.api import Store
from switch.store.models import (
    Account,
    AuthIntent,
    AuthKind,
    AuthOutcome,
    Card,
    CardStatus,
    DuplicateKey,
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
from switch.store.sqlite import SqliteStore, WriterStats, open_sqlite_store

__all__ = [
    "Account",
    "AuthIntent",
    "AuthKind",
    "AuthOutcome",
    "Card",
    "CardStatus",
    "DuplicateKey",
    "OriginalKey",
    "PinCheck",
    "PinMethod",
    "ReversalIntent",
    "ReversalOutcome",
    "SpendControls",
    "SqliteStore",
    "Store",
    "StoreError",
    "StoredOutcome",
    "WriterStats",
    "mask_fields",
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
    else:  # pragma: no cover - config.py only admits known backends
        raise StoreError("invalid", f"unknown store backend {cfg.backend!r}")
