"""The money rules that must be atomic, as pure functions of an intent and the locked rows.

What lives here: ``plan_auth`` and ``plan_reversal``. A store backend opens its transaction,
locks and reads the rows a commit depends on into a snapshot (``AuthSnapshot``,
``ReversalSnapshot``), calls the plan function, and applies the ``AuthPlan`` or
``ReversalPlan`` it returns: new PIN-try count and chip counter, hold or debit, what an
original gives back, counter deltas. Every precedence question is answered here once, for
SQLite, PostgreSQL and the in-memory test store alike, and the answer is a ``Reason``: the
backend never chooses a response code.

What does not: SQL or locking (the backends), which rows to lock (each backend's mapping in
``api.py``), turning a Reason into DE39 (the network profile in ``decisions.py``).

Precedence of an authorization (the first rule that applies decides):

1. the duplicate key is taken by a request with other content: ``DUPLICATE_TRANSMISSION``;
2. an unresolved reversal of this request (same key, card and currency) was recorded: an
   advice is acknowledged (``ADVICE_AFTER_REVERSAL``), anything else declined
   (``ORIGINAL_ALREADY_REVERSED``);
3. advices are never declined: what cannot be applied is recorded (``intent.decline_reason``:
   the network's decline, an unknown card, another currency); an advice of an authorization
   already approved changes nothing (``ADVICE_ALREADY_APPLIED``); a completion of an approved
   pre-authorization releases its hold and debits the completed amount, once
   (``COMPLETION_APPLIED``); any other advice is applied (``ADVICE_APPLIED``);
4. the chip counter: a cryptogram whose ATC was already accepted, or is older than the
   window allows, is ``ATC_REPLAY``; an accepted one is recorded even if a later rule declines;
5. the PIN result: at the try limit already, ``PIN_TRIES_EXCEEDED`` without counting; a wrong
   PIN counts and declines ``WRONG_PIN``, or ``PIN_TRIES_EXCEEDED`` when it reaches the limit;
   a right PIN resets the counter even if a later rule declines;
6. the pipeline's own decline (``intent.decline_reason``);
7. velocity: amount before count, day before month; then, for an approval in stand-in
   with a daily allowance (``intent.stand_in_daily``), the card's stand-in total that day
   (``snap.stand_in_day``): beyond it, ``intent.decline_reason`` (the stand-in decline);
8. funds: ``INSUFFICIENT_FUNDS`` when available is below the amount;
9. ``APPROVED``: a hold (0100) or a debit (0200) of the amount; an amount of zero (account
   verification) is approved without a hold.
"""

from __future__ import annotations

from dataclasses import dataclass

from switch.decisions import Reason
from switch.store.models import (
    APPROVING_REASONS,
    AuthIntent,
    ReversalIntent,
    SpendControls,
    StoreError,
)

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
    """The locked card row: its PIN-try counter and chip (ATC) counter."""

    id: str
    pin_tries: int
    pin_try_limit: int
    #: Highest ATC accepted, and which of the ``window`` counters below it were seen (bit
    #: ``i`` is ``last_atc - 1 - i``).
    last_atc: int | None = None
    atc_seen: int = 0


@dataclass(frozen=True, slots=True)
class Counters:
    """A velocity counter: approved amount and count in one period."""

    amount: int = 0
    count: int = 0


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
    #: Journal id of the completion that converted this hold, if any.
    completed_by: int | None = None


@dataclass(frozen=True, slots=True)
class OriginalRow:
    """The journal row of the original that a reversal, advice or completion names."""

    journal_id: int
    card_id: str | None
    account_id: str | None
    currency: str
    #: Its money row (locked); ``None`` when it moved no money (it was declined).
    hold: HoldRow | None


@dataclass(frozen=True, slots=True)
class AuthSnapshot:
    """What an authorization's commit depends on, read under the transaction's locks."""

    account: AccountRow | None
    card: CardRow | None
    day: Counters = Counters()
    month: Counters = Counters()
    #: An unresolved unmatched reversal names this request (same key, card, currency).
    reversed_before: bool = False
    #: The duplicate key is already journaled for a request with another digest.
    conflict: bool = False
    #: The original named by ``intent.original`` (advices and completions), when found.
    original: OriginalRow | None = None
    #: The card's approvals in stand-in on ``intent.velocity_day`` (read only when
    #: ``intent.stand_in_daily`` is set; the backend adds an approval to it).
    stand_in_day: Counters = Counters()


@dataclass(frozen=True, slots=True)
class AuthPlan:
    """What the backend writes for an authorization, besides its journal row."""

    reason: Reason
    #: New value of the card's PIN-try counter; ``None`` leaves it unchanged.
    pin_tries: int | None
    #: Amount reserved on available funds (a hold) and amount debited from ledger and
    #: available (a debit) by this request's own money row; at most one is non-zero.
    hold: int
    debit: int
    #: Available balance after the plan, ``None`` without an account.
    available_after: int | None
    #: Mark the unmatched reversal of this request as resolved by this journal row.
    resolve_unmatched: bool
    #: New (last_atc, atc_seen) of the card; ``None`` leaves them unchanged.
    atc: tuple[int, int] | None = None
    #: A completion: what it releases of the original's hold, the hold's new remaining, and
    #: that the hold is now completed by this row.
    release_original: int = 0
    original_remaining: int | None = None

    @property
    def approved(self) -> bool:
        return self.reason in APPROVING_REASONS

    @property
    def money_row(self) -> bool:
        """Whether this request gets a money row of its own (a hold or a debit)."""
        return self.approved and (self.hold > 0 or self.debit > 0)


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


def accept_atc(last: int | None, seen: int, atc: int, window: int) -> tuple[int, int] | None:
    """The card's new (last ATC, seen mask) if ``atc`` may be accepted, else ``None``.

    A counter above the highest accepted one is accepted and becomes the highest; one at most
    ``window`` below it is accepted once (a request that overtook another on the network).

    >>> accept_atc(None, 0, 28, 4)
    (28, 0)
    >>> accept_atc(28, 0, 28, 4) is None  # the same cryptogram again
    True
    >>> accept_atc(28, 0, 30, 4)  # 29 not seen yet: bit 0 is 29, bit 1 is 28 (seen)
    (30, 2)
    >>> accept_atc(30, 2, 29, 4)  # the overtaken one, once
    (30, 3)
    >>> accept_atc(30, 3, 29, 4) is None
    True
    >>> accept_atc(30, 3, 25, 4) is None  # older than the window
    True
    """
    if last is None:
        return atc, 0
    mask = (1 << window) - 1
    if atc > last:
        shift = atc - last
        return atc, ((seen << shift) | (1 << (shift - 1))) & mask
    behind = last - atc
    if behind == 0 or behind > window:
        return None
    bit = 1 << (behind - 1)
    if seen & bit:
        return None
    return last, seen | bit


def plan_auth(intent: AuthIntent, snap: AuthSnapshot) -> AuthPlan:
    """Decide what committing ``intent`` does, given the locked rows in ``snap``.

    Raises:
        StoreError: ``invalid`` when the intent breaks the store contract (unknown card or
            account, a currency other than the account's, a negative amount).
    """
    if snap.conflict:
        # Another request holds this key: this one is journaled apart and moves nothing.
        return AuthPlan(Reason.DUPLICATE_TRANSMISSION, None, 0, 0, _available(snap), False)
    _check_contract(intent, snap)
    account = snap.account
    advice = intent.kind in _ADVICE_KINDS

    def plan(
        reason: Reason, pin_tries: int | None = None, atc: tuple[int, int] | None = None
    ) -> AuthPlan:
        hold = debit = 0
        after = _available(snap)
        if reason in APPROVING_REASONS and account is not None:
            if intent.kind in _DEBIT_KINDS:
                debit = intent.amount
            elif intent.kind in _HOLD_KINDS:
                hold = intent.amount
            after = account.available_balance - intent.amount
        return AuthPlan(reason, pin_tries, hold, debit, after, snap.reversed_before, atc)

    if snap.reversed_before:
        return plan(Reason.ADVICE_AFTER_REVERSAL if advice else Reason.ORIGINAL_ALREADY_REVERSED)
    if intent.kind == "advice_decline":
        assert intent.decline_reason is not None  # _check_contract
        return plan(intent.decline_reason)
    if advice:
        return _plan_advice(intent, snap) or plan(Reason.ADVICE_APPLIED)

    card = snap.card
    atc: tuple[int, int] | None = None
    if card is not None and intent.atc is not None:
        atc = accept_atc(card.last_atc, card.atc_seen, intent.atc, intent.atc_window)
        if atc is None:
            return plan(Reason.ATC_REPLAY)
    pin_tries: int | None = None
    if card is not None and intent.pin_check is not None:
        if card.pin_tries >= card.pin_try_limit:
            return plan(Reason.PIN_TRIES_EXCEEDED, atc=atc)
        if intent.pin_check == "bad":
            tries = card.pin_tries + 1
            locked = tries >= card.pin_try_limit
            return plan(Reason.PIN_TRIES_EXCEEDED if locked else Reason.WRONG_PIN, tries, atc)
        if card.pin_tries:
            pin_tries = 0  # a right PIN resets the count, whatever decides next
    if intent.kind == "decline":
        assert intent.decline_reason is not None  # _check_contract
        return plan(intent.decline_reason, pin_tries, atc)
    if card is not None and intent.velocity is not None and intent.velocity.has_velocity:
        if not intent.velocity_day or not intent.velocity_month:
            raise StoreError("invalid", "velocity limits need velocity_day and velocity_month")
        reason = _velocity(intent.velocity, snap, intent.amount)
        if reason is not None:
            return plan(reason, pin_tries, atc)
    daily = intent.stand_in_daily
    if daily is not None and snap.stand_in_day.amount + intent.amount > daily:
        return plan(intent.decline_reason or Reason.ISSUER_UNAVAILABLE, pin_tries, atc)
    if account is not None and account.available_balance < intent.amount:
        return plan(Reason.INSUFFICIENT_FUNDS, pin_tries, atc)
    return plan(Reason.APPROVED, pin_tries, atc)


def _available(snap: AuthSnapshot) -> int | None:
    return None if snap.account is None else snap.account.available_balance


def _plan_advice(intent: AuthIntent, snap: AuthSnapshot) -> AuthPlan | None:
    """An advice that names an original of the same card and currency converts it, never adds
    to it; ``None`` when it is to be applied on its own."""
    original = snap.original
    account = snap.account
    if (
        original is None
        or account is None
        or original.card_id != intent.card_id
        or original.currency != intent.currency
        or original.hold is None  # the original moved no money: apply the advice itself
    ):
        return None
    hold = original.hold
    available = account.available_balance
    completes = (
        intent.kind == "advice_debit"
        and hold.kind == "hold"
        and hold.completed_by is None
        and hold.remaining > 0
    )
    if not completes:
        # The network tells us of an authorization we already approved (or completed, or
        # whose hold a reversal already gave back): nothing moves twice.
        return AuthPlan(Reason.ADVICE_ALREADY_APPLIED, None, 0, 0, available, False)
    keep = 0
    if intent.keep_rest_on_partial_completion and intent.amount < hold.remaining:
        keep = hold.remaining - intent.amount
    release = hold.remaining - keep
    return AuthPlan(
        reason=Reason.COMPLETION_APPLIED,
        pin_tries=None,
        hold=0,
        debit=intent.amount,
        available_after=available + release - intent.amount,
        resolve_unmatched=False,
        release_original=release,
        original_remaining=keep,
    )


@dataclass(frozen=True, slots=True)
class ReversalSnapshot:
    """What a reversal's commit depends on, read under the transaction's locks."""

    #: The original named by the reversal, with its money row locked; ``None`` if unknown.
    original: OriginalRow | None
    #: The duplicate key is already journaled for a reversal with another digest.
    conflict: bool = False


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
    much and never releases more than remains; a later reversal of the same original gives
    back only what is left. An original of another card or currency is not this reversal's:
    it is acknowledged (``REVERSAL_MISMATCH``) and releases nothing.

    Raises:
        StoreError: ``invalid`` for a negative replacement amount.
    """
    if intent.replacement_amount is not None and intent.replacement_amount < 0:
        raise StoreError("invalid", "negative replacement amount")
    if snap.conflict:
        return ReversalPlan(Reason.DUPLICATE_TRANSMISSION, 0, 0, None, 0, False, None, None)
    original = snap.original
    if original is None:
        return ReversalPlan(Reason.REVERSAL_UNMATCHED, 0, 0, None, 0, True, None, None)
    other_card = intent.pan_present and intent.card_id != original.card_id
    other_currency = bool(intent.currency) and intent.currency != original.currency
    if other_card or other_currency:
        return ReversalPlan(Reason.REVERSAL_MISMATCH, 0, 0, None, 0, False, None, None)
    hold = original.hold
    if hold is None or hold.completed_by is not None:
        # A declined original moved nothing; a completed one is reversed by reversing its
        # completion, not the pre-authorization.
        return ReversalPlan(
            Reason.REVERSAL_MATCHED, 0, 0, None, 0, False,
            original.journal_id, original.account_id,
        )  # fmt: skip
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
        original_journal_id=original.journal_id,
        account_id=hold.account_id,
    )


def plan_hold_release(hold: HoldRow) -> tuple[int, int] | None:
    """What releasing ``hold`` without a reversal gives back (expiry or an operator): the
    amount and the velocity count delta, or ``None`` when there is nothing to release (a
    debit, a completed or already released hold). Releasing twice gives back nothing more.

    >>> plan_hold_release(HoldRow(1, 2, "a", "c", "hold", 700, "d", "m"))
    (700, -1)
    >>> plan_hold_release(HoldRow(1, 2, "a", "c", "hold", 0, "d", "m")) is None
    True
    >>> plan_hold_release(HoldRow(1, 2, "a", "c", "debit", 700, "d", "m")) is None
    True
    """
    if hold.kind != "hold" or hold.completed_by is not None or hold.remaining <= 0:
        return None
    return hold.remaining, -1
