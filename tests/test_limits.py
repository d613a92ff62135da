"""Listener resource bounds over real mutual TLS on loopback (switch/server.py).

Each bound of ``ListenerConfig`` is reached and the next connection is refused quickly
(closed at accept, or right after its handshake for the per-peer bound), counted under its
``limit`` label, and given back when the connections holding it go. The source addresses
127.0.0.x (all loopback on Linux) stand in for remote peers. The idle timeout itself is
tested over memory streams (test_connection.py); here it is seen closing a real link.

TLS 1.3: a client refused after the handshake sees it on its first read; refusals send
and read.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path

import pytest
import trio
import trio.testing
from server_fixtures import make_config, running_server

from switch import metrics
from switch.acquirer import echo
from switch.client import Client
from switch.config import ConfigError, ListenerConfig, from_mapping, load
from switch.pki import PkiPaths, issue_cert, load_ca, write_pair
from switch.tls import client_context
from switch.wire import codec
from switch.wire.framing import FrameDecoder, encode_frame
from switch.wire.messages import NetworkResponse

#: Upper bound on any exchange here (loopback handshakes take milliseconds).
TIMEOUT = 5


def hits(listener: str, limit: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "cardswitch_connection_limit_hits_total", {"listener": listener, "limit": limit}
    )
    return value or 0.0


def open_now(listener: str) -> float:
    value = metrics.REGISTRY.get_sample_value("cardswitch_connections_open", {"listener": listener})
    return value or 0.0


def identity_ctx(pki: PkiPaths, tmp: Path, name: str) -> ssl.SSLContext:
    """A client context with a certificate of the dev CA for identity ``name``."""
    ca_cert, ca_key = load_ca(pki)
    cert, key = issue_cert(ca_cert, ca_key, name, san_dns=(name,))
    write_pair(cert, key, tmp / f"{name}.pem", tmp / f"{name}.key")
    return client_context(pki.ca, tmp / f"{name}.pem", tmp / f"{name}.key")


async def raw_tcp(port: int, source: str = "127.0.0.1") -> trio.SocketStream:
    """A TCP connection from ``source`` that never starts TLS."""
    return await trio.open_tcp_stream("127.0.0.1", port, local_address=source)


async def closed_by_server(tcp: trio.SocketStream) -> bool:
    """True when the server closes ``tcp`` (EOF or reset) before TIMEOUT."""
    try:
        with trio.fail_after(TIMEOUT):
            return await tcp.receive_some(1024) == b""
    except trio.BrokenResourceError:
        return True


async def echo_ok(port: int, ctx: ssl.SSLContext, *, source: str = "127.0.0.1") -> bool:
    """One echo on a fresh connection: True when answered, False when refused."""
    try:
        with trio.fail_after(TIMEOUT):
            tcp = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
            stream = trio.SSLStream(tcp, ctx, server_hostname="127.0.0.1")
            async with stream:
                await stream.do_handshake()
                await stream.send_all(encode_frame(codec.encode(echo(stan="000777"))))
                decoder = FrameDecoder("binary2", 65535)
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        return False
                    for frame in decoder.feed(bytes(data)):
                        return isinstance(codec.decode(frame), NetworkResponse)
    except (ssl.SSLError, trio.BrokenResourceError, OSError):
        return False


@asynccontextmanager
async def held_clients(port: int, ctx: ssl.SSLContext, count: int) -> AsyncIterator[list[Client]]:
    """``count`` established clients, each having had one echo answered."""
    async with AsyncExitStack() as stack:
        clients = []
        for _ in range(count):
            client = await stack.enter_async_context(Client.connect("127.0.0.1", port, ctx))
            with trio.fail_after(TIMEOUT):
                assert isinstance(await client.request(echo()), NetworkResponse)
            clients.append(client)
        yield clients


async def test_max_connections_refuses_at_accept_and_gives_back(
    pki: PkiPaths, client_ctx: ssl.SSLContext
) -> None:
    cfg = make_config(pki, name="cap-conn", max_connections=3, max_connections_per_peer=10)
    before = hits("cap-conn", "max_connections")
    async with running_server(cfg) as (_, port):
        async with held_clients(port, client_ctx, 3):
            assert not await echo_ok(port, client_ctx)
            tcp = await raw_tcp(port)
            async with tcp:
                assert await closed_by_server(tcp)
            assert open_now("cap-conn") == 3
        # The three have gone: the slots are given back.
        assert await echo_ok(port, client_ctx)
    assert hits("cap-conn", "max_connections") == before + 2


async def test_max_handshakes_refuses_at_accept(pki: PkiPaths, client_ctx: ssl.SSLContext) -> None:
    cfg = make_config(pki, name="cap-hs", max_handshakes=2, max_handshakes_per_ip=10)
    before = hits("cap-hs", "max_handshakes")
    async with running_server(cfg) as (_, port):
        stalled = [await raw_tcp(port), await raw_tcp(port)]
        try:
            assert await echo_ok(port, client_ctx) is False
            extra = await raw_tcp(port)
            async with extra:
                assert await closed_by_server(extra)
        finally:
            for tcp in stalled:
                await tcp.aclose()
        # The stalled handshakes end with their TCP connections: a handshake fits again
        # (once the server has seen them go).
        for _ in range(100):
            if await echo_ok(port, client_ctx):
                break
            await trio.sleep(0.05)
        else:
            raise AssertionError("handshake slots not given back")
    assert hits("cap-hs", "max_handshakes") >= before + 2


async def test_max_handshakes_per_ip_leaves_room_for_other_addresses(
    pki: PkiPaths, client_ctx: ssl.SSLContext
) -> None:
    cfg = make_config(pki, name="cap-ip", max_handshakes=10, max_handshakes_per_ip=2)
    before = hits("cap-ip", "max_handshakes_per_ip")
    async with running_server(cfg) as (_, port):
        stalled = [await raw_tcp(port, "127.0.0.2"), await raw_tcp(port, "127.0.0.2")]
        try:
            extra = await raw_tcp(port, "127.0.0.2")
            async with extra:
                assert await closed_by_server(extra)
            assert not await echo_ok(port, client_ctx, source="127.0.0.2")
            # Another address still gets a handshake slot.
            assert await echo_ok(port, client_ctx, source="127.0.0.1")
        finally:
            for tcp in stalled:
                await tcp.aclose()
    assert hits("cap-ip", "max_handshakes_per_ip") == before + 2


async def test_max_connections_per_peer_refuses_after_the_handshake(
    pki: PkiPaths, client_ctx: ssl.SSLContext, tmp_path: Path
) -> None:
    cfg = make_config(pki, name="cap-peer", max_connections_per_peer=2)
    other = identity_ctx(pki, tmp_path, "acquirer-two")
    before = hits("cap-peer", "max_connections_per_peer")
    async with running_server(cfg) as (_, port):
        async with held_clients(port, client_ctx, 2):
            assert not await echo_ok(port, client_ctx)
            # Another identity is not counted against this one.
            assert await echo_ok(port, other)
        assert await echo_ok(port, client_ctx)
    assert hits("cap-peer", "max_connections_per_peer") == before + 1


async def test_idle_link_is_closed_over_tls(
    pki: PkiPaths, client_ctx: ssl.SSLContext, autojump_clock: trio.testing.MockClock
) -> None:
    cfg = make_config(pki, name="cap-idle", idle_timeout=120.0)
    before = hits("cap-idle", "idle_timeout")
    async with running_server(cfg) as (_, port):
        async with Client.connect("127.0.0.1", port, client_ctx) as client:
            with trio.fail_after(TIMEOUT):
                assert isinstance(await client.request(echo()), NetworkResponse)
            t0 = trio.current_time()
            with trio.fail_after(600):
                await client.wait_closed()
            assert trio.current_time() - t0 >= 120.0
    assert hits("cap-idle", "idle_timeout") == before + 1


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("max_connections", 0, "must be at least 1"),
        ("max_handshakes", 0, "must be at least 1"),
        ("max_handshakes_per_ip", 0, "must be at least 1"),
        ("max_connections_per_peer", 0, "must be at least 1"),
        ("idle_timeout", -1.0, "must be positive, or 0"),
    ],
)
def test_limits_are_checked_when_the_config_loads(key: str, value: float, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"listener\[0\]\.{key}: {message}"):
        from_mapping({"listener": [{key: value}]})


def test_shipped_config_states_every_limit() -> None:
    # config/switch.toml documents each bound with the embedded default.
    shipped = load(Path(__file__).resolve().parents[1] / "config" / "switch.toml")
    for key in ("max_connections", "max_handshakes", "max_handshakes_per_ip"):
        assert getattr(shipped.listeners[0], key) == getattr(ListenerConfig(), key)
    assert (
        shipped.listeners[0].max_connections_per_peer == ListenerConfig().max_connections_per_peer
    )
    assert shipped.listeners[0].idle_timeout == ListenerConfig().idle_timeout
