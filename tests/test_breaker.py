"""The circuit breaker state machine (switch/breaker.py), table-driven on an injected clock.

Each case is a script of steps: ``("at", t)`` moves the clock, ``("call", outcome, expect)``
asks for a permit (``expect`` is whether one is given) and, when given, ends the call with
``outcome`` ("ok", "fail" or "abandon"; "hold" keeps it in flight for a later
``("end", outcome)``), ``("state", State)`` checks the state.
"""

from __future__ import annotations

from typing import Any

import pytest

from switch import health, metrics
from switch.breaker import Breaker, Permit, State

CLOSED, OPEN, HALF = State.CLOSED, State.OPEN, State.HALF_OPEN


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _end(breaker: Breaker, permit: Permit, outcome: str) -> None:
    if outcome == "ok":
        breaker.succeeded(permit)
    elif outcome == "fail":
        breaker.failed(permit, "HsmUnavailable: token removed")
    else:
        assert outcome == "abandon"
        breaker.abandoned(permit)


CASES: dict[str, list[tuple[Any, ...]]] = {
    "three failures open it": [
        ("call", "fail", True), ("state", CLOSED),
        ("call", "fail", True), ("state", CLOSED),
        ("call", "fail", True), ("state", OPEN),
        ("call", "ok", False),
    ],
    "a success resets the count": [
        ("call", "fail", True), ("call", "fail", True), ("call", "ok", True),
        ("call", "fail", True), ("call", "fail", True), ("state", CLOSED),
        ("call", "fail", True), ("state", OPEN),
    ],
    "abandoned calls count for nothing": [
        ("call", "fail", True), ("call", "fail", True),
        ("call", "abandon", True), ("call", "abandon", True), ("state", CLOSED),
        ("call", "fail", True), ("state", OPEN),
    ],
    "open until the cool-down, then one probe closes it": [
        *[("call", "fail", True)] * 3,
        ("at", 9.99), ("state", OPEN), ("call", "ok", False),
        ("at", 10.0), ("state", HALF),
        ("call", "ok", True), ("state", CLOSED),
        ("call", "ok", True),
    ],
    "a failed probe opens it for another cool-down": [
        *[("call", "fail", True)] * 3,
        ("at", 10.0), ("call", "fail", True), ("state", OPEN),
        ("at", 19.9), ("call", "ok", False),
        ("at", 20.0), ("state", HALF), ("call", "ok", True), ("state", CLOSED),
    ],
    "one probe at a time": [
        *[("call", "fail", True)] * 3,
        ("at", 10.0), ("call", "hold", True),
        ("call", "ok", False), ("call", "ok", False), ("state", HALF),
        ("end", "ok"), ("state", CLOSED), ("call", "ok", True),
    ],
    "an abandoned probe lets the next call probe": [
        *[("call", "fail", True)] * 3,
        ("at", 10.0), ("call", "abandon", True), ("state", HALF),
        ("call", "ok", True), ("state", CLOSED),
    ],
    "late outcomes of calls admitted while closed change nothing once open": [
        ("call", "hold", True),
        *[("call", "fail", True)] * 3, ("state", OPEN),
        ("end", "ok"), ("state", OPEN),
        ("at", 10.0), ("state", HALF),
    ],
    "late failures while half-open do not reopen it": [
        ("call", "hold", True),
        *[("call", "fail", True)] * 3,
        ("at", 10.0), ("state", HALF), ("end", "fail"), ("state", HALF),
        ("call", "ok", True), ("state", CLOSED),
    ],
}  # fmt: skip


@pytest.mark.parametrize("script", CASES.values(), ids=CASES.keys())
def test_breaker_script(script: list[tuple[Any, ...]]) -> None:
    clock = Clock()
    changes: list[State] = []
    breaker = Breaker(
        "hsm", threshold=3, cool_down=10.0, clock=clock, on_change=lambda b: changes.append(b.state)
    )
    held: list[Permit] = []
    expected_changes: list[State] = []
    last = CLOSED
    for step in script:
        if step[0] == "at":
            clock.now = step[1]
        elif step[0] == "state":
            assert breaker.state is step[1], (step, breaker)
        elif step[0] == "call":
            _, outcome, admitted = step
            permit = breaker.admit()
            assert (permit is not None) is admitted, (step, breaker)
            if permit is not None:
                if outcome == "hold":
                    held.append(permit)
                else:
                    _end(breaker, permit, outcome)
        else:
            assert step[0] == "end"
            _end(breaker, held.pop(0), step[1])
        if breaker.state is not last:
            last = breaker.state
            expected_changes.append(last)
    # every change of state was reported once, in order
    assert changes == expected_changes


def test_describe_says_why_and_when() -> None:
    clock = Clock()
    breaker = Breaker("store", threshold=2, cool_down=5.0, clock=clock)
    assert breaker.describe() == "closed"
    for _ in range(2):
        permit = breaker.admit()
        assert permit is not None
        breaker.failed(permit, "StoreError: store unavailable: database is locked")
    clock.now = 2.0
    text = breaker.describe()
    assert text.startswith("open after 2 consecutive failures")
    assert "database is locked" in text and "probe in 3.0 s" in text
    clock.now = 5.0
    assert breaker.describe().startswith("half-open")


@pytest.mark.parametrize(("threshold", "cool_down"), [(0, 1.0), (1, 0.0), (1, -1.0)])
def test_bad_settings_are_refused(threshold: int, cool_down: float) -> None:
    with pytest.raises(ValueError):
        Breaker("hsm", threshold=threshold, cool_down=cool_down, clock=Clock())


async def test_an_open_breaker_is_not_ready_with_its_reason_and_in_the_gauge() -> None:
    clock = Clock()
    breaker = Breaker("vault", threshold=1, cool_down=5.0, clock=clock)
    probe = health.BreakerProbe(breaker)
    readiness = health.Readiness([probe.name])
    await health.check_once(readiness, [probe])
    assert readiness.state().ready
    assert _gauge("vault") == 0

    permit = breaker.admit()
    assert permit is not None
    breaker.failed(permit, "KmsUnavailable: throttled")
    await health.check_once(readiness, [probe])
    failed = readiness.state().failed
    assert list(failed) == ["vault_breaker"]
    assert failed["vault_breaker"].startswith("NotReady: open after 1 consecutive failures")
    assert "KmsUnavailable: throttled" in failed["vault_breaker"]
    assert _gauge("vault") == 1

    clock.now = 5.0  # half-open: still not ready, and the gauge says so without a request
    await health.check_once(readiness, [probe])
    assert readiness.state().failed["vault_breaker"].startswith("NotReady: half-open")
    assert _gauge("vault") == 2

    permit = breaker.admit()
    assert permit is not None and permit.probe
    breaker.succeeded(permit)
    await health.check_once(readiness, [probe])
    assert readiness.state().ready and _gauge("vault") == 0


def _gauge(dependency: str) -> float | None:
    return metrics.REGISTRY.get_sample_value("cardswitch_breaker_state", {"dependency": dependency})
