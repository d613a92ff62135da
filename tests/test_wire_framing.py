"""Tests of switch.wire.framing: header kinds, split/merged feeds, strict header rejection."""

from __future__ import annotations

import pytest

from switch.wire.framing import FrameDecoder, FramingError, HeaderKind, encode_frame

HEADERS: tuple[HeaderKind, ...] = ("binary2", "ascii4", "bcd2")

# Headers written out by hand (not by encode_frame) for a 300-byte body.
HEADER_300 = {"binary2": b"\x01\x2c", "ascii4": b"0300", "bcd2": b"\x03\x00"}


@pytest.mark.parametrize("header", HEADERS)
def test_hand_written_header_is_parsed(header: HeaderKind) -> None:
    body = bytes(range(256)) + b"x" * 44
    assert FrameDecoder(header).feed(HEADER_300[header] + body) == [body]
    assert encode_frame(body, header) == HEADER_300[header] + body


@pytest.mark.parametrize("header", HEADERS)
def test_byte_by_byte_and_merged(header: HeaderKind) -> None:
    bodies = [b"a", b"bc" * 50, bytes(range(200))]
    stream = b"".join(encode_frame(b, header) for b in bodies)
    dec = FrameDecoder(header)
    got: list[bytes] = []
    for i in range(len(stream)):
        got.extend(dec.feed(stream[i : i + 1]))
        # in_progress is False exactly at frame boundaries.
        assert dec.in_progress == (i + 1 not in _boundaries(bodies, header))
    assert got == bodies
    assert not dec.in_progress
    # All at once, and in odd chunk sizes.
    assert FrameDecoder(header).feed(stream) == bodies
    dec2 = FrameDecoder(header)
    out: list[bytes] = []
    for start in range(0, len(stream), 7):
        out.extend(dec2.feed(stream[start : start + 7]))
    assert out == bodies


def _boundaries(bodies: list[bytes], header: HeaderKind) -> set[int]:
    size = 2 if header != "ascii4" else 4
    ends, pos = set(), 0
    for b in bodies:
        pos += size + len(b)
        ends.add(pos)
    return ends


def test_empty_feed_and_in_progress_on_partial_header() -> None:
    dec = FrameDecoder("binary2")
    assert dec.feed(b"") == []
    assert not dec.in_progress
    assert dec.feed(b"\x00") == []
    assert dec.in_progress


@pytest.mark.parametrize(
    ("header", "raw", "kind"),
    [
        ("binary2", b"\x00\x00", "zero_length"),
        ("ascii4", b"0000", "zero_length"),
        ("bcd2", b"\x00\x00", "zero_length"),
        ("binary2", b"\x20\x01", "oversize"),  # 8193
        ("ascii4", b"8193", "oversize"),
        ("bcd2", b"\x81\x93", "oversize"),
        ("ascii4", b"+123", "bad_header"),
        ("ascii4", b"-123", "bad_header"),
        ("ascii4", b" 123", "bad_header"),
        ("ascii4", b"12 3", "bad_header"),
        ("ascii4", b"1_23", "bad_header"),
        ("ascii4", b"0x12", "bad_header"),
        ("ascii4", "١٢٣٤".encode()[:4], "bad_header"),  # Arabic-Indic digits: int() takes them
        ("bcd2", b"\x0a\x00", "bad_header"),
        ("bcd2", b"\x00\xf1", "bad_header"),
    ],
)
def test_bad_headers_rejected(header: HeaderKind, raw: bytes, kind: str) -> None:
    dec = FrameDecoder(header)
    with pytest.raises(FramingError) as info:
        dec.feed(raw)
    assert info.value.kind == kind
    # The decoder stays broken.
    with pytest.raises(FramingError):
        dec.feed(b"0001x")


@pytest.mark.parametrize("header", HEADERS)
def test_oversize_rejected_before_body(header: HeaderKind) -> None:
    # A header announcing 101 bytes with max_frame=100 fails on the header alone.
    raw = {"binary2": b"\x00\x65", "ascii4": b"0101", "bcd2": b"\x01\x01"}[header]
    dec = FrameDecoder(header, max_frame=100)
    with pytest.raises(FramingError) as info:
        dec.feed(raw[:1])
        dec.feed(raw[1:])
    assert info.value.kind == "oversize"
    # Exactly max_frame is fine.
    ok = {"binary2": b"\x00\x64", "ascii4": b"0100", "bcd2": b"\x01\x00"}[header]
    assert FrameDecoder(header, max_frame=100).feed(ok + b"z" * 100) == [b"z" * 100]


def test_frames_before_error_are_not_lost_but_error_raised() -> None:
    dec = FrameDecoder("binary2")
    assert dec.feed(b"\x00\x01a") == [b"a"]
    with pytest.raises(FramingError):
        dec.feed(b"\x00\x00")


def test_error_message_has_no_stream_bytes() -> None:
    with pytest.raises(FramingError) as info:
        FrameDecoder("ascii4").feed(b"4X12")
    assert "4X12" not in str(info.value)


def test_encode_frame_limits() -> None:
    with pytest.raises(ValueError, match="empty"):
        encode_frame(b"")
    with pytest.raises(ValueError, match="exceeds"):
        encode_frame(b"x" * 10_000, "ascii4")
    with pytest.raises(ValueError, match="exceeds"):
        encode_frame(b"x" * 101, "binary2", max_frame=100)
    with pytest.raises(ValueError, match="unknown header"):
        encode_frame(b"x", "ascii2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_frame"):
        FrameDecoder("binary2", max_frame=0)
