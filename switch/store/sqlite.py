"""The embedded default store: one SQLite file in WAL mode with a single group-committing writer.

What lives here: ``SqliteStore`` (the ``Store`` Protocol of ``api.py``), its writer task, the
SQL of every operation, the mapping of the cards table to ``Card`` (``_CARD_TABLE``, shared
with the PostgreSQL backend) and ``_ensure_schema``, which applies the migrations
(``switch/store/migrations/sqlite/*.sql``) and records the version in ``PRAGMA
user_version``.

What does not: decisions (the pipeline decides; the writer only applies the atomic rules that
need the database: duplicates, unmatched reversals, PIN tries, velocity counters, funds), card
cryptography (``hsm/``), the records (``models.py``).

Concurrency: every write is an operation queued to one trio task. It takes everything queued
(up to ``StoreConfig.batch_max``), hands the batch to a worker thread under its own
``CapacityLimiter(1)``, which runs ``BEGIN IMMEDIATE``, applies each operation inside its own
``SAVEPOINT`` (an error rolls back only that operation and fails only its caller), and
``COMMIT``s once: one fsync for the whole batch (group commit). Only then are the callers
woken. A commit may carry a deadline (api.py): the writer does not take a queued
commit whose deadline has passed (its caller gets ``StoreError("unavailable")``, nothing
written), and sets the batch's ``busy_timeout`` to the time left before the earliest
deadline in it (at most ``BUSY_TIMEOUT_MS``), so a database locked by another process fails
the batch at about that deadline instead of holding the answers past it.

Reads use a small pool of separate read-only connections (WAL readers never block the
writer): indexed point lookups run on the trio thread (microseconds, cheaper than a thread
hop), scans in a worker thread.

Durability: ``synchronous=FULL`` in WAL mode fsyncs the log at every commit, so when a
``commit_*`` coroutine returns, its journal row, hold and counters survive a crash or power
loss. Nothing in the schema holds a clear PAN, PIN block, CVV, track data or a cryptogram.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar, cast

import trio

from switch import events as ev
from switch import metrics
from switch.config import StoreConfig
from switch.decisions import Reason
from switch.store import migrations
from switch.store.models import (
    STAND_IN_PERIOD,
    UNDELIVERED,
    Account,
    AuthIntent,
    AuthLookup,
    AuthOutcome,
    Card,
    CardChange,
    CardStatus,
    DeliveryMark,
    DuplicateKey,
    HoldRelease,
    HoldView,
    JournalEntry,
    JournalQuery,
    OriginalKey,
    ReversalIntent,
    ReversalOutcome,
    SpendControls,
    StoredOutcome,
    StoreError,
    apply_card_changes,
    card_diff,
    masked_parts,
)
from switch.store.rules import (
    AccountRow,
    AuthSnapshot,
    CardRow,
    Counters,
    HoldRow,
    OriginalRow,
    ReversalSnapshot,
    plan_auth,
    plan_hold_release,
    plan_reversal,
)

T = TypeVar("T")

#: Schema version written to ``PRAGMA user_version``: that of the last migration file.
SCHEMA_VERSION = migrations.latest("sqlite")
#: Read-only connections in the pool; the machine has few cores and reads are short.
READ_CONNECTIONS = 2
#: Milliseconds a connection waits on a lock held by another process (e.g. a second CLI)
#: before failing with "database is locked"; a batch with deadlines waits at most until the
#: earliest of them.
BUSY_TIMEOUT_MS = 5000
#: Journal ``kind`` of a reversal row (authorizations use their ``AuthKind``).
REVERSAL_KIND = "reversal"
#: Journal ``kind`` of a request that reused a duplicate key with other content.
DUPLICATE_KIND = "duplicate"
#: Separator of the blocked MCC / country lists in their TEXT columns.
_LIST_SEP = ","


@dataclass(frozen=True, slots=True)
class _Column:
    """One column of the cards table and how it maps to a ``Card`` attribute (or, with
    ``controls``, to an attribute of its ``SpendControls``)."""

    name: str
    controls: bool = False
    dump: Callable[[Any], Any] | None = None
    load: Callable[[Any], Any] | None = None
    #: Changed only by decisions (PIN tries, chip counter): provisioning never overwrites it.
    counter: bool = False


def _join(items: frozenset[str]) -> str:
    for item in items:
        if _LIST_SEP in item or not item:
            raise StoreError("invalid", "blocked MCC/country codes must be non-empty, no commas")
    return _LIST_SEP.join(sorted(items))


def _split(text: str) -> frozenset[str]:
    return frozenset(t for t in text.split(_LIST_SEP) if t)


#: The cards table's columns as ``Card`` maps them: the SELECT, the upsert and the mapping to
#: and from ``Card`` of both backends are generated from it; the DDL is in the migrations,
#: and ``_ensure_schema`` checks that the table it finds has exactly these columns.
_CARD_TABLE = (
    _Column("id"),
    _Column("account_id"),
    _Column("pan_fingerprint", load=bytes),
    _Column("pan_ciphertext", load=bytes),
    _Column("first6"),
    _Column("last4"),
    _Column("pan_length"),
    _Column("expiry"),
    _Column(
        "status",
        dump=lambda status: status.value,
        load=CardStatus,
    ),
    _Column("service_code"),
    _Column("pan_sequence"),
    _Column("cvk"),
    _Column("pvk"),
    _Column("imk_ac"),
    _Column("emv_cvn"),
    _Column("pin_method"),
    _Column("pvki"),
    _Column("pin_verification_value"),
    _Column("ibm_dec_table"),
    _Column("ibm_validation_data"),
    _Column("pin_tries", counter=True),
    _Column("pin_try_limit"),
    _Column("last_atc", counter=True),
    _Column("atc_seen", counter=True),
    _Column("per_txn_max", controls=True),
    _Column("daily_amount", controls=True),
    _Column("daily_count", controls=True),
    _Column("monthly_amount", controls=True),
    _Column("monthly_count", controls=True),
    _Column("blocked_mccs", controls=True, dump=_join, load=_split),
    _Column("blocked_countries", controls=True, dump=_join, load=_split),
)
_CARD_COLUMNS = tuple(c.name for c in _CARD_TABLE)
if set(_CARD_COLUMNS) != ({f.name for f in dataclasses.fields(Card)} - {"controls"}) | {
    f.name for f in dataclasses.fields(SpendControls)
}:  # pragma: no cover - a schema bug
    raise RuntimeError("the cards table and the Card record disagree")
_CARD_SELECT = f"SELECT {', '.join(_CARD_COLUMNS)} FROM cards"  # noqa: S608 - constant columns
_CARD_UPSERT = (
    f"INSERT INTO cards ({', '.join(_CARD_COLUMNS)}) "  # noqa: S608 - constant columns
    f"VALUES ({', '.join('?' for _ in _CARD_COLUMNS)}) "
    "ON CONFLICT(id) DO UPDATE SET "
    + ", ".join(f"{c.name} = excluded.{c.name}" for c in _CARD_TABLE[1:] if not c.counter)
)
#: The columns of a journal row's own key and of the original it names, in key order.
_KEY_COLUMNS = ("network", "acquirer_id", "transmission_time", "stan", "rrn", "terminal_id",
                "mti_class")  # fmt: skip
_ORIG_COLUMNS = tuple(f"orig_{c}" for c in _KEY_COLUMNS)
#: Journal kinds that are not an original a reversal, advice or completion can name.
_NOT_ORIGINALS = (REVERSAL_KIND, DUPLICATE_KIND)


@dataclass(frozen=True, slots=True)
class WriterStats:
    """Counters of the group-commit writer since the store was opened."""

    batches: int
    operations: int
    largest_batch: int


# -- row mapping ----------------------------------------------------------------------------


def _card_params(card: Card) -> tuple[Any, ...]:
    values = []
    for col in _CARD_TABLE:
        value = getattr(card.controls if col.controls else card, col.name)
        values.append(col.dump(value) if col.dump else value)
    return tuple(values)


def _card_from_row(row: sqlite3.Row) -> Card:
    card: dict[str, Any] = {}
    controls: dict[str, Any] = {}
    for col in _CARD_TABLE:
        value = row[col.name]
        (controls if col.controls else card)[col.name] = col.load(value) if col.load else value
    return Card(**card, controls=SpendControls(**controls))


def _account_from_row(row: sqlite3.Row) -> Account:
    return Account(
        id=row["id"],
        currency=row["currency"],
        ledger_balance=row["ledger_balance"],
        available_balance=row["available_balance"],
    )


def _key_params(key: DuplicateKey) -> tuple[str, ...]:
    return (
        key.network,
        key.acquirer_id,
        key.transmission_time,
        key.stan,
        key.rrn,
        key.terminal_id,
        key.mti_class,
    )


def _orig_values(key: OriginalKey | None) -> dict[str, str | None]:
    fields = (None,) * 7 if key is None else (
        key.network, key.acquirer_id, key.transmission_time, key.stan, key.rrn,
        key.terminal_id, key.mti_class,
    )  # fmt: skip
    return dict(zip(_ORIG_COLUMNS, fields, strict=True))


def _outcome_from_row(row: sqlite3.Row) -> StoredOutcome:
    reason = Reason(row["reason"])
    if row["kind"] == REVERSAL_KIND or row["mti_class"].startswith("04"):
        return ReversalOutcome(
            reason=reason,
            response_code=row["response_code"],
            matched=bool(row["matched"]),
            released_amount=row["released_amount"] or 0,
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


_KEY_WHERE = " AND ".join(f"j.{c} = ?" for c in _KEY_COLUMNS)
_OUTCOME_SELECT = (
    "SELECT j.kind, j.mti_class, j.digest, j.reason, j.response_code, j.approval_code, "  # noqa: S608
    "j.available_balance, j.currency, j.matched, j.released_amount, h.id AS hold_id "
    f"FROM journal j LEFT JOIN holds h ON h.journal_id = j.id WHERE {_KEY_WHERE} "
    "ORDER BY j.kind = 'duplicate', j.id"
)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


# -- the write operations (run in the writer thread, inside a SAVEPOINT) ---------------------


def _card_by_fingerprint(conn: sqlite3.Connection, fingerprint: bytes) -> Card | None:
    found = conn.execute(f"{_CARD_SELECT} WHERE pan_fingerprint = ?", (fingerprint,)).fetchone()
    return None if found is None else _card_from_row(found)


def _account(conn: sqlite3.Connection, account_id: str) -> Account | None:
    found = conn.execute("SELECT * FROM accounts WHERE id = ?", (account_id,)).fetchone()
    return None if found is None else _account_from_row(found)


def _stored(conn: sqlite3.Connection, key: DuplicateKey, digest: str) -> StoredOutcome | bool:
    """The stored outcome of this key and digest; ``True`` when the key belongs to a request
    with other content (a duplicate transmission not yet journaled), ``False`` when new."""
    rows = conn.execute(_OUTCOME_SELECT, _key_params(key)).fetchall()
    for row in rows:
        if row["digest"] == digest:
            return _outcome_from_row(row)
    return bool(rows)


def _insert_journal(conn: sqlite3.Connection, values: dict[str, Any]) -> int:
    cols = ", ".join(values)
    marks = ", ".join("?" for _ in values)
    cur = conn.execute(f"INSERT INTO journal ({cols}) VALUES ({marks})", tuple(values.values()))  # noqa: S608 - keys are ours
    return cast(int, cur.lastrowid)


def _journal_values(
    key: DuplicateKey,
    digest: str,
    orig: OriginalKey | None,
    *,
    mti: str,
    kind: str,
    stand_in: bool,
) -> dict[str, Any]:
    return {
        **dict(zip(_KEY_COLUMNS, _key_params(key), strict=True)),
        "digest": digest,
        "mti": mti,
        "kind": kind,
        **_orig_values(orig),
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


def _counters(conn: sqlite3.Connection, card_id: str, period: str) -> Counters:
    row = conn.execute(
        "SELECT amount, count FROM velocity WHERE card_id = ? AND period = ?", (card_id, period)
    ).fetchone()
    return Counters() if row is None else Counters(row["amount"], row["count"])


_ORIGINAL_KEY = ("network", "acquirer_id", "transmission_time", "stan", "mti_class")
_ORIGINAL_SELECT = (
    "SELECT j.id, j.card_id, j.account_id, j.currency, h.id AS hold_id, h.journal_id, "
    "h.account_id AS hold_account, h.card_id AS hold_card, h.kind AS hold_kind, h.remaining, "
    "h.velocity_day, h.velocity_month, h.completed_by "
    "FROM journal j LEFT JOIN holds h ON h.journal_id = j.id WHERE "
    + " AND ".join(f"j.{c} = ?" for c in _ORIGINAL_KEY)
)


def _original(conn: sqlite3.Connection, key: OriginalKey) -> OriginalRow | None:
    """The original ``key`` names (its money row with it), or ``None``."""
    sql = _ORIGINAL_SELECT
    params: list[str] = [key.network, key.acquirer_id, key.transmission_time, key.stan,
                         key.mti_class]  # fmt: skip
    for column, value in (("rrn", key.rrn), ("terminal_id", key.terminal_id)):
        if value is not None:
            sql += f" AND j.{column} = ?"
            params.append(value)
    sql += f" AND j.kind NOT IN {_NOT_ORIGINALS!r} ORDER BY j.id LIMIT 1"
    row = conn.execute(sql, params).fetchone()
    if row is None:
        return None
    hold = None
    if row["hold_id"] is not None:
        hold = HoldRow(
            row["hold_id"], row["journal_id"], row["hold_account"], row["hold_card"],
            row["hold_kind"], row["remaining"], row["velocity_day"], row["velocity_month"],
            row["completed_by"],
        )  # fmt: skip
    return OriginalRow(row["id"], row["card_id"], row["account_id"], row["currency"], hold)


def _unmatched_reversal(
    conn: sqlite3.Connection, key: DuplicateKey, card_id: str | None, currency: str
) -> int | None:
    """The unresolved unmatched reversal naming this request (same card and currency)."""
    row = conn.execute(
        "SELECT u.journal_id FROM unmatched_reversals u JOIN journal r ON r.id = u.journal_id "
        "WHERE u.resolved_journal_id IS NULL AND r.orig_network = ? AND r.orig_acquirer_id = ? "
        "AND r.orig_transmission_time = ? AND r.orig_stan = ? AND r.orig_mti_class = ? "
        "AND (r.orig_rrn IS NULL OR r.orig_rrn = ?) "
        "AND (r.orig_terminal_id IS NULL OR r.orig_terminal_id = ?) "
        "AND (r.card_id IS NULL OR r.card_id = ?) AND (r.currency = '' OR r.currency = ?) "
        "ORDER BY u.journal_id LIMIT 1",
        (key.network, key.acquirer_id, key.transmission_time, key.stan, key.mti_class,
         key.rrn, key.terminal_id, card_id, currency),
    ).fetchone()  # fmt: skip
    return None if row is None else int(row[0])


def _auth_snapshot(
    conn: sqlite3.Connection, intent: AuthIntent, conflict: bool
) -> tuple[AuthSnapshot, int | None]:
    """Read what the commit rules need (and the unmatched reversal naming this request); the
    writer's ``BEGIN IMMEDIATE`` holds the lock."""
    if conflict:
        return AuthSnapshot(None, None, conflict=True), None
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
            "SELECT id, pin_tries, pin_try_limit, last_atc, atc_seen FROM cards WHERE id = ?",
            (intent.card_id,),
        ).fetchone()
        if row is not None:
            card = CardRow(*row)
            if intent.velocity is not None and intent.velocity.has_velocity:
                day = _counters(conn, card.id, "D" + intent.velocity_day)
                month = _counters(conn, card.id, "M" + intent.velocity_month)
    unmatched = _unmatched_reversal(conn, intent.dup_key, intent.card_id, intent.currency)
    if unmatched is None and intent.original is not None:
        # an advice whose original was reversed before either arrived
        named = intent.original.as_key(intent.dup_key)
        unmatched = _unmatched_reversal(conn, named, intent.card_id, intent.currency)
    original = None if intent.original is None else _original(conn, intent.original)
    stand_in_day = Counters()
    if card is not None and intent.stand_in_daily is not None:
        stand_in_day = _counters(conn, card.id, STAND_IN_PERIOD + intent.velocity_day)
    snap = AuthSnapshot(
        account, card, day, month, reversed_before=unmatched is not None, original=original,
        stand_in_day=stand_in_day,
    )  # fmt: skip
    return snap, unmatched


def _apply_auth(conn: sqlite3.Connection, intent: AuthIntent) -> AuthOutcome:
    stored = _stored(conn, intent.dup_key, intent.digest)
    if not isinstance(stored, bool):
        if not isinstance(stored, AuthOutcome):
            raise StoreError("invalid", "duplicate key belongs to a reversal")
        return stored
    snap, unmatched = _auth_snapshot(conn, intent, conflict=stored)
    plan = plan_auth(intent, snap)
    code = intent.profile.code(plan.reason)
    if plan.pin_tries is not None:
        conn.execute(
            "UPDATE cards SET pin_tries = ? WHERE id = ?", (plan.pin_tries, intent.card_id)
        )
    if plan.atc is not None:
        conn.execute(
            "UPDATE cards SET last_atc = ?, atc_seen = ? WHERE id = ?", (*plan.atc, intent.card_id)
        )
    moved = plan.hold + plan.debit
    original = snap.original
    if plan.approved and intent.account_id is not None:
        conn.execute(
            "UPDATE accounts SET available_balance = available_balance - ? + ?, "
            "ledger_balance = ledger_balance - ? WHERE id = ?",
            (moved, plan.release_original, plan.debit, intent.account_id),
        )
        if intent.card_id is not None and (moved or plan.release_original):
            _bump_counters(
                conn,
                intent.card_id,
                day=intent.velocity_day,
                month=intent.velocity_month,
                amount=moved - plan.release_original,
                count=0 if plan.release_original else 1,
            )
    if plan.approved and intent.stand_in_daily is not None and intent.card_id is not None:
        conn.execute(
            "INSERT INTO velocity (card_id, period, amount, count) VALUES (?, ?, ?, 1) "
            "ON CONFLICT(card_id, period) DO UPDATE SET "
            "amount = amount + excluded.amount, count = count + 1",
            (intent.card_id, STAND_IN_PERIOD + intent.velocity_day, intent.amount),
        )
    kind = DUPLICATE_KIND if plan.reason is Reason.DUPLICATE_TRANSMISSION else intent.kind
    values = _journal_values(
        intent.dup_key, intent.digest, intent.original,
        mti=intent.mti, kind=kind, stand_in=intent.stand_in,
    )  # fmt: skip
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
        original_journal_id=None if original is None else original.journal_id,
    )
    journal_id = _insert_journal(conn, values)
    if plan.original_remaining is not None and original is not None and original.hold:
        conn.execute(
            "UPDATE holds SET remaining = ?, completed_by = ? WHERE id = ?",
            (plan.original_remaining, journal_id, original.hold.id),
        )
    hold_id = None
    if plan.money_row and intent.account_id is not None:
        cur = conn.execute(
            "INSERT INTO holds (journal_id, account_id, card_id, kind, amount, remaining, "
            "velocity_day, velocity_month, created_at, expires_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                journal_id,
                intent.account_id,
                intent.card_id,
                "debit" if plan.debit else "hold",
                moved,
                moved,
                intent.velocity_day,
                intent.velocity_month,
                values["created_at"],
                None if plan.debit or not intent.hold_expires_at else intent.hold_expires_at,
            ),
        )
        hold_id = cur.lastrowid
    if plan.resolve_unmatched:
        conn.execute(
            "UPDATE unmatched_reversals SET resolved_journal_id = ? WHERE journal_id = ?",
            (journal_id, unmatched),
        )
    _insert_event(conn, ev.auth_event(
        intent, journal_id=journal_id, reason=plan.reason, response_code=code, held=plan.hold,
        debited=plan.debit, released=plan.release_original, at=values["created_at"],
        event_id=ev.new_event_id(),
    ))  # fmt: skip
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


def _apply_reversal(conn: sqlite3.Connection, intent: ReversalIntent) -> ReversalOutcome:
    stored = _stored(conn, intent.dup_key, intent.digest)
    if not isinstance(stored, bool):
        if not isinstance(stored, ReversalOutcome):
            raise StoreError("invalid", "duplicate key belongs to an authorization")
        return stored
    original = None if stored else _original(conn, intent.original_key)
    snap = ReversalSnapshot(original, conflict=stored)
    plan = plan_reversal(intent, snap)
    code = intent.profile.code(plan.reason)
    hold = None if original is None else original.hold
    if plan.hold_remaining is not None and hold is not None:
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
    kind = DUPLICATE_KIND if plan.reason is Reason.DUPLICATE_TRANSMISSION else REVERSAL_KIND
    values = _journal_values(
        intent.dup_key, intent.digest, intent.original_key,
        mti=intent.mti, kind=kind, stand_in=intent.stand_in,
    )  # fmt: skip
    values.update(
        card_id=intent.card_id,
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
        conn.execute("INSERT INTO unmatched_reversals (journal_id) VALUES (?)", (journal_id,))
    _insert_event(conn, ev.reversal_event(
        intent, journal_id=journal_id, account_id=plan.account_id, reason=plan.reason,
        response_code=code, released=plan.release,
        original_journal_id=plan.original_journal_id, at=values["created_at"],
        event_id=ev.new_event_id(),
    ))  # fmt: skip
    return ReversalOutcome(
        reason=plan.reason,
        response_code=code,
        matched=matched,
        released_amount=plan.release,
        available_balance=available,
        replayed=False,
    )


# -- the outbox (written inside the decision's savepoint; read and marked by the relay) -----


def _insert_event(conn: sqlite3.Connection, event: ev.NewEvent) -> None:
    conn.execute(
        "INSERT INTO events (event_id, type, group_key, journal_id, created_at, payload) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (event.event_id, event.type, event.group_key, event.journal_id, event.created_at,
         event.payload),
    )  # fmt: skip


_EVENT_COLUMNS = (
    "id, event_id, type, group_key, journal_id, created_at, payload, published_at, attempts, "
    "parked_at, last_error"
)


def _event_from_row(row: sqlite3.Row) -> ev.OutboxEvent:
    return ev.OutboxEvent(*row)


def _pending_events(conn: sqlite3.Connection, limit: int) -> list[ev.OutboxEvent]:
    rows = conn.execute(
        f"SELECT {_EVENT_COLUMNS} FROM events "  # noqa: S608 - constant columns
        "WHERE published_at IS NULL AND parked_at IS NULL ORDER BY id LIMIT ?",
        (limit,),
    ).fetchall()
    return [_event_from_row(r) for r in rows]


def _events_since(conn: sqlite3.Connection, since: str, limit: int) -> list[ev.OutboxEvent]:
    rows = conn.execute(
        f"SELECT {_EVENT_COLUMNS} FROM events "  # noqa: S608 - constant columns
        "WHERE created_at >= ? ORDER BY id LIMIT ?",
        (since, limit),
    ).fetchall()
    return [_event_from_row(r) for r in rows]


def _outbox_stats(conn: sqlite3.Connection) -> ev.OutboxStats:
    pending = conn.execute(
        "SELECT count(*), min(created_at) FROM events "
        "WHERE published_at IS NULL AND parked_at IS NULL"
    ).fetchone()
    parked = conn.execute("SELECT count(*) FROM events WHERE parked_at IS NOT NULL").fetchone()
    return ev.OutboxStats(int(pending[0]), pending[1], int(parked[0]))


def _mark_published(conn: sqlite3.Connection, ids: Sequence[int], at: str) -> None:
    conn.executemany(
        "UPDATE events SET published_at = ? WHERE id = ? AND published_at IS NULL",
        [(at, i) for i in ids],
    )


def _record_event_failures(
    conn: sqlite3.Connection, failures: Sequence[ev.EventFailure], max_attempts: int, at: str
) -> int:
    parked = 0
    for f in failures:
        row = conn.execute("SELECT attempts FROM events WHERE id = ?", (f.id,)).fetchone()
        if row is None:
            continue
        attempts = int(row[0]) + 1
        park = f.poison or attempts >= max_attempts
        parked += park
        conn.execute(
            "UPDATE events SET attempts = ?, last_error = ?, parked_at = ? WHERE id = ?",
            (attempts, f.error[:500], at if park else None, f.id),
        )
    return parked


def _purge_published(conn: sqlite3.Connection, before: str) -> int:
    cur = conn.execute(
        "DELETE FROM events WHERE published_at IS NOT NULL AND published_at < ?", (before,)
    )
    return cur.rowcount


def _claim_lease(conn: sqlite3.Connection, name: str, owner: str, now: float, ttl: float) -> bool:
    """Take or renew the lease ``name``: free, expired, or already ours."""
    conn.execute(
        "INSERT INTO leases (name, owner, expires_at) VALUES (?, ?, ?) "
        "ON CONFLICT(name) DO UPDATE SET owner = excluded.owner, "
        "expires_at = excluded.expires_at WHERE leases.owner = excluded.owner "
        "OR leases.expires_at <= ?",
        (name, owner, now + ttl, now),
    )
    row = conn.execute("SELECT owner FROM leases WHERE name = ?", (name,)).fetchone()
    return row is not None and row[0] == owner


def _release_lease(conn: sqlite3.Connection, name: str, owner: str) -> None:
    conn.execute("DELETE FROM leases WHERE name = ? AND owner = ?", (name, owner))


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


def _update_card(
    conn: sqlite3.Connection, card_id: str, changes: Mapping[str, object], actor: str
) -> CardChange | None:
    row = conn.execute(f"{_CARD_SELECT} WHERE id = ?", (card_id,)).fetchone()
    if row is None:
        return None
    old = _card_from_row(row)
    new = apply_card_changes(old, changes)
    params = dict(zip(_CARD_COLUMNS, _card_params(new), strict=True))
    names = [c.name for c in _CARD_TABLE if c.name != "id" and c.name in changes]
    if names:
        conn.execute(
            f"UPDATE cards SET {', '.join(f'{n} = ?' for n in names)} WHERE id = ?",  # noqa: S608
            (*(params[n] for n in names), card_id),
        )
    change = CardChange(card_id, old.masked_pan, actor, _now(), card_diff(old, new))
    conn.execute(
        "INSERT INTO card_changes (card_id, masked_pan, actor, at, changed) VALUES (?, ?, ?, ?, ?)",
        (card_id, change.masked_pan, actor, change.at, json.dumps(change.changed, sort_keys=True)),
    )
    _insert_event(conn, ev.card_change_event(change, account_id=old.account_id,
                                             event_id=ev.new_event_id()))  # fmt: skip
    return change


_HOLD_SELECT = (
    "SELECT h.id, h.journal_id, h.account_id, h.card_id, j.masked_pan, h.kind, h.amount, "
    "h.remaining, h.created_at, h.expires_at, h.released_at, h.released_by, "
    "h.velocity_day, h.velocity_month, h.completed_by, j.currency "
    "FROM holds h JOIN journal j ON j.id = h.journal_id"
)


def _hold_view(row: sqlite3.Row) -> HoldView:
    return HoldView(*row[:12])


def _release(conn: sqlite3.Connection, row: sqlite3.Row, by: str, at: str) -> HoldRelease | None:
    """Give back what remains of the hold ``row`` (a _HOLD_SELECT row); None if nothing."""
    hold = HoldRow(
        row["id"], row["journal_id"], row["account_id"], row["card_id"], row["kind"],
        row["remaining"], row["velocity_day"], row["velocity_month"], row["completed_by"],
    )  # fmt: skip
    plan = plan_hold_release(hold)
    if plan is None:
        return None
    amount, count_delta = plan
    conn.execute(
        "UPDATE holds SET remaining = 0, released_at = ?, released_by = ? WHERE id = ?",
        (at, by, hold.id),
    )
    conn.execute(
        "UPDATE accounts SET available_balance = available_balance + ? WHERE id = ?",
        (amount, hold.account_id),
    )
    if hold.card_id is not None:
        _bump_counters(conn, hold.card_id, day=hold.velocity_day, month=hold.velocity_month,
                       amount=-amount, count=count_delta)  # fmt: skip
    release = HoldRelease(hold.id, hold.account_id, row["masked_pan"], amount, by, at)
    _insert_event(conn, ev.hold_release_event(
        release, journal_id=hold.journal_id, card_id=hold.card_id, currency=row["currency"],
        event_id=ev.new_event_id(),
    ))  # fmt: skip
    return release


def _expire_holds(conn: sqlite3.Connection, now: str, limit: int) -> list[HoldRelease]:
    rows = conn.execute(
        f"{_HOLD_SELECT} WHERE h.kind = 'hold' AND h.remaining > 0 "
        "AND h.expires_at IS NOT NULL AND h.expires_at <= ? ORDER BY h.expires_at LIMIT ?",
        (now, limit),
    ).fetchall()
    released = (_release(conn, row, "expiry", now) for row in rows)
    return [r for r in released if r is not None]


def _release_hold(conn: sqlite3.Connection, hold_id: int, actor: str) -> HoldRelease | None:
    row = conn.execute(f"{_HOLD_SELECT} WHERE h.id = ?", (hold_id,)).fetchone()
    return None if row is None else _release(conn, row, actor, _now())


def _list_holds(
    conn: sqlite3.Connection, account_id: str | None, card_id: str | None, active: bool, limit: int
) -> list[HoldView]:
    where, params = ["1 = 1"], []
    if account_id is not None:
        where.append("h.account_id = ?")
        params.append(account_id)
    if card_id is not None:
        where.append("h.card_id = ?")
        params.append(card_id)
    if active:
        where.append("h.kind = 'hold' AND h.remaining > 0")
    rows = conn.execute(
        f"{_HOLD_SELECT} WHERE {' AND '.join(where)} ORDER BY h.id DESC LIMIT ?",
        (*params, limit),
    ).fetchall()
    return [_hold_view(r) for r in rows]


_JOURNAL_ENTRY = (
    "SELECT id, created_at, network, mti, kind, stan, rrn, terminal_id, masked_pan, card_id, "
    "account_id, amount, currency, reason, response_code, approval_code, stand_in, "
    "released_amount, delivery, delivery_reason, delivery_at FROM journal"
)
#: Marks the row of one answer undelivered (a row already marked keeps its first mark).
_MARK_DELIVERY = (
    "UPDATE journal SET delivery = ?, delivery_reason = ?, delivery_at = ? WHERE "  # noqa: S608
    + " AND ".join(f"{c} = ?" for c in _KEY_COLUMNS)
    + " AND digest = ? AND delivery IS NULL"
)


def _mark_delivery(conn: sqlite3.Connection, marks: Sequence[DeliveryMark]) -> int:
    marked = 0
    for m in marks:
        params = (UNDELIVERED, m.reason, m.at, *_key_params(m.ref.dup_key), m.ref.digest)
        marked += conn.execute(_MARK_DELIVERY, params).rowcount
    return marked


def _search_journal(conn: sqlite3.Connection, query: JournalQuery) -> list[JournalEntry]:
    where: list[str] = ["1 = 1"]
    params: list[object] = []
    for column, value in (("stan", query.stan), ("rrn", query.rrn), ("card_id", query.card_id)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if query.masked_pan:
        first6, last4 = masked_parts(query.masked_pan)
        if first6:
            where.append("substr(masked_pan, 1, ?) = ?")
            params += [str(len(first6)), first6]
        if last4:
            where.append("substr(masked_pan, -4) = ?")
            params.append(last4)
    if query.stand_in is not None:
        where.append("stand_in = ?")
        params.append(int(query.stand_in))
    if query.undelivered:
        where.append("delivery IS NOT NULL")
    if query.since is not None:
        where.append("created_at >= ?")
        params.append(query.since)
    if query.until is not None:
        where.append("created_at < ?")
        params.append(query.until)
    rows = conn.execute(
        f"{_JOURNAL_ENTRY} WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT ?",
        (*params, query.limit),
    ).fetchall()
    return [JournalEntry(**{**dict(row), "stand_in": bool(row["stand_in"])}) for row in rows]


def _card_changes(conn: sqlite3.Connection, card_id: str) -> list[CardChange]:
    rows = conn.execute(
        "SELECT card_id, masked_pan, actor, at, changed FROM card_changes WHERE card_id = ? "
        "ORDER BY id",
        (card_id,),
    ).fetchall()
    return [CardChange(r[0], r[1], r[2], r[3], json.loads(r[4])) for r in rows]


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
    """Bring the database to ``SCHEMA_VERSION`` by applying the missing migrations, each in
    its own ``BEGIN IMMEDIATE`` transaction (a second process opening the file at the same
    time waits, then finds it done); refuse a newer schema, or one from before the first
    migratable schema.

    Raises:
        StoreError: ``unavailable`` for a schema newer than this code or older than
            ``migrations.FIRST_VERSION``, or a cards table other than ``_CARD_TABLE``.
    """
    version = _check_version(conn.execute("PRAGMA user_version").fetchone()[0])
    for migration in migrations.migrations("sqlite"):
        if migration.version <= version:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Re-read under the write lock: another process may have migrated meanwhile.
            version = _check_version(conn.execute("PRAGMA user_version").fetchone()[0])
            if version < migration.version:
                for statement in migrations.split_statements(migration.sql):
                    conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {migration.version}")
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        version = max(version, migration.version)
    columns = tuple(row[1] for row in conn.execute("PRAGMA table_info(cards)"))
    if columns != _CARD_COLUMNS:  # pragma: no cover - a migration disagrees with _CARD_TABLE
        raise StoreError("unavailable", "the cards table differs from the code's columns")


def migrate_file(path: Path) -> tuple[int, int]:
    """Bring the database file at ``path`` (created if missing) to ``SCHEMA_VERSION``; the
    schema version before and after. Blocking: call it from a thread.

    Raises:
        StoreError: as ``_ensure_schema``, or the file cannot be opened.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = _connect(path, readonly=False)
    except (OSError, sqlite3.Error) as exc:
        raise StoreError("unavailable", f"cannot open the database: {exc}") from exc
    try:
        before = conn.execute("PRAGMA user_version").fetchone()[0]
        _ensure_schema(conn)
        return int(before), SCHEMA_VERSION
    except sqlite3.Error as exc:
        raise _as_store_error(exc) from exc
    finally:
        conn.close()


def file_version(path: Path) -> tuple[int, int]:
    """The schema version of the database file at ``path`` (0: missing or empty) and this
    code's. Blocking: call it from a thread."""
    if not path.exists():
        return 0, SCHEMA_VERSION
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return int(conn.execute("PRAGMA user_version").fetchone()[0]), SCHEMA_VERSION
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise StoreError("unavailable", f"cannot open the database: {exc}") from exc


def _check_version(version: int) -> int:
    """``version`` when this code can migrate it (0 is a new, empty file)."""
    if version > SCHEMA_VERSION:
        raise StoreError(
            "unavailable",
            f"database schema {version} is newer than this code (schema {SCHEMA_VERSION}); "
            "upgrade cardswitch",
        )
    if 0 < version < migrations.FIRST_VERSION:
        # Schema 1 (0.1 development builds) kept neither reasons, digests nor full original
        # keys, which cannot be recovered from its rows.
        raise StoreError(
            "unavailable",
            f"database schema {version} predates this release and cannot be migrated; "
            "recreate the development database (remove it and run cardswitch dev-setup)",
        )
    return version


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
    EXPIRED = enum.auto()


class _Pending:
    """One queued write and the caller waiting for it."""

    __slots__ = ("deadline", "done", "error", "op", "result", "state")

    def __init__(
        self, op: Callable[[sqlite3.Connection], Any], deadline: float | None = None
    ) -> None:
        self.op = op
        self.deadline = deadline
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
        return await self._read(lambda conn: _card_by_fingerprint(conn, fingerprint))

    async def get_card(self, card_id: str) -> Card | None:
        def q(conn: sqlite3.Connection) -> Card | None:
            found = conn.execute(f"{_CARD_SELECT} WHERE id = ?", (card_id,)).fetchone()
            return None if found is None else _card_from_row(found)

        return await self._read(q)

    async def get_account(self, account_id: str) -> Account | None:
        return await self._read(lambda conn: _account(conn, account_id))

    async def lookup_auth(self, key: DuplicateKey, digest: str, fingerprint: bytes) -> AuthLookup:
        def q(conn: sqlite3.Connection) -> AuthLookup:
            stored = _stored(conn, key, digest)
            if not isinstance(stored, bool):
                return AuthLookup(stored, None, None)
            card = _card_by_fingerprint(conn, fingerprint)
            return AuthLookup(None, card, None if card is None else _account(conn, card.account_id))

        return await self._read(q)

    async def find_outcome(self, key: DuplicateKey, digest: str) -> StoredOutcome | None:
        def q(conn: sqlite3.Connection) -> StoredOutcome | None:
            stored = _stored(conn, key, digest)
            return None if isinstance(stored, bool) else stored

        return await self._read(q)

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

    async def commit_auth(
        self, intent: AuthIntent, *, deadline: float | None = None
    ) -> AuthOutcome:
        result = await self._submit(partial(_apply_auth, intent=intent), deadline)
        return cast(AuthOutcome, result)

    async def commit_reversal(
        self, intent: ReversalIntent, *, deadline: float | None = None
    ) -> ReversalOutcome:
        result = await self._submit(partial(_apply_reversal, intent=intent), deadline)
        return cast(ReversalOutcome, result)

    async def put_account(self, account: Account) -> None:
        await self._submit(partial(_put_account, account=account))

    async def put_card(self, card: Card) -> None:
        await self._submit(partial(_put_card, card=card))

    async def set_card_status(self, card_id: str, status: CardStatus) -> bool:
        return cast(
            bool, await self._submit(partial(_set_card_status, card_id=card_id, status=status))
        )

    async def update_card(
        self, card_id: str, changes: Mapping[str, object], *, actor: str
    ) -> CardChange | None:
        op = partial(_update_card, card_id=card_id, changes=dict(changes), actor=actor)
        return cast(CardChange | None, await self._submit(op))

    async def card_changes(self, card_id: str) -> list[CardChange]:
        return await self._read_offloaded(partial(_card_changes, card_id=card_id))

    async def search_journal(self, query: JournalQuery) -> list[JournalEntry]:
        return await self._read_offloaded(partial(_search_journal, query=query))

    async def mark_delivery(
        self, marks: Sequence[DeliveryMark], *, deadline: float | None = None
    ) -> int:
        if not marks:
            return 0
        op = partial(_mark_delivery, marks=list(marks))
        return cast(int, await self._submit(op, deadline))

    async def expire_holds(self, now: str, limit: int = 100) -> list[HoldRelease]:
        return cast(
            list[HoldRelease], await self._submit(partial(_expire_holds, now=now, limit=limit))
        )

    async def release_hold(self, hold_id: int, *, actor: str) -> HoldRelease | None:
        op = partial(_release_hold, hold_id=hold_id, actor=actor)
        return cast(HoldRelease | None, await self._submit(op))

    async def list_holds(
        self,
        *,
        account_id: str | None = None,
        card_id: str | None = None,
        active: bool = True,
        limit: int = 100,
    ) -> list[HoldView]:
        op = partial(_list_holds, account_id=account_id, card_id=card_id, active=active,
                     limit=limit)  # fmt: skip
        return await self._read_offloaded(op)

    # -- the outbox (switch.relay and cardswitch events) ---------------------------------------

    async def pending_events(self, limit: int) -> list[ev.OutboxEvent]:
        return await self._read_offloaded(partial(_pending_events, limit=limit))

    async def events_since(self, since: str, limit: int = 10_000) -> list[ev.OutboxEvent]:
        return await self._read_offloaded(partial(_events_since, since=since, limit=limit))

    async def outbox_stats(self) -> ev.OutboxStats:
        return await self._read_offloaded(_outbox_stats)

    async def mark_published(self, ids: Sequence[int], at: str) -> None:
        if ids:
            await self._submit(partial(_mark_published, ids=list(ids), at=at))

    async def record_event_failures(
        self, failures: Sequence[ev.EventFailure], *, max_attempts: int, at: str
    ) -> int:
        if not failures:
            return 0
        op = partial(_record_event_failures, failures=list(failures),
                     max_attempts=max_attempts, at=at)  # fmt: skip
        return cast(int, await self._submit(op))

    async def purge_published(self, before: str) -> int:
        return cast(int, await self._submit(partial(_purge_published, before=before)))

    async def claim_lease(self, name: str, owner: str, now: float, ttl: float) -> bool:
        op = partial(_claim_lease, name=name, owner=owner, now=now, ttl=ttl)
        return cast(bool, await self._submit(op))

    async def release_lease(self, name: str, owner: str) -> None:
        await self._submit(partial(_release_lease, name=name, owner=owner))

    async def _submit(
        self, op: Callable[[sqlite3.Connection], Any], deadline: float | None = None
    ) -> Any:
        item = _Pending(op, deadline)
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
                live, busy_ms = self._take(batch)
                if not live:
                    continue
                try:
                    results = await trio.to_thread.run_sync(
                        self._apply_batch,
                        [item.op for item in live],
                        busy_ms,
                        limiter=self._write_limiter,
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

    @staticmethod
    def _take(batch: list[_Pending]) -> tuple[list[_Pending], int]:
        """The commits of ``batch`` to apply now, and the batch's busy timeout (ms).

        A commit withdrawn by its caller is skipped; one whose deadline has passed fails
        without being applied (its caller may not have noticed yet: a slow batch before it).
        """
        now = trio.current_time()
        live: list[_Pending] = []
        for item in batch:
            if item.state is not _State.QUEUED:
                continue
            if item.deadline is not None and item.deadline <= now:
                item.state = _State.EXPIRED
                item.error = StoreError(
                    "unavailable", "the deadline passed before the commit started"
                )
                item.done.set()
                continue
            item.state = _State.TAKEN
            live.append(item)
        deadlines = [item.deadline for item in live if item.deadline is not None]
        busy_ms = BUSY_TIMEOUT_MS
        if deadlines:
            busy_ms = max(1, min(busy_ms, int((min(deadlines) - now) * 1000)))
        return live, busy_ms

    def _fail_queued(self) -> None:
        while True:
            try:
                item = self._recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            item.error = StoreError("closed", "the store closed before this write")
            item.done.set()

    def _apply_batch(
        self, ops: Sequence[Callable[[sqlite3.Connection], Any]], busy_ms: int = BUSY_TIMEOUT_MS
    ) -> list[tuple[Any, StoreError | None]]:
        """Worker thread: apply ``ops`` in one transaction, each in its own savepoint, waiting
        at most ``busy_ms`` for a lock another connection holds."""
        conn = self._writer
        started = time.perf_counter()
        results: list[tuple[Any, StoreError | None]] = []
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(busy_ms)}")
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
