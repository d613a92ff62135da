"""The latency budget: a slow or failing HSM gets the stand-in answer, and nothing is held."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import trio
from e2e_fixtures import running_switch

from hsm.errors import HsmUnavailable
from hsm.pkcs11 import Pkcs11Hsm
from switch.acquirer import build_auth
from switch.client import Client
from switch.config import PipelineConfig
from switch.pki import PkiPaths
from switch.wire.messages import AuthResponse, Track2

PAN = "4123456789012345"
TRACK2 = Track2(PAN, "8701", "101", "1" + "0000" + "561")


class _SlowCvv:
    """The real HSM, except that CVV verification takes ``delay`` seconds."""

    def __init__(self, hsm: Pkcs11Hsm, delay: float) -> None:
        self._hsm = hsm
        self._delay = delay

    def __getattr__(self, name: str) -> Any:
        return getattr(self._hsm, name)

    async def verify_cvv(self, *args: Any) -> Any:
        await trio.sleep(self._delay)
        return await self._hsm.verify_cvv(*args)


class _DownCvv(_SlowCvv):
    async def verify_cvv(self, *args: Any) -> Any:
        raise HsmUnavailable("token removed")


async def _one(port: int, ctx: ssl.SSLContext) -> AuthResponse:
    async with Client.connect("127.0.0.1", port, ctx) as client:
        with trio.fail_after(10):
            answer = await client.request(
                build_auth(PAN, 1000, track2=TRACK2, pos_entry_mode="901")
            )
    assert isinstance(answer, AuthResponse)
    return answer


async def test_budget_expiry_answers_stand_in_and_holds_nothing(
    pki: PkiPaths,
    demo_hsm: Pkcs11Hsm,
    card_rows: list[Any],
    tmp_path: Path,
    client_ctx: ssl.SSLContext,
) -> None:
    slow = _SlowCvv(demo_hsm, delay=3.0)
    budget = PipelineConfig(budget=0.3, stand_in="issuer_unavailable")
    async with running_switch(
        pki,
        demo_hsm,
        card_rows,
        tmp_path,
        pipeline_hsm=slow,
        pipeline=budget,
    ) as sw:
        t0 = trio.current_time()
        answer = await _one(sw.port, client_ctx)
        elapsed = trio.current_time() - t0
        account = await sw.store.get_account("demo-acct-main")
        holds = await sw.store.active_holds_total("demo-acct-main")
    assert answer.response_code == "91" and answer.approval_code is None
    assert elapsed < 2.5  # answered at the budget (0.3 s), not when the HSM replies (3 s)
    assert account is not None and account.available_balance == 1_000_000
    assert holds == 0


async def test_hsm_unavailable_answers_91_and_holds_nothing(
    pki: PkiPaths,
    demo_hsm: Pkcs11Hsm,
    card_rows: list[Any],
    tmp_path: Path,
    client_ctx: ssl.SSLContext,
) -> None:
    down = _DownCvv(demo_hsm, delay=0)
    async with running_switch(
        pki,
        demo_hsm,
        card_rows,
        tmp_path,
        pipeline_hsm=down,
    ) as sw:
        answer = await _one(sw.port, client_ctx)
        account = await sw.store.get_account("demo-acct-main")
    assert answer.response_code == "91"
    assert account is not None and account.available_balance == 1_000_000


class _SlowHsm:
    """The real HSM behind a latency: every command first waits ``delay`` seconds.

    Counts the commands started, the ones cancelled while waiting (the pipeline gave up at
    its budget) and the ones that reached the token.
    """

    def __init__(self, hsm: Pkcs11Hsm, delay: float) -> None:
        self._hsm = hsm
        self.delay = delay
        self.started = self.cancelled = self.reached = 0

    def __getattr__(self, name: str) -> Any:
        command = getattr(self._hsm, name)

        async def slowed(*args: Any) -> Any:
            self.started += 1
            try:
                await trio.sleep(self.delay)
            except trio.Cancelled:
                self.cancelled += 1
                raise
            self.reached += 1
            return await command(*args)

        return slowed


async def test_a_slow_hsm_under_load_gets_the_stand_in_answer_and_holds_nothing(
    pki: PkiPaths,
    demo_hsm: Pkcs11Hsm,
    card_rows: list[Any],
    tmp_path: Path,
    client_ctx: ssl.SSLContext,
) -> None:
    """Eight requests in flight against an HSM slower than any test: each is answered with
    the stand-in code while its HSM command is still waiting (so within the budget, not when
    the HSM would have replied), nothing is held, the HSM breaker opens, and once the latency
    is gone and the breaker's cool-down has passed the same switch approves again."""
    slow = _SlowHsm(demo_hsm, delay=3600.0)
    budget = PipelineConfig(budget=0.3, stand_in="issuer_unavailable", breaker_cool_down=0.5)
    async with running_switch(
        pki, demo_hsm, card_rows, tmp_path, pipeline_hsm=slow, pipeline=budget
    ) as sw:
        answers: list[AuthResponse] = []
        async with Client.connect("127.0.0.1", sw.port, client_ctx) as client:

            async def one() -> None:
                request = build_auth(PAN, 1000, track2=TRACK2, pos_entry_mode="901")
                with trio.fail_after(10):
                    answer = await client.request(request)
                assert isinstance(answer, AuthResponse)
                answers.append(answer)

            async with trio.open_nursery() as nursery:  # eight in flight on one connection
                for _ in range(8):
                    nursery.start_soon(one)
        assert slow.reached == 0 and slow.cancelled == slow.started >= 8
        account = await sw.store.get_account("demo-acct-main")
        holds = await sw.store.active_holds_total("demo-acct-main")
        slow.delay = 0
        await trio.sleep(0.6)  # the breaker half-opens: the next request probes the HSM
        recovered = await _one(sw.port, client_ctx)
        holds_after = await sw.store.active_holds_total("demo-acct-main")
    assert [a.response_code for a in answers] == ["91"] * 8
    assert all(a.approval_code is None for a in answers)
    assert account is not None and account.available_balance == 1_000_000
    assert holds == 0
    assert recovered.response_code == "00" and slow.reached >= 1
    assert holds_after == 1000
