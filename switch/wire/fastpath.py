"""A faster decoder and encoder for the common case, compiled from a pyiso8583 spec.

What lives here: :func:`decode` and :func:`encode`, which do what ``iso8583.decode`` (its
field dictionary) and ``iso8583.encode`` (its bytes) do, byte for byte, for the messages
they accept, and return ``None`` for anything else, so that pyiso8583, the reference, decides
and words the error. A spec is compiled once (per dictionary object) into a table of field
layouts; a message is then read with slices and ``int``/``bytes.hex`` instead of pyiso8583's
per-field dictionaries, error bookkeeping and 64-step bitmap loops.

Accepted: specs without a header (``h`` max_len 0); fixed and variable fields counted in
bytes; length prefixes in binary, BCD, or ASCII digits; field data in binary (hex text, as
pyiso8583 gives it) or a text encoding. Not accepted, so always left to pyiso8583: a header,
fields counted in nibbles (BCD numerics), a tertiary bitmap (DE65), an element the spec does
not define, and any byte pyiso8583 might read differently from this module (a prefix that is
not plain digits, a bitmap in hex text with anything but hex digits, extra bytes, a short
field, data a text encoding rejects). ``tests/test_wire_fastpath.py`` holds both directions to
pyiso8583 with hypothesis, on valid messages and on mutated ones.

What does not: the checks of codec.py (undefined elements, tertiary bitmaps, length prefixes
in text: it still runs them on what this returns), typed messages (messages.py).
"""

from __future__ import annotations

import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

#: How a length prefix is read.
_FIXED, _TEXT_DIGITS, _BINARY, _BCD = 0, 1, 2, 3
_DIGITS: Final = frozenset(b"0123456789")
_HEX_TEXT: Final = frozenset("0123456789abcdefABCDEF")
_SECONDARY: Final = 1 << 63  # bit 1 of a primary bitmap read as a 64-bit integer
_TERTIARY: Final = 1 << 63  # bit 65: the first bit of the secondary bitmap


@dataclass(frozen=True, slots=True)
class _Field:
    key: str
    #: Bytes of the length prefix (0: fixed), how to read it, and the maximum length.
    prefix: int
    prefix_kind: int
    max_len: int
    #: The text encoding of the data; None for binary data (hex text in the dictionary).
    text: str | None


@dataclass(frozen=True, slots=True)
class _Compiled:
    mti_binary: bool
    mti_text: str
    bitmap_binary: bool
    bitmap_text: str
    secondary_binary: bool
    secondary_text: str
    #: Index = field number (2-128); None: not defined or not accepted here.
    fields: tuple[_Field | None, ...]


#: Compiled specs by the identity of their dictionary (kept alive beside it: the shared spec
#: dictionaries live as long as the process).
_COMPILED: Final[dict[int, tuple[Mapping[str, Any], _Compiled | None]]] = {}


def _field(key: str, item: Mapping[str, Any]) -> _Field | None:
    if item.get("len_count", "bytes") != "bytes":
        return None
    prefix = int(item["len_type"])
    len_enc = item.get("len_enc", "ascii")
    if prefix == 0:
        kind = _FIXED
    elif len_enc == "b":
        kind = _BINARY
    elif len_enc == "bcd":
        kind = _BCD
    elif len_enc == "ascii":
        kind = _TEXT_DIGITS
    else:
        return None
    data_enc = item["data_enc"]
    if data_enc == "bcd":
        return None
    return _Field(key, prefix, kind, int(item["max_len"]), None if data_enc == "b" else data_enc)


def _compile(spec: Mapping[str, Any]) -> _Compiled | None:
    try:
        if spec["h"]["max_len"] > 0:
            return None
        fields: list[_Field | None] = [None] * 129
        for number in range(2, 129):
            item = spec.get(str(number))
            if item is not None and number != 65:
                fields[number] = _field(str(number), item)
        return _Compiled(
            mti_binary=spec["t"]["data_enc"] == "b",
            mti_text=spec["t"]["data_enc"],
            bitmap_binary=spec["p"]["data_enc"] == "b",
            bitmap_text=spec["p"]["data_enc"],
            secondary_binary=spec["1"]["data_enc"] == "b",
            secondary_text=spec["1"]["data_enc"],
            fields=tuple(fields),
        )
    except (KeyError, TypeError, ValueError):
        return None


def _compiled(spec: Mapping[str, Any]) -> _Compiled | None:
    entry = _COMPILED.get(id(spec))
    if entry is None or entry[0] is not spec:
        entry = _COMPILED[id(spec)] = (spec, _compile(spec))
    return entry[1]


def _bitmap(data: bytes, binary: bool, text: str) -> tuple[str, int] | None:
    """The bitmap as pyiso8583 puts it in the dictionary, and as an integer."""
    if binary:
        return data.hex().upper(), int.from_bytes(data, "big")
    try:
        hex_text = data.decode(text)
    except (UnicodeDecodeError, LookupError):
        return None
    if len(hex_text) != 16 or not _HEX_TEXT.issuperset(hex_text):
        return None
    return hex_text, int(hex_text, 16)


def _numbers(bits: int, offset: int) -> list[int]:
    """Field numbers of the set bits of a 64-bit bitmap (bit 1 is the most significant)."""
    out = []
    while bits:
        top = bits.bit_length()
        out.append(offset + 65 - top)
        bits ^= 1 << (top - 1)
    return out


def decode(frame: bytes, spec: Mapping[str, Any]) -> dict[str, str] | None:
    """``iso8583.decode(frame, spec)[0]``, or None when pyiso8583 must decide."""
    c = _compiled(spec)
    if c is None:
        return None
    out: dict[str, str] = {}
    if c.mti_binary:
        mti = frame[:2]
        if len(mti) != 2:
            return None
        out["t"] = mti.hex().upper()
        idx = 2
    else:
        raw = frame[:4]
        if len(raw) != 4:
            return None
        try:
            out["t"] = raw.decode(c.mti_text)
        except (UnicodeDecodeError, LookupError):
            return None
        idx = 4
    width = 8 if c.bitmap_binary else 16
    primary = _bitmap(frame[idx : idx + width], c.bitmap_binary, c.bitmap_text)
    if primary is None:
        return None
    out["p"], bits = primary
    idx += width
    numbers = _numbers(bits & ~_SECONDARY, 0)
    if bits & _SECONDARY:
        width = 8 if c.secondary_binary else 16
        secondary = _bitmap(frame[idx : idx + width], c.secondary_binary, c.secondary_text)
        if secondary is None:
            return None
        out["1"], bits2 = secondary
        if bits2 & _TERTIARY:
            return None
        idx += width
        numbers += _numbers(bits2, 64)
    fields = c.fields
    end = len(frame)
    for number in numbers:
        f = fields[number]
        if f is None:
            return None
        if f.prefix_kind == _FIXED:
            size = f.max_len
        else:
            raw = frame[idx : idx + f.prefix]
            if len(raw) != f.prefix:
                return None
            if f.prefix_kind == _TEXT_DIGITS:
                if not _DIGITS.issuperset(raw):
                    return None
                size = int(raw)
            elif f.prefix_kind == _BINARY:
                size = int.from_bytes(raw, "big")
            else:
                digits = raw.hex()
                if not digits.isdigit():
                    return None
                size = int(digits)
            if size > f.max_len:
                return None
            idx += f.prefix
        if size == 0:
            out[f.key] = ""
            continue
        data = frame[idx : idx + size]
        if len(data) != size:
            return None
        if f.text is None:
            out[f.key] = data.hex().upper()
        else:
            try:
                out[f.key] = data.decode(f.text)
            except (UnicodeDecodeError, LookupError):
                return None
        idx += size
    if idx != end:
        return None
    return out


def _bitmap_bytes(bits: int, binary: bool, text: str) -> bytes:
    data = bits.to_bytes(8, "big")
    return data if binary else data.hex().upper().encode(text)


def encode(fields: Mapping[str, Any], spec: Mapping[str, Any]) -> bytes | None:
    """``bytes(iso8583.encode(dict(fields), spec)[0])``, or None when pyiso8583 must decide
    (it then raises its ``EncodeError`` for what cannot be laid out)."""
    c = _compiled(spec)
    if c is None:
        return None
    mti = fields.get("t")
    if not isinstance(mti, str):
        return None
    parts: list[bytes] = []
    try:
        if c.mti_binary:
            head = binascii.a2b_hex(mti)
            if len(head) != 2:
                return None
        else:
            head = mti.encode(c.mti_text)
            if len(head) != 4:
                return None
    except (ValueError, UnicodeEncodeError, LookupError):
        return None
    primary = secondary = 0
    numbers: list[int] = []
    for key in fields:
        if key == "t":
            continue
        if not (key.isascii() and key.isdigit()):
            return None
        number = int(key)
        if not 2 <= number <= 128 or number == 65 or str(number) != key:
            return None
        numbers.append(number)
        if number <= 64:
            primary |= 1 << (64 - number)
        else:
            secondary |= 1 << (128 - number)
    if secondary:
        primary |= _SECONDARY
    numbers.sort()
    table = c.fields
    for number in numbers:
        f = table[number]
        if f is None:
            return None
        value = fields[f.key]
        if not isinstance(value, str):
            return None
        try:
            data = binascii.a2b_hex(value) if f.text is None else value.encode(f.text)
        except (ValueError, UnicodeEncodeError, LookupError):
            return None
        size = len(data)
        if f.prefix_kind == _FIXED:
            if size != f.max_len:
                return None
            parts.append(data)
            continue
        if size > f.max_len:
            return None
        if f.prefix_kind == _TEXT_DIGITS:
            prefix = str(size).zfill(f.prefix).encode("ascii")
        elif f.prefix_kind == _BINARY:
            if size >= 1 << (8 * f.prefix):
                return None
            prefix = size.to_bytes(f.prefix, "big")
        else:
            digits = str(size).zfill(2 * f.prefix)
            prefix = bytes.fromhex(digits)
        if len(prefix) != f.prefix:
            return None
        parts.append(prefix)
        parts.append(data)
    out = [head, _bitmap_bytes(primary, c.bitmap_binary, c.bitmap_text)]
    if secondary:
        out.append(_bitmap_bytes(secondary, c.secondary_binary, c.secondary_text))
    return b"".join(out + parts)
