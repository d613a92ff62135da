"""The embedded default store: one SQLite file in WAL mode with a single group-committing writer.

What lives here: the schema (versioned with ``PRAGMA user_version``), ``SqliteStore`` (the
``Store`` Protocol of ``api.py``), its writer task and the SQL of every operation.

What does not: decisions (the pipeline decides; the writer only applies the atomic rules that
need the database: duplicates, unmatched reversals, PIN tries, velocity counters, funds), card
cryptography (``hsm/``), the records (``models.py``).

Concurrency: every write is an operation queued to one trio task. It takes everything queued
(up to ``StoreConfig.batch_max``), hands the batch to a worker thread under its own
``CapacityLimiter(1)``, which runs ``BEGIN IMMEDIATE``, applies each operation inside its own
``SAVEPOINT`` (an error rolls back only that operation and fails only its caller), and
``COMMIT``s once: one fsync for the whole batch (group commit). Only then are the callers
woken. Reads use a small pool of separate read-only connections (WAL readers never block the
writer): indexed point lookups run on the trio thread (microseconds, cheaper than a thread
hop), scans in a worker thread.

Durability: ``synchronous=FULL`` in WAL mode fsyncs the log at every commit, so when a
``commit_*`` coroutine returns, its journal row, hold and counters survive a crash or power
loss. Nothing in the schema holds a clear PAN, PIN block, CVV, track data or a cryptogram.
"""

from __future__ import annotations

import contextlib
import enum
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import trio

from switch import metrics
from switch.config import StoreConfig
from switch.decisions import Reason
from switch.store.models import (
    Account,
    AuthIntent,
    AuthOutcome,
    Card,
    CardStatus,
    DuplicateKey,
    OriginalKey,
    ReversalIntent,
    ReversalOutcome,
    SpendControls,
    StoredOutcome,
    StoreError,
)
from switch.store.rules import (
    AccountRow,
    AuthSnapshot,
    CardRow,
    Counters,
    HoldRow,
    ReversalSnapshot,
    plan_auth,
    plan_reversal,
)

T = TypeVar("T")

#: Schema version written to ``PRAGMA user_version``; bump it with a migration step.
SCHEMA_VERSION = 2
#: Read-only connections in the pool; the machine has few cores and reads are short.
READ_CONNECTIONS = 2
#: Milliseconds a connection waits on a lock held by another process (e.g. a second CLI)
#: before failing with "database is locked".
BUSY_TIMEOUT_MS = 5000
#: Journal ``kind`` of a reversal row (authorizations use their ``AuthKind``).
REVERSAL_KIND = "reversal"
#: Separator of the blocked MCC / country lists in their TEXT columns.
_LIST_SEP = ","

_SCHEMA = """
CREATE TABLE accounts (
    id                TEXT PRIMARY KEY,
    currency          TEXT NOT NULL CHECK (length(currency) = 3),
    ledger_balance    INTEGER NOT NULL,
    available_balance INTEGER NOT NULL
) STRICT;

CREATE TABLE cards (
    id                     TEXT PRIMARY KEY,
    account_id             TEXT NOT NULL REFERENCES accounts(id),
    pan_fingerprint        BLOB NOT NULL UNIQUE,
    pan_ciphertext         BLOB NOT NULL,
    first6                 TEXT NOT NULL,
    last4                  TEXT NOT NULL,
    pan_length             INTEGER NOT NULL,
    expiry                 TEXT NOT NULL,
    status                 TEXT NOT NULL
        CHECK (status IN ('active', 'blocked', 'lost', 'stolen', 'closed')),
    service_code           TEXT NOT NULL,
    pan_sequence           TEXT NOT NULL,
    cvk                    TEXT,
    pvk                    TEXT,
    imk_ac                 TEXT,
    emv_cvn                TEXT,
    pin_method             TEXT CHECK (pin_method IN ('pvv', 'ibm3624')),
    pvki                   TEXT,
    pin_verification_value TEXT,
    ibm_dec_table          TEXT,
    ibm_validation_data    TEXT,
    pin_tries              INTEGER NOT NULL DEFAULT 0,
    pin_try_limit          INTEGER NOT NULL,
    per_txn_max            INTEGER,
    daily_amount           INTEGER,
    daily_count            INTEGER,
    monthly_amount         INTEGER,
    monthly_count          INTEGER,
    blocked_mccs           TEXT NOT NULL DEFAULT '',
    blocked_countries      TEXT NOT NULL DEFAULT ''
) STRICT;
CREATE INDEX cards_account ON cards(account_id);

-- Velocity counters of approved requests per card and period ('D'||YYYYMMDD, 'M'||YYYYMM).
CREATE TABLE velocity (
    card_id TEXT NOT NULL REFERENCES cards(id),
    period  TEXT NOT NULL,
    amount  INTEGER NOT NULL,
    count   INTEGER NOT NULL,
    PRIMARY KEY (card_id, period)
) STRICT, WITHOUT ROWID;

-- One row per request answered. orig_* is the request's own original key for an
-- authorization, and the DE90 key of the original it names for a reversal.
CREATE TABLE journal (
    id                     INTEGER PRIMARY KEY,
    network                TEXT NOT NULL,
    acquirer_id            TEXT NOT NULL,
    transmission_time      TEXT NOT NULL,
    stan                   TEXT NOT NULL,
    rrn                    TEXT NOT NULL,
    terminal_id            TEXT NOT NULL,
    mti_class              TEXT NOT NULL,
    mti                    TEXT NOT NULL,
    kind                   TEXT NOT NULL,
    orig_network           TEXT NOT NULL,
    orig_acquirer_id       TEXT NOT NULL,
    orig_stan              TEXT NOT NULL,
    orig_transmission_time TEXT NOT NULL,
    card_id                TEXT,
    account_id             TEXT,
    masked_pan             TEXT NOT NULL,
    amount                 INTEGER NOT NULL,
    replacement_amount     INTEGER,
    currency               TEXT NOT NULL,
    reason                 TEXT NOT NULL,
    response_code          TEXT NOT NULL,
    approval_code          TEXT,
    available_balance      INTEGER,
    stand_in               INTEGER NOT NULL,
    matched                INTEGER,
    released_amount        INTEGER,
    original_journal_id    INTEGER REFERENCES journal(id),
    created_at             TEXT NOT NULL,
    UNIQUE (network, acquirer_id, transmission_time, stan, rrn, terminal_id, mti_class)
) STRICT;
CREATE INDEX journal_original
    ON journal(orig_network, orig_acquirer_id, orig_stan, orig_transmission_time);

-- Money an approved authorization moved: a hold on available funds or a posted debit;
-- remaining is what a reversal can still give back.
CREATE TABLE holds (
    id                     INTEGER PRIMARY KEY,
    journal_id             INTEGER NOT NULL UNIQUE REFERENCES journal(id),
    account_id             TEXT NOT NULL REFERENCES accounts(id),
    card_id                TEXT REFERENCES cards(id),
    kind                   TEXT NOT NULL CHECK (kind IN ('hold', 'debit')),
    amount                 INTEGER NOT NULL,
    remaining              INTEGER NOT NULL CHECK (remaining >= 0 AND remaining <= amount),
    velocity_day           TEXT NOT NULL,
    velocity_month         TEXT NOT NULL,
    orig_network           TEXT NOT NULL,
    orig_acquirer_id       TEXT NOT NULL,
    orig_stan              TEXT NOT NULL,
    orig_transmission_time TEXT NOT NULL,
    created_at             TEXT NOT NULL
) STRICT;
CREATE INDEX holds_original
    ON holds(orig_network, orig_acquirer_id, orig_stan, orig_transmission_time);
CREATE INDEX holds_account ON holds(account_id) WHERE kind = 'hold' AND remaining > 0;

-- Reversals whose original was not found; an original arriving later is declined.
CREATE TABLE unmatched_reversals (
    network             TEXT NOT NULL,
    acquirer_id         TEXT NOT NULL,
    stan                TEXT NOT NULL,
    transmission_time   TEXT NOT NULL,
    journal_id          INTEGER NOT NULL REFERENCES journal(id),
    resolved_journal_id INTEGER REFERENCES journal(id),
    PRIMARY KEY (network, acquirer_id, stan, transmission_time)
) STRICT, WITHOUT ROWID;
"""

_CARD_COLUMNS = (
    "id",
    "account_id",
    "pan_fingerprint",
    "pan_ciphertext",
    "first6",
    "last4",
    "pan_length",
    "expiry",
    "status",
    "service_code",
    "pan_sequence",
    "cvk",
    "pvk",
    "imk_ac",
    "emv_cvn",
    "pin_method",
    "pvki",
    "pin_verification_value",
    "ibm_dec_table",
    "ibm_validation_data",
    "pin_tries",
    "pin_try_limit",
    "per_txn_max",
    "daily_amount",
    "daily_count",
    "monthly_amount",
    "monthly_count",
    "blocked_mccs",
    "blocked_countries",
)
_CARD_SELECT = f"SELECT {', '.join(_CARD_COLUMNS)} FROM cards"  # noqa: S608 - constant columns
_CARD_UPSERT = (
    f"INSERT INTO cards ({', '.join(_CARD_COLUMNS)}) "  # noqa: S608 - constant columns
    f"VALUES ({', '.join('?' for _ in _CARD_COLUMNS)}) "
    "ON CONFLICT(id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _CARD_COLUMNS if c != "id")
)
_ORIG_WHERE = (
    "orig_network = ? AND orig_acquirer_id = ? AND orig_stan = ? AND orig_transmission_time = ?"
)


@dataclass(frozen=True, slots=True)
class WriterStats:
    """Counters of the group-commit writer since the store was opened."""

    batches: int
    operations: int
    largest_batch: int


# -- row mapping ----------------------------------------------------------------------------


def _join(items: frozenset[str]) -> str:
    for item in items:
        if _LIST_SEP in item or not item:
            raise StoreError("invalid", "blocked MCC/country codes must be non-empty, no commas")
    return _LIST_SEP.join(sorted(items))


def _split(text: str) -> frozenset[str]:
    return frozenset(t for t in text.split(_LIST_SEP) if t)


def _card_params(card: Card) -> tuple[Any, ...]:
    c = card.controls
    return (
        card.id,
        card.account_id,
        card.pan_fingerprint,
        card.pan_ciphertext,
        card.first6,
        card.last4,
        card.pan_length,
        card.expiry,
        card.status.value,
        card.service_code,
        card.pan_sequence,
        card.cvk,
        card.pvk,
        card.imk_ac,
        card.emv_cvn,
        card.pin_method,
        card.pvki,
        card.pin_verification_value,
        card.ibm_dec_table,
        card.ibm_validation_data,
        card.pin_tries,
        card.pin_try_limit,
        c.per_txn_max,
        c.daily_amount,
        c.daily_count,
        c.monthly_amount,
        c.monthly_count,
        _join(c.blocked_mccs),
        _join(c.blocked_countries),
    )


def _card_from_row(row: sqlite3.Row) -> Card:
    return Card(
        id=row["id"],
        account_id=row["account_id"],
        pan_fingerprint=bytes(row["pan_fingerprint"]),
        pan_ciphertext=bytes(row["pan_ciphertext"]),
        first6=row["first6"],
        last4=row["last4"],
        pan_length=row["pan_length"],
        expiry=row["expiry"],
        status=CardStatus(row["status"]),
        service_code=row["service_code"],
        pan_sequence=row["pan_sequence"],
        cvk=row["cvk"],
        pvk=row["pvk"],
        imk_ac=row["imk_ac"],
        emv_cvn=row["emv_cvn"],
        pin_method=row["pin_method"],
        pvki=row["pvki"],
        pin_verification_value=row["pin_verification_value"],
        ibm_dec_table=row["ibm_dec_table"],
        ibm_validation_data=row["ibm_validation_data"],
        pin_tries=row["pin_tries"],
        pin_try_limit=row["pin_try_limit"],
        controls=SpendControls(
            per_txn_max=row["per_txn_max"],
            daily_amount=row["daily_amount"],
            daily_count=row["daily_count"],
            monthly_amount=row["monthly_amount"],
            monthly_count=row["monthly_count"],
            blocked_mccs=_split(row["blocked_mccs"]),
            blocked_countries=_split(row["blocked_countries"]),
        ),
    )


def _account_from_row(row: sqlite3.Row) -> Account:
    return Account(
        id=row["id"],
        currency=row["currency"],
        ledger_balance=row["ledger_balance"],
        available_balance=row["available_balance"],
    )


def _dup_params(key: DuplicateKey) -> tuple[str, ...]:
    return (
        key.network,
        key.acquirer_id,
        key.transmission_time,
        key.stan,
        key.rrn,
        key.terminal_id,
        key.mti_class,
    )


def _orig_params(key: OriginalKey) -> tuple[str, ...]:
    return (key.network, key.acquirer_id, key.stan, key.transmission_time)


def _outcome_from_row(row: sqlite3.Row) -> StoredOutcome:
    reason = Reason(row["reason"])
    if row["kind"] == REVERSAL_KIND:
        return ReversalOutcome(
            reason=reason,
            response_code=row["response_code"],
            matched=bool(row["matched"]),
            released_amount=row["released_amount"],
            available_balance=row["available_balance"],
            replayed=True,
        )
    return AuthOutcome(
        reason=reason,
        response_code=row["response_code"],
        approval_code=row["approval_code"],
        available_balance=row["available_balance"],
        currency=row["currency"],
        replayed=True,
        hold_id=row["hold_id"],
    )


_OUTCOME_SELECT = (
    "SELECT j.kind, j.reason, j.response_code, j.approval_code, j.available_balance, j.currency, "
    "j.matched, j.released_amount, h.id AS hold_id "
    "FROM journal j LEFT JOIN holds h ON h.journal_id = j.id "
    "WHERE j.network = ? AND j.acquirer_id = ? AND j.transmission_time = ? AND j.stan = ? "
    "AND j.rrn = ? AND j.terminal_id = ? AND j.mti_class = ?"
)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


# -- the write operations (run in the writer thread, inside a SAVEPOINT) ---------------------


def _stored_outcome(conn: sqlite3.Connection, key: DuplicateKey) -> StoredOutcome | None:
    row = conn.execute(_OUTCOME_SELECT, _dup_params(key)).fetchone()
    return None if row is None else _outcome_from_row(row)


def _insert_journal(conn: sqlite3.Connection, values: dict[str, Any]) -> int:
    cols = ", ".join(values)
    marks = ", ".join("?" for _ in values)
    cur = conn.execute(f"INSERT INTO journal ({cols}) VALUES ({marks})", tuple(values.values()))  # noqa: S608 - keys are ours
    return cast(int, cur.lastrowid)


def _journal_values(
    key: DuplicateKey, orig: OriginalKey, mti: str, kind: str, stand_in: bool
) -> dict[str, Any]:
    return {
        "network": key.network,
        "acquirer_id": key.acquirer_id,
        "transmission_time": key.transmission_time,
        "stan": key.stan,
        "rrn": key.rrn,
        "terminal_id": key.terminal_id,
        "mti_class": key.mti_class,
        "mti": mti,
        "kind": kind,
        "orig_network": orig.network,
        "orig_acquirer_id": orig.acquirer_id,
        "orig_stan": orig.stan,
        "orig_transmission_time": orig.transmission_time,
        "stand_in": int(stand_in),
        "created_at": _now(),
    }


def _bump_counters(
    conn: sqlite3.Connection, card_id: str, *, day: str, month: str, amount: int, count: int
) -> None:
    """Add ``amount`` and ``count`` (negative on a reversal) to the day and month counters."""
    for period in ("D" + day, "M" + month):
        if len(period) == 1:
            continue
        conn.execute(
            "INSERT INTO velocity (card_id, period, amount, count) VALUES (?, ?, ?, ?) "
            "ON CONFLICT(card_id, period) DO UPDATE SET "
            "amount = max(0, amount + excluded.amount), count = max(0, count + excluded.count)",
            (card_id, period, amount, count),
        )


def _auth_snapshot(conn: sqlite3.Connection, intent: AuthIntent) -> AuthSnapshot:
    """Read what the commit rules need; the writer's ``BEGIN IMMEDIATE`` holds the lock."""
    account = card = None
    if intent.account_id is not None:
        row = conn.execute(
            "SELECT id, currency, ledger_balance, available_balance FROM accounts WHERE id = ?",
            (intent.account_id,),
        ).fetchone()
        if row is not None:
            account = AccountRow(*row)
    day = month = Counters()
    if intent.card_id is not None:
        row = conn.execute(
            "SELECT id, pin_tries, pin_try_limit FROM cards WHERE id = ?", (intent.card_id,)
        ).fetchone()
        if row is not None:
            card = CardRow(*row)
            if intent.velocity is not None and intent.velocity.has_velocity:
                day = _counters(conn, card.id, "D" + intent.velocity_day)
                month = _counters(conn, card.id, "M" + intent.velocity_month)
    unmatched = conn.execute(
        "SELECT 1 FROM unmatched_reversals WHERE network = ? AND acquirer_id = ? "
        "AND stan = ? AND transmission_time = ? AND resolved_journal_id IS NULL",
        _orig_params(intent.original_key),
    ).fetchone()
    return AuthSnapshot(account, card, day, month, reversed_before=unmatched is not None)


def _counters(conn: sqlite3.Connection, card_id: str, period: str) -> Counters:
    row = conn.execute(
        "SELECT amount, count FROM velocity WHERE card_id = ? AND period = ?", (card_id, period)
    ).fetchone()
    return Counters() if row is None else Counters(row["amount"], row["count"])


def _apply_auth(conn: sqlite3.Connection, intent: AuthIntent) -> AuthOutcome:
    stored = _stored_outcome(conn, intent.dup_key)
    if stored is not None:
        if not isinstance(stored, AuthOutcome):
            raise StoreError("invalid", "duplicate key belongs to a reversal")
        return stored
    plan = plan_auth(intent, _auth_snapshot(conn, intent))
    code = intent.profile.code(plan.reason)
    if plan.pin_tries is not None:
        conn.execute(
            "UPDATE cards SET pin_tries = ? WHERE id = ?", (plan.pin_tries, intent.card_id)
        )
    moved = plan.hold + plan.debit
    if plan.approved and intent.account_id is not None:
        conn.execute(
            "UPDATE accounts SET available_balance = available_balance - ?, "
            "ledger_balance = ledger_balance - ? WHERE id = ?",
            (moved, plan.debit, intent.account_id),
        )
        if intent.card_id is not None:
            _bump_counters(
                conn,
                intent.card_id,
                day=intent.velocity_day,
                month=intent.velocity_month,
                amount=moved,
                count=1,
            )
    values = _journal_values(
        intent.dup_key, intent.original_key, intent.mti, intent.kind, intent.stand_in
    )
    approval_code = intent.approval_code if plan.approved else None
    values.update(
        card_id=intent.card_id,
        account_id=intent.account_id,
        masked_pan=intent.masked_pan,
        amount=intent.amount,
        currency=intent.currency,
        reason=plan.reason.value,
        response_code=code,
        approval_code=approval_code,
        available_balance=plan.available_after,
    )
    journal_id = _insert_journal(conn, values)
    hold_id = None
    if plan.approved and intent.account_id is not None:
        cur = conn.execute(
            "INSERT INTO holds (journal_id, account_id, card_id, kind, amount, remaining, "
            "velocity_day, velocity_month, orig_network, orig_acquirer_id, orig_stan, "
            "orig_transmission_time, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                journal_id,
                intent.account_id,
                intent.card_id,
                "debit" if plan.debit else "hold",
                moved,
                moved,
                intent.velocity_day,
                intent.velocity_month,
                *_orig_params(intent.original_key),
                values["created_at"],
            ),
        )
        hold_id = cur.lastrowid
    if plan.resolve_unmatched:
        conn.execute(
            "UPDATE unmatched_reversals SET resolved_journal_id = ? WHERE network = ? "
            "AND acquirer_id = ? AND stan = ? AND transmission_time = ?",
            (journal_id, *_orig_params(intent.original_key)),
        )
    return AuthOutcome(
        reason=plan.reason,
        response_code=code,
        approval_code=approval_code,
        available_balance=plan.available_after,
        currency=intent.currency,
        replayed=False,
        hold_id=hold_id,
        held=plan.hold,
        debited=plan.debit,
    )


def _reversal_snapshot(conn: sqlite3.Connection, intent: ReversalIntent) -> ReversalSnapshot:
    orig = _orig_params(intent.original_key)
    row = conn.execute(
        "SELECT id, journal_id, account_id, card_id, kind, remaining, velocity_day, "  # noqa: S608
        f"velocity_month FROM holds WHERE {_ORIG_WHERE} ORDER BY id LIMIT 1",
        orig,
    ).fetchone()
    if row is not None:
        return ReversalSnapshot(HoldRow(*row))
    original = conn.execute(
        f"SELECT id, account_id FROM journal WHERE {_ORIG_WHERE} AND kind != ? "  # noqa: S608
        "ORDER BY id LIMIT 1",
        (*orig, REVERSAL_KIND),
    ).fetchone()
    if original is None:
        return ReversalSnapshot(None)
    return ReversalSnapshot(None, original["id"], original["account_id"])


def _apply_reversal(conn: sqlite3.Connection, intent: ReversalIntent) -> ReversalOutcome:
    stored = _stored_outcome(conn, intent.dup_key)
    if stored is not None:
        if not isinstance(stored, ReversalOutcome):
            raise StoreError("invalid", "duplicate key belongs to an authorization")
        return stored
    snap = _reversal_snapshot(conn, intent)
    plan = plan_reversal(intent, snap)
    code = intent.profile.code(plan.reason)
    if plan.hold_remaining is not None and snap.hold is not None:
        hold = snap.hold
        conn.execute("UPDATE holds SET remaining = ? WHERE id = ?", (plan.hold_remaining, hold.id))
        conn.execute(
            "UPDATE accounts SET available_balance = available_balance + ?, "
            "ledger_balance = ledger_balance + ? WHERE id = ?",
            (plan.release, plan.ledger_credit, hold.account_id),
        )
        if hold.card_id is not None:
            _bump_counters(
                conn,
                hold.card_id,
                day=hold.velocity_day,
                month=hold.velocity_month,
                amount=-plan.release,
                count=plan.count_delta,
            )
    available: int | None = None
    if plan.account_id is not None:
        row = conn.execute(
            "SELECT available_balance FROM accounts WHERE id = ?", (plan.account_id,)
        ).fetchone()
        available = None if row is None else row["available_balance"]
    matched = plan.reason is Reason.REVERSAL_MATCHED
    values = _journal_values(
        intent.dup_key, intent.original_key, intent.mti, REVERSAL_KIND, intent.stand_in
    )
    values.update(
        account_id=plan.account_id,
        masked_pan=intent.masked_pan,
        amount=intent.amount,
        replacement_amount=intent.replacement_amount,
        currency=intent.currency,
        reason=plan.reason.value,
        response_code=code,
        available_balance=available,
        matched=int(matched),
        released_amount=plan.release,
        original_journal_id=plan.original_journal_id,
    )
    journal_id = _insert_journal(conn, values)
    if plan.record_unmatched:
        conn.execute(
            "INSERT INTO unmatched_reversals (network, acquirer_id, stan, transmission_time, "
            "journal_id) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            (*_orig_params(intent.original_key), journal_id),
        )
    return ReversalOutcome(
        reason=plan.reason,
        response_code=code,
        matched=matched,
        released_amount=plan.release,
        available_balance=available,
        replayed=False,
    )


def _put_account(conn: sqlite3.Connection, account: Account) -> None:
    conn.execute(
        "INSERT INTO accounts (id, currency, ledger_balance, available_balance) "
        "VALUES (?, ?, ?, ?) ON CONFLICT(id) DO UPDATE SET currency = excluded.currency, "
        "ledger_balance = excluded.ledger_balance, "
        "available_balance = excluded.available_balance",
        (account.id, account.currency, account.ledger_balance, account.available_balance),
    )


def _put_card(conn: sqlite3.Connection, card: Card) -> None:
    conn.execute(_CARD_UPSERT, _card_params(card))


def _set_card_status(conn: sqlite3.Connection, card_id: str, status: CardStatus) -> bool:
    cur = conn.execute("UPDATE cards SET status = ? WHERE id = ?", (status.value, card_id))
    return cur.rowcount == 1


# -- connections -------------------------------------------------------------------------------


def _connect(path: Path, *, readonly: bool) -> sqlite3.Connection:
    # isolation_level=None: we issue BEGIN/SAVEPOINT/COMMIT ourselves. check_same_thread=False:
    # trio's worker threads vary; a connection is used by one thread at a time (limiters).
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    if readonly:
        conn.execute("PRAGMA query_only = ON")
    else:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            conn.close()
            raise StoreError("unavailable", f"cannot use WAL mode (got {mode})")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
    return conn


def _ensure_schema(conn: sqlite3.Connection) -> None:
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise StoreError("unavailable", f"database schema {version} is newer than this code")
    if version == 0:
        conn.executescript(
            f"BEGIN IMMEDIATE;\n{_SCHEMA}\nPRAGMA user_version = {SCHEMA_VERSION};\nCOMMIT;"
        )
        return
    for step in range(version, SCHEMA_VERSION):
        conn.executescript(
            f"BEGIN IMMEDIATE;\n{_MIGRATIONS[step]}\nPRAGMA user_version = {step + 1};\nCOMMIT;"
        )


#: Step from schema N to N+1, by N.
_MIGRATIONS = {
    # 1 -> 2: the journal records the Reason beside the DE39 it was answered with. Rows
    # journaled before kept only DE39: their reason is inferred from it (a code shared by
    # several reasons reads as the first of the ISO table; anything else as system_error).
    1: """
ALTER TABLE journal ADD COLUMN reason TEXT NOT NULL DEFAULT '';
UPDATE journal SET reason = CASE
    WHEN kind = 'reversal' AND matched = 1 THEN 'reversal_matched'
    WHEN kind = 'reversal' THEN 'reversal_unmatched'
    WHEN kind LIKE 'advice%' THEN 'advice_applied'
    WHEN response_code = '00' THEN 'approved'
    WHEN response_code = '05' THEN 'original_already_reversed'
    WHEN response_code = '12' THEN 'invalid_transaction'
    WHEN response_code = '13' THEN 'invalid_amount'
    WHEN response_code = '14' THEN 'unknown_card'
    WHEN response_code = '41' THEN 'lost_card'
    WHEN response_code = '43' THEN 'stolen_card'
    WHEN response_code = '51' THEN 'insufficient_funds'
    WHEN response_code = '54' THEN 'expired_card'
    WHEN response_code = '55' THEN 'wrong_pin'
    WHEN response_code = '57' THEN 'card_closed'
    WHEN response_code = '61' THEN 'exceeds_amount_velocity'
    WHEN response_code = '62' THEN 'card_blocked'
    WHEN response_code = '65' THEN 'exceeds_count_velocity'
    WHEN response_code = '75' THEN 'pin_tries_exceeded'
    WHEN response_code IN ('82', 'N7') THEN 'cvv_mismatch'
    ELSE 'system_error' END;
""",
}


def _as_store_error(exc: Exception) -> StoreError:
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, sqlite3.IntegrityError):
        # SQLite's constraint messages name the constraint, never a value.
        return StoreError("integrity", str(exc))
    if isinstance(exc, sqlite3.Error):
        return StoreError("unavailable", f"{type(exc).__name__}: {exc}")
    return StoreError("unavailable", f"unexpected {type(exc).__name__}")


class _State(enum.Enum):
    QUEUED = enum.auto()
    TAKEN = enum.auto()
    WITHDRAWN = enum.auto()


class _Pending:
    """One queued write and the caller waiting for it."""

    __slots__ = ("done", "error", "op", "result", "state")

    def __init__(self, op: Callable[[sqlite3.Connection], Any]) -> None:
        self.op = op
        self.state = _State.QUEUED
        self.done = trio.Event()
        self.result: Any = None
        self.error: StoreError | None = None


class SqliteStore:
    """The ``Store`` Protocol on one SQLite file; create it with ``open_sqlite_store``."""

    def __init__(
        self, writer: sqlite3.Connection, readers: list[sqlite3.Connection], batch_max: int
    ) -> None:
        self._writer = writer
        self._readers = readers
        self._batch_max = max(1, batch_max)
        self._read_limiter = trio.CapacityLimiter(len(readers))
        self._write_limiter = trio.CapacityLimiter(1)
        self._send, self._recv = trio.open_memory_channel[_Pending](float("inf"))
        self._closed = False
        self._batches = 0
        self._operations = 0
        self._largest = 0

    def __repr__(self) -> str:
        return f"<SqliteStore batches={self._batches} closed={self._closed}>"

    @property
    def stats(self) -> WriterStats:
        """Group-commit counters (batches committed, operations, largest batch)."""
        return WriterStats(self._batches, self._operations, self._largest)

    # -- reads ---------------------------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run an indexed point lookup on a reader connection, on the trio thread.

        A lookup by primary or unique key in WAL mode never waits for the writer and, with the
        pages cached, takes microseconds; a worker-thread hop costs several times that
        (``python -m benchmarks.store_reads``: median 19 us inline, 161 us through
        ``trio.to_thread``). Scans go through ``_read_offloaded``.
        """
        if self._closed:
            raise StoreError("closed", "the store is closed")
        if not self._readers:  # every reader is busy in an offloaded scan
            return await self._read_offloaded(fn)
        conn = self._readers.pop()
        try:
            return fn(conn)
        except sqlite3.Error as exc:
            raise _as_store_error(exc) from exc
        finally:
            self._readers.append(conn)

    async def _read_offloaded(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run a read that may touch many rows in a worker thread, off the event loop."""
        if self._closed:
            raise StoreError("closed", "the store is closed")
        async with self._read_limiter:
            conn = self._readers.pop()
            try:
                return await trio.to_thread.run_sync(fn, conn)
            except sqlite3.Error as exc:
                raise _as_store_error(exc) from exc
            finally:
                self._readers.append(conn)

    async def get_card_by_fingerprint(self, fingerprint: bytes) -> Card | None:
        def q(conn: sqlite3.Connection) -> Card | None:
            row = conn.execute(f"{_CARD_SELECT} WHERE pan_fingerprint = ?", (fingerprint,))
            found = row.fetchone()
            return None if found is None else _card_from_row(found)

        return await self._read(q)

    async def get_card(self, card_id: str) -> Card | None:
        def q(conn: sqlite3.Connection) -> Card | None:
            found = conn.execute(f"{_CARD_SELECT} WHERE id = ?", (card_id,)).fetchone()
            return None if found is None else _card_from_row(found)

        return await self._read(q)

    async def get_account(self, account_id: str) -> Account | None:
        def q(conn: sqlite3.Connection) -> Account | None:
            found = conn.execute("SELECT * FROM accounts WHERE id = ?", (account_id,)).fetchone()
            return None if found is None else _account_from_row(found)

        return await self._read(q)

    async def find_outcome(self, key: DuplicateKey) -> StoredOutcome | None:
        return await self._read(partial(_stored_outcome, key=key))

    async def list_cards(self) -> list[Card]:
        def q(conn: sqlite3.Connection) -> list[Card]:
            rows = conn.execute(f"{_CARD_SELECT} ORDER BY account_id, id").fetchall()
            return [_card_from_row(r) for r in rows]

        return await self._read_offloaded(q)

    async def active_holds_total(self, account_id: str) -> int:
        def q(conn: sqlite3.Connection) -> int:
            row = conn.execute(
                "SELECT coalesce(sum(remaining), 0) FROM holds "
                "WHERE account_id = ? AND kind = 'hold' AND remaining > 0",
                (account_id,),
            ).fetchone()
            return int(row[0])

        return await self._read_offloaded(q)

    # -- writes --------------------------------------------------------------------------------

    async def commit_auth(self, intent: AuthIntent) -> AuthOutcome:
        result = await self._submit(partial(_apply_auth, intent=intent))
        return cast(AuthOutcome, result)

    async def commit_reversal(self, intent: ReversalIntent) -> ReversalOutcome:
        result = await self._submit(partial(_apply_reversal, intent=intent))
        return cast(ReversalOutcome, result)

    async def put_account(self, account: Account) -> None:
        await self._submit(partial(_put_account, account=account))

    async def put_card(self, card: Card) -> None:
        await self._submit(partial(_put_card, card=card))

    async def set_card_status(self, card_id: str, status: CardStatus) -> bool:
        return cast(
            bool, await self._submit(partial(_set_card_status, card_id=card_id, status=status))
        )

    async def _submit(self, op: Callable[[sqlite3.Connection], Any]) -> Any:
        item = _Pending(op)
        try:
            if self._closed:
                raise trio.ClosedResourceError
            self._send.send_nowait(item)
        except trio.ClosedResourceError:
            raise StoreError("closed", "the store is closed") from None
        try:
            await item.done.wait()
        except trio.Cancelled:
            if item.state is _State.QUEUED:
                item.state = _State.WITHDRAWN
                raise
            # The writer is applying it: a committed decision is the answer to send, so wait
            # for it and return it (see the cancellation contract in api.py).
            with trio.CancelScope(shield=True):
                await item.done.wait()
        if item.error is not None:
            raise item.error
        return item.result

    async def _run_writer(self) -> None:
        try:
            async for first in self._recv:
                batch = [first]
                while len(batch) < self._batch_max:
                    try:
                        batch.append(self._recv.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                live = [item for item in batch if item.state is _State.QUEUED]
                for item in live:
                    item.state = _State.TAKEN
                if not live:
                    continue
                try:
                    results = await trio.to_thread.run_sync(
                        self._apply_batch, [item.op for item in live], limiter=self._write_limiter
                    )
                except BaseException:
                    for item in live:
                        item.error = StoreError("unavailable", "the writer stopped")
                        item.done.set()
                    raise
                for item, (result, error) in zip(live, results, strict=True):
                    item.result, item.error = result, error
                    item.done.set()
        finally:
            self._closed = True
            self._fail_queued()

    def _fail_queued(self) -> None:
        while True:
            try:
                item = self._recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            item.error = StoreError("closed", "the store closed before this write")
            item.done.set()

    def _apply_batch(
        self, ops: Sequence[Callable[[sqlite3.Connection], Any]]
    ) -> list[tuple[Any, StoreError | None]]:
        """Worker thread: apply ``ops`` in one transaction, each in its own savepoint."""
        conn = self._writer
        started = time.perf_counter()
        results: list[tuple[Any, StoreError | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for op in ops:
                conn.execute("SAVEPOINT op")
                try:
                    results.append((op(conn), None))
                except Exception as exc:  # one failure must not fail the batch
                    conn.execute("ROLLBACK TO op")
                    results.append((None, _as_store_error(exc)))
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            # BEGIN, a savepoint or COMMIT itself failed: nothing of the batch is durable.
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            err = _as_store_error(exc)
            return [(None, err) for _ in ops]
        metrics.STORE_COMMIT_SECONDS.observe(time.perf_counter() - started)
        metrics.STORE_BATCH_SIZE.observe(len(ops))
        self._batches += 1
        self._operations += len(ops)
        self._largest = max(self._largest, len(ops))
        return results

    def _close_connections(self) -> None:
        for conn in (*self._readers, self._writer):
            conn.close()


@asynccontextmanager
async def open_sqlite_store(cfg: StoreConfig) -> AsyncIterator[SqliteStore]:
    """Open (creating if needed) the database at ``cfg.path`` and run its writer.

    On exit, writes already queued are committed, then the connections are closed.

    Raises:
        StoreError: the file cannot be opened, WAL cannot be enabled, or its schema is newer.
    """

    def _open() -> tuple[sqlite3.Connection, list[sqlite3.Connection]]:
        try:
            cfg.path.parent.mkdir(parents=True, exist_ok=True)
            writer = _connect(cfg.path, readonly=False)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError("unavailable", f"cannot open the database: {exc}") from exc
        try:
            _ensure_schema(writer)
            readers = [_connect(cfg.path, readonly=True) for _ in range(READ_CONNECTIONS)]
        except BaseException:
            writer.close()
            raise
        return writer, readers

    try:
        writer, readers = await trio.to_thread.run_sync(_open)
    except sqlite3.Error as exc:
        raise StoreError("unavailable", f"cannot open the database: {exc}") from exc
    store = SqliteStore(writer, readers, cfg.batch_max)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store._run_writer)
            try:
                yield store
            finally:
                store._closed = True
                store._send.close()
    finally:
        # Synchronous on purpose: closing must happen even when the caller is cancelled,
        # and the writer thread has finished (to_thread never abandons it).
        store._close_connections()
