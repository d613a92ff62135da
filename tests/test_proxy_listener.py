"""A listener with ``proxy_protocol = "v2"`` over real mutual TLS on loopback (switch/server.py).

The test plays the balancer: it sends a PROXY v2 header (built with ``struct`` in
test_proxy_protocol.py) and then the TLS handshake on the same connection. The switch logs
the header's source as ``remote`` of its connection lines (and the balancer as ``via``; the
per-answer line names the listener, not the address, with or without a balancer), bounds
handshakes per real address and checks ``allowed_sources`` against it. A peer outside
``proxy_trusted``, a connection without a header, a late or malformed one are closed before
TLS, logged, and counted under ``cardswitch_proxy_header_refused_total``. The interop test
with HAProxy itself is test_proxy_haproxy.py.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import structlog
import trio
from server_fixtures import make_config, running_server
from test_limits import closed_by_server, echo_ok, hits, raw_tcp
from test_proxy_protocol import LOCAL, PROXY, TCP4, UNSPEC, build, tcp4

from switch import metrics
from switch.acquirer import echo
from switch.client import Client, ClientError
from switch.config import ConfigError, from_mapping
from switch.pki import PkiPaths
from switch.wire.messages import NetworkResponse

TIMEOUT = 5


def refused(listener: str, reason: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "cardswitch_proxy_header_refused_total", {"listener": listener, "reason": reason}
    )
    return value or 0.0


def outcomes(listener: str, outcome: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "cardswitch_connections_total", {"listener": listener, "outcome": outcome}
    )
    return value or 0.0


def header_from(ip: str, port: int) -> bytes:
    return build(PROXY, TCP4, tcp4(ip, port, "192.0.2.1", 8583))


async def echo_through(port: int, ctx: ssl.SSLContext, preamble: bytes, **kw: Any) -> bool:
    """One echo on a connection that starts with ``preamble``: True when answered."""
    answered = False
    try:
        with trio.fail_after(TIMEOUT):
            async with Client.connect("127.0.0.1", port, ctx, preamble=preamble, **kw) as client:
                answered = isinstance(await client.request(echo()), NetworkResponse)
    except* (ssl.SSLError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass
    except* ClientError:
        pass
    return answered


def events(logs: Sequence[Mapping[str, Any]], name: str) -> list[Mapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


async def test_the_header_source_is_the_remote_of_every_log_line(
    pki: PkiPaths, client_ctx: ssl.SSLContext
) -> None:
    cfg = make_config(pki, name="pp-real", proxy_protocol="v2", proxy_trusted=("127.0.0.0/8",))
    with structlog.testing.capture_logs() as logs:
        async with running_server(cfg) as (_, port):
            assert await echo_through(port, client_ctx, header_from("203.0.113.7", 40001))
    (connected,) = events(logs, "connected")
    assert connected["remote"] == "203.0.113.7:40001"
    assert connected["via"].startswith("127.0.0.1:")
    (gone,) = events(logs, "disconnected")
    assert gone["remote"] == "203.0.113.7:40001" and gone["via"] == connected["via"]


async def test_local_header_keeps_the_socket_address(
    pki: PkiPaths, client_ctx: ssl.SSLContext
) -> None:
    """LOCAL is the balancer's own connection (a health check): its address is logged."""
    cfg = make_config(pki, name="pp-local", proxy_protocol="v2")
    with structlog.testing.capture_logs() as logs:
        async with running_server(cfg) as (_, port):
            local = build(LOCAL, UNSPEC, b"")
            assert await echo_through(port, client_ctx, local, local_address="127.0.0.3")
    (connected,) = events(logs, "connected")
    assert connected["remote"].startswith("127.0.0.3:")


async def test_no_header_untrusted_peer_and_garbage_are_closed_before_tls(
    pki: PkiPaths, client_ctx: ssl.SSLContext
) -> None:
    name = "pp-refuse"
    cfg = make_config(pki, name=name, proxy_protocol="v2", proxy_trusted=("127.0.0.1/32",))
    before = {r: refused(name, r) for r in ("bad_signature", "untrusted_peer", "too_long", "eof")}
    closed_before = outcomes(name, "proxy_refused")
    with structlog.testing.capture_logs() as logs:
        async with running_server(cfg) as (_, port):
            # A client straight to the switch: its ClientHello is no header.
            assert not await echo_ok(port, client_ctx)
            # A header from a peer that is not a trusted balancer: closed, nothing read.
            header = header_from("203.0.113.7", 40002)
            assert not await echo_through(port, client_ctx, header, local_address="127.0.0.2")
            # A header announcing more than the bound.
            tcp = await raw_tcp(port)
            async with tcp:
                await tcp.send_all(build(PROXY, TCP4, b"", length=0xFFFF))
                assert await closed_by_server(tcp)
            # The peer closes half-way through the header.
            tcp = await raw_tcp(port)
            await tcp.send_all(header_from("203.0.113.7", 40003)[:20])
            await tcp.aclose()
            # The listener still serves a proper balancer connection.
            assert await echo_through(port, client_ctx, header_from("203.0.113.7", 40004))
    assert refused(name, "bad_signature") == before["bad_signature"] + 1
    assert refused(name, "untrusted_peer") == before["untrusted_peer"] + 1
    assert refused(name, "too_long") == before["too_long"] + 1
    assert refused(name, "eof") == before["eof"] + 1
    assert outcomes(name, "proxy_refused") == closed_before + 4
    lines = events(logs, "proxy_header_refused")
    assert {e["reason"] for e in lines} >= {"bad_signature", "untrusted_peer", "too_long"}
    assert all(e["listener"] == name for e in lines)
    untrusted = next(e for e in lines if e["reason"] == "untrusted_peer")
    assert untrusted["remote"].startswith("127.0.0.2:")


async def test_a_late_header_is_refused_at_the_handshake_deadline(pki: PkiPaths) -> None:
    name = "pp-late"
    cfg = make_config(pki, name=name, proxy_protocol="v2", handshake_timeout=0.2)
    before = refused(name, "timeout")
    async with running_server(cfg) as (_, port):
        tcp = await raw_tcp(port)
        async with tcp:
            await tcp.send_all(header_from("203.0.113.7", 40005)[:15])
            assert await closed_by_server(tcp)
    assert refused(name, "timeout") == before + 1


async def test_allowed_sources_checks_the_real_client_address(
    pki: PkiPaths, client_ctx: ssl.SSLContext
) -> None:
    name = "pp-allow"
    cfg = make_config(pki, name=name, proxy_protocol="v2", allowed_sources=("198.51.100.0/24",))
    before = outcomes(name, "source_not_allowed")
    with structlog.testing.capture_logs() as logs:
        async with running_server(cfg) as (_, port):
            # The balancer (127.0.0.1) is not in the list; the client behind it is.
            assert await echo_through(port, client_ctx, header_from("198.51.100.9", 40006))
            assert not await echo_through(port, client_ctx, header_from("203.0.113.7", 40007))
    assert outcomes(name, "source_not_allowed") == before + 1
    (line,) = events(logs, "source_not_allowed")
    assert line["remote"] == "203.0.113.7:40007" and line["via"].startswith("127.0.0.1:")


async def test_allowed_sources_without_proxy_checks_the_socket_address(
    pki: PkiPaths, client_ctx: ssl.SSLContext
) -> None:
    cfg = make_config(pki, name="src-direct", allowed_sources=("127.0.0.1/32",))
    async with running_server(cfg) as (_, port):
        assert await echo_ok(port, client_ctx, source="127.0.0.1")
        assert not await echo_ok(port, client_ctx, source="127.0.0.2")


async def test_handshakes_are_bounded_per_real_address(
    pki: PkiPaths, client_ctx: ssl.SSLContext
) -> None:
    """Every connection comes from the balancer's address; the bound is per client."""
    name = "pp-perip"
    cfg = make_config(pki, name=name, proxy_protocol="v2", max_handshakes_per_ip=1)
    before = hits(name, "max_handshakes_per_ip")
    async with running_server(cfg) as (_, port):
        stalled = await raw_tcp(port)  # a header, then no ClientHello: a handshake held
        try:
            await stalled.send_all(header_from("203.0.113.7", 40008))
            await trio.sleep(0.05)  # the server reads the header (nothing asserted on time)
            for _ in range(100):
                if not await echo_through(port, client_ctx, header_from("203.0.113.7", 40009)):
                    break
                await trio.sleep(0.02)
            else:
                raise AssertionError("second handshake of one client address admitted")
            # Another client behind the same balancer still gets a handshake.
            assert await echo_through(port, client_ctx, header_from("203.0.113.8", 40010))
        finally:
            await stalled.aclose()
    assert hits(name, "max_handshakes_per_ip") >= before + 1


@pytest.mark.parametrize(
    ("listener", "message"),
    [
        ({"proxy_protocol": "v1"}, r"listener\[0\]\.proxy_protocol: must be one of 'off', 'v2'"),
        (
            {"proxy_protocol": "v2", "proxy_trusted": ["10.0.0.0/33"]},
            r"listener\[0\]\.proxy_trusted\[0\]: not a CIDR network",
        ),
        (
            {"proxy_protocol": "v2", "proxy_trusted": ["10.0.0.1/8"]},
            r"listener\[0\]\.proxy_trusted\[0\]: not a CIDR network: .*host bits set",
        ),
        ({"proxy_trusted": ["10.0.0.0/8"]}, r'proxy_trusted: only with proxy_protocol = "v2"'),
        ({"allowed_sources": ["example.com"]}, r"allowed_sources\[0\]: not a CIDR network"),
        ({"proxy_trusted": "10.0.0.0/8"}, r"proxy_trusted: expected an array"),
    ],
)
def test_bad_proxy_settings_are_one_line_errors(listener: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        from_mapping({"listener": [listener]}, "switch.toml")
    assert "\n" not in str(info.value)


def test_good_proxy_settings_load() -> None:
    cfg = from_mapping(
        {
            "listener": [
                {
                    "proxy_protocol": "v2",
                    "proxy_trusted": ["10.0.0.0/8", "fd00::/8"],
                    "allowed_sources": ["192.0.2.7"],
                }
            ]
        }
    )
    lst = cfg.listeners[0]
    assert lst.proxy_protocol == "v2"
    assert lst.proxy_trusted == ("10.0.0.0/8", "fd00::/8")
    assert lst.allowed_sources == ("192.0.2.7",)
    assert from_mapping({}).listeners[0].proxy_protocol == "off"
