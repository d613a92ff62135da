"""The money rules that must be atomic, as pure functions of an intent and the locked rows.

What lives here: ``plan_auth`` and ``plan_reversal``. A store backend opens its transaction,
locks and reads the rows a commit depends on into a snapshot (``AuthSnapshot``,
``ReversalSnapshot``), calls the plan function, and applies the ``AuthPlan`` or
``ReversalPlan`` it returns: new PIN-try count, hold or debit, counter deltas, what a reversal
releases. Every precedence question (PIN tries before a decline, reversed-before-original,
velocity before funds, advices never declined) is answered here once, for SQLite,
PostgreSQL and the in-memory test store alike, and the answer is a ``Reason``: the backend
never chooses a response code.

What does not: SQL or locking (the backends), which rows to lock (each backend's mapping in
``api.py``), turning a Reason into DE39 (the network profile in ``decisions.py``).

Precedence of an authorization (the first rule that applies decides):

1. an unresolved reversal of this original was recorded: an advice is acknowledged
   (``ADVICE_AFTER_REVERSAL``), anything else declined (``ORIGINAL_ALREADY_REVERSED``);
2. an advice applies what the network approved (``ADVICE_APPLIED``), or records what cannot
   be applied (``intent.decline_reason``: the network's decline, an unknown card, another
   currency), whatever the funds, PIN or velocity say;
3. the PIN result: at the try limit already, ``PIN_TRIES_EXCEEDED`` without counting; a wrong
   PIN counts and declines ``WRONG_PIN``, or ``PIN_TRIES_EXCEEDED`` when it reaches the limit;
   a right PIN resets the counter even if a later rule declines;
4. the pipeline's own decline (``intent.decline_reason``);
5. velocity: amount before count, day before month;
6. funds: ``INSUFFICIENT_FUNDS`` when available is below the amount;
7. ``APPROVED``: a hold (0100) or a debit (0200) of the amount.
"""

from __future__ import annotations

from dataclasses import dataclass

from switch.decisions import Reason
from switch.store.models import AuthIntent, ReversalIntent, SpendControls, StoreError

#: Kinds of an authorization intent that reserve funds and that post a debit.
_HOLD_KINDS = frozenset({"hold", "advice_hold"})
_DEBIT_KINDS = frozenset({"debit", "advice_debit"})
_ADVICE_KINDS = frozenset({"advice_hold", "advice_debit", "advice_decline"})


@dataclass(frozen=True, slots=True)
class AccountRow:
    """The locked account row (balances in minor units)."""

    id: str
    currency: str
    ledger_balance: int
    available_balance: int


@dataclass(frozen=True, slots=True)
class CardRow:
    """The locked card row: its PIN-try counter."""

    id: str
    pin_tries: int
    pin_try_limit: int


@dataclass(frozen=True, slots=True)
class Counters:
    """A velocity counter: approved amount and count in one period."""

    amount: int = 0
    count: int = 0


@dataclass(frozen=True, slots=True)
class AuthSnapshot:
    """What an authorization's commit depends on, read under the transaction's locks."""

    account: AccountRow | None
    card: CardRow | None
    day: Counters = Counters()
    month: Counters = Counters()
    #: An unresolved unmatched reversal names this request as its original.
    reversed_before: bool = False


@dataclass(frozen=True, slots=True)
class AuthPlan:
    """What the backend writes for an authorization, besides its journal row."""

    reason: Reason
    #: New value of the card's PIN-try counter; ``None`` leaves it unchanged.
    pin_tries: int | None
    #: Amount reserved on available funds (a hold) and amount debited from ledger and
    #: available (a debit); at most one of them is non-zero.
    hold: int
    debit: int
    #: Available balance after the plan, ``None`` without an account.
    available_after: int | None
    #: Mark the unmatched reversal of this original as resolved by this journal row.
    resolve_unmatched: bool

    @property
    def moves_money(self) -> bool:
        return bool(self.hold or self.debit) or self.reason in _MONEY_REASONS

    @property
    def approved(self) -> bool:
        return self.reason in _MONEY_REASONS


#: Reasons under which an authorization's amount is held or debited.
_MONEY_REASONS = frozenset({Reason.APPROVED, Reason.ADVICE_APPLIED})


def _check_contract(intent: AuthIntent, snap: AuthSnapshot) -> None:
    """Intents that break the store contract are errors, not declines."""
    if intent.amount < 0:
        raise StoreError("invalid", "negative amount")
    if intent.account_id is not None:
        if snap.account is None:
            raise StoreError("invalid", "unknown account")
        if snap.account.currency != intent.currency:
            raise StoreError("invalid", "amount currency differs from the account's")
    if intent.card_id is not None and snap.card is None:
        raise StoreError("invalid", "unknown card")
    if intent.kind in ("hold", "debit", "advice_hold", "advice_debit") and snap.account is None:
        raise StoreError("invalid", "an approvable request needs an account")
    if intent.kind in ("decline", "advice_decline") and intent.decline_reason is None:
        raise StoreError("invalid", "a decline needs its decline_reason")


def _velocity(limits: SpendControls, snap: AuthSnapshot, amount: int) -> Reason | None:
    """Amount limits before count limits, the day before the month.

    >>> s = AuthSnapshot(None, None, day=Counters(900, 2), month=Counters(900, 2))
    >>> _velocity(SpendControls(daily_amount=1000, daily_count=2), s, 200)
    <Reason.EXCEEDS_AMOUNT_VELOCITY: 'exceeds_amount_velocity'>
    >>> _velocity(SpendControls(daily_amount=1000, daily_count=2), s, 50)
    <Reason.EXCEEDS_COUNT_VELOCITY: 'exceeds_count_velocity'>
    >>> _velocity(SpendControls(monthly_amount=1000), s, 100) is None
    True
    """
    if limits.daily_amount is not None and snap.day.amount + amount > limits.daily_amount:
        return Reason.EXCEEDS_AMOUNT_VELOCITY
    if limits.monthly_amount is not None and snap.month.amount + amount > limits.monthly_amount:
        return Reason.EXCEEDS_AMOUNT_VELOCITY
    if limits.daily_count is not None and snap.day.count + 1 > limits.daily_count:
        return Reason.EXCEEDS_COUNT_VELOCITY
    if limits.monthly_count is not None and snap.month.count + 1 > limits.monthly_count:
        return Reason.EXCEEDS_COUNT_VELOCITY
    return None


def plan_auth(intent: AuthIntent, snap: AuthSnapshot) -> AuthPlan:
    """Decide what committing ``intent`` does, given the locked rows in ``snap``.

    Raises:
        StoreError: ``invalid`` when the intent breaks the store contract (unknown card or
            account, a currency other than the account's, a negative amount).
    """
    _check_contract(intent, snap)
    account = snap.account
    available = None if account is None else account.available_balance
    advice = intent.kind in _ADVICE_KINDS

    def plan(reason: Reason, pin_tries: int | None = None) -> AuthPlan:
        hold = debit = 0
        after = available
        if reason in _MONEY_REASONS and account is not None:
            if intent.kind in _DEBIT_KINDS:
                debit = intent.amount
            elif intent.kind in _HOLD_KINDS:
                hold = intent.amount
            after = account.available_balance - intent.amount
        return AuthPlan(reason, pin_tries, hold, debit, after, snap.reversed_before)

    if snap.reversed_before:
        return plan(Reason.ADVICE_AFTER_REVERSAL if advice else Reason.ORIGINAL_ALREADY_REVERSED)
    if intent.kind == "advice_decline":
        assert intent.decline_reason is not None  # _check_contract
        return plan(intent.decline_reason)
    if advice:
        return plan(Reason.ADVICE_APPLIED)

    pin_tries: int | None = None
    card = snap.card
    if card is not None and intent.pin_check is not None:
        if card.pin_tries >= card.pin_try_limit:
            return plan(Reason.PIN_TRIES_EXCEEDED)
        if intent.pin_check == "bad":
            tries = card.pin_tries + 1
            locked = tries >= card.pin_try_limit
            return plan(Reason.PIN_TRIES_EXCEEDED if locked else Reason.WRONG_PIN, tries)
        if card.pin_tries:
            pin_tries = 0  # a right PIN resets the count, whatever decides next
    if intent.kind == "decline":
        assert intent.decline_reason is not None  # _check_contract
        return plan(intent.decline_reason, pin_tries)
    if card is not None and intent.velocity is not None and intent.velocity.has_velocity:
        if not intent.velocity_day or not intent.velocity_month:
            raise StoreError("invalid", "velocity limits need velocity_day and velocity_month")
        reason = _velocity(intent.velocity, snap, intent.amount)
        if reason is not None:
            return plan(reason, pin_tries)
    if account is not None and account.available_balance < intent.amount:
        return plan(Reason.INSUFFICIENT_FUNDS, pin_tries)
    return plan(Reason.APPROVED, pin_tries)


@dataclass(frozen=True, slots=True)
class HoldRow:
    """The locked money row of an original: a hold or a debit and what remains of it."""

    id: int
    journal_id: int
    account_id: str
    card_id: str | None
    kind: str
    remaining: int
    velocity_day: str
    velocity_month: str


@dataclass(frozen=True, slots=True)
class ReversalSnapshot:
    """What a reversal's commit depends on, read under the transaction's locks."""

    #: The original's money row, locked; ``None`` when it moved no money or is unknown.
    hold: HoldRow | None
    #: Journal id and account of an original that moved no money (declined), if any.
    original_journal_id: int | None = None
    original_account_id: str | None = None


@dataclass(frozen=True, slots=True)
class ReversalPlan:
    """What the backend writes for a reversal, besides its journal row."""

    reason: Reason
    #: Amount given back: released from the hold, or credited back for a debit.
    release: int
    #: Credit to the ledger (a debit reversed), part of ``release``.
    ledger_credit: int
    #: New ``remaining`` of the hold row, ``None`` when untouched.
    hold_remaining: int | None
    #: Count delta for the original's velocity periods (-1 when fully reversed).
    count_delta: int
    #: Keep the reversal as unmatched, so that its original is declined if it arrives.
    record_unmatched: bool
    original_journal_id: int | None
    account_id: str | None


def plan_reversal(intent: ReversalIntent, snap: ReversalSnapshot) -> ReversalPlan:
    """Decide what committing the reversal ``intent`` does, given the locked rows in ``snap``.

    A full reversal releases what remains; a partial one (``replacement_amount``) keeps that
    much; a later reversal of the same original gives back only what is left.

    Raises:
        StoreError: ``invalid`` for a negative replacement amount.
    """
    if intent.replacement_amount is not None and intent.replacement_amount < 0:
        raise StoreError("invalid", "negative replacement amount")
    hold = snap.hold
    if hold is not None:
        keep = intent.replacement_amount or 0
        release = max(0, hold.remaining - keep)
        remaining = hold.remaining - release
        return ReversalPlan(
            reason=Reason.REVERSAL_MATCHED,
            release=release,
            ledger_credit=release if hold.kind == "debit" else 0,
            hold_remaining=remaining if release else None,
            count_delta=-1 if release and remaining == 0 else 0,
            record_unmatched=False,
            original_journal_id=hold.journal_id,
            account_id=hold.account_id,
        )
    if snap.original_journal_id is not None:
        return ReversalPlan(
            Reason.REVERSAL_MATCHED, 0, 0, None, 0, False,
            snap.original_journal_id, snap.original_account_id,
        )  # fmt: skip
    return ReversalPlan(Reason.REVERSAL_UNMATCHED, 0, 0, None, 0, True, None, None)
