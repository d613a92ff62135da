"""Length-prefixed framing of ISO 8583 messages on a byte stream (sans-IO).

What lives here: :class:`FrameDecoder`, fed the bytes a connection reads and returning whole
frame bodies, and :func:`encode_frame`, which prefixes a body with its length header. Three
header kinds exist (:data:`HeaderKind`): ``"binary2"`` (2-byte big-endian length
that excludes itself, the default), ``"ascii4"`` (four ASCII decimal digits) and ``"bcd2"``
(two bytes of packed BCD). Headers are checked strictly: digits only, no sign, space or
underscore, and an oversize length is rejected as soon as the header is complete, before any
byte of the body is kept. A zero length (the keep-alive some links send) is rejected too,
unless the decoder is told to accept it (``empty_frames=True``): it then yields an empty
body. :func:`keepalive_frame` is the zero-length frame of a header kind.

What does not: sockets, deadlines and TLS (server.py), the message inside a frame (codec.py).
The decoder is modelled on h2's ``FrameBuffer``: feed bytes, take frames, no I/O.
"""

from __future__ import annotations

from typing import Final, Literal

#: Length header kinds (see the module docstring); ``switch.config`` types its setting with it.
HeaderKind = Literal["binary2", "ascii4", "bcd2"]

__all__ = [
    "FrameDecoder",
    "FramingError",
    "HeaderKind",
    "WireError",
    "encode_frame",
    "header_size",
    "keepalive_frame",
]

#: Bytes taken by the length header of each kind.
_HEADER_SIZE: Final[dict[str, int]] = {"binary2": 2, "ascii4": 4, "bcd2": 2}
#: Largest length each header kind can express at all.
_HEADER_CAPACITY: Final[dict[str, int]] = {"binary2": 0xFFFF, "ascii4": 9999, "bcd2": 9999}
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
    if header == "binary2":
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
        header: HeaderKind = "binary2",
        max_frame: int = DEFAULT_MAX_FRAME,
        *,
        empty_frames: bool = False,
    ) -> None:
        """Create a decoder.

        Args:
            header: the length header kind of the connection.
            max_frame: the largest body accepted, in bytes (at least 1).
            empty_frames: accept zero-length frames (keep-alives) as empty bodies instead
                of raising ``zero_length``.

        Raises:
            ValueError: unknown header kind or a ``max_frame`` below 1.
        """
        self._header: HeaderKind = header
        self._header_size = header_size(header)
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
            length = _parse_header(self._header, raw)
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


def encode_frame(body: bytes, header: HeaderKind = "binary2", max_frame: int = 0xFFFF) -> bytes:
    """Prefix ``body`` with its length header.

    >>> encode_frame(b"abc", "ascii4")
    b'0003abc'
    >>> encode_frame(b"x" * 12, "bcd2")[:2]
    b'\\x00\\x12'

    Args:
        body: the frame body (an encoded message), not empty.
        header: the header kind.
        max_frame: the largest body allowed (also capped by what the header can express).

    Returns:
        The header followed by the body.

    Raises:
        ValueError: an empty body, a body too long for ``max_frame`` or the header, or an
            unknown header kind.
    """
    size = header_size(header)
    length = len(body)
    if length == 0:
        raise ValueError("cannot frame an empty body")
    if length > min(max_frame, _HEADER_CAPACITY[header]):
        raise ValueError(f"body of {length} bytes exceeds the frame limit")
    if header == "binary2":
        prefix = length.to_bytes(size, "big")
    elif header == "ascii4":
        prefix = f"{length:04d}".encode("ascii")
    else:
        prefix = bytes.fromhex(f"{length:04d}")
    return prefix + bytes(body)


def keepalive_frame(header: HeaderKind = "binary2") -> bytes:
    """The zero-length frame (a length header announcing an empty body) of ``header``.

    >>> keepalive_frame("ascii4"), keepalive_frame("bcd2")
    (b'0000', b'\\x00\\x00')
    """
    return b"0" * 4 if header == "ascii4" else bytes(header_size(header))
