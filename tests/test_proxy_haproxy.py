"""Interop with an independent PROXY protocol v2 sender: HAProxy (Debian's ``haproxy``) in TCP
mode with ``send-proxy-v2`` in front of a real switch process (SoftHSM, SQLite, mutual TLS).

HAProxy passes the TLS bytes through untouched (mutual TLS terminates in the switch, which
sees the client's certificate) and prefixes each connection to the switch with a v2 header.
The client connects to HAProxy from 127.0.0.2 (all of 127/8 is loopback on Linux); HAProxy
connects to the switch from 127.0.0.1, the only trusted balancer. The switch's JSON log must
name the client's address and port as ``remote`` and HAProxy's as ``via``; an echo and an
authorization are answered through it; a client connecting straight to the switch is
refused before TLS (no header).

HAProxy's listening socket is made here on port 0 and handed to it as an inherited file
descriptor (``bind fd@N``), so no port is guessed. scripts/bootstrap.sh installs haproxy;
without it the test skips and says so.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import socket
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
from crash_support import seed, switch_env
from crash_support import write_config as crash_config

from switch import config, testing
from switch.acquirer import build_auth, echo
from switch.client import Client
from switch.pki import PkiPaths
from switch.wire.messages import AuthResponse, NetworkResponse

HAPROXY = shutil.which("haproxy")
pytestmark = pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed (scripts/bootstrap.sh installs it)"
)

#: A seeded card of crash_support with a large balance.
PAN = "4000002000000001"
#: The address the client connects from (HAProxy and the switch are on 127.0.0.1).
CLIENT_IP = "127.0.0.2"
TIMEOUT = 20


def haproxy_config(fd: int, switch_port: int) -> str:
    return f"""\
global
    maxconn 64
defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend acquirers
    bind fd@{fd}
    default_backend switches
backend switches
    server switch1 127.0.0.1:{switch_port} send-proxy-v2
"""


def log_events(path: Path) -> list[dict[str, Any]]:
    events = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return events


async def test_haproxy_send_proxy_v2_gives_the_switch_the_client_address(
    pki: PkiPaths, client_ctx: ssl.SSLContext, tmp_path: Path
) -> None:
    assert HAPROXY is not None
    path = crash_config(tmp_path, pki)
    cfg = config.load(path)
    listeners = tuple(
        dataclasses.replace(lst, proxy_protocol="v2", proxy_trusted=("127.0.0.1/32",))
        for lst in cfg.listeners
    )
    testing.write_config(dataclasses.replace(cfg, listeners=listeners), path)
    await seed(path, tmp_path)
    log = tmp_path / "switch.log"

    front = socket.socket()
    front.bind(("127.0.0.1", 0))
    front.listen(16)
    front_port = front.getsockname()[1]
    with log.open("ab") as out:
        switch = await testing.start_switch(
            path, tmp_path / "ready.json", env=switch_env(tmp_path), output=out
        )
    haproxy: trio.Process | None = None
    try:
        cfg_file = tmp_path / "haproxy.cfg"
        cfg_file.write_text(haproxy_config(front.fileno(), switch.port))
        haproxy = await trio.lowlevel.open_process(
            [HAPROXY, "-db", "-f", str(cfg_file)],
            pass_fds=(front.fileno(),),
            stdout=subprocess.DEVNULL,
            stderr=(tmp_path / "haproxy.log").open("wb"),
        )
        front.close()  # HAProxy holds it now
        with trio.fail_after(TIMEOUT):
            async with Client.connect(
                "127.0.0.1", front_port, client_ctx, local_address=CLIENT_IP
            ) as client:
                client_port = client.local_port
                assert isinstance(await client.request(echo()), NetworkResponse)
                answer = await client.request(build_auth(PAN, 1234, stan="000101"))
                assert isinstance(answer, AuthResponse)
                assert answer.response_code == "00"
        # Straight to the switch, past the balancer: no header, closed before TLS.
        with pytest.raises((ssl.SSLError, trio.BrokenResourceError, OSError)):
            with trio.fail_after(TIMEOUT):
                async with Client.connect("127.0.0.1", switch.port, client_ctx):
                    pass
    finally:
        if haproxy is not None and haproxy.returncode is None:
            haproxy.send_signal(signal.SIGTERM)
            with trio.move_on_after(5):
                await haproxy.wait()
            if haproxy.returncode is None:
                haproxy.kill()
                await haproxy.wait()
        assert await switch.stop() == 0

    events = log_events(log)
    connected = [e for e in events if e.get("event") == "connected"]
    assert len(connected) == 1, connected
    (line,) = connected
    assert line["remote"] == f"{CLIENT_IP}:{client_port}"
    assert line["via"].startswith("127.0.0.1:")
    assert line["peer"]  # the client's certificate identities: TLS passed through
    gone = [e for e in events if e.get("event") == "disconnected" and e.get("via")]
    assert [e["remote"] for e in gone] == [f"{CLIENT_IP}:{client_port}"]
    refused = [e for e in events if e.get("event") == "proxy_header_refused"]
    assert [e["reason"] for e in refused] == ["bad_signature"]
    # PAN masked 6+4 wherever it appears, never in clear.
    text = log.read_text()
    assert PAN not in text
