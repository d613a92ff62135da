"""``cardswitch serve`` with ``[server] workers = 2``: real processes, SoftHSM, SQLite, mutual TLS.

One supervisor and two workers on one shared port (SO_REUSEPORT), seeded like the crash test.
Connections are answered by both workers (the ``worker`` label of the supervisor's
/metrics); /healthz and /readyz are 200 with both up; SIGHUP reaches both (TLS reload);
under load (crash_support's mix of
authorizations, duplicates and reversals over several connections) one worker is killed with
SIGKILL: the supervisor starts it again and counts it, the other worker keeps answering, and
/readyz names the missing worker until it is back. SIGTERM to the supervisor drains both and
it exits 0. Then the SQLite file is checked against every answer the clients received
(``crash_support.check_database``: each approval journaled once, holds, reversals, and
available = ledger - active holds on every account).

The longer crash loop (many kills of either worker, and of both) is marked slow and runs
with ``CARDSWITCH_SLOW_TESTS=1``.
"""

from __future__ import annotations

import os
import random
import signal
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from crash_support import Exchange, Load, RoundStats, check_database, seed
from workers_support import (
    Supervised,
    by_worker,
    connections_by_worker,
    spread_connections,
    supervised,
    worker_pids,
    write_config,
)

from switch.acquirer import build_auth, echo
from switch.pki import PkiPaths
from switch.wire.messages import AuthResponse, NetworkResponse

#: A seeded card of crash_support with a large balance.
PAN = "4000002000000001"
#: Seconds for a killed worker to be started again and be ready.
RESTART_WITHIN = 30.0


async def _until(
    what: str, check: Callable[[], Awaitable[bool]], limit: float = RESTART_WITHIN
) -> None:
    """Poll ``check`` every 0.2 s until it is true; fail after ``limit`` s naming ``what``."""
    try:
        with trio.fail_after(limit):
            while True:
                if await check():
                    return
                await trio.sleep(0.2)
    except trio.TooSlowError:
        raise AssertionError(f"not {what} within {limit:g} s") from None


async def _answered_by_both(sup: Supervised, ctx: ssl.SSLContext, load: Load) -> None:
    """An echo and an authorization on connections spread over both workers (recorded in
    ``load`` for the database checks); each worker answered some."""
    async with spread_connections(sup, ctx, workers=2) as clients:
        with trio.fail_after(20):
            for i, client in enumerate(clients):
                assert isinstance(await client.request(echo()), NetworkResponse)
                request = build_auth(PAN, 100 + i, stan=load.new_stan())
                answer = await client.request(request)
                assert isinstance(answer, AuthResponse) and answer.response_code == "00"
                load.exchanges.append(Exchange(request, 0, answer))
    page = await sup.scrape()
    answered = by_worker(page, "cardswitch_requests_total")
    assert set(answered) == {"0", "1"}, answered
    assert all(n > 0 for n in answered.values()), answered
    assert sum(answered.values()) == 2 * len(clients)


async def _load_with_a_kill(
    sup: Supervised, ctx: ssl.SSLContext, load: Load, *, connections: int = 8
) -> Outage:
    """Load the switch, SIGKILL the worker holding most connections with requests in flight,
    keep loading until it is back (checking that /readyz names it meanwhile), load on fresh
    connections too, scrape /metrics, then SIGTERM the supervisor (every connection ends)."""
    stats = RoundStats(0)
    async with trio.open_nursery() as nursery:
        for _ in range(connections):
            nursery.start_soon(load._connection, sup.port, ctx, stats)
        await trio.sleep(1.0)
        held = await connections_by_worker(sup)
        victim = max(held, key=lambda w: held[w])
        old = (await worker_pids(sup))[victim]
        assert old is not None and held[victim] > 0, held
        with trio.move_on_after(5):
            while not load.in_flight:
                load._busy = trio.Event()  # set when a request goes in flight
                await load._busy.wait()
        stats.in_flight_at_kill = load.in_flight
        os.kill(old, signal.SIGKILL)
        at_kill = stats.answered
        named = False

        async def restarted() -> bool:
            nonlocal named
            status, body = await sup.get("/readyz")
            failed = body.get("failed")
            named = named or (status == 503 and f"worker {victim}" in str(failed))
            now = await worker_pids(sup)
            return status == 200 and now[victim] not in (None, old)

        await _until("restarted", restarted)
        during = stats.answered - at_kill
        for _ in range(4):  # fresh connections: the restarted worker takes its share
            nursery.start_soon(load._connection, sup.port, ctx, stats)
        await trio.sleep(1.5)
        page = await sup.scrape()
        sup.switch.process.send_signal(signal.SIGTERM)  # drains every connection: they end
    return Outage(stats, victim, old, during, named, page)


@dataclass(frozen=True)
class Outage:
    """What ``_load_with_a_kill`` saw."""

    stats: RoundStats
    victim: str
    old_pid: int
    #: Answers received between the kill and the victim being ready again.
    answered_meanwhile: int
    #: Whether /readyz was 503 naming the victim while it was down.
    named: bool
    #: /metrics just before SIGTERM.
    page: str


async def test_two_workers_share_the_port_survive_a_kill_and_drain(
    pki: PkiPaths, client_ctx: ssl.SSLContext, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, pki, workers=2)
    await seed(cfg, tmp_path)
    load = Load(random.Random(20_261_201))
    async with supervised(cfg, tmp_path, "a") as sup:
        first = await worker_pids(sup)
        assert set(first) == {"0", "1"} and all(first.values()), first
        assert sup.switch.ready.pid not in first.values()
        await _until("ready", lambda: _ready(sup))
        status, body = await sup.get("/healthz")
        assert status == 200 and body["alive"] is True

        await _answered_by_both(sup, client_ctx, load)

        # SIGHUP is passed on: each worker reloads its TLS files.
        sup.switch.process.send_signal(signal.SIGHUP)

        async def reloaded() -> bool:
            done = [e for e in sup.events() if e["event"] == "tls_reload" and e["ok"]]
            return sorted(e["worker"] for e in done) == [0, 1]  # type: ignore[type-var]

        await _until("reloaded by both workers", reloaded, limit=10)

        outage = await _load_with_a_kill(sup, client_ctx, load)
        with trio.fail_after(30):
            code = await sup.switch.process.wait()
    assert code == 0
    assert outage.answered_meanwhile > 0, "the other worker answered nothing meanwhile"
    assert outage.named, "/readyz did not name the killed worker while it was down"
    other = "1" if outage.victim == "0" else "0"
    restarts = by_worker(outage.page, "cardswitch_worker_restarts_total")
    assert restarts == {outage.victim: 1.0, other: 0.0}
    assert by_worker(outage.page, "cardswitch_worker_up") == {"0": 1.0, "1": 1.0}
    assert set(by_worker(outage.page, "process_cpu_seconds_total")) == {"0", "1", "supervisor"}

    events = sup.events()
    exits = [(e["worker"], e["status"]) for e in events if e["event"] == "worker_exited"]
    killed = (int(outage.victim), -signal.SIGKILL)
    assert sorted(exits) == sorted([killed, (0, 0), (1, 0)]), exits
    assert events[-1]["event"] == "exit"

    report = check_database(tmp_path / "cardswitch.db", load.exchanges)
    problems = "\n".join(report.violations[:40])
    assert not report.violations, f"{len(report.violations)} violations:\n{problems}"
    assert outage.stats.approvals > 0 and report.codes.get("51", 0) > 0, report.codes
    assert outage.stats.in_flight_at_kill > 0 and load.timeouts == 0


@pytest.mark.slow
@pytest.mark.skipif(
    not os.environ.get("CARDSWITCH_SLOW_TESTS"), reason="slow: set CARDSWITCH_SLOW_TESTS=1"
)
async def test_crash_loop_of_workers_keeps_every_answer(
    pki: PkiPaths, client_ctx: ssl.SSLContext, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path, pki, workers=2)
    await seed(cfg, tmp_path)
    rng = random.Random(20_261_202)
    load = Load(rng)
    total_during = 0
    for number in range(6):
        async with supervised(cfg, tmp_path, f"loop{number}") as sup:
            await _until("ready", lambda: _ready(sup))
            outage = await _load_with_a_kill(sup, client_ctx, load)
            total_during += outage.answered_meanwhile
            with trio.fail_after(30):
                assert await sup.switch.process.wait() == 0
    report = check_database(tmp_path / "cardswitch.db", load.exchanges)
    problems = "\n".join(report.violations[:40])
    assert not report.violations, f"{len(report.violations)} violations:\n{problems}"
    assert total_during > 0 and load.timeouts == 0


async def _ready(sup: Supervised) -> bool:
    status, _ = await sup.get("/readyz")
    return status == 200
