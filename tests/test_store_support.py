"""Shared builders of the store tests: a fresh store (SQLite, PostgreSQL or in memory) with one
account and one card, and intents keyed by STAN. No tests live here."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsm.pan import mask_pan
from switch.config import StoreConfig
from switch.decisions import profile
from switch.store import (
    Account,
    AuthIntent,
    Card,
    CardStatus,
    DuplicateKey,
    OriginalKey,
    ReversalIntent,
    SpendControls,
    open_store,
)
from switch.store.memory import MemoryStore

#: The CVV test-vector card (published Visa table); only its fingerprint reaches the store.
PAN = "4123456789012345"
ACCOUNT_ID = "acct-1"
CARD_ID = "card-1"
CURRENCY = "978"
NETWORK = "visa"
PROFILE = profile(NETWORK)
#: DE32 as the original carries it (LLVAR, no padding).
ACQUIRER = "12345"
#: DE7 of every test request.
DE7 = "0101120000"
#: HMAC key of the test fingerprints (the switch gets fingerprints from the card-data vault).
FP_KEY = b"test-fingerprint-key-0123456789ab"


def fingerprint(pan: str) -> bytes:
    return hmac.new(FP_KEY, pan.encode(), hashlib.sha256).digest()


def make_card(
    card_id: str = CARD_ID,
    pan: str = PAN,
    account_id: str = ACCOUNT_ID,
    **changes: Any,
) -> Card:
    base: dict[str, Any] = {
        "id": card_id,
        "account_id": account_id,
        "pan_fingerprint": fingerprint(pan),
        "pan_ciphertext": os.urandom(60),
        "first6": pan[:6],
        "last4": pan[-4:],
        "pan_length": len(pan),
        "expiry": "8701",
        "status": CardStatus.ACTIVE,
        "service_code": "101",
        "pin_method": "pvv",
        "pvki": "1",
        "pin_verification_value": "8523",
        "pin_try_limit": 3,
    }
    base.update(changes)
    return Card(**base)


def dup_key(stan: str, mti: str = "0100", acquirer: str = ACQUIRER) -> DuplicateKey:
    return DuplicateKey(NETWORK, acquirer, DE7, stan, f"RRN{stan:>9}", "TERM0001", mti)


def orig_key(stan: str, acquirer: str = ACQUIRER, mti: str = "0100") -> OriginalKey:
    """The key by which a reversal names the request ``auth(stan)`` (its DE37 and DE41)."""
    return OriginalKey(NETWORK, acquirer, DE7, stan, mti, f"RRN{stan:>9}", "TERM0001")


def digest_of(*parts: object) -> str:
    """A content digest for the tests' intents: the same parts, the same request."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def auth(stan: str, amount: int = 1000, kind: str = "hold", **changes: Any) -> AuthIntent:
    """An authorization on the test card; ``stan`` makes its keys unique."""
    mti = {"hold": "0100", "debit": "0200", "advice_hold": "0120", "advice_debit": "0220"}
    base: dict[str, Any] = {
        "dup_key": dup_key(stan, mti.get(kind, "0100")),
        "mti": mti.get(kind, "0100"),
        "card_id": CARD_ID,
        "account_id": ACCOUNT_ID,
        "masked_pan": mask_pan(PAN),
        "amount": amount,
        "currency": CURRENCY,
        "kind": kind,
        "profile": PROFILE,
        "approval_code": f"A{stan[-5:]:>05}",
        "velocity_day": "20250101",
        "velocity_month": "202501",
    }
    base.update(changes)
    base.setdefault("digest", digest_of(base["amount"], base["currency"], base["card_id"]))
    return AuthIntent(**base)


def reversal(
    stan: str,
    original_stan: str,
    amount: int = 1000,
    *,
    replacement: int | None = None,
    mti: str = "0400",
    acquirer: str = ACQUIRER,
    original_mti: str = "0100",
    card_id: str | None = CARD_ID,
    currency: str = CURRENCY,
) -> ReversalIntent:
    return ReversalIntent(
        dup_key=dup_key(stan, mti),
        digest=digest_of(amount, replacement, original_stan, card_id, currency),
        original_key=orig_key(original_stan, acquirer, original_mti),
        card_id=card_id,
        pan_present=True,
        mti=mti,
        amount=amount,
        replacement_amount=replacement,
        currency=currency,
        masked_pan=mask_pan(PAN),
        profile=PROFILE,
    )


@dataclass(frozen=True)
class Backend:
    """Which store a test runs on: ``sqlite``, ``memory`` or ``postgres`` (with its DSN)."""

    name: str
    dsn: str = ""

    def __str__(self) -> str:
        return self.name


@asynccontextmanager
async def seeded_store(
    path: Path,
    balance: int = 100_000,
    controls: SpendControls | None = None,
    batch_max: int = 128,
    backend: str | Backend = "sqlite",
) -> AsyncIterator[Any]:
    """A store at ``path`` holding one account with ``balance`` and the test card on it;
    ``backend`` "memory" gives the in-memory test store instead (``path`` unused), a
    ``Backend("postgres", dsn)`` the PostgreSQL database ``dsn`` (already migrated)."""
    spec = backend if isinstance(backend, Backend) else Backend(backend)
    async with contextlib.AsyncExitStack() as stack:
        store: Any
        if spec.name == "memory":
            store = MemoryStore()
        elif spec.name == "postgres":
            cfg = StoreConfig(backend="postgres", dsn=spec.dsn)
            store = await stack.enter_async_context(open_store(cfg))
        else:
            cfg = StoreConfig(path=path, batch_max=batch_max)
            store = await stack.enter_async_context(open_store(cfg))
        if await store.get_account(ACCOUNT_ID) is None:
            await store.put_account(Account(ACCOUNT_ID, CURRENCY, balance, balance))
            await store.put_card(make_card(controls=controls or SpendControls()))
        yield store
