"""Real ISO 8583 messages from other projects decode with our profiles to their expected fields.

The corpus (tests/data/iso8583_messages.json) records, for each message, the fields
other decoders (pyiso8583, tshark, jPOS) found. We check at two levels: the raw field
dictionary (codec.decode_fields) and, for MTIs the switch types, the typed message or the
format error that its content deserves. Each entry is read with the network profile of its
layout: iso87-ascii (pyiso8583 default_ascii), iso87-binary (default), iso87-ascii-rawbin
(raw DE55 inside ASCII) or a profile written for it (tests/data/networks/).
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
from switch.wire.profile import load_profile
from switch.wire.spec import SpecChoice

DATA = json.loads(CORPUS.read_text())
MESSAGES = {m["id"]: m for m in DATA["messages"]}
#: Profiles written for corpus entries whose layout no shipped profile has.
CORPUS_PROFILES = CORPUS.parent / "networks"

#: Entries needing a layout the switch does not offer, with the reason (none left).
UNSUPPORTED: dict[str, str] = {}
#: Entries read with a profile other than the one of their bitmap encoding.
PROFILE_OF = {
    # raw BER-TLV DE55 inside an ASCII message
    "pyiso8583_doc_4": "iso87-ascii-rawbin",
    # ASCII MTI, hex bitmap, BCD DE2 with a 1-byte BCD length
    "pyiso8583_doc_5": "pyiso8583-doc5",
}


def spec_of(entry: dict[str, Any]) -> SpecChoice:
    name = PROFILE_OF.get(entry["id"])
    if name is not None:
        found = (CORPUS_PROFILES / f"{name}.toml").is_file()
        return load_profile(name, CORPUS_PROFILES if found else None).wire_spec()
    return "binary" if entry["encoding"]["bitmap"].startswith("binary") else "ascii"


@pytest.mark.parametrize("entry_id", sorted(MESSAGES))
def test_fields_match(entry_id: str) -> None:
    entry = MESSAGES[entry_id]
    if entry_id in UNSUPPORTED:
        pytest.skip(UNSUPPORTED[entry_id])
    fields = codec.decode_fields(bytes.fromhex(entry["raw_hex"]), spec_of(entry))
    assert fields == entry["expected_fields"]


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
    # DE55 is ASCII text ending in a space: not hex, so not chip data under iso87-ascii.
    "moov_iso_reversal_repeat_message": ("55", "DE55 text that is not hex"),
    "moov_iso_reversal_message_advice": ("90", "a reversal without original data elements"),
    "moov_network_management_message": NetworkRequest,
    "moov_network_management_message_response": NetworkResponse,
    "pyiso8583_doc_1": ("2", "a 10-digit PAN"),
    "pyiso8583_doc_2": ("11", "an 0210 without STAN"),
    "pyiso8583_doc_3": ("2", "an 0200 without PAN"),
    "pyiso8583_doc_4": ("2", "an 0200 without PAN"),
    "pyiso8583_doc_5": ("4", "its 15-digit BCD PAN reads, but an 0200 needs an amount"),
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
    fields = codec.decode_fields(bytes.fromhex(entry["raw_hex"]), spec_of(entry))
    tags = TlvMap.from_bytes(bytes.fromhex(fields["55"]))
    assert tags[0x9F02] == bytes.fromhex("000000012345")
    assert tags[0x5F34] == b"\x02"


def test_doc5_mixed_layout_reads_its_bcd_pan() -> None:
    """The entry skipped before profiles: its BCD DE2 read as the 15 digits pyiso8583 printed,
    and the same bytes come back when the field dictionary is encoded again."""
    import iso8583

    from switch.wire.spec import shared_spec

    entry = MESSAGES["pyiso8583_doc_5"]
    raw = bytes.fromhex(entry["raw_hex"])
    spec = spec_of(entry)
    assert codec.decode_fields(raw, spec)["2"] == "121200000002121"
    again, _ = iso8583.encode({"t": "0200", "2": "121200000002121"}, dict(shared_spec(spec)))
    assert bytes(again) == raw
    # The same bytes are not a message of the all-ASCII profile.
    with pytest.raises(FormatError):
        codec.decode_fields(raw, "ascii")


def test_moov_text_de55_reads_as_default_ascii_reads_it() -> None:
    """moov's reversals carry DE55 as text: iso87-ascii gives the same text as pyiso8583's
    default_ascii (no raw-byte reinterpretation)."""
    entry = MESSAGES["moov_iso_reversal_message"]
    fields = codec.decode_fields(bytes.fromhex(entry["raw_hex"]), "iso87-ascii")
    assert fields["55"] == entry["expected_fields"]["55"] == "003317000394809080646510000000"
