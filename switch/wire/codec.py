"""Bytes <-> typed ISO 8583 messages (sans-IO), with format errors as values for answering.

What lives here: :func:`decode` (a frame body to a typed message), :func:`encode` (the
reverse), :func:`decode_fields` (a frame body to its raw field dictionary, for tests, tools
and the CLI), :class:`FormatError` and :func:`format_error_response`, which builds the
DE39 = 30 answer to a body that cannot be used when its MTI and STAN can be recovered.

Errors: ``decode`` raises nothing but :class:`FormatError`, whatever the bytes. pyiso8583's
``DecodeError`` carries the raw message, so it never leaves this module: only the field
number, the position and a sanitised reason are kept. A tertiary bitmap (DE65) in a spec
that does not define DE129-192 (a profile's ``tertiary_bitmap``), or a data element the spec
does not define, is a :class:`FormatError` too, with the MTI, STAN and echo fields before it
recovered, so it is answered rather than closing the link. Length prefixes in text (ASCII or
EBCDIC) must be digits of their encoding.
``encode`` raises ``ValueError`` or ``TypeError`` for programmer errors (a message that cannot
be laid out).

Both directions take ``fastpath``'s compiled decoder and encoder first (byte-identical to
pyiso8583 where they answer) and pyiso8583 for everything they leave to it, errors included.

What does not: framing (framing.py), what a field number means (messages.py), the pyiso8583
spec data (spec.py), BER-TLV of DE55 (emv.py), the fast path itself (fastpath.py).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Final

import iso8583

from hsm.pan import scrub
from switch.wire import fastpath, messages
from switch.wire.framing import WireError
from switch.wire.messages import ErrorResponse, FieldError, Message
from switch.wire.spec import SpecChoice, shared_spec, sub_layouts

__all__ = [
    "FormatError",
    "decode",
    "decode_fields",
    "encode",
    "format_error_response",
]

#: Response code hinted for a message that cannot be parsed: 30 = format error.
FORMAT_ERROR_CODE: Final = "30"
#: Characters kept from a library error text (lengths and words, no data).
_SAFE_REASON = re.compile(r"[^A-Za-z0-9 ,.]")
#: Longest reason text kept from a library error.
_REASON_MAX: Final = 80
#: pyiso8583 keys of the MTI and bitmaps, named for errors.
_STRUCTURE_NAMES: Final = {"t": "mti", "p": "bitmap", "1": "bitmap", "h": "header"}
#: Characters of one decoded bitmap (hex text of 8 bytes); a longer secondary one means a
#: tertiary bitmap followed (DE65), which the switch does not serve.
_HEX_BITMAP_WIDTH: Final = 16
#: Data elements a bitmap can announce: 2-128, and 129-192 behind a tertiary bitmap
#: (pyiso8583 4.x reads DE65 as the tertiary bitmap indicator, never as data).
_BITMAP_FIELDS: Final = tuple(str(i) for i in range(2, 193) if i != 65)
#: How an element the spec does not define is read, only to get past it: LLLVAR bytes.
#: Such a message is answered as a format error whatever this reads.
_UNDEFINED_FIELD: Final = {
    "data_enc": "b", "len_enc": "ascii", "len_type": 3, "max_len": 999, "desc": "undefined",
}  # fmt: skip
#: The digit bytes of a text length prefix, by its encoding (ASCII 0x30-0x39, EBCDIC
#: 0xF0-0xF9); other text encodings are checked as ASCII.
_PREFIX_DIGITS: Final = {"cp500": frozenset(range(0xF0, 0xFA))}
_ASCII_DIGITS: Final = frozenset(range(0x30, 0x3A))
#: The first element behind a tertiary bitmap: a spec that defines it accepts one.
_FIRST_TERTIARY: Final = "129"
#: Exceptions a malformed body can provoke inside pyiso8583 besides DecodeError.
_DECODE_FAILURES: Final = (ValueError, IndexError, KeyError, TypeError, LookupError)


class FormatError(WireError):
    """A frame body that is not a usable message; answered with 30 when possible.

    Attributes:
        reason: what is wrong, a fixed text without message bytes or PAN.
        field: the field at fault (number as text, ``"mti"``, ``"bitmap"``) or None.
        mti, stan, transmission_time, acquirer_id, rrn, terminal_id, network_code: recovered
            values (DE0, 11, 7, 32, 37, 41, 70), each
            None when absent or malformed; enough to build the 30 answer.
        response_code_hint: the DE39 to answer with (30, format error).
    """

    response_code_hint: str = FORMAT_ERROR_CODE

    def __init__(
        self,
        reason: str,
        *,
        field: str | None = None,
        mti: str | None = None,
        stan: str | None = None,
        transmission_time: str | None = None,
        acquirer_id: str | None = None,
        rrn: str | None = None,
        terminal_id: str | None = None,
        network_code: str | None = None,
    ) -> None:
        where = f"field {field}: " if field else ""
        ident = f" (mti={mti or '?'}, stan={stan or '?'})"
        super().__init__(f"format error: {where}{reason}{ident}")
        self.reason = reason
        self.field = field
        self.mti = mti
        self.stan = stan
        self.transmission_time = transmission_time
        self.acquirer_id = acquirer_id
        self.rrn = rrn
        self.terminal_id = terminal_id
        self.network_code = network_code

    @classmethod
    def _with_context(
        cls, reason: str, field: str | None, partial: Mapping[str, Any]
    ) -> FormatError:
        ctx = messages.recover_context(partial)
        return cls(reason, field=field, **ctx)


def _safe_reason(text: str) -> str:
    return _SAFE_REASON.sub("", scrub(text))[:_REASON_MAX].strip() or "malformed"


def _field_name(key: str) -> str:
    return _STRUCTURE_NAMES.get(key, key)


def _lenient(spec: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``spec`` whose text fields decode any byte (latin-1), for recovery only."""
    out = {k: dict(v) for k, v in spec.items()}
    for item in out.values():
        if item["data_enc"] == "ascii":
            item["data_enc"] = "latin-1"
    return out


def _guarded(spec: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``spec`` where every element a bitmap can announce is defined.

    pyiso8583 fails with a bare ``KeyError`` on an element its spec lacks (one behind a
    tertiary bitmap, say), which would lose the MTI and STAN needed to answer; with a stub
    for each, it reads on (or fails with a ``DecodeError`` that keeps what came before), and
    ``_decode_dict`` then answers the undefined element as a format error.
    """
    out = dict(spec)
    for key in _BITMAP_FIELDS:
        out.setdefault(key, dict(_UNDEFINED_FIELD))
    return out


_LENIENT_CACHE: Final[dict[SpecChoice, dict[str, Any]]] = {}
_GUARDED_CACHE: Final[dict[SpecChoice, dict[str, Any]]] = {}


def _guarded_spec(kind: SpecChoice) -> dict[str, Any]:
    spec = _GUARDED_CACHE.get(kind)
    if spec is None:
        spec = _GUARDED_CACHE[kind] = _guarded(shared_spec(kind))
    return spec


def _recover(frame: bytes, kind: SpecChoice, partial: Mapping[str, Any]) -> dict[str, Any]:
    """Best-effort field dictionary of a body that failed to decode.

    Combines what the strict decode got before failing with a second pass that reads text
    fields as latin-1, so that a non-ASCII byte in, say, DE4 does not hide DE11.
    """
    merged: dict[str, Any] = {}
    lenient = _LENIENT_CACHE.get(kind)
    if lenient is None:
        lenient = _LENIENT_CACHE[kind] = _lenient(_guarded_spec(kind))
    try:
        merged.update(iso8583.decode(frame, lenient)[0])
    except iso8583.DecodeError as exc:
        merged.update(exc.doc_dec)
    except _DECODE_FAILURES:
        pass
    merged.update(partial)
    return merged


def _decode_dict(frame: bytes, kind: SpecChoice) -> dict[str, str]:
    """pyiso8583-decode ``frame`` strictly; raise FormatError (with context) on failure."""
    if not isinstance(frame, bytes | bytearray):
        raise TypeError("frame must be bytes")
    defined = shared_spec(kind)
    spec = _guarded_spec(kind)
    frame = bytes(frame)
    fast = fastpath.decode(frame, spec)
    if fast is not None:  # length prefixes are plain digits there: only the checks below
        return _checked(fast, defined)
    try:
        doc_dec, doc_enc = iso8583.decode(frame, spec)
    except iso8583.DecodeError as exc:
        reason = _safe_reason(f"{exc.msg} at position {exc.pos}")
        field = _field_name(str(exc.field))
        raise FormatError._with_context(reason, field, _recover(frame, kind, exc.doc_dec)) from None
    except _DECODE_FAILURES as exc:
        # e.g. a bitmap bit for a field the spec does not define (tertiary bitmap).
        reason = _safe_reason(f"undecodable message ({type(exc).__name__})")
        raise FormatError._with_context(reason, None, _recover(frame, kind, {})) from None
    for key, enc in doc_enc.items():
        item = spec.get(key, {})
        len_enc = item.get("len_enc")
        if item.get("len_type") and len_enc not in ("b", "bcd"):
            allowed = _PREFIX_DIGITS.get(len_enc, _ASCII_DIGITS)
            if not all(b in allowed for b in enc["len"]):
                raise FormatError._with_context("length prefix is not digits", key, doc_dec)
    return _checked(doc_dec, defined)


def _checked(doc_dec: dict[str, str], defined: Mapping[str, Any]) -> dict[str, str]:
    """``doc_dec`` unless it holds a tertiary bitmap or an element the spec does not define."""
    # Binary bitmaps decode to hex text too, so one width covers both encodings.
    if len(doc_dec.get("1", "")) > _HEX_BITMAP_WIDTH and _FIRST_TERTIARY not in defined:
        raise FormatError._with_context("tertiary bitmap not supported", "65", doc_dec)
    for key in doc_dec:
        if key not in defined:
            raise FormatError._with_context("data element not defined by the spec", key, doc_dec)
    return doc_dec


def decode_fields(frame: bytes, spec: SpecChoice = "ascii") -> dict[str, str]:
    """Decode ``frame`` to its fields without typing them: ``{"0": MTI, "2": ..., ...}``.

    Bitmaps are left out; binary fields (and, in the ``"bcd"`` spec, numeric ones) are
    upper-case hex as pyiso8583 gives them, with BCD padding removed. Field contents are
    not validated (that is :func:`decode`'s job).

    Args:
        frame: the frame body (without length header).
        spec: the wire spec.

    Returns:
        Field number (as text, ``"0"`` for the MTI) to decoded value.

    Raises:
        FormatError: the bytes are not an ISO 8583 message of this spec.
    """
    doc = _decode_dict(frame, spec)
    out = {"0": doc["t"]}
    out.update((k, v) for k, v in doc.items() if k not in ("t", "p", "1", "h"))
    return out


def decode(frame: bytes, spec: SpecChoice = "ascii") -> Message:
    """Decode a frame body into a typed message, validating field contents.

    Args:
        frame: the frame body (without length header).
        spec: the wire spec.

    Returns:
        The typed message; :class:`~switch.wire.messages.UnsupportedMessage` for a
        well-formed message whose MTI the switch does not serve.

    Raises:
        FormatError: for any bytes that are not a valid message (never anything else).
        TypeError: ``frame`` is not bytes (a programmer error).
    """
    doc = _decode_dict(frame, spec)
    try:
        return messages.from_fields(doc, sub_layouts(spec))
    except FieldError as exc:
        raise FormatError._with_context(exc.reason, exc.field, doc) from None
    except _DECODE_FAILURES:  # pragma: no cover - defensive: from_fields validates first
        raise FormatError._with_context("field content malformed", None, doc) from None


def encode(msg: Message, spec: SpecChoice = "ascii") -> bytes:
    """Encode a typed message into a frame body.

    Raises:
        TypeError: ``msg`` is not a message dataclass.
        ValueError: the message cannot be laid out in ``spec`` (a wrong field length or
            character set); the text names the field, never its value.
    """
    fields: dict[str, Any] = messages.to_fields(msg, sub_layouts(spec))
    layout = shared_spec(spec)
    fast = fastpath.encode(fields, layout)
    if fast is not None:
        return fast
    try:
        raw, _ = iso8583.encode(fields, layout)
    except iso8583.EncodeError as exc:
        raise ValueError(
            f"cannot encode {type(msg).__name__} field {exc.field}: {_safe_reason(exc.msg)}"
        ) from None
    return bytes(raw)


def format_error_response(
    err: FormatError, spec: SpecChoice = "ascii", *, response_code: str
) -> bytes | None:
    """The encoded format-error answer to ``err``, or None when the message cannot be answered.

    Args:
        err: the error ``decode`` raised.
        spec: the wire spec of the answer.
        response_code: the DE39 to send; the caller takes it from its network profile (the
            code of ``Reason.FORMAT_ERROR``, 30 in ISO 8583:1987), so no table lives here.

    An answer exists when the MTI and the STAN were recovered and the MTI is a request class;
    it echoes DE7, DE32, DE37, DE41 and DE70 when those were recovered too. An answer that the
    peer could not read either (an 0810 without the DE7 or DE70 its spec makes mandatory,
    because the request's were malformed) is no answer: None. With None the server closes the
    connection (or drops the message for a response-class MTI).
    """
    if err.mti is None or err.stan is None or not messages.is_request(err.mti):
        return None
    answer = ErrorResponse(
        mti=messages.response_mti(err.mti),
        stan=err.stan,
        response_code=response_code,
        transmission_time=err.transmission_time,
        acquirer_id=err.acquirer_id,
        rrn=err.rrn,
        terminal_id=err.terminal_id,
        network_code=err.network_code,
    )
    try:
        data = encode(answer, spec)
        decode(data, spec)  # what its peer will do with it
    except (ValueError, FormatError):
        return None
    return data
