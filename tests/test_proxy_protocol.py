"""The PROXY protocol v2 reader (switch/proxy_protocol.py), sans-IO.

Headers are built here with ``struct`` straight from the specification's layout (an
encoder independent of the reader), then read back whole, byte by byte, truncated and
corrupted. The interop test against HAProxy itself is in tests/test_proxy_listener.py.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switch.proxy_protocol import (
    MAX_PAYLOAD,
    PREFIX_LENGTH,
    REASONS,
    SIGNATURE,
    ProxyHeader,
    ProxyHeaderError,
    ProxyHeaderReader,
    parse,
)

LOCAL, PROXY = 0x20, 0x21
TCP4, TCP6, UDP4, UNIX, UNSPEC = 0x11, 0x21, 0x12, 0x31, 0x00


def build(
    ver_cmd: int,
    family: int,
    addresses: bytes,
    tlvs: list[tuple[int, bytes]] = (),  # type: ignore[assignment]
    *,
    length: int | None = None,
) -> bytes:
    """A v2 header: signature, version/command, family, length, addresses, TLVs."""
    body = addresses + b"".join(struct.pack("!BH", t, len(v)) + v for t, v in tlvs)
    announced = len(body) if length is None else length
    return SIGNATURE + struct.pack("!BBH", ver_cmd, family, announced) + body


def tcp4(src: str, sport: int, dst: str, dport: int) -> bytes:
    return struct.pack("!4s4sHH", ipaddress.IPv4Address(src).packed,
                       ipaddress.IPv4Address(dst).packed, sport, dport)  # fmt: skip


def tcp6(src: str, sport: int, dst: str, dport: int) -> bytes:
    return struct.pack("!16s16sHH", ipaddress.IPv6Address(src).packed,
                       ipaddress.IPv6Address(dst).packed, sport, dport)  # fmt: skip


def reason_of(data: bytes) -> str:
    with pytest.raises(ProxyHeaderError) as info:
        parse(data)
    assert info.value.reason in REASONS
    return info.value.reason


ports = st.integers(0, 65535)
ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
Endpoints = tuple[str, int, str, int]
#: (source IP, source port, destination IP, destination port).
endpoints4 = st.tuples(ipv4, ports, ipv4, ports)
endpoints6 = st.tuples(ipv6, ports, ipv6, ports)
tlv_lists = st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=64)), max_size=6)


@settings(max_examples=200, deadline=None)
@given(endpoints4, tlv_lists, st.binary(max_size=32))
def test_tcp4_round_trip(ends: Endpoints, tlvs: list[tuple[int, bytes]], rest: bytes) -> None:
    src, sport, dst, dport = ends
    header, after = parse(build(PROXY, TCP4, tcp4(src, sport, dst, dport), tlvs) + rest)
    assert header == ProxyHeader("proxy", (src, sport), (dst, dport), tuple(tlvs))
    assert after == rest


@settings(max_examples=200, deadline=None)
@given(endpoints6, tlv_lists)
def test_tcp6_round_trip(ends: Endpoints, tlvs: list[tuple[int, bytes]]) -> None:
    src, sport, dst, dport = ends
    header, after = parse(build(PROXY, TCP6, tcp6(src, sport, dst, dport), tlvs))
    assert header.source == (str(ipaddress.IPv6Address(src)), sport)
    assert header.destination == (str(ipaddress.IPv6Address(dst)), dport)
    assert header.tlvs == tuple(tlvs)
    assert after == b""


@settings(max_examples=100, deadline=None)
@given(endpoints4, tlv_lists, st.data())
def test_fed_in_any_pieces_never_past_the_header(
    ends: Endpoints, tlvs: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    """The reader asks for no byte beyond the header, however the bytes arrive."""
    src, sport, dst, dport = ends
    wire = build(PROXY, TCP4, tcp4(src, sport, dst, dport), tlvs)
    reader = ProxyHeaderReader()
    offset = 0
    result = None
    while result is None:
        want = reader.wanted()
        assert 0 < want <= len(wire) - offset
        take = data.draw(st.integers(1, want))
        result = reader.feed(wire[offset : offset + take])
        offset += take
    assert offset == len(wire) and reader.wanted() == 0
    assert result.source == (src, sport)
    with pytest.raises(ValueError):
        reader.feed(b"x")


def test_local_header_carries_no_client() -> None:
    """The balancer's health check: LOCAL, usually AF_UNSPEC with no addresses."""
    assert parse(build(LOCAL, UNSPEC, b""))[0] == ProxyHeader("local", None, None)
    # A LOCAL header's addresses, of any family, are ignored; TLVs after them are kept.
    header, _ = parse(build(LOCAL, TCP4, tcp4("10.1.1.1", 1, "10.2.2.2", 2), [(0x04, b"x")]))
    assert header == ProxyHeader("local", None, None, ((0x04, b"x"),))
    assert parse(build(LOCAL, UNIX, b"\0" * 216))[0].command == "local"


@settings(max_examples=200, deadline=None)
@given(endpoints4, tlv_lists, st.data())
def test_truncated_header_is_refused(
    ends: Endpoints, tlvs: list[tuple[int, bytes]], data: st.DataObject
) -> None:
    src, sport, dst, dport = ends
    wire = build(PROXY, TCP4, tcp4(src, sport, dst, dport), tlvs)
    cut = data.draw(st.integers(0, len(wire) - 1))
    assert reason_of(wire[:cut]) == "bad_length"
    # Fed in pieces, a truncated header is simply incomplete: the reader wants more.
    reader = ProxyHeaderReader()
    if cut:
        assert reader.feed(wire[: min(cut, PREFIX_LENGTH)]) is None
    assert reader.wanted() > 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_garbage_is_refused_with_a_known_reason(data: bytes) -> None:
    """Any byte string is a header, an incomplete one, or a refusal from the closed set."""
    try:
        parse(data)
    except ProxyHeaderError as exc:
        assert exc.reason in REASONS
        assert "\n" not in str(exc)


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=PREFIX_LENGTH - len(SIGNATURE), max_size=200))
def test_garbage_after_the_signature_is_refused_or_read(data: bytes) -> None:
    try:
        header, _ = parse(SIGNATURE + data)
    except ProxyHeaderError as exc:
        assert exc.reason in REASONS
    else:
        assert header.command in ("local", "proxy")
        if header.command == "proxy":
            assert header.source is not None and header.destination is not None


@settings(max_examples=100, deadline=None)
@given(st.integers(0, len(SIGNATURE) - 1), st.integers(0, 255))
def test_one_wrong_signature_byte_fails_at_that_byte(position: int, value: int) -> None:
    wire = bytearray(build(PROXY, TCP4, tcp4("1.2.3.4", 5, "6.7.8.9", 10)))
    if wire[position] == value:
        value ^= 0xFF
    wire[position] = value
    reader = ProxyHeaderReader()
    if position:
        reader.feed(bytes(wire[:position]))
    with pytest.raises(ProxyHeaderError) as info:
        reader.feed(bytes(wire[position : position + 1]))
    assert info.value.reason == "bad_signature"


def test_tls_client_hello_without_header_fails_on_the_first_byte() -> None:
    with pytest.raises(ProxyHeaderError) as info:
        ProxyHeaderReader().feed(b"\x16")
    assert info.value.reason == "bad_signature"
    assert reason_of(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n") == "bad_signature"  # version 1


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (build(0x11, TCP4, tcp4("1.1.1.1", 1, "2.2.2.2", 2)), "bad_version"),
        (build(0x31, TCP4, tcp4("1.1.1.1", 1, "2.2.2.2", 2)), "bad_version"),
        (build(0x22, TCP4, tcp4("1.1.1.1", 1, "2.2.2.2", 2)), "bad_command"),
        (build(PROXY, UDP4, tcp4("1.1.1.1", 1, "2.2.2.2", 2)), "unsupported_family"),
        (build(PROXY, UNIX, b"\0" * 216), "unsupported_family"),
        (build(PROXY, UNSPEC, b""), "unsupported_family"),
        (build(PROXY, TCP4, b"\0" * 11), "bad_length"),
        (build(PROXY, TCP6, b"\0" * 35), "bad_length"),
        (build(PROXY, TCP4, b"", length=MAX_PAYLOAD + 1), "too_long"),
        (build(PROXY, TCP4, b"", length=0xFFFF), "too_long"),
        (build(PROXY, TCP4, tcp4("1.1.1.1", 1, "2.2.2.2", 2) + b"\x01\x00"), "bad_tlv"),
        (build(PROXY, TCP4, tcp4("1.1.1.1", 1, "2.2.2.2", 2) + b"\x01\x00\x05ab"), "bad_tlv"),
    ],
)
def test_malformed_headers(wire: bytes, reason: str) -> None:
    assert reason_of(wire) == reason


def test_length_is_checked_before_the_payload_is_read() -> None:
    """A huge announced length fails on the prefix: nothing more is asked for."""
    reader = ProxyHeaderReader()
    with pytest.raises(ProxyHeaderError) as info:
        reader.feed(build(PROXY, TCP4, b"", length=0xFFFF)[:PREFIX_LENGTH])
    assert info.value.reason == "too_long"


def test_largest_payload_accepted() -> None:
    addresses = tcp4("10.0.0.1", 1, "10.0.0.2", 2)
    filler = b"z" * (MAX_PAYLOAD - len(addresses) - 3)
    header, _ = parse(build(PROXY, TCP4, addresses, [(0xEE, filler)]))
    assert header.tlvs == ((0xEE, filler),)
