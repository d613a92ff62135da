"""Real ISO 8583 messages from other projects decode with our specs to their expected fields.

The corpus (tests/data/iso8583_messages.json) records, for each message, the fields
other decoders (pyiso8583, tshark, jPOS) found. We check at two levels: the raw field
dictionary (codec.decode_fields) and, for MTIs the switch types, the typed message or the
format error that its content deserves.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from data_paths import CORPUS_PATH as CORPUS

from switch.wire import codec
from switch.wire.codec import FormatError
from switch.wire.emv import TlvMap
from switch.wire.messages import (
    AuthRequest,
    NetworkRequest,
    NetworkResponse,
    ReversalRequest,
    ReversalResponse,
)
from switch.wire.spec import SpecKind

DATA = json.loads(CORPUS.read_text())
MESSAGES = {m["id"]: m for m in DATA["messages"]}

#: Entries needing a spec the switch does not offer, with the reason.
UNSUPPORTED = {
    "pyiso8583_doc_5": (
        "assumes a hybrid spec (ASCII MTI and hex-ASCII bitmap but a BCD DE2 with a 1-byte BCD "
        "length); the switch's specs are all-ASCII, binary-bitmap ASCII, or full BCD"
    ),
}
#: Entries whose DE55 is ASCII text rather than BER-TLV bytes (moov test data): our ascii spec
#: carries DE55 as raw bytes (like pyiso8583_doc_4), so we read the bytes of that text.
DE55_AS_TEXT = {
    "moov_iso_reversal_message",
    "moov_iso_reversal_message_response",
    "moov_iso_reversal_repeat_message",
}


def spec_of(entry: dict[str, Any]) -> SpecKind:
    return "binary" if entry["encoding"]["bitmap"].startswith("binary") else "ascii"


@pytest.mark.parametrize("entry_id", sorted(MESSAGES))
def test_fields_match(entry_id: str) -> None:
    entry = MESSAGES[entry_id]
    if entry_id in UNSUPPORTED:
        pytest.skip(UNSUPPORTED[entry_id])
    fields = codec.decode_fields(bytes.fromhex(entry["raw_hex"]), spec_of(entry))
    expected = dict(entry["expected_fields"])
    if entry_id in DE55_AS_TEXT:
        assert bytes.fromhex(fields.pop("55")) == expected.pop("55").encode("ascii")
    assert fields == expected


def test_framed_hex_matches_raw() -> None:
    from switch.wire.framing import FrameDecoder

    for entry in MESSAGES.values():
        frames = FrameDecoder("binary2").feed(bytes.fromhex(entry["framed_hex_2byte_be"]))
        assert frames == [bytes.fromhex(entry["raw_hex"])]


#: Expected typed outcome of each entry: the class, or the field a FormatError names and why.
TYPED: dict[str, type | tuple[str, str]] = {
    "moov_financial_transaction_message": ("2", "an 0200 without DE2 or track 2"),
    "moov_financial_transaction_message_response": ("49", "DE49 130 is not an ISO 4217 code"),
    "moov_iso_reversal_message": ReversalRequest,
    "moov_iso_reversal_message_response": ReversalResponse,
    "moov_iso_reversal_repeat_message": ReversalRequest,
    "moov_iso_reversal_message_advice": ("90", "a reversal without original data elements"),
    "moov_network_management_message": NetworkRequest,
    "moov_network_management_message_response": NetworkResponse,
    "pyiso8583_doc_1": ("2", "a 10-digit PAN"),
    "pyiso8583_doc_2": ("11", "an 0210 without STAN"),
    "pyiso8583_doc_3": ("2", "an 0200 without PAN"),
    "pyiso8583_doc_4": ("2", "an 0200 without PAN"),
    "peer_npm_iso_8583_0100_track2": AuthRequest,
    "peer_npm_iso_8583_0420_f90": ReversalRequest,
}
#: Typed attribute -> corpus field number, for plain echoed text fields.
ATTR_FIELDS = {
    "mti": "0",
    "pan": "2",
    "processing_code": "3",
    "transmission_time": "7",
    "stan": "11",
    "local_time": "12",
    "local_date": "13",
    "acquirer_id": "32",
    "rrn": "37",
    "response_code": "39",
    "terminal_id": "41",
    "merchant_id": "42",
    "currency": "49",
    "code": "70",
}


def test_every_entry_has_a_typed_expectation() -> None:
    assert set(TYPED) | set(UNSUPPORTED) == set(MESSAGES)


@pytest.mark.parametrize("entry_id", sorted(TYPED))
def test_typed(entry_id: str) -> None:
    entry = MESSAGES[entry_id]
    expected = entry["expected_fields"]
    frame = bytes.fromhex(entry["raw_hex"])
    outcome = TYPED[entry_id]
    if isinstance(outcome, tuple):
        with pytest.raises(FormatError) as info:
            codec.decode(frame, spec_of(entry))
        assert info.value.field == outcome[0], outcome[1]
        assert info.value.mti == expected["0"]
        assert info.value.stan == expected.get("11")
        return
    msg = codec.decode(frame, spec_of(entry))
    assert type(msg) is outcome
    for attr, number in ATTR_FIELDS.items():
        if number in expected and hasattr(msg, attr):
            assert getattr(msg, attr) == expected[number], attr
    if "4" in expected:
        assert getattr(msg, "amount") == int(expected["4"])  # noqa: B009
    if isinstance(msg, ReversalRequest | ReversalResponse) and msg.original is not None:
        de90 = expected["90"]
        assert (msg.original.mti, msg.original.stan) == (de90[:4], de90[4:10])
        assert msg.original.transmission_time == de90[10:20]
    if isinstance(msg, AuthRequest) and "35" in expected:
        assert msg.track2 is not None
        assert msg.track2.pan == expected["35"].split("D")[0]
        assert msg.track2.expiry == "2512"
        assert msg.track2.service_code == "201"


def test_doc4_field55_is_ber_tlv() -> None:
    entry = MESSAGES["pyiso8583_doc_4"]
    fields = codec.decode_fields(bytes.fromhex(entry["raw_hex"]), "ascii")
    tags = TlvMap.from_bytes(bytes.fromhex(fields["55"]))
    assert tags[0x9F02] == bytes.fromhex("000000012345")
    assert tags[0x5F34] == b"\x02"
