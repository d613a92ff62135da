"""BER-TLV of EMV ICC data (DE55): parse, build and look up by tag.

What lives here: :class:`Tlv` (one data object; constructed templates hold children),
:func:`parse` (bytes to a tuple of ``Tlv``), :func:`build` (the reverse), :class:`TlvMap`
(read-only access by tag, searching into templates), the names of the common EMV tags as
integer constants, and :class:`EmvFormatError`.

Tags are integers of their encoded bytes (``0x9F26``), as EMV Book 3 Annex B writes them.
Lengths follow ISO/IEC 8825-1 definite forms: short (one byte < 0x80) and long (0x81-0x84
followed by up to four length bytes); indefinite length is not allowed in EMV. Padding
bytes 0x00 between objects are skipped as EMV Book 3 permits.

What does not: the cryptography of ARQC/ARPC (hsm/), field numbers and the DE55 envelope
(messages.py, spec.py). EMV data is sensitive: nothing here logs it and errors never contain it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final

from switch.wire.framing import WireError

__all__ = [
    "AIP",
    "AMOUNT_AUTHORISED",
    "AMOUNT_OTHER",
    "APPLICATION_CRYPTOGRAM",
    "ATC",
    "CRYPTOGRAM_INFORMATION_DATA",
    "ISSUER_APPLICATION_DATA",
    "ISSUER_AUTHENTICATION_DATA",
    "PAN_SEQUENCE_NUMBER",
    "TERMINAL_COUNTRY_CODE",
    "TRANSACTION_CURRENCY_CODE",
    "TRANSACTION_DATE",
    "TRANSACTION_TYPE",
    "TVR",
    "UNPREDICTABLE_NUMBER",
    "EmvFormatError",
    "Tlv",
    "TlvMap",
    "build",
    "encode_tag",
    "parse",
]

#: 9F26 Application Cryptogram (ARQC/TC/AAC), 8 bytes.
APPLICATION_CRYPTOGRAM: Final = 0x9F26
#: 9F27 Cryptogram Information Data, 1 byte.
CRYPTOGRAM_INFORMATION_DATA: Final = 0x9F27
#: 9F10 Issuer Application Data (holds the CVR and key derivation index).
ISSUER_APPLICATION_DATA: Final = 0x9F10
#: 9F36 Application Transaction Counter, 2 bytes.
ATC: Final = 0x9F36
#: 9F37 Unpredictable Number, 4 bytes.
UNPREDICTABLE_NUMBER: Final = 0x9F37
#: 95 Terminal Verification Results, 5 bytes.
TVR: Final = 0x95
#: 9A Transaction Date, YYMMDD in BCD.
TRANSACTION_DATE: Final = 0x9A
#: 9C Transaction Type, 1 byte.
TRANSACTION_TYPE: Final = 0x9C
#: 5F2A Transaction Currency Code, n3 in 2 bytes BCD.
TRANSACTION_CURRENCY_CODE: Final = 0x5F2A
#: 5F34 Application PAN Sequence Number.
PAN_SEQUENCE_NUMBER: Final = 0x5F34
#: 82 Application Interchange Profile, 2 bytes.
AIP: Final = 0x82
#: 9F02 Amount, Authorised (numeric), 6 bytes BCD.
AMOUNT_AUTHORISED: Final = 0x9F02
#: 9F03 Amount, Other (numeric), 6 bytes BCD.
AMOUNT_OTHER: Final = 0x9F03
#: 9F1A Terminal Country Code, n3 in 2 bytes BCD.
TERMINAL_COUNTRY_CODE: Final = 0x9F1A
#: 91 Issuer Authentication Data (ARPC and response code / CSU) in the response.
ISSUER_AUTHENTICATION_DATA: Final = 0x91

#: Bit of the first tag byte marking a constructed data object.
_CONSTRUCTED_BIT: Final = 0x20
#: Low five bits of the first tag byte all set: more tag bytes follow.
_TAG_NUMBER_MASK: Final = 0x1F
#: Bit of a subsequent tag byte saying yet another byte follows.
_TAG_MORE_BIT: Final = 0x80
#: Longest tag accepted, in bytes (EMV uses at most 3).
_TAG_MAX_BYTES: Final = 4
#: First length byte 0x80 means indefinite length (forbidden in EMV); 0x81.. give the count.
_LENGTH_LONG_BIT: Final = 0x80
#: Most length bytes after 0x8n accepted.
_LENGTH_MAX_BYTES: Final = 4
#: Byte EMV allows before, between and after data objects as padding (0xFF is not: Mastercard
#: uses FFxx template tags).
_PADDING: Final = 0x00
#: Deepest nesting of constructed templates accepted (guards against crafted recursion).
_MAX_DEPTH: Final = 8


class EmvFormatError(WireError):
    """ICC data that is not well-formed BER-TLV. The message gives an offset, never data."""


@dataclass(frozen=True, slots=True)
class Tlv:
    """One BER-TLV data object: a primitive ``value`` or, if constructed, ``children``."""

    tag: int
    value: bytes = field(default=b"", repr=False)
    children: tuple[Tlv, ...] = field(default=(), repr=False)

    def __repr__(self) -> str:
        kind = f"{len(self.children)} children" if self.constructed else f"{len(self.value)} bytes"
        return f"Tlv(tag=0x{self.tag:X}, {kind})"

    @property
    def constructed(self) -> bool:
        """Whether the tag is constructed (a template such as 0x70 or 0x77)."""
        return bool(tag_bytes_first(self.tag) & _CONSTRUCTED_BIT)


def tag_bytes_first(tag: int) -> int:
    """The first byte of the encoded ``tag``."""
    return encode_tag(tag)[0]


def encode_tag(tag: int) -> bytes:
    """The bytes of ``tag`` (``0x9F26 -> b'\\x9f\\x26'``).

    Raises:
        ValueError: ``tag`` is not a valid BER tag number.
    """
    if tag <= 0:
        raise ValueError("tag must be positive")
    raw = tag.to_bytes((tag.bit_length() + 7) // 8, "big")
    multi = raw[0] & _TAG_NUMBER_MASK == _TAG_NUMBER_MASK
    if len(raw) > _TAG_MAX_BYTES or multi != (len(raw) > 1):
        raise ValueError("not a valid BER tag")
    if any(not b & _TAG_MORE_BIT for b in raw[1:-1]) or (len(raw) > 1 and raw[-1] & _TAG_MORE_BIT):
        raise ValueError("not a valid BER tag")
    return raw


def _encode_length(length: int) -> bytes:
    if length < _LENGTH_LONG_BIT:
        return bytes([length])
    raw = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([_LENGTH_LONG_BIT | len(raw)]) + raw


def _parse(data: bytes, start: int, end: int, depth: int) -> tuple[Tlv, ...]:
    if depth > _MAX_DEPTH:
        raise EmvFormatError(f"templates nested deeper than {_MAX_DEPTH} at offset {start}")
    items: list[Tlv] = []
    pos = start
    while pos < end:
        if data[pos] == _PADDING:
            pos += 1
            continue
        tag_start = pos
        first = data[pos]
        pos += 1
        if first & _TAG_NUMBER_MASK == _TAG_NUMBER_MASK:
            while True:
                if pos >= end:
                    raise EmvFormatError(f"tag truncated at offset {tag_start}")
                byte = data[pos]
                pos += 1
                if not byte & _TAG_MORE_BIT:
                    break
                if pos - tag_start >= _TAG_MAX_BYTES:
                    raise EmvFormatError(f"tag too long at offset {tag_start}")
        tag = int.from_bytes(data[tag_start:pos], "big")
        if pos >= end:
            raise EmvFormatError(f"length of tag at offset {tag_start} missing")
        length = data[pos]
        pos += 1
        if length & _LENGTH_LONG_BIT:
            count = length & ~_LENGTH_LONG_BIT
            if count == 0 or count > _LENGTH_MAX_BYTES:
                raise EmvFormatError(f"unsupported length form of tag at offset {tag_start}")
            if pos + count > end:
                raise EmvFormatError(f"length of tag at offset {tag_start} truncated")
            length = int.from_bytes(data[pos : pos + count], "big")
            pos += count
        if pos + length > end:
            raise EmvFormatError(f"value of tag at offset {tag_start} overruns its container")
        if first & _CONSTRUCTED_BIT:
            children = _parse(data, pos, pos + length, depth + 1)
            items.append(Tlv(tag, data[pos : pos + length], children))
        else:
            items.append(Tlv(tag, data[pos : pos + length]))
        pos += length
    return tuple(items)


def parse(data: bytes) -> tuple[Tlv, ...]:
    """Parse BER-TLV ``data`` (e.g. DE55) into data objects, templates recursively.

    >>> [(hex(t.tag), t.value.hex()) for t in parse(bytes.fromhex("9F02060000000123455F340102"))]
    [('0x9f02', '000000012345'), ('0x5f34', '02')]

    Raises:
        EmvFormatError: truncated or malformed tags or lengths, indefinite lengths,
            excessive nesting.
    """
    return _parse(bytes(data), 0, len(data), 0)


def _build_one(item: Tlv) -> bytes:
    tag = encode_tag(item.tag)
    if tag[0] & _CONSTRUCTED_BIT and item.children:
        value = b"".join(_build_one(child) for child in item.children)
    else:
        value = bytes(item.value)
    return tag + _encode_length(len(value)) + value


def build(items: Iterable[Tlv | tuple[int, bytes]]) -> bytes:
    """Encode data objects as BER-TLV (minimal length forms).

    >>> build([(0x9F02, bytes.fromhex("000000012345")), (0x5F34, b"\\x02")]).hex().upper()
    '9F02060000000123455F340102'

    Args:
        items: ``Tlv`` objects (constructed ones built from their children when they have
            any) or ``(tag, value)`` pairs.

    Raises:
        ValueError: an invalid tag number.
    """
    out = bytearray()
    for item in items:
        tlv = item if isinstance(item, Tlv) else Tlv(item[0], bytes(item[1]))
        out += _build_one(tlv)
    return bytes(out)


class TlvMap(Mapping[int, bytes]):
    """Read-only tag -> value view of parsed ICC data, searching inside templates.

    The first occurrence of a tag wins (depth-first, in order).

    >>> m = TlvMap.from_bytes(bytes.fromhex("9F02060000000123455F340102"))
    >>> m[PAN_SEQUENCE_NUMBER], AMOUNT_OTHER in m
    (b'\\x02', False)
    """

    __slots__ = ("_items", "_values")

    def __init__(self, items: Iterable[Tlv]) -> None:
        self._items = tuple(items)
        values: dict[int, bytes] = {}
        stack = list(reversed(self._items))
        while stack:
            node = stack.pop()
            values.setdefault(node.tag, node.value)
            stack.extend(reversed(node.children))
        self._values = values

    @classmethod
    def from_bytes(cls, data: bytes) -> TlvMap:
        """Parse ``data`` and index it.

        Raises:
            EmvFormatError: ``data`` is not well-formed BER-TLV.
        """
        return cls(parse(data))

    @property
    def items_tree(self) -> tuple[Tlv, ...]:
        """The top-level data objects as parsed."""
        return self._items

    def __getitem__(self, tag: int) -> bytes:
        return self._values[tag]

    def __iter__(self) -> Iterator[int]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"TlvMap(tags=[{', '.join(f'0x{t:X}' for t in self._values)}])"
