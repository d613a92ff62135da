"""The PROXY protocol version 2 header a TCP load balancer sends before the client's bytes.

What lives here: a sans-IO reader of the binary v2 header (HAProxy's PROXY protocol
specification, section 2.2): the 12-byte signature, the version/command byte (LOCAL or
PROXY), the family/protocol byte, the 16-bit length, the addresses and ports of TCP over
IPv4 or IPv6, then TLVs, which are walked (each must fit) and kept as raw (type, value)
pairs, never interpreted. ``ProxyHeaderReader`` is fed bytes and says how many more it needs,
so the caller never reads past the header: the TLS ClientHello that follows it stays in the
socket for the handshake. Stdlib only, no I/O, no logging.

A LOCAL header (the balancer's own health check) carries no client: the caller keeps the
socket's addresses. A PROXY header must carry TCP over IPv4 or IPv6; any other family or
protocol (UDP, UNIX sockets, AF_UNSPEC) is refused, since a switch that cannot tell which
client it serves must not serve it.

Every refusal is a ``ProxyHeaderError`` whose ``reason`` is one of ``REASONS`` (a closed set,
fit for a metric label); ``detail`` says more for the log line. Version 1 (the text header)
is not read: it starts with ``PROXY `` and fails the signature.

What does not live here: whether the peer is trusted to send a header, reading the socket,
deadlines, logging and metrics (switch/server.py); the listener settings (switch/config.py).

>>> header = bytes.fromhex("0d0a0d0a000d0a515549540a" "21" "11" "000c"
...                        "0a000001" "7f000001" "d431" "2183")
>>> reader = ProxyHeaderReader()
>>> reader.feed(header[: reader.wanted()]) is None
True
>>> reader.wanted()
12
>>> reader.feed(header[16:])
ProxyHeader(command='proxy', source=('10.0.0.1', 54321), destination=('127.0.0.1', 8579), tlvs=())
>>> parse(header + b"rest")[1]
b'rest'
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final, Literal

__all__ = [
    "MAX_PAYLOAD",
    "PREFIX_LENGTH",
    "REASONS",
    "SIGNATURE",
    "ProxyHeader",
    "ProxyHeaderError",
    "ProxyHeaderReader",
    "parse",
]

#: The 12 bytes every v2 header starts with.
SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
#: Signature, version/command, family/protocol and the 16-bit length of what follows.
PREFIX_LENGTH: Final = 16
#: Most bytes accepted after the prefix (addresses and TLVs). The protocol allows 65535; a
#: TCP header with a few TLVs (unique id, authority, ALPN, a CRC) needs well under this.
MAX_PAYLOAD: Final = 2048

#: Why a header was refused (the closed set of ``ProxyHeaderError.reason``).
REASONS: Final = (
    "bad_signature",
    "bad_version",
    "bad_command",
    "unsupported_family",
    "too_long",
    "bad_length",
    "bad_tlv",
)
Reason = Literal[
    "bad_signature",
    "bad_version",
    "bad_command",
    "unsupported_family",
    "too_long",
    "bad_length",
    "bad_tlv",
]

_VERSION: Final = 0x2
_COMMANDS: Final = {0x0: "local", 0x1: "proxy"}
#: family/protocol byte of a PROXY header this switch reads -> bytes of its address block.
_TCP_OVER_IPV4: Final = 0x11
_TCP_OVER_IPV6: Final = 0x21
_ADDRESS_BLOCK: Final = {_TCP_OVER_IPV4: 12, _TCP_OVER_IPV6: 36}
#: Address block sizes of every family/protocol a LOCAL header may name (UNSPEC, TCP and
#: UDP over IPv4 and IPv6, UNIX stream and datagram).
_LOCAL_ADDRESS_BLOCK: Final = {
    0x00: 0, 0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216,
}  # fmt: skip
_TLV_HEADER: Final = struct.Struct("!BH")


class ProxyHeaderError(ValueError):
    """A header that is not a PROXY v2 header this switch accepts.

    Attributes:
        reason: one of ``REASONS`` (a metric label).
        detail: a short explanation for the log (no client data beyond numbers).
    """

    def __init__(self, reason: Reason, detail: str) -> None:
        assert reason in REASONS
        self.reason: Reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A parsed v2 header.

    Attributes:
        command: "local" (no client; use the socket's addresses) or "proxy".
        source: the client's (IP, port) for "proxy"; None for "local".
        destination: the address the client connected to on the balancer, or None.
        tlvs: the (type, value) pairs after the addresses, in order, uninterpreted.
    """

    command: Literal["local", "proxy"]
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    tlvs: tuple[tuple[int, bytes], ...] = ()


class ProxyHeaderReader:
    """Accumulates the bytes of one header; ``wanted()`` bytes at a time, never more.

    Args:
        max_payload: most bytes accepted after the 16-byte prefix.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._max_payload = max_payload
        self._buffer = bytearray()
        self._total: int | None = None  # known once the prefix is in
        self._header: ProxyHeader | None = None

    def wanted(self) -> int:
        """How many more bytes the header needs (0 once it is complete)."""
        if self._header is not None:
            return 0
        if self._total is None:
            return PREFIX_LENGTH - len(self._buffer)
        return self._total - len(self._buffer)

    def feed(self, data: bytes) -> ProxyHeader | None:
        """Add ``data`` (at most ``wanted()`` bytes); the header once complete, else None.

        Raises:
            ProxyHeaderError: the bytes so far cannot start or be a header this switch
                accepts (the signature is checked byte by byte, so a TLS ClientHello sent
                without a header fails on its first byte).
            ValueError: more bytes than ``wanted()``, or a feed after the header completed.
        """
        if len(data) > self.wanted() or self._header is not None:
            raise ValueError("fed past the end of the PROXY header")
        start = len(self._buffer)
        self._buffer += data
        checked = min(len(self._buffer), len(SIGNATURE))
        if start < checked and self._buffer[:checked] != SIGNATURE[:checked]:
            raise ProxyHeaderError("bad_signature", "not a PROXY protocol v2 header")
        if self._total is None and len(self._buffer) >= PREFIX_LENGTH:
            self._total = PREFIX_LENGTH + _check_prefix(bytes(self._buffer), self._max_payload)
        if self._total is not None and len(self._buffer) == self._total:
            self._header = _parse_payload(self._buffer[12], self._buffer[13], self._buffer[16:])
            return self._header
        return None


def parse(data: bytes, max_payload: int = MAX_PAYLOAD) -> tuple[ProxyHeader, bytes]:
    """Parse a header at the start of ``data``; returns it and the bytes after it.

    Raises:
        ProxyHeaderError: not an acceptable header, or ``data`` ends before the header does
            (``bad_length``).
    """
    reader = ProxyHeaderReader(max_payload)
    offset = 0
    while True:
        want = reader.wanted()
        chunk = data[offset : offset + want]
        if len(chunk) < want:
            reader.feed(chunk)  # may raise on the signature or prefix
            raise ProxyHeaderError("bad_length", f"truncated: {len(data)} bytes")
        offset += want
        header = reader.feed(chunk)
        if header is not None:
            return header, data[offset:]


def _check_prefix(prefix: bytes, max_payload: int) -> int:
    """The payload length the 16-byte prefix announces, once its fixed fields are valid."""
    version, command = prefix[12] >> 4, prefix[12] & 0x0F
    if version != _VERSION:
        raise ProxyHeaderError("bad_version", f"version {version}")
    if command not in _COMMANDS:
        raise ProxyHeaderError("bad_command", f"command {command}")
    (length,) = struct.unpack_from("!H", prefix, 14)
    if length > max_payload:
        raise ProxyHeaderError("too_long", f"{length} bytes announced, at most {max_payload}")
    if _COMMANDS[command] == "proxy":
        family = prefix[13]
        if family not in _ADDRESS_BLOCK:
            raise ProxyHeaderError("unsupported_family", f"family/protocol 0x{family:02x}")
        if length < _ADDRESS_BLOCK[family]:
            raise ProxyHeaderError("bad_length", f"{length} bytes for the addresses")
    return int(length)


def _parse_payload(ver_cmd: int, family: int, payload: bytes | bytearray) -> ProxyHeader:
    command = _COMMANDS[ver_cmd & 0x0F]
    if command == "local":
        # A LOCAL header's address block, whatever its family, is ignored (section 2.2); the
        # TLVs after it are still walked, so that a malformed one is refused. An unknown
        # family byte leaves no telling where its addresses end: nothing is walked then.
        skip = _LOCAL_ADDRESS_BLOCK.get(family, len(payload))
        return ProxyHeader("local", None, None, _tlvs(payload[min(skip, len(payload)) :]))
    width = _ADDRESS_BLOCK[family]
    half = (width - 4) // 2
    raw = bytes(payload[:width])
    src_ip = _ip(raw[:half])
    dst_ip = _ip(raw[half : 2 * half])
    src_port, dst_port = struct.unpack_from("!HH", raw, 2 * half)
    return ProxyHeader("proxy", (src_ip, src_port), (dst_ip, dst_port), _tlvs(payload[width:]))


def _ip(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))


def _tlvs(data: bytes | bytearray) -> tuple[tuple[int, bytes], ...]:
    """Walk the TLVs: each needs its 3-byte header and its whole value inside ``data``."""
    out: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(data):
        if len(data) - offset < _TLV_HEADER.size:
            raise ProxyHeaderError("bad_tlv", f"{len(data) - offset} stray bytes after TLVs")
        kind, size = _TLV_HEADER.unpack_from(data, offset)
        offset += _TLV_HEADER.size
        if size > len(data) - offset:
            raise ProxyHeaderError("bad_tlv", f"TLV 0x{kind:02x} of {size} bytes overruns")
        out.append((kind, bytes(data[offset : offset + size])))
        offset += size
    return tuple(out)
