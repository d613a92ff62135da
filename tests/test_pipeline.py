"""The pipeline as a unit: software HSM, in-memory store, pinned clock, no TLS or SoftHSM.

Every decision comes back as a ``Decision`` whose reason is the one that decided it and whose
DE39 is the network profile's code for that reason; the money invariants are checked on the
in-memory store after each test that moves money.
"""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import trio

from hsm.errors import HsmUnavailable
from switch.acquirer import build_auth, build_reversal, encipher_pin
from switch.config import PipelineConfig
from switch.decisions import Reason
from switch.handler import Decision
from switch.provision import CardRow
from switch.testing import SoftwareEngine, context_for, software_engine
from switch.wire.messages import AuthRequest, AuthResponse, Track2

REPO = Path(__file__).resolve().parents[1]
APPROVAL_PAN = "4123456789012345"  # CVV 561 (8701/101), PIN 1234 by PVV, 50 a day
APPROVAL_TRACK2 = Track2(APPROVAL_PAN, "8701", "101", "1" + "0000" + "561" + "0000")
SMALL_PAN = "4666655554444111"  # balance 1.00
BLOCKED_PAN = "4333322221111222"
EMV_PAN = "1234567890123456"  # MCC 7995 and country 408 blocked
VELOCITY_PAN = "4000001234567899"
DEMO_ZPK = "0123456789ABCDEFFEDCBA9876543210"
EXTRA = [
    {
        "pan": VELOCITY_PAN, "expiry": "3012", "service_code": "101", "account": "acct-velocity",
        "currency": "978", "balance": 1_000_000, "daily_count": 2, "daily_amount": 5000,
    },
]  # fmt: skip


def _rows() -> list[CardRow]:
    demo = json.loads((REPO / "config" / "demo" / "cards.json").read_text())["cards"]
    return [CardRow.from_mapping(r, f"row {i}") for i, r in enumerate([*demo, *EXTRA])]


async def _engine(**kwargs: Any) -> SoftwareEngine:
    return await software_engine(_rows(), **kwargs)


async def _auth(engine: SoftwareEngine, request: Any) -> Decision:
    return await engine.pipeline.authorize(request, context_for(engine.config))


async def _check_invariants(engine: SoftwareEngine) -> None:
    """available = ledger - active holds, on every account."""
    store = engine.store
    for account in store.accounts.values():
        holds = await store.active_holds_total(account.id)
        assert account.available_balance == account.ledger_balance - holds, account.id


class _Flaky:
    """The software HSM with commands that fail or stall on demand."""

    def __init__(self, hsm: Any) -> None:
        self._hsm = hsm
        self.down = False
        self.delay = 0.0

    def __getattr__(self, name: str) -> Any:
        inner = getattr(self._hsm, name)
        if not callable(inner) or name.startswith("_"):
            return inner

        async def command(*args: Any, **kwargs: Any) -> Any:
            if self.delay:
                await trio.sleep(self.delay)
            if self.down:
                raise HsmUnavailable("token removed")
            return await inner(*args, **kwargs)

        return command


async def test_approval_holds_and_answers_from_the_profile() -> None:
    engine = await _engine()
    request = build_auth(APPROVAL_PAN, 1250, track2=APPROVAL_TRACK2, pos_entry_mode="901")
    decision = await _auth(engine, request)
    assert decision.reason is Reason.APPROVED and decision.stand_in is None
    assert isinstance(decision.response, AuthResponse)
    assert decision.response.response_code == "00" and decision.response.approval_code
    assert decision.held == 1250 and decision.masked_pan == "412345******2345"
    assert await engine.store.active_holds_total("demo-acct-main") == 1250
    await _check_invariants(engine)


@pytest.mark.parametrize(
    ("network", "request_", "reason", "code"),
    [
        ("visa", build_auth(SMALL_PAN, 5000), Reason.INSUFFICIENT_FUNDS, "51"),
        ("visa", build_auth(BLOCKED_PAN, 100), Reason.CARD_BLOCKED, "62"),
        ("visa", build_auth("4000000000000002", 100), Reason.UNKNOWN_CARD, "14"),
        ("visa", build_auth(APPROVAL_PAN, 100, currency="840"),
         Reason.CURRENCY_NOT_SUPPORTED, "57"),
        ("visa", build_auth(APPROVAL_PAN, 600_000), Reason.EXCEEDS_TRANSACTION_LIMIT, "61"),
        ("visa", build_auth(EMV_PAN, 100, currency="124", mcc="7995"),
         Reason.BLOCKED_MERCHANT_CATEGORY, "57"),
        ("visa", build_auth(APPROVAL_PAN, 0, mti="0200"), Reason.INVALID_AMOUNT, "13"),
        ("visa", build_auth(APPROVAL_PAN, 100, processing_code="300000"),
         Reason.INVALID_TRANSACTION, "12"),
        ("visa", build_auth(APPROVAL_PAN, 100, expiry="8702"), Reason.EXPIRED_CARD, "54"),
        ("visa", build_auth(APPROVAL_PAN, 100, cvv2="123", expiry="8701"),
         Reason.CVV2_MISMATCH, "N7"),
        ("mastercard", build_auth(APPROVAL_PAN, 100, cvv2="123", expiry="8701"),
         Reason.CVV2_MISMATCH, "05"),
        ("iso", build_auth(APPROVAL_PAN, 100, cvv2="123", expiry="8701"),
         Reason.CVV2_MISMATCH, "82"),
        ("visa", build_auth(APPROVAL_PAN, 100, track2=replace(APPROVAL_TRACK2,
         discretionary="1" + "0000" + "562" + "0000"), pos_entry_mode="901"),
         Reason.CVV_MISMATCH, "82"),
    ],
)  # fmt: skip
async def test_each_decline_is_its_reason_and_the_profiles_code(
    network: str, request_: AuthRequest, reason: Reason, code: str
) -> None:
    engine = await _engine(network=network)
    decision = await _auth(engine, request_)
    assert (decision.reason, decision.response_code) == (reason, code)
    assert decision.held == decision.debited == 0
    assert len(engine.store.journal) == 1  # the decline is journaled
    await _check_invariants(engine)


async def test_wrong_pins_then_lock_counted_by_the_commit_rules() -> None:
    engine = await _engine()
    wrong = encipher_pin("9999", APPROVAL_PAN, DEMO_ZPK)
    right = encipher_pin("1234", APPROVAL_PAN, DEMO_ZPK)
    reasons = [
        (await _auth(engine, build_auth(APPROVAL_PAN, 100, pin_block=block))).reason
        for block in (wrong, wrong, wrong, right)
    ]
    assert reasons == [
        Reason.WRONG_PIN,
        Reason.WRONG_PIN,
        Reason.PIN_TRIES_EXCEEDED,
        Reason.PIN_TRIES_EXCEEDED,  # locked: a right PIN is not even verified
    ]


async def test_velocity_decline_is_the_velocity_reason() -> None:
    engine = await _engine()
    first = await _auth(engine, build_auth(VELOCITY_PAN, 4000))
    second = await _auth(engine, build_auth(VELOCITY_PAN, 1500))
    assert (first.reason, second.reason) == (Reason.APPROVED, Reason.EXCEEDS_AMOUNT_VELOCITY)
    assert second.response_code == "61"


async def test_hsm_down_is_the_stand_in_policy_and_keeps_nothing() -> None:
    flaky: list[_Flaky] = []

    def wrap(hsm: Any) -> Any:
        flaky.append(_Flaky(hsm))
        return flaky[0]

    engine = await _engine(hsm_wrapper=wrap, pipeline=PipelineConfig(stand_in="system_error"))
    flaky[0].down = True
    request = build_auth(APPROVAL_PAN, 100, track2=APPROVAL_TRACK2, pos_entry_mode="901")
    decision = await _auth(engine, request)
    assert (decision.reason, decision.stand_in, decision.response_code) == (
        Reason.SYSTEM_ERROR,
        "hsm",
        "96",
    )
    assert engine.store.journal == []


async def test_budget_expiry_before_commit_is_stand_in(autojump_clock: trio.abc.Clock) -> None:
    flaky: list[_Flaky] = []

    def wrap(hsm: Any) -> Any:
        flaky.append(_Flaky(hsm))
        return flaky[0]

    engine = await _engine(hsm_wrapper=wrap, pipeline=PipelineConfig(budget=2.0))
    flaky[0].delay = 5.0
    t0 = trio.current_time()
    request = build_auth(APPROVAL_PAN, 100, track2=APPROVAL_TRACK2, pos_entry_mode="901")
    decision = await _auth(engine, request)
    assert trio.current_time() - t0 == pytest.approx(2.0)
    assert (decision.reason, decision.stand_in, decision.response_code) == (
        Reason.ISSUER_UNAVAILABLE,
        "budget",
        "91",
    )
    assert engine.store.journal == []


async def test_slow_store_not_yet_taken_is_withdrawn_at_the_budget(
    autojump_clock: trio.abc.Clock,
) -> None:
    engine = await _engine(pipeline=PipelineConfig(budget=2.0))
    engine.store.commit_delay = 10.0
    decision = await _auth(engine, build_auth(APPROVAL_PAN, 100))
    assert (decision.reason, decision.stand_in) == (Reason.ISSUER_UNAVAILABLE, "budget")
    assert engine.store.journal == []
    await _check_invariants(engine)


async def test_repeat_is_its_stored_answer_even_with_the_hsm_down() -> None:
    flaky: list[_Flaky] = []

    def wrap(hsm: Any) -> Any:
        flaky.append(_Flaky(hsm))
        return flaky[0]

    engine = await _engine(hsm_wrapper=wrap)
    request = build_auth(APPROVAL_PAN, 700, track2=APPROVAL_TRACK2, pos_entry_mode="901")
    first = await _auth(engine, request)
    flaky[0].down = True
    again = await _auth(engine, replace(request, mti="0101"))
    assert again.replayed and again.stand_in is None
    assert (again.reason, again.response_code) == (Reason.APPROVED, "00")
    assert isinstance(first.response, AuthResponse) and isinstance(again.response, AuthResponse)
    assert again.response.approval_code == first.response.approval_code
    assert await engine.store.active_holds_total("demo-acct-main") == 700
    await _check_invariants(engine)


async def test_reversal_releases_once_and_store_outage_is_stand_in() -> None:
    engine = await _engine()
    original = build_auth(APPROVAL_PAN, 700)
    await _auth(engine, original)
    ctx = context_for(engine.config)
    engine.store.unavailable = True
    down = await engine.pipeline.reverse(build_reversal(original), ctx)
    assert (down.reason, down.stand_in, down.response_code) == (
        Reason.ISSUER_UNAVAILABLE,
        "store",
        "91",
    )
    engine.store.unavailable = False
    reversal = build_reversal(original)
    done = await engine.pipeline.reverse(reversal, ctx)
    again = await engine.pipeline.reverse(replace(reversal, mti="0401"), ctx)
    assert (done.reason, done.released) == (Reason.REVERSAL_MATCHED, 700)
    assert again.replayed and again.released == 700  # the stored answer, nothing released twice
    assert await engine.store.active_holds_total("demo-acct-main") == 0
    await _check_invariants(engine)


async def test_advices_are_acknowledged_with_what_they_did() -> None:
    engine = await _engine()
    applied = await _auth(engine, build_auth(SMALL_PAN, 5000, mti="0120"))
    declined = await _auth(
        engine, replace(build_auth(SMALL_PAN, 5000, mti="0120"), response_code="05")
    )
    unknown = await _auth(engine, build_auth("4000000000000002", 100, mti="0220"))
    assert [d.reason for d in (applied, declined, unknown)] == [
        Reason.ADVICE_APPLIED,
        Reason.ADVICE_OF_DECLINE,
        Reason.ADVICE_UNKNOWN_CARD,
    ]
    assert [d.response_code for d in (applied, declined, unknown)] == ["00", "00", "00"]
    assert applied.held == 5000 and declined.held == 0
    # every answer matches its journal row
    assert [row.outcome.response_code for row in engine.store.journal] == ["00", "00", "00"]
    await _check_invariants(engine)


async def test_store_failure_during_lookup_is_stand_in() -> None:
    engine = await _engine()
    engine.store.unavailable = True
    decision = await _auth(engine, build_auth(APPROVAL_PAN, 100))
    assert (decision.reason, decision.stand_in) == (Reason.ISSUER_UNAVAILABLE, "store")


async def test_holds_expire_by_merchant_category_and_the_sweeper_releases_them_once() -> None:
    """A purchase hold lasts 7 days, a hotel's 30 (pinned clock); the sweeper gives each back
    once when its day comes, and a reversal after that releases nothing more."""
    from switch.sweeper import sweep_once
    from switch.testing import PINNED_NOW

    engine = await _engine()
    shop = build_auth(APPROVAL_PAN, 700, mcc="5411")
    hotel = build_auth(APPROVAL_PAN, 900, mcc="7011")
    for request in (shop, hotel):
        assert (await _auth(engine, request)).reason is Reason.APPROVED
    store = engine.store
    assert sorted(store.expiry.values()) == [
        (PINNED_NOW + timedelta(days=7)).isoformat(timespec="seconds"),
        (PINNED_NOW + timedelta(days=30)).isoformat(timespec="seconds"),
    ]
    assert await sweep_once(store, PINNED_NOW + timedelta(days=6), 100) == []
    week = await sweep_once(store, PINNED_NOW + timedelta(days=7), 100)
    assert [r.amount for r in week] == [700]
    assert await sweep_once(store, PINNED_NOW + timedelta(days=8), 100) == []
    reversed_late = await engine.pipeline.reverse(build_reversal(shop), context_for(engine.config))
    assert (reversed_late.reason, reversed_late.released) == (Reason.REVERSAL_MATCHED, 0)
    month = await sweep_once(store, PINNED_NOW + timedelta(days=31), 100)
    assert [r.amount for r in month] == [900]
    assert await store.active_holds_total("demo-acct-main") == 0
    await _check_invariants(engine)
