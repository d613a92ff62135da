"""Signals while a real switch process drains (switch/app.py).

SIGTERM starts the drain; a SIGHUP during it is logged and ignored (it used to kill the
process), so the requests in flight are still answered and the exit status is 0. A second
SIGTERM cuts the drain short: the process exits 0 well before the drain deadline, and the
requests still inside the (slow) engine are abandoned rather than waited for.
"""

from __future__ import annotations

import signal
import ssl
import sys
from pathlib import Path

import trio

from switch import testing
from switch.acquirer import build_auth, echo
from switch.client import Client, ClientError
from switch.config import Config, ListenerConfig, MetricsConfig, ServerConfig, TlsConfig
from switch.pki import PkiPaths
from switch.wire.messages import AuthResponse, NetworkResponse

REPO = Path(__file__).resolve().parents[1]
PAN = "4123456789012345"


def slow_switch(tmp: Path, pki: PkiPaths, *, delay: float, drain: float) -> list[str]:
    cfg = Config(
        listeners=(ListenerConfig(host="127.0.0.1", port=0),),
        tls=TlsConfig(ca=pki.ca, cert=pki.server_cert, key=pki.server_key),
        server=ServerConfig(drain_timeout=drain),
        metrics=MetricsConfig(port=0),
    )
    path = testing.write_config(cfg, tmp / "switch.toml")
    ready = tmp / "ready.json"
    return [
        sys.executable,
        str(REPO / "tests" / "slow_switch.py"),
        str(path),
        str(ready),
        f"{delay}",
    ]


async def test_sighup_during_drain_is_ignored_and_in_flight_answers_arrive(
    pki: PkiPaths, client_ctx: ssl.SSLContext, tmp_path: Path
) -> None:
    argv = slow_switch(tmp_path, pki, delay=1.5, drain=10.0)
    log = tmp_path / "switch.log"
    with log.open("wb") as out:
        switch = await testing.start_switch(
            None, tmp_path / "ready.json", command=argv, output=out, ready_within=20
        )
        proc = switch.process
        try:
            answers: list[AuthResponse] = []
            async with Client.connect("127.0.0.1", switch.port, client_ctx) as client:
                with trio.fail_after(5):
                    assert isinstance(await client.request(echo()), NetworkResponse)

                async def one(i: int) -> None:
                    answer = await client.request(build_auth(PAN, 100 + i))
                    assert isinstance(answer, AuthResponse)
                    answers.append(answer)

                with trio.fail_after(15):
                    async with trio.open_nursery() as nursery:
                        for i in range(10):
                            nursery.start_soon(one, i)
                        await trio.sleep(0.5)  # all 10 are inside the 1.5 s engine
                        proc.send_signal(signal.SIGTERM)
                        await trio.sleep(0.2)
                        proc.send_signal(signal.SIGHUP)
                        await trio.sleep(0.2)
                        proc.send_signal(signal.SIGHUP)
            assert len(answers) == 10
            assert {a.response_code for a in answers} == {"00"}
            with trio.fail_after(15):
                assert await proc.wait() == 0
        finally:
            switch.kill()
            with trio.move_on_after(10):
                await proc.wait()
    logged = testing.log_events(log)
    seen = [e["event"] for e in logged]
    # The startup heap is frozen once, when the listeners are bound (switch.app).
    frozen = [e for e in logged if e["event"] == "startup_heap_frozen"]
    assert len(frozen) == 1 and isinstance(frozen[0]["objects"], int)
    assert frozen[0]["objects"] > 1000
    assert seen.index("listening") < seen.index("startup_heap_frozen") < seen.index("exit")
    assert seen.count("signal_ignored") == 2
    assert "tls_reload" not in seen
    assert seen[-1] == "exit"


async def test_a_second_sigterm_ends_the_drain_early_and_exits_0(
    pki: PkiPaths, client_ctx: ssl.SSLContext, tmp_path: Path
) -> None:
    # The engine takes 60 s and the drain would wait 60 s: only the second signal ends it.
    argv = slow_switch(tmp_path, pki, delay=60.0, drain=60.0)
    log = tmp_path / "switch.log"
    with log.open("wb") as out:
        switch = await testing.start_switch(
            None, tmp_path / "ready.json", command=argv, output=out, ready_within=20
        )
        proc = switch.process
        try:
            failed: list[str] = []
            async with Client.connect("127.0.0.1", switch.port, client_ctx) as client:
                with trio.fail_after(5):
                    assert isinstance(await client.request(echo()), NetworkResponse)

                async def one(i: int) -> None:
                    try:
                        await client.request(build_auth(PAN, 100 + i))
                    except ClientError as exc:
                        failed.append(str(exc))

                with trio.fail_after(20):
                    async with trio.open_nursery() as nursery:
                        for i in range(5):
                            nursery.start_soon(one, i)
                        await trio.sleep(0.5)
                        proc.send_signal(signal.SIGTERM)
                        await trio.sleep(0.5)
                        assert proc.poll() is None  # draining: waiting for the engine
                        proc.send_signal(signal.SIGTERM)
                    assert await proc.wait() == 0
            assert len(failed) == 5  # abandoned, the connection closed without answers
        finally:
            switch.kill()
            with trio.move_on_after(10):
                await proc.wait()
    seen = testing.log_events(log)
    names = [e["event"] for e in seen]
    assert "drain_cut_short" in names
    undelivered = [e for e in seen if e["event"] == "answer_undelivered"]
    assert len(undelivered) == 5 and {e["kind"] for e in undelivered} == {"abandoned"}
