"""Tests of switch.wire.emv: BER-TLV parse/build of DE55 against hand-written encodings."""

from __future__ import annotations

import json

import pytest
from data_paths import CORPUS_PATH
from hypothesis import given, settings
from hypothesis import strategies as st

from switch.wire import codec, emv
from switch.wire.emv import EmvFormatError, Tlv, TlvMap
from switch.wire.framing import WireError
from switch.wire.messages import AuthRequest

# A typical Visa/Mastercard ARQC request DE55, written out tag by tag (EMV Book 3 Annex A).
ARQC_DE55 = bytes.fromhex(
    "9F2608"
    "1122334455667788"  # application cryptogram
    "9F2701"
    "80"  # CID: ARQC
    "9F1012"
    "0110A00003220000000000000000000000FF"  # IAD, 18 bytes
    "9F3602"
    "0042"  # ATC
    "9F3704"
    "DEADBEEF"  # unpredictable number
    "9505"
    "0000008000"  # TVR
    "9A03"
    "240611"  # transaction date
    "9C01"
    "00"  # transaction type
    "5F2A02"
    "0978"  # currency
    "8202"
    "3900"  # AIP
    "9F0206"
    "000000001000"  # amount authorised
    "9F0306"
    "000000000000"  # amount other
    "9F1A02"
    "0250"  # terminal country
)


def test_parse_named_tags() -> None:
    tags = TlvMap.from_bytes(ARQC_DE55)
    assert tags[emv.APPLICATION_CRYPTOGRAM] == bytes.fromhex("1122334455667788")
    assert tags[emv.CRYPTOGRAM_INFORMATION_DATA] == b"\x80"
    assert len(tags[emv.ISSUER_APPLICATION_DATA]) == 18
    assert tags[emv.ATC] == b"\x00\x42"
    assert tags[emv.UNPREDICTABLE_NUMBER] == bytes.fromhex("DEADBEEF")
    assert tags[emv.TVR] == bytes.fromhex("0000008000")
    assert tags[emv.TRANSACTION_DATE] == bytes.fromhex("240611")
    assert tags[emv.TRANSACTION_TYPE] == b"\x00"
    assert tags[emv.TRANSACTION_CURRENCY_CODE] == bytes.fromhex("0978")
    assert tags[emv.AIP] == bytes.fromhex("3900")
    assert tags[emv.AMOUNT_AUTHORISED] == bytes.fromhex("000000001000")
    assert tags[emv.AMOUNT_OTHER] == bytes(6)
    assert tags[emv.TERMINAL_COUNTRY_CODE] == bytes.fromhex("0250")
    assert emv.ISSUER_AUTHENTICATION_DATA not in tags
    assert len(tags) == 13
    assert emv.build(tags.items_tree) == ARQC_DE55


def test_build_from_pairs_matches_hand_encoding() -> None:
    arpc = emv.build([(emv.ISSUER_AUTHENTICATION_DATA, bytes.fromhex("01020304050607083030"))])
    assert arpc == bytes.fromhex("910A01020304050607083030")


def test_long_form_lengths_and_templates() -> None:
    value = bytes(range(200))
    # 0x81 form for 128..255 bytes; 0x82 form for 256..65535.
    assert emv.build([(0x9F10, value)])[:4] == bytes.fromhex("9F1081C8")
    assert emv.build([(0xDF8129, bytes(300))])[:6] == bytes.fromhex("DF812982012C")
    nested = bytes.fromhex("770D9F27018070079F360200019A00")
    (top,) = emv.parse(nested)
    assert top.tag == 0x77 and top.constructed
    assert [c.tag for c in top.children] == [0x9F27, 0x70]
    assert top.children[1].children[0].value == b"\x00\x01"
    assert TlvMap.from_bytes(nested)[0x9A] == b""
    assert emv.build([top]) == nested
    # Zero padding between objects is skipped.
    assert [t.tag for t in emv.parse(b"\x00\x9c\x01\x00\x00\x00")] == [0x9C]


@pytest.mark.parametrize(
    "data",
    [
        bytes.fromhex("9F"),  # tag truncated
        bytes.fromhex("9F26"),  # length missing
        bytes.fromhex("9F26081122"),  # value overruns
        bytes.fromhex("9F2680"),  # indefinite length
        bytes.fromhex("9F2685000000000100"),  # 5 length bytes
        bytes.fromhex("9F8181810100"),  # tag longer than 4 bytes
        bytes.fromhex("70059F260811"),  # child overruns its template
    ],
)
def test_malformed_rejected(data: bytes) -> None:
    with pytest.raises(EmvFormatError) as info:
        emv.parse(data)
    assert isinstance(info.value, WireError)
    assert data.hex() not in str(info.value).lower()


def test_deep_nesting_rejected() -> None:
    data = b""
    for _ in range(12):
        data = b"\x70" + bytes([len(data)]) + data
    with pytest.raises(EmvFormatError, match="nested"):
        emv.parse(data)


def test_repr_has_no_value() -> None:
    item = Tlv(emv.APPLICATION_CRYPTOGRAM, bytes.fromhex("1122334455667788"))
    assert "1122334455667788" not in repr(item).replace(" ", "")
    assert "9F26" in repr(item)
    assert "1122" not in repr(TlvMap([item]))


def test_invalid_tag_numbers() -> None:
    for tag in (0, 0x9F, 0x9F8080, 0x0A9F, 0x9F818181FF):
        with pytest.raises(ValueError):
            emv.encode_tag(tag)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=120))
def test_random_bytes_only_emv_format_error(data: bytes) -> None:
    try:
        items = emv.parse(data)
    except EmvFormatError:
        return
    TlvMap(items)


def test_corpus_mastercard_sample() -> None:
    """The corpus's contactless Mastercard DE55 uses proprietary C1/A1 length markers for
    encrypted/masked tags (e.g. ``56 A1 29`` inside template FF8105), which are not BER: strict
    parsing stops there,
    while the DE55 bytes still travel unchanged through every spec."""
    sample = bytes.fromhex(json.loads(CORPUS_PATH.read_text())["field55_samples"][0]["hex"])
    marker = sample.index(bytes.fromhex("56A129"))
    with pytest.raises(EmvFormatError, match=f"length form of tag at offset {marker}"):
        emv.parse(sample)
    head = TlvMap.from_bytes(sample[: sample.index(bytes.fromhex("FF8105"))])
    assert head[0x4F] == bytes.fromhex("A0000000041010")
    assert head[emv.TRANSACTION_CURRENCY_CODE] == bytes.fromhex("0840")
    assert head[emv.UNPREDICTABLE_NUMBER] == bytes.fromhex("09BC2106")
    req = AuthRequest(
        mti="0100",
        pan="5413330089020011",
        processing_code="000000",
        amount=100,
        transmission_time="1002123000",
        stan="000001",
        currency="840",
        emv=sample,
    )
    # 512 bytes: beyond LLLVAR hex text (999 characters) and pyiso8583 default's 255 bytes;
    # profiles that allow 999 raw bytes carry it unchanged.
    for spec in ("bcd", "iso87-ascii-rawbin"):
        decoded = codec.decode(codec.encode(req, spec), spec)
        assert isinstance(decoded, AuthRequest) and decoded.emv == sample
    for spec in ("ascii", "binary", "mastercard"):
        with pytest.raises(ValueError, match="field 55"):
            codec.encode(req, spec)
