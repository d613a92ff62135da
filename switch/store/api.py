"""The interface the pipeline and the provisioning CLI use to reach the durable store.

What lives here: the ``Store`` Protocol and, in each method's docstring, its contract and how
a multi-instance PostgreSQL backend maps it (several switch processes sharing one database,
so mutual exclusion comes from row locks instead of the single embedded writer).

What does not: any implementation (``sqlite.py`` is the embedded default), the records
(``models.py``), opening a backend from configuration (``switch.store.open_store``).

Durability contract of every write: when the coroutine returns, the effect is committed to
stable storage (SQLite WAL with ``synchronous=FULL``; PostgreSQL ``synchronous_commit=on``).
Cancellation: a write cancelled before the backend starts applying it is withdrawn (nothing
written, ``trio.Cancelled`` propagates); once applying has started the call waits for the
commit and returns its outcome, because a committed decision is the answer that must be sent.

Deadlines of the decision writes: ``commit_auth`` and ``commit_reversal`` take an optional
``deadline`` (``trio.current_time()`` seconds: the request's budget end). A backend must not
start applying a commit whose deadline has passed (it raises ``StoreError("unavailable")``
and writes nothing), and must bound its own waits for locks by the time left, so that a
commit either completes about at the deadline or fails without effect: the caller then
answers by its stand-in policy, and the journal never disagrees with the answer. SQLite:
a batch is applied only for the callers whose deadline has not passed, under a
``busy_timeout`` of the earliest deadline left in the batch (``BUSY_TIMEOUT_MS`` without
one). PostgreSQL: ``SET LOCAL lock_timeout`` and ``statement_timeout`` to the time left
(milliseconds, at least 1) at the start of the transaction; a cancelled statement rolls the
whole transaction back.

Mapping to PostgreSQL (same schema, ``BIGINT`` amounts, ``BYTEA`` blobs):

- reads are plain ``SELECT``s on a pool connection in autocommit (READ COMMITTED).
- ``commit_auth``: one transaction: ``INSERT INTO journal ... ON CONFLICT`` on the partial
  unique index of the duplicate key (``WHERE kind <> 'duplicate'``) ``DO NOTHING RETURNING
  id``; when no row comes back, ``SELECT`` the rows of that key: the one with the same digest
  is replayed (roll back), otherwise the request is journaled as ``kind = 'duplicate'`` (its
  own partial unique index on key and digest) with ``DUPLICATE_TRANSMISSION``. Otherwise lock
  and read, in this order everywhere so that two instances cannot deadlock: the unmatched
  reversal naming this request ``FOR UPDATE``, the original an advice or completion names
  and its hold ``FOR UPDATE``, the card ``FOR UPDATE`` (PIN tries, chip counter, velocity
  counters), the account ``FOR UPDATE`` (funds); build the snapshot, call
  ``rules.plan_auth``, apply the plan, ``UPDATE journal SET <outcome>``. Concurrent intents on
  one account serialise on its row lock.
- ``commit_reversal``: one transaction: journal insert as above; the original's journal row
  and its hold ``FOR UPDATE`` then the account ``FOR UPDATE``; ``rules.plan_reversal``;
  release, or insert into ``unmatched_reversals``. The hold row lock makes 0400/0401/0420/
  0421 and several reversals of one original release exactly once across instances.
- the outbox: every decision write above, ``expire_holds``/``release_hold`` and
  ``update_card`` also ``INSERT INTO events`` in the same transaction (``switch.events``
  builds the row), so an event exists iff its decision committed. The relay's reads are
  plain ``SELECT``s; its lease is ``SELECT ... FROM leases WHERE name = $1 FOR UPDATE SKIP
  LOCKED`` (another instance renewing it is skipped, not waited for), then the same
  owner-or-expired ``UPDATE`` as SQLite's upsert; its marks are single ``UPDATE``s.
- ``put_account``/``put_card``: ``INSERT ... ON CONFLICT (id) DO UPDATE``; ``set_card_status``
  a single ``UPDATE``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Protocol

from switch.store.models import (
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
    ReversalIntent,
    ReversalOutcome,
    StoredOutcome,
)

if TYPE_CHECKING:  # switch.events imports the store's records: a type-only import here
    from switch.events import EventFailure, OutboxEvent, OutboxStats


class Store(Protocol):
    """Cards, accounts and the authorization journal, durable before an answer is sent.

    Every method may raise ``StoreError`` (the database failed, or the store is closed);
    declines are never exceptions but outcomes.
    """

    # -- reads (any reader connection; no locks) ---------------------------------------------

    async def get_card_by_fingerprint(self, fingerprint: bytes) -> Card | None:
        """The card whose PAN fingerprint is ``fingerprint``, or ``None``.

        PostgreSQL: ``SELECT ... FROM cards WHERE pan_fingerprint = $1`` (unique index).
        """
        ...

    async def get_card(self, card_id: str) -> Card | None:
        """The card with id ``card_id``, or ``None``."""
        ...

    async def get_account(self, account_id: str) -> Account | None:
        """The account with id ``account_id``, or ``None``."""
        ...

    async def lookup_auth(self, key: DuplicateKey, digest: str, fingerprint: bytes) -> AuthLookup:
        """``find_outcome(key, digest)``, then, when nothing is stored, the card of
        ``fingerprint`` and its account: the authorization path's reads in one operation
        (one worker-thread hop on PostgreSQL, where each hop costs about 150 us of CPU).
        """
        ...

    async def find_outcome(self, key: DuplicateKey, digest: str) -> StoredOutcome | None:
        """The stored answer of the request with this duplicate key and content digest
        (``replayed=True``), or ``None`` (new, or the key reused with other content, which
        ``commit_*`` journals as a duplicate transmission). A fast path before the heavier
        HSM work; ``commit_*`` checks again atomically.

        PostgreSQL: ``SELECT`` on the journal's duplicate-key indexes.
        """
        ...

    async def list_cards(self) -> list[Card]:
        """Every card, ordered by account then id (provisioning and operators)."""
        ...

    async def active_holds_total(self, account_id: str) -> int:
        """Sum of what remains of the account's active holds (0100 kind), in minor units.

        With no external postings, ``available = ledger - active_holds_total`` for accounts
        provisioned with equal ledger and available balances.
        """
        ...

    # -- the decision writes (journal + money + counters, one transaction) -------------------

    async def commit_auth(
        self, intent: AuthIntent, *, deadline: float | None = None
    ) -> AuthOutcome:
        """Make an authorization durable with its hold/debit, PIN-try and velocity effects.

        The semantics are those of ``AuthIntent``. A duplicate key already journaled returns
        the stored outcome with ``replayed=True`` and changes nothing. ``deadline`` (trio
        time): not started after it, lock waits bounded by it (module docstring).

        Raises:
            StoreError: ``invalid`` when the intent's currency differs from its account's or
                it names an unknown card or account; ``unavailable`` when the commit failed
                or could not start before its deadline; ``closed`` after the store was closed.
        """
        ...

    async def commit_reversal(
        self, intent: ReversalIntent, *, deadline: float | None = None
    ) -> ReversalOutcome:
        """Make a reversal durable, releasing at most what remains of the original's hold
        (or crediting back a debit): a full reversal releases the rest, a partial one
        reduces the hold to ``replacement_amount``, a later reversal of the same original
        releases only what is left (0 after a full one). An unknown original is kept as an
        unmatched reversal, so the original is declined if it arrives later. ``deadline``:
        as ``commit_auth``.

        Raises:
            StoreError: as ``commit_auth``.
        """
        ...

    # -- provisioning writes -------------------------------------------------------------------

    async def put_account(self, account: Account) -> None:
        """Insert or replace an account (balances included)."""
        ...

    async def put_card(self, card: Card) -> None:
        """Insert or replace a card by id.

        Raises:
            StoreError: ``integrity`` when another card has the same PAN fingerprint or the
                account does not exist.
        """
        ...

    async def set_card_status(self, card_id: str, status: CardStatus) -> bool:
        """Change a card's status; ``False`` when no such card exists."""
        ...

    async def update_card(
        self, card_id: str, changes: Mapping[str, object], *, actor: str
    ) -> CardChange | None:
        """Change only the named attributes of a card (``models.CARD_UPDATABLE``, and
        ``pin_tries`` reset to 0), in one transaction with a ``card_changes`` row saying who,
        when and what (masked; secrets only named). ``None`` when no such card exists.

        PostgreSQL: ``SELECT ... FROM cards WHERE id = $1 FOR UPDATE``, ``UPDATE cards SET``
        the named columns, ``INSERT INTO card_changes``.

        Raises:
            StoreError: ``invalid`` for an attribute that cannot be changed.
        """
        ...

    async def card_changes(self, card_id: str) -> list[CardChange]:
        """The journaled changes of a card, oldest first."""
        ...

    async def search_journal(self, query: JournalQuery) -> list[JournalEntry]:
        """Journal rows matching ``query``, newest first, at most ``query.limit``."""
        ...

    async def mark_delivery(
        self, marks: Sequence[DeliveryMark], *, deadline: float | None = None
    ) -> int:
        """Mark the journal rows of answers that could not be delivered (``delivery =
        'undelivered'``, its reason and time), in one transaction; returns how many rows were
        marked. A row is named as it was journaled (``JournalRef``: duplicate key and
        digest); a row already marked keeps its first mark, and a ref naming no row marks
        nothing. Nothing else of the row changes: no money moves. ``deadline`` (trio time):
        not started after it (``StoreError("unavailable")``) and its waits bounded by it, as
        for the decision writes: a mark never holds a connection up for long.

        PostgreSQL: one ``UPDATE journal SET delivery = ... WHERE <key> AND digest = %s AND
        delivery IS NULL`` per mark.
        """
        ...

    # -- holds ---------------------------------------------------------------------------------

    async def expire_holds(self, now: str, limit: int = 100) -> list[HoldRelease]:
        """Release up to ``limit`` holds whose expiry (ISO 8601 UTC) is at or before ``now``,
        in one transaction; idempotent (a released hold gives back nothing more, and a
        reversal after it releases nothing more).

        PostgreSQL: ``SELECT ... FROM holds WHERE kind = 'hold' AND remaining > 0 AND
        expires_at <= $1 ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED`` (instances
        sweeping at once take different holds), then per hold the account ``FOR UPDATE``.
        """
        ...

    async def release_hold(self, hold_id: int, *, actor: str) -> HoldRelease | None:
        """An operator gives back what remains of a hold; ``None`` when there is nothing."""
        ...

    async def list_holds(
        self,
        *,
        account_id: str | None = None,
        card_id: str | None = None,
        active: bool = True,
        limit: int = 100,
    ) -> list[HoldView]:
        """Money rows, newest first; ``active`` keeps holds with something left to release."""
        ...

    # -- the outbox (relay and ``cardswitch events``; each decision above writes its row) -----

    async def pending_events(self, limit: int) -> list[OutboxEvent]:
        """Up to ``limit`` events neither published nor parked, in commit order."""
        ...

    async def events_since(self, since: str, limit: int = 10_000) -> list[OutboxEvent]:
        """Events created at or after ``since`` (ISO 8601 UTC), whatever their state, in
        commit order (what ``cardswitch events replay`` re-publishes)."""
        ...

    async def outbox_stats(self) -> OutboxStats:
        """Rows pending, the creation time of the oldest pending one, rows parked."""
        ...

    async def mark_published(self, ids: Sequence[int], at: str) -> None:
        """Mark the rows ``ids`` published at ``at`` (SQS acknowledged each of them)."""
        ...

    async def record_event_failures(
        self, failures: Sequence[EventFailure], *, max_attempts: int, at: str
    ) -> int:
        """Count one failed attempt of each row; park (at ``at``) the poison ones and those
        that reached ``max_attempts``. Returns how many were parked."""
        ...

    async def purge_published(self, before: str) -> int:
        """Delete the rows published before ``before``; how many."""
        ...

    async def claim_lease(self, name: str, owner: str, now: float, ttl: float) -> bool:
        """Take the lease ``name`` for ``owner`` until ``now + ttl`` (Unix seconds) if it is
        free, expired or already ``owner``'s; whether ``owner`` holds it now."""
        ...

    async def release_lease(self, name: str, owner: str) -> None:
        """Give the lease up if ``owner`` holds it (a clean stop: no wait for expiry)."""
        ...
