"""Tests of typed messages and the codec: answers, MTI helpers, field validation, format
errors and their 30 answers, DE48/DE54/DE90/DE95 layouts, masked reprs, wire layouts."""

from __future__ import annotations

import dataclasses

import iso8583
import pytest
from iso8583.specs import default_ascii

from switch.wire import codec
from switch.wire.codec import FormatError
from switch.wire.messages import (
    AdditionalAmount,
    AuthRequest,
    AuthResponse,
    NetworkRequest,
    NetworkResponse,
    ReversalRequest,
    ReversalResponse,
    UnsupportedMessage,
    is_repeat,
    is_request,
    message_class,
)
from switch.wire.spec import spec_for

PAN = "4761739001010010"
BASE = {  # a valid 0100 as pyiso8583 fields
    "t": "0100",
    "2": PAN,
    "3": "000000",
    "4": "000000001000",
    "7": "0611123456",
    "11": "000999",
    "32": "123456",
    "37": "RRN000000001",
    "41": "TERM0001",
    "49": "978",
}


def frame_of(fields: dict[str, str], spec: str = "ascii") -> bytes:
    """Encode with pyiso8583 directly (bypassing our typed layer)."""
    raw, _ = iso8583.encode(dict(fields), spec_for(spec))
    return bytes(raw)


def with_(**changes: str | None) -> dict[str, str]:
    out = dict(BASE)
    for name, value in changes.items():
        key = name.lstrip("f")
        if value is None:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def test_valid_base_decodes() -> None:
    msg = codec.decode(frame_of(BASE))
    assert isinstance(msg, AuthRequest)
    assert (msg.pan, msg.amount, msg.currency, msg.stan) == (PAN, 1000, "978", "000999")


@pytest.mark.parametrize(
    ("req_mti", "resp_mti"),
    [
        ("0100", "0110"),
        ("0101", "0110"),
        ("0120", "0130"),
        ("0121", "0130"),
        ("0200", "0210"),
        ("0220", "0230"),
        ("0221", "0230"),
    ],
)
def test_auth_answer_mti(req_mti: str, resp_mti: str) -> None:
    req = codec.decode(frame_of(with_(t=req_mti)))
    assert isinstance(req, AuthRequest)
    resp = AuthResponse.answer(req, "00", approval_code="123456")
    assert resp.mti == resp_mti
    wire = codec.decode_fields(codec.encode(resp))
    # The echo fields, as the request had them.
    for key in ("2", "3", "4", "7", "11", "32", "37", "41", "49"):
        assert wire[key] == BASE[key]
    assert (wire["39"], wire["38"]) == ("00", "123456")


@pytest.mark.parametrize(
    ("req_mti", "resp_mti"),
    [("0400", "0410"), ("0401", "0410"), ("0420", "0430"), ("0421", "0430")],
)
def test_reversal_answer_mti(req_mti: str, resp_mti: str) -> None:
    fields = with_(t=req_mti, f90="0100000999061112345600000123456" + "0" * 11)
    req = codec.decode(frame_of(fields))
    assert isinstance(req, ReversalRequest)
    assert req.original.mti == "0100"
    assert req.original.stan == "000999"
    assert req.original.transmission_time == "0611123456"
    assert req.original.acquirer_id == "00000123456"
    assert req.is_full
    resp = ReversalResponse.answer(req)
    assert resp.mti == resp_mti
    assert codec.decode_fields(codec.encode(resp))["90"] == fields["90"]


def test_partial_reversal_de95() -> None:
    de90 = "0100000999061112345600000123456" + "0" * 11
    de95 = "000000000400" + "000000000400" + "C00000000" + "C00000000"
    req = codec.decode(frame_of(with_(t="0400", f90=de90, f95=de95)))
    assert isinstance(req, ReversalRequest)
    assert req.replacement_amount == 400
    assert not req.is_full
    zero = codec.decode(frame_of(with_(t="0400", f90=de90, f95="0" * 24 + "C00000000" * 2)))
    assert isinstance(zero, ReversalRequest) and zero.is_full
    with pytest.raises(FormatError) as info:
        codec.decode(frame_of(with_(t="0400", f90=de90, f95="00000000040X" + "0" * 30)))
    assert info.value.field == "95"
    with pytest.raises(FormatError) as info:
        codec.decode(frame_of(with_(t="0400", f90="0100000999" + "X" * 32)))
    assert info.value.field == "90"


def test_network_answer_echo() -> None:
    frame = frame_of({"t": "0800", "7": "0611123456", "11": "000042", "70": "301"})
    req = codec.decode(frame)
    assert req == NetworkRequest(
        mti="0800", transmission_time="0611123456", stan="000042", code="301"
    )
    resp = NetworkResponse.answer(req)
    fields = codec.decode_fields(codec.encode(resp))
    assert fields == {"0": "0810", "7": "0611123456", "11": "000042", "39": "00", "70": "301"}


def test_mti_helpers() -> None:
    assert [message_class(m) for m in ("0100", "0101", "0200", "0120", "0221", "0400", "0421")] == [
        "auth",
        "auth",
        "financial",
        "advice",
        "advice",
        "reversal",
        "reversal",
    ]
    assert message_class("0800") == "network"
    assert [is_repeat(m) for m in ("0100", "0101", "0121", "0401", "0420")] == [
        False,
        True,
        True,
        True,
        False,
    ]
    assert [is_request(m) for m in ("0100", "0110", "0120", "0130", "0800", "0810")] == [
        True,
        False,
        True,
        False,
        True,
        False,
    ]
    with pytest.raises(ValueError):
        message_class("01X0")


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"f7": "1311123456"}, "7"),  # month 13
        ({"f7": "0231123456"}, "7"),  # 31 February
        ({"f7": "0611243456"}, "7"),  # hour 24
        ({"f13": "0230"}, "13"),
        ({"f12": "126000"}, "12"),
        ({"f14": "2513"}, "14"),
        ({"f4": "00000000100A"}, "4"),
        ({"f4": "+00000000100"}, "4"),
        ({"f49": "000"}, "49"),
        ({"f49": "EUR"}, "49"),
        ({"f2": "47617390010"}, "2"),  # 11 digits
        ({"f2": "476173900101001X"}, "2"),
        ({"f3": None}, "3"),
        ({"f4": None}, "4"),
        ({"f11": None}, "11"),
        ({"f11": "00099A"}, "11"),
        ({"f49": None}, "49"),
        ({"f2": None}, "2"),
        ({"f32": "12345X"}, "32"),
        ({"f41": "TERM\x7f001"}, "41"),
        ({"f35": "4761739001010010X2512201"}, "35"),
        ({"f35": "4761739001010010D2513201"}, "35"),
        ({"f48": "R92\x01"}, "48"),
        ({"t": "01A0"}, "mti"),
    ],
)
def test_field_validation(changes: dict[str, str | None], field: str) -> None:
    with pytest.raises(FormatError) as info:
        codec.decode(frame_of(with_(**changes)))
    assert info.value.field == field
    assert info.value.response_code_hint == "30"
    assert PAN not in str(info.value)


def test_luhn_is_not_a_format_error() -> None:
    bad_check_digit = PAN[:-1] + "1"
    msg = codec.decode(frame_of(with_(f2=bad_check_digit)))
    assert isinstance(msg, AuthRequest) and msg.pan == bad_check_digit


def test_pan_from_track2_when_de2_absent() -> None:
    msg = codec.decode(frame_of(with_(f2=None, f35=PAN + "D25122011143878089")))
    assert isinstance(msg, AuthRequest)
    assert msg.pan == PAN
    assert msg.track2 is not None
    assert (msg.track2.expiry, msg.track2.service_code) == ("2512", "201")
    assert msg.track2.discretionary == "1143878089"


@pytest.mark.parametrize("text", ["9205123", "R92", "FREE TEXT FROM AN ACQUIRER", "12"])
def test_de48_not_in_the_subelement_layout_is_free_text(text: str) -> None:
    """A DE48 that is not Mastercard subelements is not a format error: it is kept as free
    text, and no CVV2 is read from it."""
    msg = codec.decode(frame_of(with_(f48=text)))
    assert isinstance(msg, AuthRequest)
    assert msg.additional_text == text and msg.cvv2 is None and msg.additional_data == ()
    assert codec.decode_fields(codec.encode(msg))["48"] == text


def test_de48_subelements_and_cvv2() -> None:
    msg = codec.decode(frame_of(with_(f48="R" + "9203123" + "1005ABCDE")))
    assert isinstance(msg, AuthRequest)
    assert msg.category_code == "R"
    assert msg.cvv2 == "123"
    assert msg.additional_data == (("92", "123"), ("10", "ABCDE"))
    no_tcc = codec.decode(frame_of(with_(f48="9203456")))
    assert isinstance(no_tcc, AuthRequest) and no_tcc.category_code is None
    assert no_tcc.cvv2 == "456"
    # Built from typed values: CVV2 alone becomes subelement 92.
    req = dataclasses.replace(msg, additional_data=(), category_code=None, cvv2="789")
    assert codec.decode_fields(codec.encode(req))["48"] == "9203789"


def test_de54_additional_amounts() -> None:
    req = codec.decode(frame_of(BASE))
    assert isinstance(req, AuthRequest)
    fields = with_(t="0110", f39="00")
    fields["54"] = "0002978C000000123456" + "0001978D000000000100"
    resp = codec.decode(frame_of(fields))
    assert isinstance(resp, AuthResponse)
    assert resp.additional_amounts == (
        AdditionalAmount(account_type="00", amount_type="02", currency="978", amount=123456),
        AdditionalAmount(account_type="00", amount_type="01", currency="978", amount=-100),
    )
    assert resp.available_balance == resp.additional_amounts[0]
    balance = AdditionalAmount(account_type="10", amount_type="02", currency="978", amount=-5)
    built = AuthResponse.answer(req, "00", available_balance=balance)
    assert codec.decode_fields(codec.encode(built))["54"] == "1002978D000000000005"
    fields["54"] = "0002978X000000123456"
    with pytest.raises(FormatError) as info:
        codec.decode(frame_of(fields))
    assert info.value.field == "54"


def test_masked_reprs() -> None:
    fields = with_(f35=PAN + "D25122011143878089", f48="9203123", f52="0123456789ABCDEF")
    fields["55"] = "9F26081122334455667788"
    msg = codec.decode(frame_of(fields))
    assert isinstance(msg, AuthRequest)
    assert msg.pin_block == bytes.fromhex("0123456789ABCDEF")
    text = repr(msg) + str(msg) + repr(msg.track2)
    for secret in (PAN, "9203123", "1143878089", "0123456789", "1122334455667788", "2512"):
        assert secret not in text
    assert "476173******0010" in text
    resp = AuthResponse.answer(msg, "00")
    assert PAN not in repr(resp)
    assert "cvv2=<redacted>" in repr(msg)


def test_garbage_with_recoverable_mti_and_stan_gets_30() -> None:
    good = frame_of(BASE)
    # Corrupt DE4 with a non-ASCII byte: the rest of the message is intact.
    pos = good.index(b"000000001000")
    bad = good[:pos] + b"\xff" + good[pos + 1 :]
    with pytest.raises(FormatError) as info:
        codec.decode(bad)
    err = info.value
    assert (err.field, err.mti, err.stan) == ("4", "0100", "000999")
    assert b"\xff" not in str(err).encode("utf-8", "replace")
    answer = codec.format_error_response(err, response_code="30")
    assert answer is not None
    # Decoded with pyiso8583's own shipped spec, not ours.
    fields, _ = iso8583.decode(answer, default_ascii)
    assert fields["t"] == "0110"
    assert fields["11"] == "000999"
    assert fields["39"] == "30"
    assert fields["7"] == "0611123456"
    assert fields["41"] == "TERM0001"
    assert "2" not in fields


def test_unanswerable_format_errors() -> None:
    for frame in (b"", b"01", b"XXXX" + b"0" * 16, b"0100" + b"Z" * 16):
        with pytest.raises(FormatError) as info:
            codec.decode(frame)
        assert codec.format_error_response(info.value, response_code="30") is None
    # A response-class MTI is never answered.
    with pytest.raises(FormatError) as info:
        codec.decode(frame_of({"t": "0110", "11": "000001", "39": "0X" + "X"[:0]})[:-1])
    assert info.value.mti == "0110"
    assert codec.format_error_response(info.value, response_code="30") is None


def test_non_digit_length_prefix_rejected() -> None:
    good = frame_of(BASE)
    pos = good.index(b"06123456")
    bad = good[:pos] + b"+6" + good[pos + 2 :]
    assert iso8583.decode(bad, spec_for("ascii"))[0]["32"] == "123456"  # pyiso8583 accepts it
    with pytest.raises(FormatError) as info:
        codec.decode(bad)
    assert info.value.field == "32"


def test_unsupported_message() -> None:
    msg = codec.decode(frame_of({"t": "0600", "7": "0611123456", "11": "000777", "41": "TERM0001"}))
    assert isinstance(msg, UnsupportedMessage)
    answer = msg.answer()
    assert answer is not None
    fields = codec.decode_fields(codec.encode(answer))
    assert fields == {"0": "0610", "7": "0611123456", "11": "000777", "39": "12", "41": "TERM0001"}
    resp = codec.decode(frame_of({"t": "0610", "11": "000777", "39": "00"}))
    assert isinstance(resp, UnsupportedMessage) and resp.answer() is None


def test_encode_programmer_errors_name_field_not_value() -> None:
    req = codec.decode(frame_of(BASE))
    assert isinstance(req, AuthRequest)
    with pytest.raises(ValueError, match="amount"):
        codec.encode(dataclasses.replace(req, amount=-1))
    with pytest.raises(ValueError, match="field 41") as info:
        codec.encode(dataclasses.replace(req, terminal_id="SHORT"))
    assert "SHORT" not in str(info.value)
    with pytest.raises(TypeError):
        codec.encode(object())  # type: ignore[arg-type]


def test_wire_layouts_written_by_hand() -> None:
    req = NetworkRequest(mti="0800", transmission_time="0611123456", stan="000042", code="301")
    bitmaps = "82200000000000000400000000000000"
    assert codec.encode(req, "ascii") == b"0800" + bitmaps.encode() + b"0611123456000042301"
    assert codec.encode(req, "binary") == (
        b"0800" + bytes.fromhex(bitmaps) + b"0611123456000042301"
    )
    assert codec.encode(req, "bcd") == bytes.fromhex("0800" + bitmaps + "06111234560000420301")
    # BCD: odd-length PAN right-padded with F behind a 1-byte BCD digit count.
    auth = codec.decode(frame_of(with_(f2="4761739001010", f32=None, f37=None, f41=None)))
    wire = codec.encode(auth, "bcd")
    assert bytes.fromhex("134761739001010F") in wire
    assert codec.decode(wire, "bcd") == auth
