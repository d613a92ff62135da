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
    OriginalRow,
    ReversalSnapshot,
    accept_atc,
    plan_auth,
    plan_reversal,
)

KEY = DuplicateKey("visa", "12345", "1201120000", "000001", "RRN000000001", "TERM0001", "0100")
ORIG = OriginalKey("visa", "12345", "1201120000", "000001", "0100", "RRN000000001", "TERM0001")
LIMITS = SpendControls(daily_amount=1000, daily_count=3, monthly_amount=5000, monthly_count=10)
INTENT = AuthIntent(
    dup_key=KEY,
    digest="d1",
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
        "a key taken by another request: duplicate transmission, before everything",
        _intent(pin_check="bad"), _snap(conflict=True),
        Reason.DUPLICATE_TRANSMISSION, None, 0, 0,
    ),
    (
        "zero amount: account verification approved without a hold",
        _intent(amount=0), SNAP, Reason.APPROVED, None, 0, 0,
    ),
    (
        "a replayed chip counter declines before the PIN is counted",
        _intent(atc=28, atc_window=4, pin_check="bad"),
        _snap(card=replace(CARD, last_atc=28)), Reason.ATC_REPLAY, None, 0, 0,
    ),
    (
        "an advice repeating an approved authorization changes nothing",
        _intent(kind="advice_hold", original=ORIG),
        _snap(original=OriginalRow(3, "c1", "a1", "978",
                                   HoldRow(1, 3, "a1", "c1", "hold", 500, "d", "m"))),
        Reason.ADVICE_ALREADY_APPLIED, None, 0, 0,
    ),
    (
        "an advice naming another card's request is applied on its own",
        _intent(kind="advice_hold", original=ORIG),
        _snap(original=OriginalRow(3, "c2", "a2", "978",
                                   HoldRow(1, 3, "a2", "c2", "hold", 500, "d", "m"))),
        Reason.ADVICE_APPLIED, None, 500, 0,
    ),
    (
        "a completion debits its amount (and releases the hold: see its own test)",
        _intent(kind="advice_debit", original=ORIG, amount=400),
        _snap(original=OriginalRow(3, "c1", "a1", "978",
                                   HoldRow(1, 3, "a1", "c1", "hold", 500, "d", "m"))),
        Reason.COMPLETION_APPLIED, None, 0, 400,
    ),
    (
        "a second completion of the same pre-authorization moves nothing",
        _intent(kind="advice_debit", original=ORIG, amount=400),
        _snap(original=OriginalRow(3, "c1", "a1", "978",
                                   HoldRow(1, 3, "a1", "c1", "hold", 0, "d", "m", 9))),
        Reason.ADVICE_ALREADY_APPLIED, None, 0, 0,
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
    if snap.account is not None and not snap.conflict:
        assert plan.available_after == (
            snap.account.available_balance - hold - debit + plan.release_original
        )


def test_completion_releases_the_hold_and_debits_once() -> None:
    hold = HoldRow(1, 3, "a1", "c1", "hold", 500, "d", "m")
    snap = _snap(original=OriginalRow(3, "c1", "a1", "978", hold))
    full = plan_auth(_intent(kind="advice_debit", original=ORIG, amount=400), snap)
    assert (full.release_original, full.original_remaining, full.debit) == (500, 0, 400)
    assert full.available_after == 10_000 + 500 - 400
    kept = plan_auth(
        _intent(kind="advice_debit", original=ORIG, amount=400,
                keep_rest_on_partial_completion=True),
        snap,
    )  # fmt: skip
    assert (kept.release_original, kept.original_remaining, kept.debit) == (400, 100, 400)


def test_chip_counter_window() -> None:
    accepted = plan_auth(_intent(atc=30, atc_window=4), _snap(card=replace(CARD, last_atc=28)))
    assert (accepted.reason, accepted.atc) == (Reason.APPROVED, (30, 0b10))
    # an accepted counter is recorded even when a later rule declines
    poor = _snap(card=replace(CARD, last_atc=28), account=replace(ACCOUNT, available_balance=0))
    declined = plan_auth(_intent(atc=29, atc_window=4), poor)
    assert (declined.reason, declined.atc) == (Reason.INSUFFICIENT_FUNDS, (29, 0b1))
    assert accept_atc(29, 0b1, 28, 4) is None  # seen
    assert accept_atc(40, 0, 35, 4) is None  # older than the window
    assert accept_atc(40, 0, 36, 4) == (40, 0b1000)


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
    digest="r1",
    original_key=ORIG,
    card_id="c1",
    pan_present=True,
    mti="0400",
    amount=1000,
    replacement_amount=None,
    currency="978",
    masked_pan="",
    profile=profile("visa"),
)
HOLD = HoldRow(7, 3, "a1", "c1", "hold", 1000, "20261201", "202612")


def _original(hold: HoldRow | None = HOLD, card: str = "c1", currency: str = "978") -> OriginalRow:
    return OriginalRow(3, card, "a1", currency, hold)


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
        ReversalSnapshot(_original(replace(HOLD, remaining=remaining))),
    )
    assert plan.reason is Reason.REVERSAL_MATCHED
    assert (plan.release, plan.hold_remaining, plan.count_delta) == (release, left, count_delta)
    assert plan.ledger_credit == 0 and not plan.record_unmatched


def test_reversal_of_a_debit_credits_the_ledger() -> None:
    plan = plan_reversal(REVERSAL, ReversalSnapshot(_original(replace(HOLD, kind="debit"))))
    assert (plan.release, plan.ledger_credit) == (1000, 1000)


def test_reversal_of_a_declined_original_matches_and_moves_nothing() -> None:
    plan = plan_reversal(REVERSAL, ReversalSnapshot(_original(None)))
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
        plan_reversal(replace(REVERSAL, replacement_amount=-1), ReversalSnapshot(_original()))


@pytest.mark.parametrize(
    ("intent", "original"),
    [
        (REVERSAL, _original(card="c2")),  # the original is another card's
        (REVERSAL, _original(currency="840")),  # in another currency
        (replace(REVERSAL, card_id=None), _original()),  # a PAN no card has
    ],
)
def test_reversal_of_another_cards_or_currencys_original_releases_nothing(
    intent: ReversalIntent, original: OriginalRow
) -> None:
    plan = plan_reversal(intent, ReversalSnapshot(original))
    assert (plan.reason, plan.release, plan.record_unmatched) == (
        Reason.REVERSAL_MISMATCH,
        0,
        False,
    )


def test_reversal_without_pan_or_currency_matches_on_the_key() -> None:
    intent = replace(REVERSAL, card_id=None, pan_present=False, currency="")
    plan = plan_reversal(intent, ReversalSnapshot(_original()))
    assert (plan.reason, plan.release) == (Reason.REVERSAL_MATCHED, 1000)


def test_reversal_reusing_a_key_with_other_content_is_a_duplicate() -> None:
    plan = plan_reversal(REVERSAL, ReversalSnapshot(_original(), conflict=True))
    assert (plan.reason, plan.release) == (Reason.DUPLICATE_TRANSMISSION, 0)


def test_reversal_of_a_completed_pre_authorization_releases_nothing() -> None:
    plan = plan_reversal(REVERSAL, ReversalSnapshot(_original(replace(HOLD, completed_by=9))))
    assert (plan.reason, plan.release) == (Reason.REVERSAL_MATCHED, 0)
