"""Regressions of the house refactor, each through the real server (mutual TLS, SoftHSM,
SQLite): the reason a request is logged with is the one that decided it, a repeat is
answered with its committed answer whatever the HSM does, and a reversal the store cannot
take is answered by the stand-in policy (not as a switch defect).
"""

from __future__ import annotations

import json
import ssl
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
from e2e_fixtures import Switch, cvn10_request, running_switch

from hsm.errors import HsmUnavailable
from hsm.pkcs11 import Pkcs11Hsm
from switch.acquirer import build_auth, build_reversal
from switch.client import Client
from switch.pki import PkiPaths
from switch.store.models import StoreError
from switch.wire.messages import AuthResponse, ReversalResponse

VELOCITY_PAN = "4000001234567899"  # 2 a day, 50.00 a day
APPROVAL_PAN = "4123456789012345"


async def _ask(port: int, ctx: ssl.SSLContext, *messages: Any) -> list[Any]:
    async with Client.connect("127.0.0.1", port, ctx) as client:
        with trio.fail_after(10):
            return [await client.request(m) for m in messages]


def _answered(sw: Switch) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in sw.log.getvalue().splitlines() if line.strip()]
    return [line for line in lines if line.get("event") == "answered"]


class _FailingArqc:
    """The real HSM, except that ARQC verification fails once ``down`` is set."""

    def __init__(self, hsm: Pkcs11Hsm) -> None:
        self._hsm = hsm
        self.down = False
        self.delay = 0.0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._hsm, name)

    async def verify_arqc(self, req: Any) -> Any:
        if self.delay:
            await trio.sleep(self.delay)
        if self.down:
            raise HsmUnavailable("token removed")
        return await self._hsm.verify_arqc(req)


class _ReversalsFail:
    """The real store, except that reversals cannot be committed (the database is down)."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def commit_reversal(self, intent: Any, *, deadline: float | None = None) -> Any:
        raise StoreError("unavailable", "disk I/O error")


@pytest.mark.parametrize("network", ["visa", "mastercard"])
async def test_log_names_the_reason_the_commit_rules_decided(  # noqa: PLR0917
    pki: PkiPaths,
    demo_hsm: Pkcs11Hsm,
    card_rows: list[Any],
    tmp_path: Path,
    client_ctx: ssl.SSLContext,
    network: str,
) -> None:
    """61 from velocity is logged as velocity, 05 from an earlier reversal as such, an advice
    of a network decline as ``advice_of_decline`` (before: the first reason of the code)."""
    original = build_auth(APPROVAL_PAN, 700, stan="000777")
    reversal = build_reversal(original)
    declined_advice = replace(build_auth(APPROVAL_PAN, 900, mti="0120"), response_code="05")
    async with running_switch(pki, demo_hsm, card_rows, tmp_path, network=network) as sw:
        answers = await _ask(
            sw.port, client_ctx,
            build_auth(VELOCITY_PAN, 4000), build_auth(VELOCITY_PAN, 1500),
            reversal, original, declined_advice,
        )  # fmt: skip
        held = await sw.store.active_holds_total("demo-acct-main")
        lines = _answered(sw)
    assert [a.response_code for a in answers] == ["00", "61", "00", "05", "00"]
    assert [line["reason"] for line in lines] == [
        "approved",
        "exceeds_amount_velocity",
        "reversal_unmatched",
        "original_already_reversed",
        "advice_of_decline",
    ]
    assert [line["response_code"] for line in lines] == ["00", "61", "00", "05", "00"]
    assert held == 0


async def test_repeat_gets_its_committed_answer_when_the_hsm_fails(
    pki: PkiPaths,
    demo_hsm: Pkcs11Hsm,
    card_rows: list[Any],
    tmp_path: Path,
    client_ctx: ssl.SSLContext,
) -> None:
    """A chip repeat whose ARPC cannot be recomputed (HSM down, or slower than the budget)
    is still answered 00 with the first approval code, without DE55; never 91."""
    hsm = _FailingArqc(demo_hsm)
    request = cvn10_request()
    async with running_switch(pki, demo_hsm, card_rows, tmp_path, pipeline_hsm=hsm) as sw:
        (first,) = await _ask(sw.port, client_ctx, request)
        hsm.down = True
        (down,) = await _ask(sw.port, client_ctx, replace(request, mti="0101"))
        hsm.down, hsm.delay = False, 5.0
        (slow,) = await _ask(sw.port, client_ctx, replace(request, mti="0101"))
        available = (await sw.store.get_account("demo-acct-emv")).available_balance  # type: ignore[union-attr]
    assert isinstance(first, AuthResponse) and first.response_code == "00" and first.emv
    for again in (down, slow):
        assert isinstance(again, AuthResponse)
        assert (again.response_code, again.approval_code) == ("00", first.approval_code)
        assert again.emv is None
    assert available == 500_000 - 4000  # one hold


async def test_reversal_the_store_cannot_take_gets_the_stand_in_answer(
    pki: PkiPaths,
    demo_hsm: Pkcs11Hsm,
    card_rows: list[Any],
    tmp_path: Path,
    client_ctx: ssl.SSLContext,
) -> None:
    """A store outage during an 0400 is answered by the stand-in policy (91), as an
    authorization would be, not 96 as a switch defect; and nothing is released."""
    original = build_auth(APPROVAL_PAN, 700, stan="000888")
    async with running_switch(pki, demo_hsm, card_rows, tmp_path) as sw:
        (approved,) = await _ask(sw.port, client_ctx, original)
    async with running_switch(
        pki, demo_hsm, card_rows, tmp_path / "down", pipeline_store=_ReversalsFail
    ) as sw:
        (answer,) = await _ask(sw.port, client_ctx, build_reversal(original))
        lines = _answered(sw)
    assert approved.response_code == "00"
    assert isinstance(answer, ReversalResponse) and answer.response_code == "91"
    assert lines[-1]["reason"] == "issuer_unavailable"
    assert lines[-1]["stand_in_cause"] == "store"
