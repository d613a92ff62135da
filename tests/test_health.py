"""switch.health in-process: the HTTP port over real sockets on 127.0.0.1, probes as fakes.

The HTTP side runs in its own thread, so these tests talk to it with urllib from a worker
thread while the trio loop runs the probes, or is deliberately left without heartbeats.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from hsm.errors import HsmTimeout, HsmUnavailable
from switch import health, metrics

#: Seconds one HTTP request may take.
HTTP_TIMEOUT = 10.0


@dataclass
class FakeClock:
    now: float = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeHsm:
    """``key_check_value`` that fails with ``error`` when set; records the labels asked."""

    error: Exception | None = None
    hang: bool = False
    asked: list[str] = field(default_factory=list)

    async def key_check_value(self, label: str) -> str:
        self.asked.append(label)
        if self.hang:
            await trio.sleep_forever()
        if self.error is not None:
            raise self.error
        return "ABC123"


@dataclass
class FakeStore:
    asked: list[str] = field(default_factory=list)

    async def get_account(self, account_id: str) -> Any:
        self.asked.append(account_id)


@dataclass
class FakeServer:
    bound: list[tuple[str, str, int]] = field(default_factory=list)
    draining: bool = False


@dataclass
class Reply:
    status: int
    body: bytes
    content_type: str

    def json(self) -> Any:
        return json.loads(self.body)


def get(port: int, path: str) -> Reply:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=HTTP_TIMEOUT) as resp:
            return Reply(resp.status, resp.read(), resp.headers["Content-Type"])
    except urllib.error.HTTPError as err:
        return Reply(err.code, err.read(), err.headers["Content-Type"])


async def aget(port: int, path: str) -> Reply:
    return await trio.to_thread.run_sync(get, port, path)


@contextmanager
def http_server(
    heartbeat: health.Heartbeat, readiness: health.Readiness, stale_after: float = 3.0
) -> Iterator[int]:
    server = health.HealthServer("127.0.0.1", 0, heartbeat, readiness, stale_after=stale_after)
    server.start()
    try:
        yield server.address[1]
    finally:
        server.close()


async def test_readyz_names_the_failing_hsm_and_recovers() -> None:
    hsm = FakeHsm(error=HsmUnavailable("token not present"))
    store = FakeStore()
    listeners = FakeServer(bound=[("visa", "127.0.0.1", 8583)])
    probes: list[health.Probe] = [
        health.ListenersProbe(listeners, frozenset({"visa"})),
        health.HsmProbe(hsm, "demo-zpk"),
        health.StoreProbe(store),
    ]
    readiness = health.Readiness(p.name for p in probes)
    with http_server(health.Heartbeat(), readiness) as port:
        before = await aget(port, "/readyz")
        assert before.status == 503  # nothing checked yet
        assert set(before.json()["failed"]) == {"listeners", "hsm", "store"}

        await health.check_once(readiness, probes)
        reply = await aget(port, "/readyz")
        assert reply.status == 503
        assert reply.content_type == "application/json"
        assert reply.json() == {
            "ready": False,
            "failed": {"hsm": "HsmUnavailable: token not present"},
        }
        assert hsm.asked == ["demo-zpk"] and store.asked == [health.READY_ACCOUNT]
        assert metrics.REGISTRY.get_sample_value("cardswitch_ready_check", {"check": "hsm"}) == 0

        hsm.error = None
        await health.check_once(readiness, probes)
        assert (await aget(port, "/readyz")).json() == {"ready": True, "failed": {}}
        assert (await aget(port, "/readyz")).status == 200
        assert metrics.REGISTRY.get_sample_value("cardswitch_ready_check", {"check": "hsm"}) == 1


async def test_a_probe_that_hangs_fails_at_its_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    probes: list[health.Probe] = [health.HsmProbe(FakeHsm(hang=True), "zpk")]
    readiness = health.Readiness(["hsm"])
    await health.check_once(readiness, probes, probe_timeout=1.5)
    assert readiness.state().failed == {"hsm": "Timeout: no answer within 1.5 s"}


async def test_probe_errors_are_one_line_type_and_message() -> None:
    probes: list[health.Probe] = [health.HsmProbe(FakeHsm(error=HsmTimeout("slow\nline")), "k")]
    readiness = health.Readiness(["hsm"])
    await health.check_once(readiness, probes)
    assert readiness.state().failed == {"hsm": "HsmTimeout: slow line"}


async def test_listeners_not_bound_or_draining_are_not_ready() -> None:
    server = FakeServer(bound=[("visa", "127.0.0.1", 1)])
    probe = health.ListenersProbe(server, frozenset({"visa", "mc"}))
    readiness = health.Readiness(["listeners"])
    await health.check_once(readiness, [probe])
    assert readiness.state().failed == {"listeners": "NotReady: not bound: mc"}
    server.bound.append(("mc", "127.0.0.1", 2))
    await health.check_once(readiness, [probe])
    assert readiness.state().ready
    server.draining = True
    await health.check_once(readiness, [probe])
    assert readiness.state().failed["listeners"].startswith("NotReady: draining")


async def test_healthz_follows_the_heartbeat_and_metrics_still_answer() -> None:
    clock = FakeClock()
    heartbeat = health.Heartbeat(clock)
    readiness = health.Readiness([])
    with http_server(heartbeat, readiness, stale_after=3.0) as port:
        alive = await aget(port, "/healthz")
        assert (alive.status, alive.json()["alive"]) == (200, True)
        assert (await aget(port, "/readyz")).status == 200

        clock.now += 3.5  # the loop has not beaten for 3.5 s
        stuck = await aget(port, "/healthz")
        assert (stuck.status, stuck.json()) == (
            503,
            {"alive": False, "heartbeat_age_seconds": 3.5},
        )
        not_ready = await aget(port, "/readyz")
        assert not_ready.status == 503
        assert not_ready.json()["failed"] == {"loop": "Stale: event loop heartbeat 3.5 s old"}
        scrape = await aget(port, "/metrics")
        assert scrape.status == 200
        assert scrape.content_type == metrics.CONTENT_TYPE
        assert b"cardswitch_loop_heartbeat_age_seconds 3.5" in scrape.body

        heartbeat.beat()
        assert (await aget(port, "/healthz")).status == 200


@pytest.mark.parametrize("path", ["/", "/health", "/metrics/x", "/readyz/"])
async def test_other_paths_are_404(path: str) -> None:
    with http_server(health.Heartbeat(), health.Readiness([])) as port:
        reply = await aget(port, path)
    assert reply.status == 404


def poll_until(port: int, path: str, status: int, limit: float = 30.0) -> list[int]:
    """From this thread (not the loop): GET ``path`` until it answers ``status``; the statuses."""
    seen: list[int] = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        seen.append(get(port, path).status)
        if seen[-1] == status:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"{path} never answered {status}: {seen[-5:]}")


async def test_heartbeat_task_beats_and_the_hook_blocks_the_loop(tmp_path: Path) -> None:
    heartbeat = health.Heartbeat()
    hook = tmp_path / "block"
    with http_server(heartbeat, health.Readiness([]), stale_after=0.5) as port:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                partial(health.run_heartbeat, heartbeat, interval=0.05, block_file=hook)
            )
            await trio.to_thread.run_sync(poll_until, port, "/healthz", 200)

            def block_and_watch() -> list[int]:
                # The hook blocks the loop for 3 s; this thread sees the heartbeat go stale.
                hook.write_text("3")
                return poll_until(port, "/healthz", 503)

            statuses = await trio.to_thread.run_sync(block_and_watch)
            assert statuses[-1] == 503
            assert not hook.exists()  # consumed: the hook fires once per file
            # The loop runs again: the heartbeat is fresh and /healthz says 200 again.
            await trio.to_thread.run_sync(poll_until, port, "/healthz", 200)
            nursery.cancel_scope.cancel()


def test_hook_is_off_without_its_environment_variable() -> None:
    assert health.block_file_from_env({}) is None
    assert str(health.block_file_from_env({health.BLOCK_LOOP_FILE_ENV: "/x/y"})) == "/x/y"
