"""The issuer stand-in policy and the breakers, on the pipeline over the software engine.

An HSM wrapper fails or stalls on purpose; every answer is checked against the in-memory
journal and holds (what was answered is what was kept), and the breakers against the
``cardswitch_breaker_state`` gauge. Time is the autojump clock where a budget matters.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio

from hsm.errors import HsmUnavailable
from switch import metrics
from switch.acquirer import build_auth, encipher_pin
from switch.breaker import State
from switch.config import ListenerConfig, PipelineConfig
from switch.decisions import Reason
from switch.handler import Decision
from switch.provision import CardRow
from switch.testing import SoftwareEngine, context_for, software_engine
from switch.wire.messages import AuthRequest, AuthResponse, Track2

REPO = Path(__file__).resolve().parents[1]
PAN = "4123456789012345"  # CVV 561 for 8701/101; PIN 1234
TRACK2 = Track2(PAN, "8701", "101", "1" + "0000" + "561" + "0000")
BLOCKED_PAN = "4333322221111222"
BLOCKED_TRACK2 = Track2(BLOCKED_PAN, "9307", "141", "1" + "0000" + "382" + "0000")
ZPK = "0123456789ABCDEFFEDCBA9876543210"
ACCOUNT = "demo-acct-main"


class FlakyHsm:
    """The software HSM whose commands fail (``down``) or take ``delay`` seconds; counts
    the commands that reached it."""

    def __init__(self, hsm: Any) -> None:
        self._hsm = hsm
        self.down = False
        self.delay = 0.0
        self.calls = 0

    def __getattr__(self, name: str) -> Any:
        inner = getattr(self._hsm, name)
        if not callable(inner) or name.startswith("_"):
            return inner

        async def command(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.delay:
                await trio.sleep(self.delay)
            if self.down:
                raise HsmUnavailable("token removed")
            return await inner(*args, **kwargs)

        return command


def _rows() -> list[CardRow]:
    demo = json.loads((REPO / "config" / "demo" / "cards.json").read_text())["cards"]
    return [CardRow.from_mapping(r, f"row {i}") for i, r in enumerate(demo)]


async def _engine(
    *, pipeline: PipelineConfig | None = None, **listener: Any
) -> tuple[SoftwareEngine, FlakyHsm]:
    wrappers: list[FlakyHsm] = []

    def wrap(hsm: Any) -> Any:
        wrappers.append(FlakyHsm(hsm))
        return wrappers[0]

    engine = await software_engine(_rows(), hsm_wrapper=wrap, pipeline=pipeline)
    if listener:
        lst = replace(engine.config.listeners[0], **listener)
        engine.config = replace(engine.config, listeners=(lst,))
    return engine, wrappers[0]


LOW_RISK: dict[str, Any] = {
    "stand_in": "approve_low_risk",
    "stand_in_max_amount": 5000,
    "stand_in_daily_amount": 8000,
}


def _req(stan: str, amount: int, **kwargs: Any) -> AuthRequest:
    kwargs.setdefault("track2", TRACK2)
    return build_auth(PAN, amount, stan=stan, pos_entry_mode="901", **kwargs)


async def _auth(engine: SoftwareEngine, request: AuthRequest) -> Decision:
    return await engine.pipeline.authorize(request, context_for(engine.config))


async def _agree(engine: SoftwareEngine, answers: dict[str, Decision]) -> None:
    """Every answer is its journal row (or there is none and nothing was kept), and the
    holds are exactly the approved answers' amounts."""
    store = engine.store
    rows = {row.dup_key.stan: row for row in store.journal}
    held = 0
    for stan, decision in answers.items():
        row = rows.get(stan)
        if row is None:
            assert decision.stand_in is not None, stan  # only an un-kept stand-in answer
            assert decision.response_code != "00", stan
            continue
        assert row.outcome.response_code == decision.response_code, stan
        hold = store.holds.get(row.id)
        if decision.response_code == "00":
            assert hold is not None and hold.remaining == row.amount == decision.held, stan
            held += hold.remaining
        else:
            assert hold is None, stan
    assert set(rows) <= set(answers)
    assert await store.active_holds_total(ACCOUNT) == held
    account = store.accounts[ACCOUNT]
    assert account.available_balance == account.ledger_balance - held


def _state(engine: SoftwareEngine, dependency: str) -> State:
    return engine.pipeline.breakers[dependency].state


def _gauge(dependency: str) -> float | None:
    return metrics.REGISTRY.get_sample_value("cardswitch_breaker_state", {"dependency": dependency})


async def test_low_risk_is_approved_in_stand_in_journaled_with_its_hold() -> None:
    engine, hsm = await _engine(**LOW_RISK)
    hsm.down = True
    before = (
        metrics.REGISTRY.get_sample_value(
            "cardswitch_stand_in_approvals_total", {"network": "visa"}
        )
        or 0.0
    )
    decision = await _auth(engine, _req("000001", 2500))
    assert (decision.reason, decision.response_code, decision.stand_in) == (
        Reason.APPROVED, "00", "hsm",
    )  # fmt: skip
    assert isinstance(decision.response, AuthResponse) and decision.response.approval_code
    (row,) = engine.store.journal
    assert row.stand_in and row.kind == "hold" and row.outcome.response_code == "00"
    after = metrics.REGISTRY.get_sample_value(
        "cardswitch_stand_in_approvals_total", {"network": "visa"}
    )
    assert after == before + 1
    await _agree(engine, {"000001": decision})


@pytest.mark.parametrize(
    ("why", "request_"),
    [
        ("over the limit", _req("000001", 5001)),
        ("a PIN to check", _req("000001", 100, pin_block=encipher_pin("1234", PAN, ZPK))),
        ("a CVV2 to check", _req("000001", 100, cvv2="561", expiry="8701")),
        ("a blocked MCC", _req("000001", 100, mcc="7995")),
    ],
)  # fmt: skip
async def test_what_is_not_low_risk_is_declined_and_kept_nowhere(
    why: str, request_: AuthRequest
) -> None:
    engine, hsm = await _engine(**LOW_RISK)
    hsm.down = True
    if why == "a blocked MCC":  # the demo approval card blocks none: block one
        card = next(c for c in engine.store.cards.values() if c.account_id == ACCOUNT)
        controls = replace(card.controls, blocked_mccs=frozenset({"7995"}))
        engine.store.cards[card.id] = replace(card, controls=controls)
    decision = await _auth(engine, request_)
    assert (decision.reason, decision.response_code, decision.stand_in) == (
        Reason.ISSUER_UNAVAILABLE, "91", "hsm",
    )  # fmt: skip
    assert engine.store.journal == []
    await _agree(engine, {"000001": decision})


async def test_a_blocked_card_is_declined_as_always() -> None:
    engine, hsm = await _engine(**LOW_RISK)
    hsm.down = True
    request = build_auth(BLOCKED_PAN, 100, track2=BLOCKED_TRACK2, pos_entry_mode="901")
    decision = await _auth(engine, request)
    assert (decision.reason, decision.response_code, decision.stand_in) == (
        Reason.CARD_BLOCKED, "62", None,
    )  # fmt: skip


async def test_daily_allowance_is_counted_by_the_commit() -> None:
    engine, hsm = await _engine(**LOW_RISK)
    hsm.down = True
    answers = {}
    for stan, amount in (("000001", 5000), ("000002", 3000), ("000003", 1)):
        answers[stan] = await _auth(engine, _req(stan, amount))
    assert [d.response_code for d in answers.values()] == ["00", "00", "91"]
    assert answers["000003"].stand_in == "hsm"
    # the third is journaled as a stand-in decline (the commit decided it), with no hold
    assert [(r.stand_in, r.outcome.reason) for r in engine.store.journal] == [
        (True, Reason.APPROVED), (True, Reason.APPROVED), (True, Reason.ISSUER_UNAVAILABLE),
    ]  # fmt: skip
    await _agree(engine, answers)


async def test_decline_policy_declines_with_the_stand_in_reason() -> None:
    engine, hsm = await _engine()
    hsm.down = True
    decision = await _auth(engine, _req("000001", 100))
    assert (decision.response_code, decision.stand_in) == ("91", "hsm")
    assert engine.store.journal == []


async def test_store_down_is_a_decline_whatever_the_policy() -> None:
    engine, hsm = await _engine(**LOW_RISK)
    hsm.down = True
    engine.store.unavailable = True
    decision = await _auth(engine, _req("000001", 100))
    assert (decision.response_code, decision.stand_in) == ("91", "store")
    engine.store.unavailable = False
    assert engine.store.journal == []


async def test_breaker_opens_answers_at_once_then_a_probe_closes_it(
    autojump_clock: trio.abc.Clock,
) -> None:
    pipeline = PipelineConfig(breaker_failures=3, breaker_cool_down=5.0)
    engine, hsm = await _engine(pipeline=pipeline, **LOW_RISK)
    hsm.down = True
    answers: dict[str, Decision] = {}
    for i in range(3):
        answers[f"00000{i}"] = await _auth(engine, _req(f"00000{i}", 100))
    assert _state(engine, "hsm") is State.OPEN
    assert _gauge("hsm") == 1
    calls = hsm.calls
    t0 = trio.current_time()
    answers["000010"] = await _auth(engine, _req("000010", 100))
    assert trio.current_time() == t0 and hsm.calls == calls  # not called: answered at once
    assert answers["000010"].response_code == "00" and answers["000010"].stand_in == "hsm"
    hsm.down = False
    await trio.sleep(5.0)
    assert _state(engine, "hsm") is State.HALF_OPEN
    assert _gauge("hsm") == 2
    answers["000011"] = await _auth(engine, _req("000011", 100))  # the probe
    assert answers["000011"].stand_in is None and answers["000011"].response_code == "00"
    assert _state(engine, "hsm") is State.CLOSED and _gauge("hsm") == 0
    await _agree(engine, answers)
    assert [r.stand_in for r in engine.store.journal] == [True] * 4 + [False]


async def test_slow_hsm_answers_within_the_budget_and_opens_the_breaker(
    autojump_clock: trio.abc.Clock,
) -> None:
    pipeline = PipelineConfig(budget=1.0, breaker_failures=2, breaker_cool_down=30.0)
    engine, hsm = await _engine(pipeline=pipeline, **LOW_RISK)
    hsm.delay = 10.0
    answers: dict[str, Decision] = {}
    for i in range(4):
        t0 = trio.current_time()
        decision = await _auth(engine, _req(f"00000{i}", 100))
        elapsed = trio.current_time() - t0
        answers[f"00000{i}"] = decision
        if i < 2:  # the budget ran out while waiting for the HSM: a timeout of the HSM
            assert elapsed == pytest.approx(1.0)
            assert (decision.response_code, decision.stand_in) == ("91", "budget")
        else:  # the breaker is open: stand-in approval at once, no HSM call
            assert elapsed == 0
            assert (decision.response_code, decision.stand_in) == ("00", "hsm")
    assert _state(engine, "hsm") is State.OPEN
    await _agree(engine, answers)


async def test_store_failures_open_the_store_breaker(autojump_clock: trio.abc.Clock) -> None:
    engine, _hsm = await _engine(pipeline=PipelineConfig(breaker_failures=2))
    engine.store.unavailable = True
    for i in range(2):
        decision = await _auth(engine, _req(f"00000{i}", 100))
        assert decision.stand_in == "store"
    assert _state(engine, "store") is State.OPEN and _gauge("store") == 1
    engine.store.unavailable = False  # back, but the breaker holds until its cool-down
    refused = await _auth(engine, _req("000009", 100))
    assert (refused.response_code, refused.stand_in) == ("91", "store")
    assert engine.store.journal == []
    await trio.sleep(PipelineConfig().breaker_cool_down)
    probe = await _auth(engine, _req("000010", 100))
    assert probe.response_code == "00" and _state(engine, "store") is State.CLOSED


def test_listener_policy_keys_are_checked() -> None:
    from switch.config import ConfigError, from_mapping

    with pytest.raises(ConfigError, match="stand_in_max_amount"):
        from_mapping({"listener": [{"stand_in": "approve_low_risk"}]})
    cfg = from_mapping({"listener": [{"stand_in": "approve_low_risk", "stand_in_max_amount": 1}]})
    assert cfg.listeners[0] == ListenerConfig(stand_in="approve_low_risk", stand_in_max_amount=1)
