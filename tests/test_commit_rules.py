"""The precedence of the commit rules (store/rules.py), table-driven and without a database.

Each row is an intent and a snapshot of the locked rows; the expected plan is written from
the rules' contract (the module docstring), not read back from the code.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from switch.decisions import Reason, profile
from switch.store.models import (
    AuthIntent,
    DuplicateKey,
    OriginalKey,
    ReversalIntent,
    SpendControls,
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

KEY = DuplicateKey("visa", "12345", "1201120000", "000001", "RRN000000001", "TERM0001", "0100")
ORIG = OriginalKey("visa", "12345", "000001", "1201120000")
LIMITS = SpendControls(daily_amount=1000, daily_count=3, monthly_amount=5000, monthly_count=10)
INTENT = AuthIntent(
    dup_key=KEY,
    original_key=ORIG,
    mti="0100",
    card_id="c1",
    account_id="a1",
    masked_pan="412345******2345",
    amount=500,
    currency="978",
    kind="hold",
    profile=profile("visa"),
    approval_code="123456",
    velocity_day="20261201",
    velocity_month="202612",
)
ACCOUNT = AccountRow("a1", "978", 10_000, 10_000)
CARD = CardRow("c1", 0, 3)
SNAP = AuthSnapshot(ACCOUNT, CARD)


def _intent(**changes: Any) -> AuthIntent:
    return replace(INTENT, **changes)


def _snap(**changes: Any) -> AuthSnapshot:
    return replace(SNAP, **changes)


# (name, intent, snapshot, reason, new PIN-try count, hold, debit)
CASES: list[tuple[str, AuthIntent, AuthSnapshot, Reason, int | None, int, int]] = [
    ("approved hold", INTENT, SNAP, Reason.APPROVED, None, 500, 0),
    ("approved debit", _intent(kind="debit"), SNAP, Reason.APPROVED, None, 0, 500),
    (
        "funds", INTENT, _snap(account=replace(ACCOUNT, available_balance=499)),
        Reason.INSUFFICIENT_FUNDS, None, 0, 0,
    ),
    (
        "exact funds", INTENT, _snap(account=replace(ACCOUNT, available_balance=500)),
        Reason.APPROVED, None, 500, 0,
    ),
    (
        "reversed before: declined even with a right PIN and funds",
        _intent(pin_check="ok"), _snap(reversed_before=True),
        Reason.ORIGINAL_ALREADY_REVERSED, None, 0, 0,
    ),
    (
        "reversed before: an advice is acknowledged without money",
        _intent(kind="advice_hold"), _snap(reversed_before=True),
        Reason.ADVICE_AFTER_REVERSAL, None, 0, 0,
    ),
    (
        "wrong PIN counts", _intent(pin_check="bad"), SNAP, Reason.WRONG_PIN, 1, 0, 0,
    ),
    (
        "third wrong PIN locks", _intent(pin_check="bad"), _snap(card=replace(CARD, pin_tries=2)),
        Reason.PIN_TRIES_EXCEEDED, 3, 0, 0,
    ),
    (
        "at the limit: declined without counting, even a right PIN",
        _intent(pin_check="ok"), _snap(card=replace(CARD, pin_tries=3)),
        Reason.PIN_TRIES_EXCEEDED, None, 0, 0,
    ),
    (
        "PIN before the pipeline's decline",
        _intent(pin_check="bad", kind="decline", decline_reason=Reason.CVV_MISMATCH), SNAP,
        Reason.WRONG_PIN, 1, 0, 0,
    ),
    (
        "a right PIN resets the count even when declined for funds",
        _intent(pin_check="ok"),
        _snap(card=replace(CARD, pin_tries=2), account=replace(ACCOUNT, available_balance=0)),
        Reason.INSUFFICIENT_FUNDS, 0, 0, 0,
    ),
    (
        "the pipeline's decline before velocity and funds",
        _intent(kind="decline", decline_reason=Reason.EXPIRED_CARD, velocity=LIMITS),
        _snap(day=Counters(1000, 3), account=replace(ACCOUNT, available_balance=0)),
        Reason.EXPIRED_CARD, None, 0, 0,
    ),
    (
        "velocity amount before count", _intent(velocity=LIMITS), _snap(day=Counters(600, 3)),
        Reason.EXCEEDS_AMOUNT_VELOCITY, None, 0, 0,
    ),
    (
        "velocity count", _intent(velocity=LIMITS), _snap(day=Counters(100, 3)),
        Reason.EXCEEDS_COUNT_VELOCITY, None, 0, 0,
    ),
    (
        "monthly amount", _intent(velocity=LIMITS), _snap(month=Counters(4600, 1)),
        Reason.EXCEEDS_AMOUNT_VELOCITY, None, 0, 0,
    ),
    (
        "velocity before funds", _intent(velocity=LIMITS),
        _snap(day=Counters(900, 0), account=replace(ACCOUNT, available_balance=0)),
        Reason.EXCEEDS_AMOUNT_VELOCITY, None, 0, 0,
    ),
    (
        "advice applied beyond funds, PIN lock and velocity",
        _intent(kind="advice_debit", pin_check="bad", velocity=LIMITS, amount=50_000),
        _snap(card=replace(CARD, pin_tries=3), day=Counters(1000, 3)),
        Reason.ADVICE_APPLIED, None, 0, 50_000,
    ),
    (
        "advice of a network decline moves nothing",
        _intent(kind="advice_decline", decline_reason=Reason.ADVICE_OF_DECLINE), SNAP,
        Reason.ADVICE_OF_DECLINE, None, 0, 0,
    ),
    (
        "advice for an unknown card moves nothing",
        _intent(kind="advice_decline", decline_reason=Reason.ADVICE_UNKNOWN_CARD,
                card_id=None, account_id=None),
        AuthSnapshot(None, None), Reason.ADVICE_UNKNOWN_CARD, None, 0, 0,
    ),
    (
        "unknown card declined without an account",
        _intent(kind="decline", decline_reason=Reason.UNKNOWN_CARD, card_id=None, account_id=None),
        AuthSnapshot(None, None), Reason.UNKNOWN_CARD, None, 0, 0,
    ),
]  # fmt: skip


@pytest.mark.parametrize("case", CASES, ids=[case[0] for case in CASES])
def test_auth_precedence(
    case: tuple[str, AuthIntent, AuthSnapshot, Reason, int | None, int, int],
) -> None:
    _name, intent, snap, reason, pin_tries, hold, debit = case
    plan = plan_auth(intent, snap)
    assert (plan.reason, plan.pin_tries, plan.hold, plan.debit) == (reason, pin_tries, hold, debit)
    assert plan.resolve_unmatched is snap.reversed_before
    if snap.account is not None:
        assert plan.available_after == snap.account.available_balance - hold - debit


@pytest.mark.parametrize(
    ("intent", "snap", "message"),
    [
        (_intent(amount=-1), SNAP, "negative amount"),
        (INTENT, _snap(account=None), "unknown account"),
        (INTENT, _snap(account=replace(ACCOUNT, currency="840")), "currency"),
        (INTENT, _snap(card=None), "unknown card"),
        (_intent(kind="decline"), SNAP, "decline_reason"),
        (_intent(velocity=LIMITS, velocity_day=""), SNAP, "velocity_day"),
    ],
)
def test_contract_breaks_are_errors_not_declines(
    intent: AuthIntent, snap: AuthSnapshot, message: str
) -> None:
    with pytest.raises(StoreError, match=message) as err:
        plan_auth(intent, snap)
    assert err.value.kind == "invalid"


REVERSAL = ReversalIntent(
    dup_key=replace(KEY, stan="000002", mti_class="0400"),
    original_key=ORIG,
    mti="0400",
    amount=1000,
    replacement_amount=None,
    currency="978",
    masked_pan="",
    profile=profile("visa"),
)
HOLD = HoldRow(7, 3, "a1", "c1", "hold", 1000, "20261201", "202612")


@pytest.mark.parametrize(
    ("replacement", "remaining", "release", "left", "count_delta"),
    [
        (None, 1000, 1000, 0, -1),  # full reversal
        (400, 1000, 600, 400, 0),  # partial: 4.00 stays authorized
        (1200, 1000, 0, None, 0),  # a replacement above what remains never raises the hold
        (None, 0, 0, None, 0),  # already fully reversed: nothing twice
        (300, 400, 100, 300, 0),  # a second partial releases only what is left
    ],
)
def test_reversal_releases_at_most_what_remains(
    replacement: int | None, remaining: int, release: int, left: int | None, count_delta: int
) -> None:
    plan = plan_reversal(
        replace(REVERSAL, replacement_amount=replacement),
        ReversalSnapshot(replace(HOLD, remaining=remaining)),
    )
    assert plan.reason is Reason.REVERSAL_MATCHED
    assert (plan.release, plan.hold_remaining, plan.count_delta) == (release, left, count_delta)
    assert plan.ledger_credit == 0 and not plan.record_unmatched


def test_reversal_of_a_debit_credits_the_ledger() -> None:
    plan = plan_reversal(REVERSAL, ReversalSnapshot(replace(HOLD, kind="debit")))
    assert (plan.release, plan.ledger_credit) == (1000, 1000)


def test_reversal_of_a_declined_original_matches_and_moves_nothing() -> None:
    plan = plan_reversal(REVERSAL, ReversalSnapshot(None, 3, "a1"))
    assert (plan.reason, plan.release, plan.record_unmatched) == (Reason.REVERSAL_MATCHED, 0, False)
    assert (plan.original_journal_id, plan.account_id) == (3, "a1")


def test_unknown_original_is_kept_as_unmatched() -> None:
    plan = plan_reversal(REVERSAL, ReversalSnapshot(None))
    assert (plan.reason, plan.release, plan.record_unmatched) == (
        Reason.REVERSAL_UNMATCHED,
        0,
        True,
    )


def test_negative_replacement_is_an_error() -> None:
    with pytest.raises(StoreError, match="replacement"):
        plan_reversal(replace(REVERSAL, replacement_amount=-1), ReversalSnapshot(HOLD))
