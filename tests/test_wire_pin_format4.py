"""DE52 sized by the listener's PIN block format: 16 bytes for ISO 9564 format 4 (AES), 8 for
the TDES formats, in every wire spec (ascii, binary, bcd); sans-IO, over bytes only.

The format 4 blocks are psec's published vectors (tests/data/payment_crypto.json), so the
bytes carried are real AES PIN blocks, not self-made filler.
"""

from __future__ import annotations

import json

import iso8583
import pytest
from data_paths import VECTORS_PATH

from switch.acquirer import build_auth
from switch.config import ListenerConfig
from switch.decisions import Reason, profile
from switch.session import Answer, Decide, Session, classify, listener_spec
from switch.wire import codec
from switch.wire.framing import encode_frame
from switch.wire.messages import AuthRequest
from switch.wire.spec import (
    SPEC_KINDS,
    SpecKind,
    WireSpec,
    pin_block_bytes,
    shared_spec,
    spec_for,
    wire_spec,
)

PAN = "4123456789012345"
PINBLOCK = {
    v["name"]: v
    for v in json.loads(VECTORS_PATH.read_text(encoding="utf-8"))["vectors"]
    if v["category"] == "pinblock"
}
#: A published format 4 block (16 bytes) and a published ISO 0 block (8 bytes, clear: only
#: its size matters here).
AES_BLOCK = bytes.fromhex(PINBLOCK["ISO4 psec decipher"]["inputs"]["block"])
TDES_BLOCK = bytes.fromhex(PINBLOCK["ISO0 psec"]["expected"])
ISO = profile("iso")


def _auth(block: bytes, stan: str = "000001") -> AuthRequest:
    return build_auth(PAN, 1000, stan=stan, pin_block=block, when="1201120000")


@pytest.mark.parametrize("kind", SPEC_KINDS)
def test_format4_spec_carries_a_16_byte_pin_block_unchanged(kind: SpecKind) -> None:
    spec = wire_spec(kind, pin_block_format=4)
    body = codec.encode(_auth(AES_BLOCK), spec)
    assert AES_BLOCK in body or AES_BLOCK.hex().upper().encode() in body  # raw or hex text
    decoded = codec.decode(body, spec)
    assert isinstance(decoded, AuthRequest) and decoded.pin_block == AES_BLOCK
    assert decoded == _auth(AES_BLOCK)


@pytest.mark.parametrize("kind", SPEC_KINDS)
@pytest.mark.parametrize("fmt", [0, 1, 3])
def test_tdes_format_specs_keep_the_8_byte_pin_block(kind: SpecKind, fmt: int) -> None:
    spec = wire_spec(kind, pin_block_format=fmt)
    assert spec == WireSpec(kind)  # the same spec as the plain kind
    decoded = codec.decode(codec.encode(_auth(TDES_BLOCK), spec), spec)
    assert isinstance(decoded, AuthRequest) and decoded.pin_block == TDES_BLOCK


@pytest.mark.parametrize("kind", SPEC_KINDS)
@pytest.mark.parametrize(
    ("fmt", "block"), [(0, AES_BLOCK), (4, TDES_BLOCK)], ids=["aes-on-tdes", "tdes-on-aes"]
)
def test_pin_block_of_the_other_size_cannot_be_encoded(
    kind: SpecKind, fmt: int, block: bytes
) -> None:
    with pytest.raises(ValueError, match="field 52"):
        codec.encode(_auth(block), wire_spec(kind, pin_block_format=fmt))


@pytest.mark.parametrize("kind", SPEC_KINDS)
def test_format4_variant_differs_from_its_kind_only_in_de52_length(kind: SpecKind) -> None:
    """So a later change of a kind's DE52 encoding (hex text in ASCII) applies to both."""
    plain, aes = spec_for(kind), spec_for(kind, pin_block_format=4)
    assert {k for k in plain if plain[k] != aes[k]} == {"52"}
    assert {k for k, v in plain["52"].items() if aes["52"][k] != v} == {"max_len"}
    assert aes["52"]["max_len"] == 2 * plain["52"]["max_len"]  # bytes, or hex characters


def test_pin_block_sizes_by_iso9564_format() -> None:
    assert [pin_block_bytes(f) for f in range(5)] == [8, 8, 8, 8, 16]
    with pytest.raises(ValueError, match="PIN block format"):
        pin_block_bytes(5)
    with pytest.raises(ValueError, match="PIN block size"):
        WireSpec("ascii", pin_block_bytes=12)
    with pytest.raises(ValueError, match="spec kind"):
        WireSpec("ebcdic")
    with pytest.raises(ValueError, match="WireSpec"):
        spec_for(WireSpec("ascii"), pin_block_format=4)


@pytest.mark.parametrize("kind", SPEC_KINDS)
def test_listener_spec_follows_the_listeners_pin_block_format(kind: SpecKind) -> None:
    four = listener_spec(ListenerConfig(spec=kind, pin_block_format=4))
    zero = listener_spec(ListenerConfig(spec=kind))
    assert (four.pin_block_bytes, zero.pin_block_bytes) == (16, 8)
    # The listener's spec names a layout: the shipped profile of that kind, built in too.
    assert shared_spec(four) == shared_spec(WireSpec(kind, 16))
    assert shared_spec(zero) == shared_spec(WireSpec(kind, 8))


@pytest.mark.parametrize("kind", SPEC_KINDS)
def test_format4_listener_session_decides_a_16_byte_pin_block(kind: SpecKind) -> None:
    listener = ListenerConfig(spec=kind, pin_block_format=4)
    body = codec.encode(_auth(AES_BLOCK), wire_spec(kind, pin_block_format=4))
    (action,) = Session(listener, ISO).receive(encode_frame(body, listener.header))
    assert isinstance(action, Decide) and isinstance(action.message, AuthRequest)
    assert action.message.pin_block == AES_BLOCK


@pytest.mark.parametrize("kind", SPEC_KINDS)
@pytest.mark.parametrize(("listener_fmt", "sent_fmt"), [(0, 4), (4, 0)])
def test_pin_block_of_the_wrong_size_for_the_listener_is_a_format_error(
    kind: SpecKind, listener_fmt: int, sent_fmt: int
) -> None:
    """A 16-byte block to a format 0 listener, or an 8-byte one to a format 4 listener: the
    message is misread from DE52 on, answered 30 (STAN recovered), the session stays open."""
    block = AES_BLOCK if sent_fmt == 4 else TDES_BLOCK
    body = codec.encode(_auth(block, stan="004242"), wire_spec(kind, pin_block_format=sent_fmt))
    listener = ListenerConfig(spec=kind, pin_block_format=listener_fmt)  # type: ignore[arg-type]
    session = Session(listener, ISO)
    (action,) = session.receive(encode_frame(body, listener.header))
    assert isinstance(action, Answer)
    assert (action.reason, action.stan, action.response_code) == (
        Reason.FORMAT_ERROR,
        "004242",
        ISO.code(Reason.FORMAT_ERROR),
    )
    assert not session.closed


def test_classify_of_a_format4_frame_with_the_plain_kind_is_not_decided() -> None:
    body = codec.encode(_auth(AES_BLOCK), wire_spec("ascii", pin_block_format=4))
    assert not isinstance(classify(body, "ascii", ISO), Decide)
    assert isinstance(classify(body, WireSpec("ascii", 16), ISO), Decide)


def test_format4_ascii_frame_is_readable_by_pyiso8583_with_a_16_byte_de52() -> None:
    """An independent reading: pyiso8583's own default_ascii, DE52 widened to the 32 hex
    characters of a 16-byte block (nothing else changed)."""
    body = codec.encode(_auth(AES_BLOCK), wire_spec("ascii", pin_block_format=4))
    peer = {k: dict(v) for k, v in iso8583.specs.default_ascii.items()}
    peer["52"].update(max_len=32)
    fields, _ = iso8583.decode(body, peer)
    assert fields["52"] == AES_BLOCK.hex().upper() and fields["2"] == PAN
