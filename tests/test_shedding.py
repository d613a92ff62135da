"""Load shedding at the connection (switch/connection.py admission) in front of the pipeline.

Caps set low, a burst above them: the excess is answered at once with the overload code,
what waited too long is answered at its start-by instant, no approval leaves after its
budget, every request is answered exactly once, and the journal and holds agree with the
answers. Memory streams and the autojump clock over the software engine (a slow HSM makes
every decision take a known time); one variant through the real TLS server.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import structlog
import trio
import trio.testing
from e2e_fixtures import running_switch

from hsm.pkcs11 import Pkcs11Hsm
from switch import metrics
from switch.acquirer import build_auth
from switch.client import Client
from switch.config import ListenerConfig, PipelineConfig, ServerConfig
from switch.connection import Connection
from switch.decisions import Profile, profile
from switch.handler import Dispatcher
from switch.pki import PkiPaths
from switch.provision import CardRow
from switch.testing import software_engine
from switch.wire import codec
from switch.wire.framing import FrameDecoder, encode_frame
from switch.wire.messages import AuthResponse, Track2

REPO = Path(__file__).resolve().parents[1]
PAN = "4123456789012345"
TRACK2 = Track2(PAN, "8701", "101", "1" + "0000" + "561" + "0000")
ACCOUNT = "demo-acct-main"
BUDGET = 1.0
MIN_REMAINING = 0.1
#: Seconds each CVV verification takes: three rounds of two fit the budget, the next not.
HSM_DELAY = 0.35


class SlowHsm:
    def __init__(self, hsm: Any) -> None:
        self._hsm = hsm

    def __getattr__(self, name: str) -> Any:
        inner = getattr(self._hsm, name)
        if not callable(inner) or name.startswith("_"):
            return inner

        async def command(*args: Any, **kwargs: Any) -> Any:
            await trio.sleep(HSM_DELAY)
            return await inner(*args, **kwargs)

        return command


class SlowCvv:
    """The real HSM, its CVV verifications each ``delay`` seconds slower."""

    def __init__(self, hsm: Pkcs11Hsm, delay: float) -> None:
        self._hsm = hsm
        self._delay = delay

    def __getattr__(self, name: str) -> Any:
        return getattr(self._hsm, name)

    async def verify_cvv(self, *args: Any) -> Any:
        await trio.sleep(self._delay)
        return await self._hsm.verify_cvv(*args)


def _rows() -> list[CardRow]:
    demo = json.loads((REPO / "config" / "demo" / "cards.json").read_text())["cards"]
    return [CardRow.from_mapping(r, f"row {i}") for i, r in enumerate(demo)]


async def _read_answers(
    stream: trio.abc.ReceiveStream,
    answers: list[tuple[float, dict[str, str]]],
    *wanted: tuple[int, trio.Event],
) -> None:
    """Decode the answers arriving on ``stream`` into ``answers`` (arrival time, fields);
    each ``(count, event)`` of ``wanted`` is set once ``count`` answers have come."""
    decoder = FrameDecoder("binary2", 65535)
    while data := await stream.receive_some(65536):
        for frame in decoder.feed(bytes(data)):
            answers.append((trio.current_time(), codec.decode_fields(frame)))
        for count, event in wanted:
            if len(answers) >= count:
                event.set()


def _sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def test_burst_above_the_caps_is_shed_at_once_and_nothing_is_lost(
    autojump_clock: trio.testing.MockClock,
) -> None:
    pipeline = PipelineConfig(budget=BUDGET, min_remaining=MIN_REMAINING)
    engine = await software_engine(_rows(), pipeline=pipeline, hsm_wrapper=SlowHsm)
    listener = ListenerConfig(name="shed", network="visa", max_in_flight=2, max_queued=5)
    shed_before = {k: _sample("cardswitch_shed_total", listener="shed", kind=k)
                   for k in ("queue_full", "deadline")}  # fmt: skip
    ours, theirs = trio.testing.memory_stream_pair()
    conn = Connection(
        ours, Dispatcher(engine.pipeline), listener, profile("visa"), linger=5.0,
        budget=BUDGET, min_remaining=MIN_REMAINING,
    )  # fmt: skip
    stans = [f"{i:06d}" for i in range(1, 13)]
    answers: list[tuple[float, dict[str, str]]] = []
    all_answered = trio.Event()

    with structlog.testing.capture_logs() as logs, trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run)
            nursery.start_soon(_read_answers, theirs, answers, (len(stans), all_answered))
            t0 = trio.current_time()
            burst = [
                build_auth(PAN, 100 + i, stan=s, track2=TRACK2, pos_entry_mode="901")
                for i, s in enumerate(stans)
            ]
            await theirs.send_all(b"".join(encode_frame(codec.encode(r)) for r in burst))
            await all_answered.wait()
            await theirs.send_eof()
    # Exactly one answer per request, none lost.
    assert sorted(a["11"] for _, a in answers) == stans
    by_stan = {a["11"]: (at - t0, a["39"]) for at, a in answers}
    lines = {e["stan"]: e for e in logs if e["event"] == "answered"}
    # 2 start at once, 5 wait, the other 5 are answered at once with the overload code.
    overload = [s for s in stans if lines[s]["reason"] == "system_overload"]
    at_once = [s for s in overload if by_stan[s][0] == 0]
    assert len(at_once) == 12 - 2 - 5
    assert all(by_stan[s][1] == "91" and lines[s]["stand_in_cause"] == "overload" for s in overload)
    # Rounds of two at 0, 0.35, 0.70 s; the 7th would start at 1.05: shed at its start-by.
    late = [s for s in overload if s not in at_once]
    assert [by_stan[s][0] for s in late] == [BUDGET - MIN_REMAINING]
    after = {k: _sample("cardswitch_shed_total", listener="shed", kind=k)
             for k in ("queue_full", "deadline")}  # fmt: skip
    assert after["queue_full"] - shed_before["queue_full"] == len(at_once)
    assert after["deadline"] - shed_before["deadline"] == len(late)
    # Nothing answered after its budget; no approval without its journal row and hold.
    assert max(t for t, _ in by_stan.values()) <= BUDGET
    approved = [s for s in stans if by_stan[s][1] == "00"]
    assert len(approved) == 4
    journal = {row.dup_key.stan: row for row in engine.store.journal}
    assert sorted(journal) == approved
    held = sum(100 + stans.index(s) for s in approved)
    assert await engine.store.active_holds_total(ACCOUNT) == held
    assert sum(h.remaining for h in engine.store.holds.values()) == held  # none held twice


async def test_overload_through_the_real_server(
    pki: PkiPaths,
    demo_hsm: Pkcs11Hsm,
    card_rows: list[Any],
    tmp_path: Path,
    client_ctx: ssl.SSLContext,
) -> None:
    """max_in_flight 1 and max_queued 1 with a slow HSM (and a queue wait long enough for the
    queued one): a burst of 6 on one link gets two decisions and four overload answers, each
    at once; the holds are the approvals."""

    track2 = replace(TRACK2, discretionary="1" + "0000" + "561")
    pipeline = PipelineConfig(budget=2.5, min_remaining=0.1)
    async with running_switch(
        pki, demo_hsm, card_rows, tmp_path, pipeline_hsm=SlowCvv(demo_hsm, 0.8), pipeline=pipeline,
        max_in_flight=1, max_queued=1, server=ServerConfig(max_queue_wait=2.0),
    ) as sw:  # fmt: skip
        async with Client.connect("127.0.0.1", sw.port, client_ctx) as client:
            results: dict[str, tuple[str, float]] = {}

            async def one(stan: str) -> None:
                t0 = trio.current_time()
                request = build_auth(PAN, 1000, stan=stan, track2=track2, pos_entry_mode="901")
                with trio.fail_after(10):
                    answer = await client.request(request)
                assert isinstance(answer, AuthResponse)
                results[stan] = (answer.response_code, trio.current_time() - t0)

            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(one, f"{i + 1:06d}")
        holds = await sw.store.active_holds_total(ACCOUNT)
    codes = sorted(code for code, _ in results.values())
    assert codes == ["00", "00", "91", "91", "91", "91"]
    approved = [s for s, (code, _) in results.items() if code == "00"]
    assert holds == 1000 * len(approved)
    slowest_decided = max(t for code, t in results.values() if code == "00")
    fastest_shed = min(t for code, t in results.values() if code == "91")
    assert fastest_shed < slowest_decided  # the excess did not wait for the decisions


async def test_once_service_times_are_known_the_excess_is_shed_on_arrival(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Two slots, decisions of 0.35 s, a 1 s budget: after one round has shown how long a
    decision takes, a burst of 12 gets 2 started, 2 queued (they start at 0.35 s and finish
    by 0.70 s), and the 8 that would finish after their budget behind them are answered 91
    on arrival, not at their start-by instant 0.9 s later, though the queue had room."""
    pipeline = PipelineConfig(budget=BUDGET, min_remaining=MIN_REMAINING)
    engine = await software_engine(_rows(), pipeline=pipeline, hsm_wrapper=SlowHsm)
    listener = ListenerConfig(name="forecast", network="visa", max_in_flight=2, max_queued=50)
    kinds = ("queue_full", "forecast", "deadline")
    shed_before = {k: _sample("cardswitch_shed_total", listener="forecast", kind=k) for k in kinds}
    ours, theirs = trio.testing.memory_stream_pair()
    conn = Connection(
        ours, Dispatcher(engine.pipeline), listener, profile("visa"), linger=5.0,
        budget=BUDGET, min_remaining=MIN_REMAINING,
    )  # fmt: skip
    warmup = ["000001", "000002"]
    stans = [f"{i:06d}" for i in range(3, 15)]
    answers: list[tuple[float, dict[str, str]]] = []
    got = {"warmup": trio.Event(), "burst": trio.Event()}

    def frames(numbers: list[str], first_amount: int) -> bytes:
        requests = [
            build_auth(PAN, first_amount + i, stan=s, track2=TRACK2, pos_entry_mode="901")
            for i, s in enumerate(numbers)
        ]
        return b"".join(encode_frame(codec.encode(r)) for r in requests)

    with structlog.testing.capture_logs() as logs, trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run)
            nursery.start_soon(
                _read_answers,
                theirs,
                answers,
                (len(warmup), got["warmup"]),
                (len(warmup) + len(stans), got["burst"]),
            )
            await theirs.send_all(frames(warmup, 50))
            await got["warmup"].wait()
            t0 = trio.current_time()
            await theirs.send_all(frames(stans, 100))
            await got["burst"].wait()
            await theirs.send_eof()
    burst = {a["11"]: (at - t0, a["39"]) for at, a in answers if a["11"] in stans}
    assert sorted(burst) == stans  # one answer each
    lines = {e["stan"]: e for e in logs if e["event"] == "answered"}
    overload = sorted(s for s in stans if lines[s]["reason"] == "system_overload")
    assert overload == stans[4:]
    assert all(burst[s] == (0, "91") and lines[s]["stand_in_cause"] == "overload" for s in overload)
    decided = {s: burst[s] for s in stans[:4]}
    assert all(code == "00" for _, code in decided.values())
    assert sorted(t for t, _ in decided.values()) == pytest.approx([0.35, 0.35, 0.70, 0.70])
    after = {k: _sample("cardswitch_shed_total", listener="forecast", kind=k) for k in kinds}
    assert {k: after[k] - shed_before[k] for k in kinds} == {
        "queue_full": 0, "forecast": 8, "deadline": 0,
    }  # fmt: skip
    # The money: the six approvals are journaled with their holds, nothing else is.
    approved = warmup + stans[:4]
    journal = {row.dup_key.stan: row for row in engine.store.journal}
    assert sorted(journal) == approved
    held = 50 + 51 + sum(100 + i for i in range(4))
    assert await engine.store.active_holds_total(ACCOUNT) == held
    assert sum(h.remaining for h in engine.store.holds.values()) == held


async def test_a_network_budget_shorter_than_the_pipeline_budget_bounds_the_queue_wait(
    pki: PkiPaths,
    demo_hsm: Pkcs11Hsm,
    card_rows: list[Any],
    tmp_path: Path,
    client_ctx: ssl.SSLContext,
) -> None:
    """The listener's network answers within 1 s, the pipeline's budget is 5 s: the request
    that cannot start within the network's budget less ``min_remaining`` is shed at that
    instant by the admission (kind "deadline"), not left queued until the pipeline's own
    deadline cuts it off, and nothing is answered after the network's budget."""
    network_budget, hsm_delay = 1.0, 0.8
    visa = profile("visa")
    short = Profile(
        visa.name, visa.table, original_match_rrn_terminal=visa.original_match_rrn_terminal,
        budget=network_budget, wire=visa.wire,
    )  # fmt: skip

    pipeline = PipelineConfig(budget=5.0, min_remaining=MIN_REMAINING)
    with pytest.MonkeyPatch.context() as patch:
        # The listener's network profile, as Server builds it, with its own budget.
        patch.setattr("switch.server.profile", lambda _network: short)
        holds, shed, results = await _three_behind_a_slow_hsm(
            running_switch(
                pki, demo_hsm, card_rows, tmp_path, pipeline_hsm=SlowCvv(demo_hsm, hsm_delay),
                pipeline=pipeline, max_in_flight=1, max_queued=4,
                server=ServerConfig(max_queue_wait=5.0),
            ),
            client_ctx,
        )  # fmt: skip
    # The first is decided in 0.8 s; the second starts then with 0.2 s left and is stood in
    # for at the budget; the third cannot start by 0.9 s and is shed then, by the admission.
    codes = {stan: code for stan, (code, _) in results.items()}
    assert codes == {"000001": "00", "000002": "91", "000003": "91"}
    assert shed == 1
    assert results["000003"][1] < results["000002"][1]
    assert max(t for _, t in results.values()) < network_budget + 0.25
    assert holds == 1000


async def _three_behind_a_slow_hsm(
    switch: Any, client_ctx: ssl.SSLContext
) -> tuple[int, float, dict[str, tuple[str, float]]]:
    """Three track-2 purchases sent in order on one link of ``switch`` (a running_switch);
    returns the account's holds, the deadline sheds counted and each STAN's DE39 and
    seconds to its answer."""
    track2 = replace(TRACK2, discretionary="1" + "0000" + "561")
    results: dict[str, tuple[str, float]] = {}
    async with switch as sw:
        listener = sw.config.listeners[0].name
        shed_before = _sample("cardswitch_shed_total", listener=listener, kind="deadline")
        async with Client.connect("127.0.0.1", sw.port, client_ctx) as client:

            async def one(stan: str) -> None:
                t0 = trio.current_time()
                request = build_auth(PAN, 1000, stan=stan, track2=track2, pos_entry_mode="901")
                with trio.fail_after(10):
                    answer = await client.request(request)
                assert isinstance(answer, AuthResponse)
                results[stan] = (answer.response_code, trio.current_time() - t0)

            async with trio.open_nursery() as nursery:
                for i in range(3):
                    nursery.start_soon(one, f"{i + 1:06d}")
                    await trio.sleep(0.01)  # in this order on the wire
        holds = await sw.store.active_holds_total(ACCOUNT)
        shed = _sample("cardswitch_shed_total", listener=listener, kind="deadline") - shed_before
    return holds, shed, results
