"""Framing a profile can ask for: 4-byte binary lengths, lengths that include their header, a
TPDU or a Visa BASE I message header stripped from requests and put back on answers."""

from __future__ import annotations

from pathlib import Path

import pytest

from switch.acquirer import build_auth
from switch.config import ListenerConfig
from switch.decisions import profile
from switch.session import Answer, Decide, Session
from switch.wire import codec
from switch.wire.framing import (
    FrameDecoder,
    Framing,
    FramingError,
    answer_envelope,
    encode_frame,
    split_envelope,
)
from switch.wire.messages import NetworkRequest

ECHO = NetworkRequest(mti="0800", transmission_time="1128120000", stan="000777", code="301")
PAN = "4123456789012345"
TPDU = bytes.fromhex("6000120034")
#: A Visa BASE I header: length 22, flag/format 01, text format 02, total length (filled in),
#: destination 123456, source 654321, then round-trip, flags, batch, reserved, user bytes.
VISA = bytes([22, 1, 2, 0, 0]) + bytes.fromhex("123456654321") + bytes(11)


@pytest.mark.parametrize("includes", [False, True])
def test_binary4_lengths_with_or_without_the_header(includes: bool) -> None:
    framing = Framing("binary4", includes_itself=includes)
    frame = encode_frame(b"abc", framing)
    assert frame[:4] == (7 if includes else 3).to_bytes(4, "big")
    decoder = FrameDecoder(framing)
    assert decoder.feed(frame[:5]) == [] and decoder.feed(frame[5:] + frame) == [b"abc", b"abc"]


def test_a_length_shorter_than_its_own_header_is_refused() -> None:
    decoder = FrameDecoder(Framing("binary2", includes_itself=True))
    with pytest.raises(FramingError) as info:
        decoder.feed(b"\x00\x01x")
    assert info.value.kind == "bad_header"
    with pytest.raises(FramingError) as zero:
        FrameDecoder(Framing("ascii4", includes_itself=True)).feed(b"0004")
    assert zero.value.kind == "zero_length"


def test_tpdu_is_stripped_and_answered_with_addresses_swapped() -> None:
    framing = Framing(envelope="tpdu")
    envelope, message = split_envelope(framing, TPDU + b"0800...")
    assert (envelope, message) == (TPDU, b"0800...")
    assert answer_envelope(framing, envelope, b"0810") == bytes.fromhex("6000340012")


def test_visa_header_answer_swaps_stations_and_carries_its_length() -> None:
    framing = Framing("binary2", envelope="visa")
    envelope, _ = split_envelope(framing, VISA + b"0800")
    answer = answer_envelope(framing, envelope, b"x" * 50)
    assert answer[0] == 22 and int.from_bytes(answer[3:5], "big") == 72
    assert answer[5:8] == bytes.fromhex("654321") and answer[8:11] == bytes.fromhex("123456")
    with pytest.raises(FramingError, match="22"):
        split_envelope(framing, bytes([21]) + VISA[1:] + b"0800")
    with pytest.raises(FramingError):
        split_envelope(framing, VISA[:10])


def test_fixed_envelope_is_echoed_and_sized() -> None:
    framing = Framing(envelope="fixed", envelope_size=3)
    assert answer_envelope(framing, b"ABC", b"0810") == b"ABC"
    with pytest.raises(ValueError):
        Framing(envelope="fixed")
    with pytest.raises(ValueError):
        Framing(envelope="tpdu", envelope_size=3)


def test_session_of_a_tpdu_profile_decides_and_answers_with_the_envelope(tmp_path: Path) -> None:
    (tmp_path / "tpdu.toml").write_text(
        'extends = "iso87-bcd"\n[framing]\nlength = "binary2"\nenvelope = "tpdu"\n'
    )
    prof = profile("tpdu", tmp_path)
    assert prof.wire is not None
    listener = ListenerConfig(network="iso87-bcd")  # the profile object carries the wire
    session = Session(listener, prof)
    spec = prof.wire.wire_spec()
    (action,) = session.receive(encode_frame(TPDU + codec.encode(ECHO, spec)))
    assert isinstance(action, Decide) and action.message == ECHO
    framed = session.frame(b"answer")
    assert framed == encode_frame(bytes.fromhex("6000340012") + b"answer")
    # A garbled request behind the TPDU is answered 30 with the swapped TPDU too (a garbled
    # currency: an echo whose DE70 is garbled cannot be answered readably and is closed).
    body = bytearray(codec.encode(build_auth(PAN, 100, when="1201120000", stan="000042"), spec))
    body[-1] = 0xFF
    (bad,) = session.receive(encode_frame(TPDU + bytes(body)))
    assert isinstance(bad, Answer) and bad.field == "49"
    framed = session.frame(bad.body)
    assert framed[2:7] == bytes.fromhex("6000340012")
