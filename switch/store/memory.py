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

from dataclasses import dataclass, field, replace

import trio

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


@dataclass(slots=True)
class JournalRow:
    """One answered request, as the SQLite journal keeps it (the fields tests look at)."""

    id: int
    dup_key: DuplicateKey
    original_key: OriginalKey
    mti: str
    kind: str
    card_id: str | None
    account_id: str | None
    amount: int
    outcome: StoredOutcome
    stand_in: bool


@dataclass(slots=True)
class _Hold:
    row: HoldRow
    amount: int
    original_key: OriginalKey


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
    _holds: list[_Hold] = field(default_factory=list)
    _counters: dict[tuple[str, str], Counters] = field(default_factory=dict)
    _unmatched: dict[OriginalKey, int | None] = field(default_factory=dict)

    def _check(self) -> None:
        if self.unavailable:
            raise StoreError("unavailable", "the in-memory store is set unavailable")

    async def _before_write(self) -> None:
        """The point where a cancelled caller is withdrawn (nothing applied yet)."""
        self._check()
        if self.commit_delay:
            await trio.sleep(self.commit_delay)
        else:
            await trio.lowlevel.checkpoint()
        self._check()

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

    async def find_outcome(self, key: DuplicateKey) -> StoredOutcome | None:
        self._check()
        row = self._row(key)
        return None if row is None else row.outcome

    async def list_cards(self) -> list[Card]:
        self._check()
        return sorted(self.cards.values(), key=lambda c: (c.account_id, c.id))

    async def active_holds_total(self, account_id: str) -> int:
        self._check()
        return sum(
            h.row.remaining
            for h in self._holds
            if h.row.account_id == account_id and h.row.kind == "hold"
        )

    def _row(self, key: DuplicateKey) -> JournalRow | None:
        return next((r for r in self.journal if r.dup_key == key), None)

    # -- decisions -----------------------------------------------------------------------------

    async def commit_auth(self, intent: AuthIntent) -> AuthOutcome:
        await self._before_write()
        stored = self._row(intent.dup_key)
        if stored is not None:
            if not isinstance(stored.outcome, AuthOutcome):
                raise StoreError("invalid", "duplicate key belongs to a reversal")
            return stored.outcome
        account = self.accounts.get(intent.account_id) if intent.account_id else None
        card = self.cards.get(intent.card_id) if intent.card_id else None
        day = Counters()
        month = Counters()
        if card is not None:
            day = self._counters.get((card.id, "D" + intent.velocity_day), Counters())
            month = self._counters.get((card.id, "M" + intent.velocity_month), Counters())
        reversed_before = self._unmatched.get(intent.original_key, 0) is None
        snap = AuthSnapshot(
            account=None
            if account is None
            else AccountRow(
                account.id, account.currency, account.ledger_balance, account.available_balance
            ),
            card=None if card is None else CardRow(card.id, card.pin_tries, card.pin_try_limit),
            day=day,
            month=month,
            reversed_before=reversed_before,
        )
        plan = plan_auth(intent, snap)  # raises before anything changed
        journal_id = len(self.journal) + 1
        if card is not None and plan.pin_tries is not None:
            self.cards[card.id] = card = replace(card, pin_tries=plan.pin_tries)
        hold_id = None
        moved = plan.hold + plan.debit
        if plan.approved and account is not None:
            self.accounts[account.id] = replace(
                account,
                available_balance=account.available_balance - moved,
                ledger_balance=account.ledger_balance - plan.debit,
            )
            hold_id = len(self._holds) + 1
            self._holds.append(
                _Hold(
                    HoldRow(
                        hold_id, journal_id, account.id, intent.card_id,
                        "debit" if plan.debit else "hold", moved,
                        intent.velocity_day, intent.velocity_month,
                    ),
                    moved,
                    intent.original_key,
                )
            )  # fmt: skip
            if card is not None:
                self._bump(card.id, intent.velocity_day, intent.velocity_month, moved, 1)
        if plan.resolve_unmatched:
            self._unmatched[intent.original_key] = journal_id
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
        self.journal.append(
            JournalRow(
                journal_id, intent.dup_key, intent.original_key, intent.mti, intent.kind,
                intent.card_id, intent.account_id, intent.amount,
                replace(outcome, replayed=True, held=0, debited=0), intent.stand_in,
            )
        )  # fmt: skip
        return outcome

    async def commit_reversal(self, intent: ReversalIntent) -> ReversalOutcome:
        await self._before_write()
        stored = self._row(intent.dup_key)
        if stored is not None:
            if not isinstance(stored.outcome, ReversalOutcome):
                raise StoreError("invalid", "duplicate key belongs to an authorization")
            return stored.outcome
        hold = next((h for h in self._holds if h.original_key == intent.original_key), None)
        snap = ReversalSnapshot(None if hold is None else hold.row)
        if hold is None:
            original = next(
                (
                    r
                    for r in self.journal
                    if r.original_key == intent.original_key and r.kind != "reversal"
                ),
                None,
            )
            if original is not None:
                snap = ReversalSnapshot(None, original.id, original.account_id)
        plan = plan_reversal(intent, snap)
        journal_id = len(self.journal) + 1
        if hold is not None and plan.hold_remaining is not None:
            hold.row = replace(hold.row, remaining=plan.hold_remaining)
            account = self.accounts[hold.row.account_id]
            self.accounts[account.id] = replace(
                account,
                available_balance=account.available_balance + plan.release,
                ledger_balance=account.ledger_balance + plan.ledger_credit,
            )
            if hold.row.card_id is not None:
                self._bump(
                    hold.row.card_id, hold.row.velocity_day, hold.row.velocity_month,
                    -plan.release, plan.count_delta,
                )  # fmt: skip
        available = None
        if plan.account_id is not None and plan.account_id in self.accounts:
            available = self.accounts[plan.account_id].available_balance
        if plan.record_unmatched:
            self._unmatched.setdefault(intent.original_key, None)
        outcome = ReversalOutcome(
            reason=plan.reason,
            response_code=intent.profile.code(plan.reason),
            matched=not plan.record_unmatched,
            released_amount=plan.release,
            available_balance=available,
            replayed=False,
        )
        self.journal.append(
            JournalRow(
                journal_id, intent.dup_key, intent.original_key, intent.mti, "reversal",
                None, plan.account_id, intent.amount,
                replace(outcome, replayed=True), intent.stand_in,
            )
        )  # fmt: skip
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
        self.cards[card.id] = card

    async def set_card_status(self, card_id: str, status: CardStatus) -> bool:
        await self._before_write()
        card = self.cards.get(card_id)
        if card is None:
            return False
        self.cards[card_id] = replace(card, status=status)
        return True
