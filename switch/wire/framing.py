"""Length-prefixed framing of ISO 8583 messages on a byte stream (sans-IO).

What lives here: :class:`FrameDecoder`, fed the bytes a connection reads and returning whole
frame bodies, and :func:`encode_frame`, which prefixes a body with its length header. Four
header kinds exist (:data:`HeaderKind`): ``"binary2"`` (2-byte big-endian length, the
default), ``"binary4"`` (4-byte big-endian length), ``"ascii4"`` (four ASCII decimal digits)
and ``"bcd2"`` (two bytes of packed BCD). A length counts the body only, or the body and the
header itself (:class:`Framing` ``includes_itself``). Headers are checked strictly: digits
only, no sign, space or underscore, and a zero or oversize length is rejected as soon as the
header is complete, before any byte of the body is kept. A zero length (the keep-alive
some links send) is rejected too, unless the decoder is told to accept it
(``empty_frames=True``): it then yields an empty body. :func:`keepalive_frame` is the
zero-length frame of a header kind.

A frame body may start with an envelope the network puts before the ISO message
(:data:`EnvelopeKind`): a 5-byte TPDU (``"tpdu"``: id, destination, origin; the answer swaps
the two addresses), the 22-byte header of Visa's BASE I (``"visa"``: the answer swaps the
destination and source station ids and carries its own total length) or a fixed number of
opaque bytes echoed as they are (``"fixed"``). :func:`split_envelope` takes it off a request
and :func:`answer_envelope` makes the one of its answer.

What does not: sockets, deadlines and TLS (server.py), the message inside a frame (codec.py).
The decoder is modelled on h2's ``FrameBuffer``: feed bytes, take frames, no I/O.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Final, Literal, get_args

#: Length header kinds (see the module docstring); ``switch.config`` types its setting with it.
HeaderKind = Literal["binary2", "binary4", "ascii4", "bcd2"]
#: What may precede the ISO message inside a frame (see the module docstring).
EnvelopeKind = Literal["none", "tpdu", "fixed", "visa"]

__all__ = [
    "ENVELOPE_KINDS",
    "HEADER_KINDS",
    "EnvelopeKind",
    "FrameDecoder",
    "Framing",
    "FramingError",
    "HeaderKind",
    "WireError",
    "answer_envelope",
    "encode_frame",
    "header_size",
    "keepalive_frame",
    "split_envelope",
]

#: The header kinds, in the order of HeaderKind.
HEADER_KINDS: Final[tuple[HeaderKind, ...]] = get_args(HeaderKind)
#: The envelope kinds, in the order of EnvelopeKind.
ENVELOPE_KINDS: Final[tuple[EnvelopeKind, ...]] = get_args(EnvelopeKind)
#: Bytes taken by the length header of each kind.
_HEADER_SIZE: Final[dict[str, int]] = {"binary2": 2, "binary4": 4, "ascii4": 4, "bcd2": 2}
#: Largest length each header kind can express at all (binary4: what a frame may ever be).
_HEADER_CAPACITY: Final[dict[str, int]] = {
    "binary2": 0xFFFF, "binary4": 0xFFFF, "ascii4": 9999, "bcd2": 9999,
}  # fmt: skip
#: Size of a TPDU (ISO 8583 over TCP/IP of terminal networks): id 1, destination 2, origin 2.
TPDU_SIZE: Final = 5
#: Size of the Visa BASE I message header (its first byte says 22, 0x16).
VISA_HEADER_SIZE: Final = 22
#: Offsets in the Visa header: total message length (2 bytes), destination and source
#: station ids (3 bytes each).
_VISA_LENGTH, _VISA_DEST, _VISA_SOURCE = 3, 5, 8
#: Largest fixed envelope, in bytes.
MAX_ENVELOPE: Final = 64
#: Bytes of the ASCII digits 0-9 (``int()`` would also accept signs, spaces and underscores).
_ASCII_DIGITS: Final = frozenset(b"0123456789")
#: Default largest frame body the decoder accepts, in bytes (ListenerConfig.max_frame).
DEFAULT_MAX_FRAME: Final = 8192


class WireError(Exception):
    """Base of the wire layer's errors (framing, format, EMV); defined here, the lowest module."""


class FramingError(WireError):
    """The byte stream cannot be framed any more; the connection must be closed.

    Attributes:
        kind: a short fixed identifier for metrics and logs: ``"zero_length"``,
            ``"oversize"`` or ``"bad_header"``. The message never contains stream bytes.
    """

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"framing error ({kind}): {detail}")
        self.kind = kind


@dataclass(frozen=True, slots=True)
class Framing:
    """How the frames of one listener are delimited: length header and envelope.

    >>> Framing("binary4", includes_itself=True).header_size
    4

    Raises:
        ValueError: an unknown header or envelope kind, or an envelope size that does not fit
            the kind (``fixed``: 1 to 64 bytes; the others have their own size).
    """

    header: HeaderKind = "binary2"
    #: Whether the length in the header counts the header's own bytes too.
    includes_itself: bool = False
    envelope: EnvelopeKind = "none"
    #: Bytes of a ``fixed`` envelope (the other kinds have their own size).
    envelope_size: int = 0

    def __post_init__(self) -> None:
        header_size(self.header)
        if self.envelope not in ENVELOPE_KINDS:
            raise ValueError(f"unknown envelope kind {self.envelope!r}")
        if self.envelope == "fixed":
            if not 1 <= self.envelope_size <= MAX_ENVELOPE:
                raise ValueError(f"a fixed envelope is 1 to {MAX_ENVELOPE} bytes")
        elif self.envelope_size not in (0, envelope_bytes(self.envelope, 0)):
            raise ValueError(f"a {self.envelope} envelope has its own size")

    @property
    def header_size(self) -> int:
        """Bytes taken by the length header."""
        return header_size(self.header)

    @property
    def envelope_bytes(self) -> int:
        """Bytes of the envelope that starts every frame body (0 without one)."""
        return envelope_bytes(self.envelope, self.envelope_size)


def envelope_bytes(kind: EnvelopeKind, size: int) -> int:
    """The size of an envelope of ``kind`` (``size`` is that of a ``fixed`` one)."""
    return {"none": 0, "tpdu": TPDU_SIZE, "visa": VISA_HEADER_SIZE}.get(kind, size)


def _framing(header: HeaderKind | Framing) -> Framing:
    return header if isinstance(header, Framing) else _plain_framing(header)


@functools.cache
def _plain_framing(header: HeaderKind) -> Framing:
    """The ``Framing`` of a bare header kind (a handful of values: built once each)."""
    return Framing(header)


def split_envelope(framing: Framing, frame: bytes) -> tuple[bytes, bytes]:
    """Split a frame body into its envelope and the ISO message after it.

    >>> split_envelope(Framing(envelope="tpdu"), bytes.fromhex("6000010002") + b"0800")
    (b'`\\x00\\x01\\x00\\x02', b'0800')

    Raises:
        FramingError: the body is shorter than its envelope, or a Visa header does not say
            22 bytes (``bad_envelope``).
    """
    size = framing.envelope_bytes
    if not size:
        return b"", frame
    if len(frame) <= size:
        raise FramingError("bad_envelope", "frame shorter than its message header")
    if framing.envelope == "visa" and frame[0] != VISA_HEADER_SIZE:
        raise FramingError("bad_envelope", "Visa message header does not announce 22 bytes")
    return frame[:size], frame[size:]


def answer_envelope(framing: Framing, envelope: bytes, message: bytes) -> bytes:
    """The envelope of an answer ``message`` to a request that came with ``envelope``.

    A TPDU and a Visa header swap their two addresses; a Visa header carries the answer's
    total length (header and message); a fixed envelope is echoed. Without a request
    envelope (an answer sent before any request), a TPDU or fixed envelope is zeros and a
    Visa header is the bare 22-byte form with zero station ids.

    >>> answer_envelope(Framing(envelope="tpdu"), bytes.fromhex("6000010002"), b"0810").hex()
    '6000020001'
    """
    size = framing.envelope_bytes
    if not size:
        return b""
    if len(envelope) != size:
        visa = framing.envelope == "visa"
        envelope = bytes([VISA_HEADER_SIZE, 1, 2]) + bytes(size - 3) if visa else bytes(size)
    if framing.envelope == "tpdu":
        return envelope[:1] + envelope[3:5] + envelope[1:3]
    if framing.envelope == "visa":
        out = bytearray(envelope)
        total = size + len(message)
        out[_VISA_LENGTH : _VISA_LENGTH + 2] = total.to_bytes(2, "big")
        out[_VISA_DEST : _VISA_DEST + 3] = envelope[_VISA_SOURCE : _VISA_SOURCE + 3]
        out[_VISA_SOURCE : _VISA_SOURCE + 3] = envelope[_VISA_DEST : _VISA_DEST + 3]
        return bytes(out)
    return envelope


def header_size(header: HeaderKind) -> int:
    """Return how many bytes the length header of ``header`` takes.

    Raises:
        ValueError: ``header`` is not a known header kind.
    """
    try:
        return _HEADER_SIZE[header]
    except KeyError:
        raise ValueError(f"unknown header kind {header!r}") from None


def _parse_header(header: HeaderKind, raw: bytes) -> int:
    """Return the body length a complete header announces.

    Raises:
        FramingError: the header is not well formed for its kind (``bad_header``).
    """
    if header in ("binary2", "binary4"):
        return int.from_bytes(raw, "big")
    if header == "ascii4":
        if not all(b in _ASCII_DIGITS for b in raw):
            raise FramingError("bad_header", "ASCII length header holds a non-digit")
        return int(raw.decode("ascii"))
    # bcd2: every nibble must be a decimal digit.
    value = 0
    for byte in raw:
        high, low = byte >> 4, byte & 0x0F
        if high > 9 or low > 9:
            raise FramingError("bad_header", "BCD length header holds a non-decimal nibble")
        value = value * 100 + high * 10 + low
    return value


class FrameDecoder:
    """Turn a stream of bytes into frame bodies.

    >>> d = FrameDecoder("ascii4")
    >>> d.feed(b"0003ab")
    []
    >>> d.in_progress
    True
    >>> d.feed(b"c0001x")
    [b'abc', b'x']
    >>> d.in_progress
    False

    With ``empty_frames=True`` a zero-length frame is a frame with an empty body:

    >>> FrameDecoder("binary2", empty_frames=True).feed(b"\\x00\\x00\\x00\\x01z")
    [b'', b'z']

    After a :class:`FramingError` the decoder is broken: every later ``feed`` raises again.
    """

    def __init__(
        self,
        header: HeaderKind | Framing = "binary2",
        max_frame: int = DEFAULT_MAX_FRAME,
        *,
        empty_frames: bool = False,
    ) -> None:
        """Create a decoder.

        Args:
            header: the length header kind of the connection, or its whole framing.
            max_frame: the largest body accepted, in bytes (at least 1).
            empty_frames: accept zero-length frames (keep-alives) as empty bodies instead
                of raising ``zero_length``.

        Raises:
            ValueError: unknown header kind or a ``max_frame`` below 1.
        """
        framing = _framing(header)
        self._header: HeaderKind = framing.header
        self._header_size = framing.header_size
        #: What the announced length counts besides the body (the header, when it includes
        #: itself).
        self._overhead = self._header_size if framing.includes_itself else 0
        if max_frame < 1:
            raise ValueError("max_frame must be at least 1")
        self._max_frame = max_frame
        self._empty_frames = empty_frames
        self._buffer = bytearray()
        #: Length of the body being collected, or None while the header is incomplete.
        self._body_length: int | None = None
        self._error: FramingError | None = None

    @property
    def in_progress(self) -> bool:
        """Whether some bytes of an incomplete frame (header or body) are buffered."""
        return bool(self._buffer) or self._body_length is not None

    def feed(self, data: bytes) -> list[bytes]:
        """Add ``data`` read from the stream; return the bodies of the frames it completes.

        Args:
            data: the next bytes of the stream (any length, including zero).

        Returns:
            Complete frame bodies in stream order, headers stripped.

        Raises:
            FramingError: an oversize or malformed header, or a zero-length one when empty
                frames are not accepted.
        """
        if self._error is not None:
            raise self._error
        self._buffer += data
        frames: list[bytes] = []
        while True:
            if self._body_length is None:
                if len(self._buffer) < self._header_size:
                    return frames
                length = self._check_header(bytes(self._buffer[: self._header_size]))
                del self._buffer[: self._header_size]
                self._body_length = length
            if len(self._buffer) < self._body_length:
                return frames
            frames.append(bytes(self._buffer[: self._body_length]))
            del self._buffer[: self._body_length]
            self._body_length = None

    def _check_header(self, raw: bytes) -> int:
        try:
            announced = _parse_header(self._header, raw)
            if announced < self._overhead:
                raise FramingError("bad_header", "length shorter than the header itself")
            length = announced - self._overhead
            if length == 0 and not self._empty_frames:
                raise FramingError("zero_length", "frame announces an empty body")
            if length > self._max_frame:
                raise FramingError(
                    "oversize", f"frame announces {length} bytes, limit {self._max_frame}"
                )
        except FramingError as exc:
            self._error = exc
            self._buffer.clear()
            raise
        return length


def encode_frame(
    body: bytes, header: HeaderKind | Framing = "binary2", max_frame: int = 0xFFFF
) -> bytes:
    """Prefix ``body`` with its length header.

    >>> encode_frame(b"abc", "ascii4")
    b'0003abc'
    >>> encode_frame(b"x" * 12, "bcd2")[:2]
    b'\\x00\\x12'
    >>> encode_frame(b"abc", Framing("binary4", includes_itself=True))
    b'\\x00\\x00\\x00\\x07abc'

    Args:
        body: the frame body (envelope, if any, and encoded message), not empty.
        header: the header kind, or the whole framing.
        max_frame: the largest body allowed (also capped by what the header can express).

    Returns:
        The header followed by the body.

    Raises:
        ValueError: an empty body, a body too long for ``max_frame`` or the header, or an
            unknown header kind.
    """
    framing = _framing(header)
    kind, size = framing.header, framing.header_size
    length = len(body)
    if length == 0:
        raise ValueError("cannot frame an empty body")
    if length > max_frame:
        raise ValueError(f"body of {length} bytes exceeds the frame limit")
    if framing.includes_itself:
        length += size
    if length > _HEADER_CAPACITY[kind]:
        raise ValueError(f"body of {len(body)} bytes exceeds what the header can express")
    if kind in ("binary2", "binary4"):
        prefix = length.to_bytes(size, "big")
    elif kind == "ascii4":
        prefix = f"{length:04d}".encode("ascii")
    else:
        prefix = bytes.fromhex(f"{length:04d}")
    return prefix + bytes(body)


def keepalive_frame(header: HeaderKind | Framing = "binary2") -> bytes:
    """The zero-length frame (a length header announcing an empty body) of ``header``.

    >>> keepalive_frame("ascii4"), keepalive_frame("bcd2")
    (b'0000', b'\\x00\\x00')
    >>> keepalive_frame(Framing("binary4", includes_itself=True))
    b'\\x00\\x00\\x00\\x04'
    """
    framing = _framing(header)
    length = framing.header_size if framing.includes_itself else 0
    if framing.header in ("binary2", "binary4"):
        return length.to_bytes(framing.header_size, "big")
    if framing.header == "ascii4":
        return f"{length:04d}".encode("ascii")
    return bytes.fromhex(f"{length:04d}")
