"""The switch as a real process: SIGTERM drains in-flight requests and exits 0."""

from __future__ import annotations

import signal
import ssl
import sys
from pathlib import Path

import trio

from switch import testing
from switch.acquirer import build_auth, echo
from switch.client import Client
from switch.config import Config, ListenerConfig, MetricsConfig, ServerConfig, TlsConfig
from switch.pki import PkiPaths
from switch.wire.messages import AuthResponse, NetworkResponse

REPO = Path(__file__).resolve().parents[1]


def write_config(path: Path, pki: PkiPaths) -> Path:
    """A configuration with one listener on port 0 and metrics off."""
    cfg = Config(
        listeners=(ListenerConfig(host="127.0.0.1", port=0),),
        tls=TlsConfig(ca=pki.ca, cert=pki.server_cert, key=pki.server_key),
        # Room for the 20 requests the drain test holds in its 1 s handler at once.
        server=ServerConfig(drain_timeout=10.0, max_in_flight=32),
        metrics=MetricsConfig(port=0),
    )
    return testing.write_config(cfg, path)


async def test_sigterm_answers_in_flight_and_exits_0(
    pki: PkiPaths, client_ctx: ssl.SSLContext, tmp_path: Path
) -> None:
    cfg = write_config(tmp_path / "switch.toml", pki)
    ready = tmp_path / "ready.json"
    slow = [sys.executable, str(REPO / "tests" / "slow_switch.py"), str(cfg), str(ready), "1.0"]
    switch = await testing.start_switch(cfg, ready, command=slow, ready_within=20)
    proc, port = switch.process, switch.port
    try:
        answers: list[AuthResponse] = []
        async with Client.connect("127.0.0.1", port, client_ctx) as client:
            # The switch works before the signal.
            with trio.fail_after(5):
                assert isinstance(await client.request(echo()), NetworkResponse)

            async def one(i: int) -> None:
                answer = await client.request(build_auth("4123456789012345", 100 + i))
                assert isinstance(answer, AuthResponse)
                answers.append(answer)

            with trio.fail_after(15):
                async with trio.open_nursery() as nursery:
                    for i in range(20):
                        nursery.start_soon(one, i)
                    await trio.sleep(0.3)  # all 20 are now inside the 1 s handler
                    proc.send_signal(signal.SIGTERM)
        assert len(answers) == 20
        assert {a.response_code for a in answers} == {"00"}
        with trio.fail_after(15):
            assert await proc.wait() == 0
        # It no longer accepts connections.
        try:
            await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            pass
        else:
            raise AssertionError("switch still accepting after drain")
    finally:
        if proc.poll() is None:
            proc.kill()
        with trio.move_on_after(10):
            await proc.wait()
