"""The shared store: PostgreSQL through psycopg 3 and a connection pool, for several switch
processes on one database.

What lives here: ``PostgresStore`` (the ``Store`` Protocol of ``api.py``), the SQL of every
operation, the locks each decision takes, ``open_postgres_store``, ``migrate`` (the
``postgres/*.sql`` migrations under an advisory lock) and ``schema_version``.

What does not: the commit rules (``rules.py``: this module builds the same snapshots as
``sqlite.py`` under row locks and applies the plans ``plan_auth``/``plan_reversal`` return),
the mapping of the cards table (``sqlite._CARD_TABLE``, shared), configuration
(``StoreConfig``).

Concurrency (chosen by measurement, ``python -m benchmarks.pg_store``): every operation runs
synchronous psycopg in a ``trio.to_thread`` worker over a pool of ``pool_size`` connections,
one transaction per decision, autocommit for reads. PostgreSQL flushes the WAL of commits
that arrive together in one fsync, so concurrent decisions group-commit in the server
without a batching writer here, and a slow decision never holds others' locks.

Nothing assumes the process is alone: duplicates, unmatched reversals, PIN tries, the chip
counter, velocity counters and funds are read and written only inside the decision's
transaction. Each decision first takes transaction-scoped advisory locks on its own key and
on the key of the original it names (network, acquirer, DE7, STAN, MTI class), in one order,
so that an original and its reversal (or advice, or completion) arriving at two instances
at once are serialised: without it neither would see the other's uncommitted row, and the
reversal would be recorded as unmatched while the original is approved. Then rows are
locked in the order of ``api.py``: the unmatched reversal naming the request, the original's
hold, the card, the account (``SELECT ... FOR UPDATE``). A deadlock, a serialization failure
or a duplicate key that slipped past the lock is retried; a connection found broken before
the commit was sent is retried on another one.

Time bounds: ``statement_timeout`` and ``lock_timeout`` are set on every connection; a
whole operation (retries included) is also cut client-side after ``statement_timeout`` by
shutting its socket down, so a database that stops answering yields
``StoreError("unavailable")`` within the budget, never a hang. A cut or failed COMMIT leaves
the outcome unknown to this process; the network's repeat (same key) gets whatever was
committed. Cancellation follows ``api.py``: an operation still waiting for a connection
slot is withdrawn; once its thread has started it is waited for.

Durability: ``synchronous_commit=on``. Secrets: the password comes from
``CARDSWITCH_PG_PASSWORD``, ``StoreConfig.password_file`` or libpq's own environment; the
DSN never carries it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import heapq
import itertools
import json
import math
import os
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import psycopg
import trio
from psycopg import errors as pg_errors
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool, PoolTimeout

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
from switch.store.sqlite import (
    _CARD_COLUMNS,
    _CARD_TABLE,
    _MARK_DELIVERY,
    _NOT_ORIGINALS,
    _OUTCOME_SELECT,
    DUPLICATE_KIND,
    REVERSAL_KIND,
    _card_from_row,
    _card_params,
    _journal_values,
    _key_params,
    _now,
    _outcome_from_row,
)

T = TypeVar("T")
Conn = psycopg.Connection[dict[str, Any]]

#: Schema version this code expects (that of the last ``postgres/*.sql`` migration).
SCHEMA_VERSION = migrations.latest("postgres")
#: Environment variable that may hold the password (libpq's PGPASSWORD works too).
PASSWORD_ENV = "CARDSWITCH_PG_PASSWORD"  # noqa: S105 - a variable name
#: Advisory lock (transaction scope) that serialises ``migrate`` across instances.
MIGRATION_LOCK = 0x6361_7264_6D69_6772  # "cardmigr"
#: Attempts of one operation (deadlocks, serialization failures, broken pooled connections).
ATTEMPTS = 4
#: Constraints whose violation by a decision means another instance won a race: retry, and
#: the retry replays or journals the duplicate.
_RACE_CONSTRAINTS = frozenset({"journal_key", "journal_duplicate"})

_CARD_SELECT = f"SELECT {', '.join(_CARD_COLUMNS)} FROM cards"  # noqa: S608 - constant columns
_CARD_UPSERT = (
    f"INSERT INTO cards ({', '.join(_CARD_COLUMNS)}) "  # noqa: S608 - constant columns
    f"VALUES ({', '.join('%s' for _ in _CARD_COLUMNS)}) "
    "ON CONFLICT (id) DO UPDATE SET "
    + ", ".join(f"{c.name} = excluded.{c.name}" for c in _CARD_TABLE[1:] if not c.counter)
)
_STORED_SELECT = _OUTCOME_SELECT.replace("?", "%s")


# -- connection parameters --------------------------------------------------------------------


def password(cfg: StoreConfig) -> str | None:
    """The password from ``CARDSWITCH_PG_PASSWORD`` or ``password_file``; ``None`` leaves it
    to libpq (PGPASSWORD, PGPASSFILE, peer or certificate authentication).

    Raises:
        StoreError: ``unavailable`` when ``password_file`` cannot be read.
    """
    from_env = os.environ.get(PASSWORD_ENV)
    if from_env:
        return from_env
    if cfg.password_file:
        try:
            lines = Path(cfg.password_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise StoreError(
                "unavailable", f"cannot read store.password_file: {exc.strerror}"
            ) from None
        return lines[0] if lines else ""
    return None


def connection_kwargs(cfg: StoreConfig) -> dict[str, Any]:
    """libpq parameters of every connection, over those of ``cfg.dsn``."""
    statement_ms = max(1, round(cfg.statement_timeout * 1000))
    lock_ms = max(1, round(cfg.lock_timeout * 1000))
    options = (
        f"-c statement_timeout={statement_ms} -c lock_timeout={lock_ms} "
        f"-c idle_in_transaction_session_timeout={statement_ms * 10} -c synchronous_commit=on"
    )
    kwargs: dict[str, Any] = {
        "autocommit": True,
        "row_factory": dict_row,
        "connect_timeout": max(2, math.ceil(cfg.connect_timeout)),
        "options": options,
        "application_name": "cardswitch",
        # TCP only (ignored on a Unix socket): notice a vanished peer.
        "keepalives": 1,
        "keepalives_idle": 5,
        "keepalives_interval": 2,
        "keepalives_count": 3,
        "tcp_user_timeout": statement_ms + 1000,
    }
    secret = password(cfg)
    if secret is not None:
        kwargs["password"] = secret
    return kwargs


def _describe(exc: BaseException) -> str:
    """One line about a database error, without row values (only the primary message)."""
    if isinstance(exc, psycopg.Error):
        primary = exc.diag.message_primary if exc.diag else None
        text = primary or str(exc).splitlines()[0] if str(exc) else ""
        return f"{type(exc).__name__}: {text}".rstrip(": ")
    return type(exc).__name__


def _as_store_error(exc: BaseException) -> StoreError:
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, psycopg.IntegrityError):
        return StoreError("integrity", _describe(exc))
    if isinstance(exc, pg_errors.QueryCanceled):
        return StoreError("unavailable", f"statement timeout: {_describe(exc)}")
    if isinstance(exc, pg_errors.LockNotAvailable):
        return StoreError("unavailable", f"lock timeout: {_describe(exc)}")
    if isinstance(exc, PoolTimeout):
        return StoreError("unavailable", "no database connection available in time")
    return StoreError("unavailable", _describe(exc))


# -- the client-side deadline -----------------------------------------------------------------


class _Watchdog:
    """Cuts the socket of connections whose operation outlived its deadline.

    A blocked libpq read returns at once when its socket is shut down, so a database that
    stopped answering (frozen, partitioned) fails the operation instead of hanging its thread.
    One daemon thread serves every connection of the store.
    """

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._heap: list[tuple[float, int]] = []
        self._active: dict[int, Conn] = {}
        self._tokens = itertools.count()
        self._stopped = False
        self.cuts = 0
        self._thread = threading.Thread(target=self._run, name="pg-watchdog", daemon=True)
        self._thread.start()

    def arm(self, conn: Conn, deadline: float) -> int:
        with self._lock:
            token = next(self._tokens)
            self._active[token] = conn
            heapq.heappush(self._heap, (deadline, token))
            self._lock.notify()
            return token

    def disarm(self, token: int) -> None:
        with self._lock:
            self._active.pop(token, None)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
            self._lock.notify()
        self._thread.join(timeout=1)

    def _run(self) -> None:
        with self._lock:
            while not self._stopped:
                now = time.monotonic()
                while self._heap and (
                    self._heap[0][0] <= now or self._heap[0][1] not in self._active
                ):
                    _deadline, token = heapq.heappop(self._heap)
                    conn = self._active.pop(token, None)
                    if conn is not None:
                        self.cuts += 1
                        _shutdown(conn)
                timeout = self._heap[0][0] - now if self._heap else None
                self._lock.wait(timeout)


def _shutdown(conn: Conn) -> None:
    with contextlib.suppress(OSError, psycopg.Error):
        fd = os.dup(conn.fileno())
        with socket.socket(fileno=fd) as sock:
            sock.shutdown(socket.SHUT_RDWR)


# -- locks and snapshots (inside the decision's transaction) ----------------------------------


def _lock_id(parts: Iterable[str]) -> int:
    """A stable 64-bit advisory lock id for a key (the same in every process)."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def _own_lock(key: DuplicateKey) -> int:
    return _lock_id((key.network, key.acquirer_id, key.transmission_time, key.stan,
                     key.mti_class))  # fmt: skip


def _named_lock(key: OriginalKey) -> int:
    return _lock_id((key.network, key.acquirer_id, key.transmission_time, key.stan,
                     key.mti_class))  # fmt: skip


def _lock_keys(conn: Conn, ids: Iterable[int]) -> None:
    """Take the transaction's advisory locks in ascending order (no deadlock between them)."""
    for lock in sorted(set(ids)):
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock,))


def _card_by_fingerprint(conn: Conn, fingerprint: bytes) -> Card | None:
    found = conn.execute(f"{_CARD_SELECT} WHERE pan_fingerprint = %s", (fingerprint,)).fetchone()
    return None if found is None else _card_from_row(cast(Any, found))


def _account(conn: Conn, account_id: str) -> Account | None:
    found = conn.execute(
        "SELECT id, currency, ledger_balance, available_balance FROM accounts WHERE id = %s",
        (account_id,),
    ).fetchone()
    return None if found is None else Account(**found)


def _stored(conn: Conn, key: DuplicateKey, digest: str) -> StoredOutcome | bool:
    """As ``sqlite._stored``: the stored outcome, ``True`` for a key taken by other content,
    ``False`` when new."""
    rows = conn.execute(_STORED_SELECT, _key_params(key)).fetchall()
    for row in rows:
        if row["digest"] == digest:
            return _outcome_from_row(cast(Any, row))
    return bool(rows)


def _original(conn: Conn, key: OriginalKey) -> OriginalRow | None:
    """The original ``key`` names, its money row locked ``FOR UPDATE``; ``None`` if unknown."""
    sql = (
        "SELECT id, card_id, account_id, currency FROM journal WHERE network = %s "
        "AND acquirer_id = %s AND transmission_time = %s AND stan = %s AND mti_class = %s"
    )
    params: list[str] = [key.network, key.acquirer_id, key.transmission_time, key.stan,
                         key.mti_class]  # fmt: skip
    for column, value in (("rrn", key.rrn), ("terminal_id", key.terminal_id)):
        if value is not None:
            sql += f" AND {column} = %s"
            params.append(value)
    sql += " AND kind <> ALL(%s) ORDER BY id LIMIT 1"
    params_any: list[Any] = [*params, list(_NOT_ORIGINALS)]
    row = conn.execute(sql, params_any).fetchone()
    if row is None:
        return None
    found = conn.execute(
        "SELECT id, journal_id, account_id, card_id, kind, remaining, velocity_day, "
        "velocity_month, completed_by FROM holds WHERE journal_id = %s FOR UPDATE",
        (row["id"],),
    ).fetchone()
    hold = None
    if found is not None:
        hold = HoldRow(
            found["id"], found["journal_id"], found["account_id"], found["card_id"],
            found["kind"], found["remaining"], found["velocity_day"], found["velocity_month"],
            found["completed_by"],
        )  # fmt: skip
    return OriginalRow(row["id"], row["card_id"], row["account_id"], row["currency"], hold)


def _unmatched_reversal(
    conn: Conn, key: DuplicateKey, card_id: str | None, currency: str
) -> int | None:
    """The unresolved unmatched reversal naming this request, locked ``FOR UPDATE``."""
    row = conn.execute(
        "SELECT u.journal_id FROM unmatched_reversals u JOIN journal r ON r.id = u.journal_id "
        "WHERE u.resolved_journal_id IS NULL AND r.orig_network = %s AND r.orig_acquirer_id = %s "
        "AND r.orig_transmission_time = %s AND r.orig_stan = %s AND r.orig_mti_class = %s "
        "AND (r.orig_rrn IS NULL OR r.orig_rrn = %s) "
        "AND (r.orig_terminal_id IS NULL OR r.orig_terminal_id = %s) "
        "AND (r.card_id IS NULL OR r.card_id = %s) AND (r.currency = '' OR r.currency = %s) "
        "ORDER BY u.journal_id LIMIT 1 FOR UPDATE OF u",
        (key.network, key.acquirer_id, key.transmission_time, key.stan, key.mti_class,
         key.rrn, key.terminal_id, card_id, currency),
    ).fetchone()  # fmt: skip
    return None if row is None else int(row["journal_id"])


def _auth_snapshot(
    conn: Conn, intent: AuthIntent, conflict: bool
) -> tuple[AuthSnapshot, int | None]:
    """The rows ``plan_auth`` needs, locked in the order of ``api.py``: the unmatched
    reversal, the original's hold, the card, the account."""
    if conflict:
        return AuthSnapshot(None, None, conflict=True), None
    unmatched = _unmatched_reversal(conn, intent.dup_key, intent.card_id, intent.currency)
    if unmatched is None and intent.original is not None:
        # an advice whose original was reversed before either arrived
        named = intent.original.as_key(intent.dup_key)
        unmatched = _unmatched_reversal(conn, named, intent.card_id, intent.currency)
    original = None if intent.original is None else _original(conn, intent.original)
    card = None
    day = month = Counters()
    if intent.card_id is not None:
        row = conn.execute(
            "SELECT id, pin_tries, pin_try_limit, last_atc, atc_seen FROM cards WHERE id = %s "
            "FOR UPDATE",
            (intent.card_id,),
        ).fetchone()
        if row is not None:
            card = CardRow(
                row["id"], row["pin_tries"], row["pin_try_limit"], row["last_atc"],
                row["atc_seen"],
            )  # fmt: skip
            if intent.velocity is not None and intent.velocity.has_velocity:
                day_key, month_key = "D" + intent.velocity_day, "M" + intent.velocity_month
                found = {
                    r["period"]: Counters(r["amount"], r["count"])
                    for r in conn.execute(
                        "SELECT period, amount, count FROM velocity "
                        "WHERE card_id = %s AND period = ANY(%s)",
                        (card.id, [day_key, month_key]),
                    )
                }
                day = found.get(day_key, Counters())
                month = found.get(month_key, Counters())
    account = None
    if intent.account_id is not None:
        row = conn.execute(
            "SELECT id, currency, ledger_balance, available_balance FROM accounts "
            "WHERE id = %s FOR UPDATE",
            (intent.account_id,),
        ).fetchone()
        if row is not None:
            account = AccountRow(
                row["id"], row["currency"], row["ledger_balance"], row["available_balance"]
            )
    stand_in_day = Counters()
    if card is not None and intent.stand_in_daily is not None:
        row = conn.execute(
            "SELECT amount, count FROM velocity WHERE card_id = %s AND period = %s",
            (card.id, STAND_IN_PERIOD + intent.velocity_day),
        ).fetchone()
        if row is not None:
            stand_in_day = Counters(row["amount"], row["count"])
    snap = AuthSnapshot(
        account, card, day, month, reversed_before=unmatched is not None, original=original,
        stand_in_day=stand_in_day,
    )  # fmt: skip
    return snap, unmatched


# -- the write operations (one transaction each) ----------------------------------------------


def _insert_journal(conn: Conn, values: dict[str, Any]) -> int:
    cols = ", ".join(values)
    marks = ", ".join("%s" for _ in values)
    row = conn.execute(
        f"INSERT INTO journal ({cols}) VALUES ({marks}) RETURNING id",  # noqa: S608 - our keys
        tuple(values.values()),
    ).fetchone()
    assert row is not None
    return int(row["id"])


def _bump_counters(
    conn: Conn, card_id: str, *, day: str, month: str, amount: int, count: int
) -> None:
    """Add ``amount`` and ``count`` (negative on a reversal) to the day and month counters."""
    for period in ("D" + day, "M" + month):
        if len(period) == 1:
            continue
        conn.execute(
            "INSERT INTO velocity (card_id, period, amount, count) VALUES (%s, %s, %s, %s) "
            "ON CONFLICT (card_id, period) DO UPDATE SET "
            "amount = greatest(0, velocity.amount + excluded.amount), "
            "count = greatest(0, velocity.count + excluded.count)",
            (card_id, period, amount, count),
        )


def _apply_auth(conn: Conn, intent: AuthIntent) -> AuthOutcome:
    locks = [_own_lock(intent.dup_key)]
    if intent.original is not None:
        locks.append(_named_lock(intent.original))
    _lock_keys(conn, locks)
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
            "UPDATE cards SET pin_tries = %s WHERE id = %s", (plan.pin_tries, intent.card_id)
        )
    if plan.atc is not None:
        conn.execute(
            "UPDATE cards SET last_atc = %s, atc_seen = %s WHERE id = %s",
            (*plan.atc, intent.card_id),
        )
    moved = plan.hold + plan.debit
    original = snap.original
    if plan.approved and intent.account_id is not None:
        conn.execute(
            "UPDATE accounts SET available_balance = available_balance - %s + %s, "
            "ledger_balance = ledger_balance - %s WHERE id = %s",
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
            "INSERT INTO velocity (card_id, period, amount, count) VALUES (%s, %s, %s, 1) "
            "ON CONFLICT (card_id, period) DO UPDATE SET "
            "amount = velocity.amount + excluded.amount, count = velocity.count + 1",
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
            "UPDATE holds SET remaining = %s, completed_by = %s WHERE id = %s",
            (plan.original_remaining, journal_id, original.hold.id),
        )
    hold_id = None
    if plan.money_row and intent.account_id is not None:
        row = conn.execute(
            "INSERT INTO holds (journal_id, account_id, card_id, kind, amount, remaining, "
            "velocity_day, velocity_month, created_at, expires_at) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
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
        ).fetchone()
        assert row is not None
        hold_id = int(row["id"])
    if plan.resolve_unmatched:
        conn.execute(
            "UPDATE unmatched_reversals SET resolved_journal_id = %s WHERE journal_id = %s",
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


def _apply_reversal(conn: Conn, intent: ReversalIntent) -> ReversalOutcome:
    _lock_keys(conn, (_own_lock(intent.dup_key), _named_lock(intent.original_key)))
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
    available: int | None = None
    if plan.hold_remaining is not None and hold is not None:
        conn.execute(
            "UPDATE holds SET remaining = %s WHERE id = %s", (plan.hold_remaining, hold.id)
        )
        row = conn.execute(
            "UPDATE accounts SET available_balance = available_balance + %s, "
            "ledger_balance = ledger_balance + %s WHERE id = %s RETURNING available_balance",
            (plan.release, plan.ledger_credit, hold.account_id),
        ).fetchone()
        available = None if row is None else row["available_balance"]
        if hold.card_id is not None:
            _bump_counters(
                conn,
                hold.card_id,
                day=hold.velocity_day,
                month=hold.velocity_month,
                amount=-plan.release,
                count=plan.count_delta,
            )
    elif plan.account_id is not None:
        row = conn.execute(
            "SELECT available_balance FROM accounts WHERE id = %s", (plan.account_id,)
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
        conn.execute("INSERT INTO unmatched_reversals (journal_id) VALUES (%s)", (journal_id,))
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


# -- the outbox (written in the decision's transaction; read and marked by the relay) -------


def _insert_event(conn: Conn, event: ev.NewEvent) -> None:
    conn.execute(
        "INSERT INTO events (event_id, type, group_key, journal_id, created_at, payload) "
        "VALUES (%s, %s, %s, %s, %s, %s)",
        (event.event_id, event.type, event.group_key, event.journal_id, event.created_at,
         event.payload),
    )  # fmt: skip


_EVENT_SELECT = (
    "SELECT id, event_id, type, group_key, journal_id, created_at, payload, published_at, "
    "attempts, parked_at, last_error FROM events"
)


def _events(conn: Conn, where: str, params: tuple[Any, ...]) -> list[ev.OutboxEvent]:
    rows = conn.execute(f"{_EVENT_SELECT} WHERE {where}", params).fetchall()
    return [ev.OutboxEvent(**cast(Any, r)) for r in rows]


def _outbox_stats(conn: Conn) -> ev.OutboxStats:
    row = conn.execute(
        "SELECT count(*) AS pending, min(created_at) AS oldest, "
        "(SELECT count(*) FROM events WHERE parked_at IS NOT NULL) AS parked "
        "FROM events WHERE published_at IS NULL AND parked_at IS NULL"
    ).fetchone()
    assert row is not None
    return ev.OutboxStats(int(row["pending"]), row["oldest"], int(row["parked"]))


def _record_event_failures(
    conn: Conn, failures: Sequence[ev.EventFailure], max_attempts: int, at: str
) -> int:
    parked = 0
    for f in failures:
        row = conn.execute(
            "UPDATE events SET attempts = attempts + 1, last_error = %s, "
            "parked_at = CASE WHEN %s OR attempts + 1 >= %s THEN %s END "
            "WHERE id = %s RETURNING parked_at",
            (f.error[:500], f.poison, max_attempts, at, f.id),
        ).fetchone()
        parked += row is not None and row["parked_at"] is not None
    return parked


def _claim_lease(conn: Conn, name: str, owner: str, now: float, ttl: float) -> bool:
    """Take or renew the lease: SKIP LOCKED passes over a row another instance is renewing
    (the claim fails this time instead of waiting behind it)."""
    row = conn.execute(
        "SELECT owner, expires_at FROM leases WHERE name = %s FOR UPDATE SKIP LOCKED", (name,)
    ).fetchone()
    if row is None:
        inserted = conn.execute(
            "INSERT INTO leases (name, owner, expires_at) VALUES (%s, %s, %s) "
            "ON CONFLICT (name) DO NOTHING RETURNING owner",
            (name, owner, now + ttl),
        ).fetchone()
        return inserted is not None
    if row["owner"] != owner and row["expires_at"] > now:
        return False
    conn.execute(
        "UPDATE leases SET owner = %s, expires_at = %s WHERE name = %s", (owner, now + ttl, name)
    )
    return True


def _put_account(conn: Conn, account: Account) -> None:
    conn.execute(
        "INSERT INTO accounts (id, currency, ledger_balance, available_balance) "
        "VALUES (%s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET currency = excluded.currency, "
        "ledger_balance = excluded.ledger_balance, "
        "available_balance = excluded.available_balance",
        (account.id, account.currency, account.ledger_balance, account.available_balance),
    )


def _put_card(conn: Conn, card: Card) -> None:
    conn.execute(_CARD_UPSERT, _card_params(card))


def _set_card_status(conn: Conn, card_id: str, status: CardStatus) -> bool:
    cur = conn.execute("UPDATE cards SET status = %s WHERE id = %s", (status.value, card_id))
    return cur.rowcount == 1


def _update_card(
    conn: Conn, card_id: str, changes: Mapping[str, object], actor: str
) -> CardChange | None:
    row = conn.execute(f"{_CARD_SELECT} WHERE id = %s FOR UPDATE", (card_id,)).fetchone()
    if row is None:
        return None
    old = _card_from_row(cast(Any, row))
    new = apply_card_changes(old, changes)
    params = dict(zip(_CARD_COLUMNS, _card_params(new), strict=True))
    names = [c.name for c in _CARD_TABLE if c.name != "id" and c.name in changes]
    if names:
        conn.execute(
            f"UPDATE cards SET {', '.join(f'{n} = %s' for n in names)} WHERE id = %s",  # noqa: S608
            (*(params[n] for n in names), card_id),
        )
    change = CardChange(card_id, old.masked_pan, actor, _now(), card_diff(old, new))
    conn.execute(
        "INSERT INTO card_changes (card_id, masked_pan, actor, at, changed) "
        "VALUES (%s, %s, %s, %s, %s)",
        (card_id, change.masked_pan, actor, change.at, json.dumps(change.changed, sort_keys=True)),
    )
    # The account's row lock (after the card's, the api.py order) keeps the account's events
    # in commit order in the outbox, as every decision of the account holds it too.
    conn.execute("SELECT id FROM accounts WHERE id = %s FOR UPDATE", (old.account_id,))
    _insert_event(conn, ev.card_change_event(change, account_id=old.account_id,
                                             event_id=ev.new_event_id()))  # fmt: skip
    return change


_HOLD_SELECT = (
    "SELECT h.id, h.journal_id, h.account_id, h.card_id, j.masked_pan, h.kind, h.amount, "
    "h.remaining, h.created_at, h.expires_at, h.released_at, h.released_by, "
    "h.velocity_day, h.velocity_month, h.completed_by, j.currency "
    "FROM holds h JOIN journal j ON j.id = h.journal_id"
)
_HOLD_VIEW_FIELDS = tuple(f.name for f in dataclasses.fields(HoldView))


def _release(conn: Conn, row: dict[str, Any], by: str, at: str) -> HoldRelease | None:
    """Give back what remains of the locked hold ``row`` (a _HOLD_SELECT row), as
    ``rules.plan_hold_release`` says; None if nothing."""
    hold = HoldRow(
        row["id"], row["journal_id"], row["account_id"], row["card_id"], row["kind"],
        row["remaining"], row["velocity_day"], row["velocity_month"], row["completed_by"],
    )  # fmt: skip
    plan = plan_hold_release(hold)
    if plan is None:
        return None
    amount, count_delta = plan
    conn.execute(
        "UPDATE holds SET remaining = 0, released_at = %s, released_by = %s WHERE id = %s",
        (at, by, hold.id),
    )
    conn.execute(
        "UPDATE accounts SET available_balance = available_balance + %s WHERE id = %s",
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


def _expire_holds(conn: Conn, now: str, limit: int) -> list[HoldRelease]:
    # SKIP LOCKED: instances sweeping at once take different holds; accounts are then locked
    # in id order, so two sweepers cannot deadlock on them.
    rows = conn.execute(
        f"{_HOLD_SELECT} WHERE h.kind = 'hold' AND h.remaining > 0 "
        "AND h.expires_at IS NOT NULL AND h.expires_at <= %s ORDER BY h.expires_at LIMIT %s "
        "FOR UPDATE OF h SKIP LOCKED",
        (now, limit),
    ).fetchall()
    rows.sort(key=lambda r: (r["account_id"], r["id"]))
    released = (_release(conn, row, "expiry", now) for row in rows)
    return [r for r in released if r is not None]


def _release_hold(conn: Conn, hold_id: int, actor: str) -> HoldRelease | None:
    row = conn.execute(f"{_HOLD_SELECT} WHERE h.id = %s FOR UPDATE OF h", (hold_id,)).fetchone()
    return None if row is None else _release(conn, row, actor, _now())


def _list_holds(
    conn: Conn, account_id: str | None, card_id: str | None, active: bool, limit: int
) -> list[HoldView]:
    where, params = ["TRUE"], []
    if account_id is not None:
        where.append("h.account_id = %s")
        params.append(account_id)
    if card_id is not None:
        where.append("h.card_id = %s")
        params.append(card_id)
    if active:
        where.append("h.kind = 'hold' AND h.remaining > 0")
    rows = conn.execute(
        f"{_HOLD_SELECT} WHERE {' AND '.join(where)} ORDER BY h.id DESC LIMIT %s",
        (*params, limit),
    ).fetchall()
    return [HoldView(**{name: r[name] for name in _HOLD_VIEW_FIELDS}) for r in rows]


_JOURNAL_ENTRY = (
    "SELECT id, created_at, network, mti, kind, stan, rrn, terminal_id, masked_pan, card_id, "
    "account_id, amount, currency, reason, response_code, approval_code, stand_in, "
    "released_amount, delivery, delivery_reason, delivery_at FROM journal"
)
_MARK_DELIVERY_PG = _MARK_DELIVERY.replace("?", "%s")


def _mark_delivery(conn: Conn, marks: Sequence[DeliveryMark]) -> int:
    marked = 0
    for m in marks:
        params = (UNDELIVERED, m.reason, m.at, *_key_params(m.ref.dup_key), m.ref.digest)
        marked += conn.execute(_MARK_DELIVERY_PG, params).rowcount
    return marked


def _search_journal(conn: Conn, query: JournalQuery) -> list[JournalEntry]:
    where: list[str] = ["TRUE"]
    params: list[object] = []
    for column, value in (("stan", query.stan), ("rrn", query.rrn), ("card_id", query.card_id)):
        if value is not None:
            where.append(f"{column} = %s")
            params.append(value)
    if query.masked_pan:
        first6, last4 = masked_parts(query.masked_pan)
        if first6:
            where.append("left(masked_pan, %s) = %s")
            params += [len(first6), first6]
        if last4:
            where.append("right(masked_pan, 4) = %s")
            params.append(last4)
    if query.stand_in is not None:
        where.append("stand_in = %s")
        params.append(int(query.stand_in))
    if query.undelivered:
        where.append("delivery IS NOT NULL")
    if query.since is not None:
        where.append("created_at >= %s")
        params.append(query.since)
    if query.until is not None:
        where.append("created_at < %s")
        params.append(query.until)
    rows = conn.execute(
        f"{_JOURNAL_ENTRY} WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT %s",
        (*params, query.limit),
    ).fetchall()
    return [JournalEntry(**{**r, "stand_in": bool(r["stand_in"])}) for r in rows]


def _card_changes(conn: Conn, card_id: str) -> list[CardChange]:
    rows = conn.execute(
        "SELECT card_id, masked_pan, actor, at, changed FROM card_changes WHERE card_id = %s "
        "ORDER BY id",
        (card_id,),
    ).fetchall()
    return [
        CardChange(r["card_id"], r["masked_pan"], r["actor"], r["at"], json.loads(r["changed"]))
        for r in rows
    ]


# -- the store --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PoolStats:
    """Counters of the store since it was opened."""

    operations: int
    retries: int
    #: Operations whose socket the client-side deadline cut.
    cuts: int


class PostgresStore:
    """The ``Store`` Protocol on a PostgreSQL database; create it with ``open_postgres_store``."""

    def __init__(self, pool: ConnectionPool[Conn], cfg: StoreConfig) -> None:
        self._pool = pool
        self._timeout = cfg.statement_timeout
        # One slot per pooled connection: an operation that has a slot gets a connection at
        # once, and one that waits for a slot can still be withdrawn.
        self._limiter = trio.CapacityLimiter(cfg.pool_size)
        self._watchdog = _Watchdog()
        self._closed = False
        self._operations = 0
        self._retries = 0

    def __repr__(self) -> str:
        return f"<PostgresStore operations={self._operations} closed={self._closed}>"

    @property
    def stats(self) -> PoolStats:
        return PoolStats(self._operations, self._retries, self._watchdog.cuts)

    async def _run(
        self, fn: Callable[[Conn], T], *, write: bool, deadline: float | None = None
    ) -> T:
        """Run ``fn`` in a worker thread; ``deadline`` (trio time) bounds it further than the
        configured ``statement_timeout``: an operation whose deadline has passed is not
        started, and one running is cut (client-side) when it comes."""
        if self._closed:
            raise StoreError("closed", "the store is closed")
        limit = self._timeout
        if deadline is not None:
            limit = min(limit, deadline - trio.current_time())
            if limit <= 0:
                raise StoreError("unavailable", "the decision's deadline passed before commit")
        # Waiting for the limiter is cancellable (nothing started: withdrawn); the thread,
        # once started, is waited for (abandon_on_cancel=False).
        return await trio.to_thread.run_sync(
            self._attempts, fn, write, limit, limiter=self._limiter
        )

    def _attempts(self, fn: Callable[[Conn], T], write: bool, limit: float) -> T:
        """Worker thread: run ``fn`` (in a transaction when ``write``), retrying what is safe
        to retry, within ``limit`` seconds."""
        deadline = time.monotonic() + limit
        started = time.perf_counter()
        last: BaseException | None = None
        for _attempt in range(ATTEMPTS):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self._closed:
                break
            sent_commit = False
            try:
                with self._pool.connection(timeout=remaining) as conn:
                    token = self._watchdog.arm(conn, deadline)
                    try:
                        if write:
                            with conn.transaction():
                                result = fn(conn)
                                sent_commit = True
                        else:
                            result = fn(conn)
                    finally:
                        self._watchdog.disarm(token)
            except StoreError:
                raise
            except (pg_errors.QueryCanceled, pg_errors.LockNotAvailable, PoolTimeout) as exc:
                raise _as_store_error(exc) from exc
            except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure) as exc:
                last = exc
            except pg_errors.UniqueViolation as exc:
                constraint = exc.diag.constraint_name if exc.diag else None
                if not write or constraint not in _RACE_CONSTRAINTS:
                    raise _as_store_error(exc) from exc
                last = exc
            except psycopg.OperationalError as exc:
                # A connection that broke before COMMIT was sent committed nothing: try another
                # one. After it, the outcome is unknown: report it.
                if sent_commit or not _broken(exc):
                    raise _as_store_error(exc) from exc
                last = exc
            except psycopg.Error as exc:
                raise _as_store_error(exc) from exc
            else:
                self._operations += 1
                if write:
                    metrics.STORE_COMMIT_SECONDS.observe(time.perf_counter() - started)
                return result
            self._retries += 1
        if self._closed:
            raise StoreError("closed", "the store is closed")
        if last is None:
            raise StoreError("unavailable", "the database did not answer in time")
        raise StoreError("unavailable", f"gave up after retries: {_describe(last)}") from last

    # -- reads ---------------------------------------------------------------------------------

    async def get_card_by_fingerprint(self, fingerprint: bytes) -> Card | None:
        return await self._run(lambda conn: _card_by_fingerprint(conn, fingerprint), write=False)

    async def get_card(self, card_id: str) -> Card | None:
        def q(conn: Conn) -> Card | None:
            found = conn.execute(f"{_CARD_SELECT} WHERE id = %s", (card_id,)).fetchone()
            return None if found is None else _card_from_row(cast(Any, found))

        return await self._run(q, write=False)

    async def get_account(self, account_id: str) -> Account | None:
        return await self._run(lambda conn: _account(conn, account_id), write=False)

    async def lookup_auth(self, key: DuplicateKey, digest: str, fingerprint: bytes) -> AuthLookup:
        def q(conn: Conn) -> AuthLookup:
            stored = _stored(conn, key, digest)
            if not isinstance(stored, bool):
                return AuthLookup(stored, None, None)
            card = _card_by_fingerprint(conn, fingerprint)
            return AuthLookup(None, card, None if card is None else _account(conn, card.account_id))

        return await self._run(q, write=False)

    async def find_outcome(self, key: DuplicateKey, digest: str) -> StoredOutcome | None:
        def q(conn: Conn) -> StoredOutcome | None:
            stored = _stored(conn, key, digest)
            return None if isinstance(stored, bool) else stored

        return await self._run(q, write=False)

    async def list_cards(self) -> list[Card]:
        def q(conn: Conn) -> list[Card]:
            rows = conn.execute(f"{_CARD_SELECT} ORDER BY account_id, id").fetchall()
            return [_card_from_row(cast(Any, r)) for r in rows]

        return await self._run(q, write=False)

    async def active_holds_total(self, account_id: str) -> int:
        def q(conn: Conn) -> int:
            row = conn.execute(
                "SELECT coalesce(sum(remaining), 0) AS total FROM holds "
                "WHERE account_id = %s AND kind = 'hold' AND remaining > 0",
                (account_id,),
            ).fetchone()
            return 0 if row is None else int(row["total"])

        return await self._run(q, write=False)

    # -- writes --------------------------------------------------------------------------------

    async def commit_auth(
        self, intent: AuthIntent, *, deadline: float | None = None
    ) -> AuthOutcome:
        return await self._run(
            lambda conn: _apply_auth(conn, intent), write=True, deadline=deadline
        )

    async def commit_reversal(
        self, intent: ReversalIntent, *, deadline: float | None = None
    ) -> ReversalOutcome:
        return await self._run(
            lambda conn: _apply_reversal(conn, intent), write=True, deadline=deadline
        )

    async def put_account(self, account: Account) -> None:
        await self._run(lambda conn: _put_account(conn, account), write=True)

    async def put_card(self, card: Card) -> None:
        await self._run(lambda conn: _put_card(conn, card), write=True)

    async def set_card_status(self, card_id: str, status: CardStatus) -> bool:
        return await self._run(lambda conn: _set_card_status(conn, card_id, status), write=True)

    async def update_card(
        self, card_id: str, changes: Mapping[str, object], *, actor: str
    ) -> CardChange | None:
        frozen = dict(changes)
        return await self._run(lambda conn: _update_card(conn, card_id, frozen, actor), write=True)

    async def card_changes(self, card_id: str) -> list[CardChange]:
        return await self._run(lambda conn: _card_changes(conn, card_id), write=False)

    async def expire_holds(self, now: str, limit: int = 100) -> list[HoldRelease]:
        return await self._run(lambda conn: _expire_holds(conn, now, limit), write=True)

    async def release_hold(self, hold_id: int, *, actor: str) -> HoldRelease | None:
        return await self._run(lambda conn: _release_hold(conn, hold_id, actor), write=True)

    async def search_journal(self, query: JournalQuery) -> list[JournalEntry]:
        return await self._run(lambda conn: _search_journal(conn, query), write=False)

    async def list_holds(
        self,
        *,
        account_id: str | None = None,
        card_id: str | None = None,
        active: bool = True,
        limit: int = 100,
    ) -> list[HoldView]:
        return await self._run(
            lambda conn: _list_holds(conn, account_id, card_id, active, limit), write=False
        )

    # -- the outbox (switch.relay and cardswitch events) ---------------------------------------

    async def pending_events(self, limit: int) -> list[ev.OutboxEvent]:
        where = "published_at IS NULL AND parked_at IS NULL ORDER BY id LIMIT %s"
        return await self._run(lambda conn: _events(conn, where, (limit,)), write=False)

    async def events_since(self, since: str, limit: int = 10_000) -> list[ev.OutboxEvent]:
        where = "created_at >= %s ORDER BY id LIMIT %s"
        return await self._run(lambda conn: _events(conn, where, (since, limit)), write=False)

    async def outbox_stats(self) -> ev.OutboxStats:
        return await self._run(_outbox_stats, write=False)

    async def mark_delivery(
        self, marks: Sequence[DeliveryMark], *, deadline: float | None = None
    ) -> int:
        if not marks:
            return 0
        frozen = list(marks)
        return await self._run(
            lambda conn: _mark_delivery(conn, frozen), write=True, deadline=deadline
        )

    async def mark_published(self, ids: Sequence[int], at: str) -> None:
        if not ids:
            return
        frozen = list(ids)
        await self._run(
            lambda conn: conn.execute(
                "UPDATE events SET published_at = %s WHERE id = ANY(%s) AND published_at IS NULL",
                (at, frozen),
            ),
            write=True,
        )

    async def record_event_failures(
        self, failures: Sequence[ev.EventFailure], *, max_attempts: int, at: str
    ) -> int:
        frozen = list(failures)
        return await self._run(
            lambda conn: _record_event_failures(conn, frozen, max_attempts, at), write=True
        )

    async def purge_published(self, before: str) -> int:
        def purge(conn: Conn) -> int:
            cur = conn.execute(
                "DELETE FROM events WHERE published_at IS NOT NULL AND published_at < %s",
                (before,),
            )
            return cur.rowcount

        return await self._run(purge, write=True)

    async def claim_lease(self, name: str, owner: str, now: float, ttl: float) -> bool:
        return await self._run(lambda conn: _claim_lease(conn, name, owner, now, ttl), write=True)

    async def release_lease(self, name: str, owner: str) -> None:
        await self._run(
            lambda conn: conn.execute(
                "DELETE FROM leases WHERE name = %s AND owner = %s", (name, owner)
            ),
            write=True,
        )

    def _close(self) -> None:
        self._closed = True
        self._pool.close(timeout=5)
        self._watchdog.stop()


def _broken(exc: psycopg.OperationalError) -> bool:
    """Whether the error is the connection failing (not a statement the database refused)."""
    return exc.sqlstate is None or exc.sqlstate.startswith(("08", "57P"))


# -- schema -----------------------------------------------------------------------------------


_VERSION_TABLE = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
)"""


def schema_version(conn: Conn) -> int:
    """The database's schema version, 0 when it was never migrated."""
    row = conn.execute("SELECT to_regclass('schema_migrations') AS t").fetchone()
    if row is None or row["t"] is None:
        return 0
    found = conn.execute("SELECT max(version) AS v FROM schema_migrations").fetchone()
    return 0 if found is None or found["v"] is None else int(found["v"])


def _check_current(version: int) -> None:
    if version > SCHEMA_VERSION:
        raise StoreError(
            "unavailable",
            f"database schema {version} is newer than this code (schema {SCHEMA_VERSION}); "
            "upgrade cardswitch",
        )
    if version < SCHEMA_VERSION:
        raise StoreError(
            "unavailable",
            f"database schema {version} is older than this code (schema {SCHEMA_VERSION}); "
            "run cardswitch db migrate",
        )


def _connect(cfg: StoreConfig) -> Conn:
    try:
        return psycopg.connect(cfg.dsn, **connection_kwargs(cfg))
    except psycopg.Error as exc:
        raise StoreError("unavailable", f"cannot connect: {_describe(exc)}") from None


def database_version(cfg: StoreConfig) -> tuple[int, int]:
    """The database's schema version and this code's. Blocking: call it from a thread.

    Raises:
        StoreError: ``unavailable`` when the database cannot be reached.
    """
    with _connect(cfg) as conn:
        try:
            return schema_version(conn), SCHEMA_VERSION
        except psycopg.Error as exc:
            raise StoreError("unavailable", _describe(exc)) from None


def migrate(cfg: StoreConfig) -> tuple[int, int]:
    """Apply the missing ``postgres/*.sql`` migrations in one transaction, under an advisory
    lock (a second instance migrating at the same time waits, then finds nothing to do).
    Returns the schema version before and after. Blocking: call it from a thread.

    Raises:
        StoreError: ``unavailable`` when the database cannot be reached, a statement fails,
            or its schema is newer than this code.
    """
    with _connect(cfg) as conn:
        try:
            # A migration may take longer than a decision's statement timeout.
            conn.execute("SET statement_timeout = 0")
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                conn.execute(_VERSION_TABLE)
                before = schema_version(conn)
                if before > SCHEMA_VERSION:
                    _check_current(before)
                for migration in migrations.migrations("postgres"):
                    if migration.version <= before:
                        continue
                    for statement in migrations.split_statements(migration.sql):
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)",
                        (migration.version, migration.name),
                    )
        except psycopg.Error as exc:
            raise StoreError("unavailable", f"migration failed: {_describe(exc)}") from None
    return before, max(before, SCHEMA_VERSION)


@asynccontextmanager
async def open_postgres_store(cfg: StoreConfig) -> AsyncIterator[PostgresStore]:
    """Connect to ``cfg.dsn``, check the schema is this code's, and serve the pool.

    The database is not migrated here (``cardswitch db migrate`` does it once for every
    instance). On exit, the pool is closed.

    Raises:
        StoreError: ``unavailable`` when the database cannot be reached within
            ``connect_timeout`` or its schema is not ``SCHEMA_VERSION``.
    """

    def _open() -> ConnectionPool[Conn]:
        with _connect(cfg) as conn:
            try:
                version = schema_version(conn)
            except psycopg.Error as exc:
                raise StoreError("unavailable", _describe(exc)) from None
        _check_current(version)
        pool: ConnectionPool[Conn] = ConnectionPool(
            cfg.dsn,
            kwargs=connection_kwargs(cfg),
            min_size=cfg.pool_size,
            max_size=cfg.pool_size,
            open=False,
            timeout=cfg.statement_timeout,
            name="cardswitch",
            reconnect_timeout=24 * 3600.0,
        )
        try:
            pool.open(wait=True, timeout=max(cfg.connect_timeout, 2.0))
        except PoolTimeout:
            pool.close(timeout=1)
            raise StoreError("unavailable", "cannot open the connection pool in time") from None
        return pool

    pool = await trio.to_thread.run_sync(_open)
    store = PostgresStore(pool, cfg)
    try:
        yield store
    finally:
        store._closed = True
        with trio.CancelScope(shield=True):
            # Let operations already in their threads finish, then close the pool.
            async with contextlib.AsyncExitStack() as stack:
                for _ in range(cfg.pool_size):
                    await stack.enter_async_context(_hold(store._limiter))
                await trio.to_thread.run_sync(store._close)


@asynccontextmanager
async def _hold(limiter: trio.CapacityLimiter) -> AsyncIterator[None]:
    token = object()
    await limiter.acquire_on_behalf_of(token)
    try:
        yield
    finally:
        limiter.release_on_behalf_of(token)
