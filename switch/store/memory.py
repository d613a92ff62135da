"""An in-memory ``Store`` for unit tests: the same commit rules, no durability.

What lives here: ``MemoryStore``, which keeps cards, accounts, the journal, holds, velocity
counters and unmatched reversals in dictionaries and decides every commit with
``switch.store.rules`` exactly as the SQLite and PostgreSQL backends do, so pipeline tests
run without a database file. It can be told to fail (``unavailable``) or to stall
(``commit_delay``) to exercise the pipeline's failure and budget policies.

What does not: durability (nothing survives the process: never a default, never configured
by ``[store] backend``), SQL, the rules themselves (``rules.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import trio

from switch import events as ev
from switch.decisions import Reason
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


@dataclass(slots=True)
class JournalRow:
    """One answered request, as the SQLite journal keeps it (the fields tests look at)."""

    id: int
    dup_key: DuplicateKey
    digest: str
    original: OriginalKey | None
    mti: str
    kind: str
    card_id: str | None
    account_id: str | None
    currency: str
    amount: int
    outcome: StoredOutcome
    stand_in: bool
    masked_pan: str = ""
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    #: ``None`` (sent) or ``(UNDELIVERED, reason, at)`` once ``mark_delivery`` marked it.
    delivery: tuple[str, str, str] | None = None


@dataclass
class MemoryStore:
    """The ``Store`` Protocol over dictionaries (tests only)."""

    accounts: dict[str, Account] = field(default_factory=dict)
    cards: dict[str, Card] = field(default_factory=dict)
    journal: list[JournalRow] = field(default_factory=list)
    #: When true every operation raises ``StoreError("unavailable")``.
    unavailable: bool = False
    #: Seconds each commit waits before it is applied (a slow database); cancellable.
    commit_delay: float = 0.0
    #: Money rows by journal id of the request that moved the money.
    holds: dict[int, HoldRow] = field(default_factory=dict)
    #: Hold expiry (ISO 8601) and releases without a reversal (by, at), by journal id.
    expiry: dict[int, str] = field(default_factory=dict)
    released: dict[int, tuple[str, str]] = field(default_factory=dict)
    #: Journaled card changes, oldest first.
    changes: list[CardChange] = field(default_factory=list)
    _counters: dict[tuple[str, str], Counters] = field(default_factory=dict)
    #: Unmatched reversals: journal id -> journal id of the original that resolved it.
    _unmatched: dict[int, int | None] = field(default_factory=dict)
    #: The outbox, in commit order (appended by the same call that changes the journal,
    #: with no checkpoint between them: the in-memory form of one transaction).
    events: dict[int, ev.OutboxEvent] = field(default_factory=dict)
    _next_event: int = 1
    leases: dict[str, tuple[str, float]] = field(default_factory=dict)

    def _check(self) -> None:
        if self.unavailable:
            raise StoreError("unavailable", "the in-memory store is set unavailable")

    async def _before_write(self, deadline: float | None = None) -> None:
        """The point where a cancelled caller is withdrawn (nothing applied yet); a commit
        whose ``deadline`` has passed by then is not applied (api.py)."""
        self._check()
        if self.commit_delay:
            await trio.sleep(self.commit_delay)
        else:
            await trio.lowlevel.checkpoint()
        self._check()
        if deadline is not None and trio.current_time() >= deadline:
            raise StoreError("unavailable", "the deadline passed before the commit started")

    # -- reads ---------------------------------------------------------------------------------

    async def get_card_by_fingerprint(self, fingerprint: bytes) -> Card | None:
        self._check()
        return next((c for c in self.cards.values() if c.pan_fingerprint == fingerprint), None)

    async def get_card(self, card_id: str) -> Card | None:
        self._check()
        return self.cards.get(card_id)

    async def get_account(self, account_id: str) -> Account | None:
        self._check()
        return self.accounts.get(account_id)

    async def lookup_auth(self, key: DuplicateKey, digest: str, fingerprint: bytes) -> AuthLookup:
        stored = await self.find_outcome(key, digest)
        if stored is not None:
            return AuthLookup(stored, None, None)
        card = await self.get_card_by_fingerprint(fingerprint)
        account = await self.get_account(card.account_id) if card is not None else None
        return AuthLookup(None, card, account)

    async def find_outcome(self, key: DuplicateKey, digest: str) -> StoredOutcome | None:
        self._check()
        stored = self._stored(key, digest)
        return None if isinstance(stored, bool) else stored

    async def list_cards(self) -> list[Card]:
        self._check()
        return sorted(self.cards.values(), key=lambda c: (c.account_id, c.id))

    async def active_holds_total(self, account_id: str) -> int:
        self._check()
        return sum(
            h.remaining
            for h in self.holds.values()
            if h.account_id == account_id and h.kind == "hold"
        )

    def _stored(self, key: DuplicateKey, digest: str) -> StoredOutcome | bool:
        rows = [r for r in self.journal if r.dup_key == key]
        for row in rows:
            if row.digest == digest:
                return row.outcome
        return bool(rows)

    def _original(self, key: OriginalKey) -> OriginalRow | None:
        for row in self.journal:
            if row.kind not in ("reversal", "duplicate") and key.matches(row.dup_key):
                hold = self.holds.get(row.id)
                return OriginalRow(row.id, row.card_id, row.account_id, row.currency, hold)
        return None

    def _unmatched_for(self, key: DuplicateKey, card_id: str | None, currency: str) -> int | None:
        for journal_id, resolved in self._unmatched.items():
            reversal = self.journal[journal_id - 1]
            if (
                resolved is None
                and reversal.original is not None
                and reversal.original.matches(key)
                and reversal.card_id in (None, card_id)
                and reversal.currency in ("", currency)
            ):
                return journal_id
        return None

    # -- decisions -----------------------------------------------------------------------------

    async def commit_auth(
        self, intent: AuthIntent, *, deadline: float | None = None
    ) -> AuthOutcome:
        await self._before_write(deadline)
        stored = self._stored(intent.dup_key, intent.digest)
        if not isinstance(stored, bool):
            if not isinstance(stored, AuthOutcome):
                raise StoreError("invalid", "duplicate key belongs to a reversal")
            return stored
        account = self.accounts.get(intent.account_id) if intent.account_id else None
        card = self.cards.get(intent.card_id) if intent.card_id else None
        unmatched = None
        snap = AuthSnapshot(None, None, conflict=True)
        if not stored:
            day = month = Counters()
            if card is not None:
                day = self._counters.get((card.id, "D" + intent.velocity_day), Counters())
                month = self._counters.get((card.id, "M" + intent.velocity_month), Counters())
            unmatched = self._unmatched_for(intent.dup_key, intent.card_id, intent.currency)
            if unmatched is None and intent.original is not None:
                named = intent.original.as_key(intent.dup_key)
                unmatched = self._unmatched_for(named, intent.card_id, intent.currency)
            snap = AuthSnapshot(
                account=None
                if account is None
                else AccountRow(
                    account.id, account.currency, account.ledger_balance, account.available_balance
                ),
                card=None
                if card is None
                else CardRow(
                    card.id, card.pin_tries, card.pin_try_limit, card.last_atc, card.atc_seen
                ),
                day=day,
                month=month,
                reversed_before=unmatched is not None,
                original=None if intent.original is None else self._original(intent.original),
                stand_in_day=self._counters.get(
                    (card.id, STAND_IN_PERIOD + intent.velocity_day), Counters()
                )
                if card is not None and intent.stand_in_daily is not None
                else Counters(),
            )
        plan = plan_auth(intent, snap)  # raises before anything changed
        journal_id = len(self.journal) + 1
        if card is not None and plan.pin_tries is not None:
            self.cards[card.id] = card = replace(card, pin_tries=plan.pin_tries)
        if card is not None and plan.atc is not None:
            self.cards[card.id] = card = replace(card, last_atc=plan.atc[0], atc_seen=plan.atc[1])
        moved = plan.hold + plan.debit
        hold_id = None
        if plan.approved and account is not None:
            self.accounts[account.id] = replace(
                account,
                available_balance=account.available_balance - moved + plan.release_original,
                ledger_balance=account.ledger_balance - plan.debit,
            )
            if card is not None and (moved or plan.release_original):
                count = 0 if plan.release_original else 1
                self._bump(card.id, intent.velocity_day, intent.velocity_month,
                           moved - plan.release_original, count)  # fmt: skip
        if plan.approved and intent.stand_in_daily is not None and card is not None:
            key = (card.id, STAND_IN_PERIOD + intent.velocity_day)
            old = self._counters.get(key, Counters())
            self._counters[key] = Counters(old.amount + intent.amount, old.count + 1)
        original = snap.original
        if plan.original_remaining is not None and original is not None and original.hold:
            self.holds[original.journal_id] = replace(
                original.hold, remaining=plan.original_remaining, completed_by=journal_id
            )
        if plan.money_row and account is not None:
            if plan.hold and intent.hold_expires_at:
                self.expiry[journal_id] = intent.hold_expires_at
            hold_id = len(self.holds) + 1
            self.holds[journal_id] = HoldRow(
                hold_id, journal_id, account.id, intent.card_id,
                "debit" if plan.debit else "hold", moved,
                intent.velocity_day, intent.velocity_month,
            )  # fmt: skip
        if plan.resolve_unmatched and unmatched is not None:
            self._unmatched[unmatched] = journal_id
        outcome = AuthOutcome(
            reason=plan.reason,
            response_code=intent.profile.code(plan.reason),
            approval_code=intent.approval_code if plan.approved else None,
            available_balance=plan.available_after,
            currency=intent.currency,
            replayed=False,
            hold_id=hold_id,
            held=plan.hold,
            debited=plan.debit,
        )
        kind = "duplicate" if plan.reason is Reason.DUPLICATE_TRANSMISSION else intent.kind
        row = JournalRow(
            journal_id, intent.dup_key, intent.digest, intent.original, intent.mti, kind,
            intent.card_id, intent.account_id, intent.currency, intent.amount,
            replace(outcome, replayed=True, held=0, debited=0), intent.stand_in,
            intent.masked_pan,
        )  # fmt: skip
        self._add_event(ev.auth_event(
            intent, journal_id=journal_id, reason=plan.reason, response_code=outcome.response_code,
            held=plan.hold, debited=plan.debit, released=plan.release_original,
            at=row.created_at, event_id=ev.new_event_id(),
        ))  # fmt: skip
        self.journal.append(row)
        return outcome

    async def commit_reversal(
        self, intent: ReversalIntent, *, deadline: float | None = None
    ) -> ReversalOutcome:
        await self._before_write(deadline)
        stored = self._stored(intent.dup_key, intent.digest)
        if not isinstance(stored, bool):
            if not isinstance(stored, ReversalOutcome):
                raise StoreError("invalid", "duplicate key belongs to an authorization")
            return stored
        original = None if stored else self._original(intent.original_key)
        plan = plan_reversal(intent, ReversalSnapshot(original, conflict=stored))
        journal_id = len(self.journal) + 1
        hold = None if original is None else original.hold
        if hold is not None and plan.hold_remaining is not None:
            self.holds[hold.journal_id] = replace(hold, remaining=plan.hold_remaining)
            account = self.accounts[hold.account_id]
            self.accounts[account.id] = replace(
                account,
                available_balance=account.available_balance + plan.release,
                ledger_balance=account.ledger_balance + plan.ledger_credit,
            )
            if hold.card_id is not None:
                self._bump(
                    hold.card_id, hold.velocity_day, hold.velocity_month,
                    -plan.release, plan.count_delta,
                )  # fmt: skip
        available = None
        if plan.account_id is not None and plan.account_id in self.accounts:
            available = self.accounts[plan.account_id].available_balance
        if plan.record_unmatched:
            self._unmatched[journal_id] = None
        outcome = ReversalOutcome(
            reason=plan.reason,
            response_code=intent.profile.code(plan.reason),
            matched=plan.reason is Reason.REVERSAL_MATCHED,
            released_amount=plan.release,
            available_balance=available,
            replayed=False,
        )
        kind = "duplicate" if plan.reason is Reason.DUPLICATE_TRANSMISSION else "reversal"
        row = JournalRow(
            journal_id, intent.dup_key, intent.digest, intent.original_key, intent.mti,
            kind, intent.card_id, plan.account_id, intent.currency, intent.amount,
            replace(outcome, replayed=True), intent.stand_in, intent.masked_pan,
        )  # fmt: skip
        self._add_event(ev.reversal_event(
            intent, journal_id=journal_id, account_id=plan.account_id, reason=plan.reason,
            response_code=outcome.response_code, released=plan.release,
            original_journal_id=plan.original_journal_id, at=row.created_at,
            event_id=ev.new_event_id(),
        ))  # fmt: skip
        self.journal.append(row)
        return outcome

    def _bump(self, card_id: str, day: str, month: str, amount: int, count: int) -> None:
        for period in ("D" + day, "M" + month):
            if len(period) == 1:
                continue
            old = self._counters.get((card_id, period), Counters())
            self._counters[(card_id, period)] = Counters(
                max(0, old.amount + amount), max(0, old.count + count)
            )

    # -- provisioning --------------------------------------------------------------------------

    async def put_account(self, account: Account) -> None:
        await self._before_write()
        self.accounts[account.id] = account

    async def put_card(self, card: Card) -> None:
        await self._before_write()
        if card.account_id not in self.accounts:
            raise StoreError("integrity", "FOREIGN KEY constraint failed")
        for other in self.cards.values():
            if other.id != card.id and other.pan_fingerprint == card.pan_fingerprint:
                raise StoreError("integrity", "UNIQUE constraint failed: cards.pan_fingerprint")
        old = self.cards.get(card.id)
        if old is not None:  # counters belong to decisions, not to provisioning
            card = replace(card, pin_tries=old.pin_tries, last_atc=old.last_atc,
                           atc_seen=old.atc_seen)  # fmt: skip
        self.cards[card.id] = card

    async def update_card(
        self, card_id: str, changes: Mapping[str, object], *, actor: str
    ) -> CardChange | None:
        await self._before_write()
        old = self.cards.get(card_id)
        if old is None:
            return None
        new = apply_card_changes(old, changes)
        self.cards[card_id] = new
        at = datetime.now(UTC).isoformat(timespec="microseconds")
        change = CardChange(card_id, old.masked_pan, actor, at, card_diff(old, new))
        self.changes.append(change)
        self._add_event(
            ev.card_change_event(change, account_id=old.account_id, event_id=ev.new_event_id())
        )
        return change

    async def card_changes(self, card_id: str) -> list[CardChange]:
        self._check()
        return [c for c in self.changes if c.card_id == card_id]

    async def search_journal(self, query: JournalQuery) -> list[JournalEntry]:
        self._check()
        first6, last4 = masked_parts(query.masked_pan or "")
        found = []
        for r in reversed(self.journal):
            k = r.dup_key
            if (
                (query.stan is not None and k.stan != query.stan)
                or (query.rrn is not None and k.rrn != query.rrn)
                or (query.card_id is not None and r.card_id != query.card_id)
                or not r.masked_pan.startswith(first6)
                or not r.masked_pan.endswith(last4)
                or (query.stand_in is not None and r.stand_in != query.stand_in)
                or (query.undelivered and r.delivery is None)
                or (query.since is not None and r.created_at < query.since)
                or (query.until is not None and r.created_at >= query.until)
            ):
                continue
            o = r.outcome
            found.append(
                JournalEntry(
                    r.id, r.created_at, k.network, r.mti, r.kind, k.stan, k.rrn, k.terminal_id,
                    r.masked_pan, r.card_id, r.account_id, r.amount, r.currency, o.reason.value,
                    o.response_code, getattr(o, "approval_code", None), r.stand_in,
                    getattr(o, "released_amount", None), *(r.delivery or (None,) * 3),
                )
            )  # fmt: skip
        return found[: query.limit]

    async def mark_delivery(
        self, marks: Sequence[DeliveryMark], *, deadline: float | None = None
    ) -> int:
        await self._before_write(deadline)
        marked = 0
        for mark in marks:
            for row in self.journal:
                if (row.dup_key, row.digest) == (mark.ref.dup_key, mark.ref.digest):
                    if row.delivery is None:
                        row.delivery = (UNDELIVERED, mark.reason, mark.at)
                        marked += 1
                    break
        return marked

    async def expire_holds(self, now: str, limit: int = 100) -> list[HoldRelease]:
        await self._before_write()
        due = sorted(
            (j for j, h in self.holds.items()
             if h.kind == "hold" and h.remaining > 0 and self.expiry.get(j, "~") <= now),
            key=lambda j: self.expiry[j],
        )[:limit]  # fmt: skip
        return [r for r in (self._release(j, "expiry", now) for j in due) if r is not None]

    async def release_hold(self, hold_id: int, *, actor: str) -> HoldRelease | None:
        await self._before_write()
        journal_id = next((j for j, h in self.holds.items() if h.id == hold_id), None)
        if journal_id is None:
            return None
        return self._release(journal_id, actor, datetime.now(UTC).isoformat())

    async def list_holds(
        self,
        *,
        account_id: str | None = None,
        card_id: str | None = None,
        active: bool = True,
        limit: int = 100,
    ) -> list[HoldView]:
        self._check()
        views = []
        for journal_id, h in sorted(self.holds.items(), key=lambda kv: -kv[1].id):
            if account_id is not None and h.account_id != account_id:
                continue
            if card_id is not None and h.card_id != card_id:
                continue
            if active and not (h.kind == "hold" and h.remaining > 0):
                continue
            row = self.journal[journal_id - 1]
            released = self.released.get(journal_id)
            views.append(
                HoldView(
                    h.id, journal_id, h.account_id, h.card_id, row.masked_pan, h.kind,
                    row.amount, h.remaining, "", self.expiry.get(journal_id),
                    released[1] if released else None, released[0] if released else None,
                )
            )  # fmt: skip
        return views[:limit]

    def _release(self, journal_id: int, by: str, at: str) -> HoldRelease | None:
        hold = self.holds[journal_id]
        plan = plan_hold_release(hold)
        if plan is None:
            return None
        amount, count_delta = plan
        self.holds[journal_id] = replace(hold, remaining=0)
        self.released[journal_id] = (by, at)
        account = self.accounts[hold.account_id]
        self.accounts[account.id] = replace(
            account, available_balance=account.available_balance + amount
        )
        if hold.card_id is not None:
            self._bump(hold.card_id, hold.velocity_day, hold.velocity_month, -amount, count_delta)
        original = self.journal[journal_id - 1]
        release = HoldRelease(hold.id, hold.account_id, original.masked_pan, amount, by, at)
        self._add_event(ev.hold_release_event(
            release, journal_id=journal_id, card_id=hold.card_id, currency=original.currency,
            event_id=ev.new_event_id(),
        ))  # fmt: skip
        return release

    async def set_card_status(self, card_id: str, status: CardStatus) -> bool:
        await self._before_write()
        card = self.cards.get(card_id)
        if card is None:
            return False
        self.cards[card_id] = replace(card, status=status)
        return True

    # -- the outbox ----------------------------------------------------------------------------

    def _add_event(self, new: ev.NewEvent) -> None:
        number = self._next_event
        self._next_event += 1
        self.events[number] = ev.OutboxEvent(
            number, new.event_id, new.type, new.group_key, new.journal_id, new.created_at,
            new.payload,
        )  # fmt: skip

    def _replace_event(self, number: int, **changes: object) -> None:
        if number in self.events:
            self.events[number] = replace(self.events[number], **changes)  # type: ignore[arg-type]

    async def pending_events(self, limit: int) -> list[ev.OutboxEvent]:
        self._check()
        rows = self.events.values()
        return [e for e in rows if e.published_at is None and e.parked_at is None][:limit]

    async def events_since(self, since: str, limit: int = 10_000) -> list[ev.OutboxEvent]:
        self._check()
        return [e for e in self.events.values() if e.created_at >= since][:limit]

    async def outbox_stats(self) -> ev.OutboxStats:
        pending = await self.pending_events(len(self.events))
        parked = sum(1 for e in self.events.values() if e.parked_at is not None)
        oldest = min((e.created_at for e in pending), default=None)
        return ev.OutboxStats(len(pending), oldest, parked)

    async def mark_published(self, ids: Sequence[int], at: str) -> None:
        await self._before_write()
        for i in ids:
            if i in self.events and self.events[i].published_at is None:
                self._replace_event(i, published_at=at)

    async def record_event_failures(
        self, failures: Sequence[ev.EventFailure], *, max_attempts: int, at: str
    ) -> int:
        await self._before_write()
        parked = 0
        for f in failures:
            if f.id not in self.events:
                continue
            attempts = self.events[f.id].attempts + 1
            park = f.poison or attempts >= max_attempts
            parked += park
            self._replace_event(f.id, attempts=attempts, last_error=f.error[:500],
                                parked_at=at if park else None)  # fmt: skip
        return parked

    async def purge_published(self, before: str) -> int:
        await self._before_write()
        old = [i for i, e in self.events.items() if e.published_at and e.published_at < before]
        for i in old:
            del self.events[i]
        return len(old)

    async def claim_lease(self, name: str, owner: str, now: float, ttl: float) -> bool:
        await self._before_write()
        holder = self.leases.get(name)
        if holder is None or holder[0] == owner or holder[1] <= now:
            self.leases[name] = (owner, now + ttl)
            return True
        return False

    async def release_lease(self, name: str, owner: str) -> None:
        await self._before_write()
        if self.leases.get(name, ("", 0.0))[0] == owner:
            del self.leases[name]
