"""Logs never carry card data: masking, redaction, and exceptions that hold raw bytes."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator

import iso8583
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hsm import pan
from hsm.pan import mask_pan, scrub
from switch import log as log_mod
from switch.wire import codec
from switch.wire.spec import spec_for

PAN = "4123456789012345"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    log_mod.configure("debug", "json", stream=stream)
    yield stream
    log_mod.configure("info", "console")


def _lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_sensitive_keys_are_redacted_and_pan_masked(captured: io.StringIO) -> None:
    logger = log_mod.get_logger("test")
    logger.info(
        "event",
        pan=PAN,
        pin_block=b"\x12\x34\x56\x78\x9a\xbc\xde\xf0",
        cvv2="123",
        track2=f"{PAN}=87011010000056100000",
        note=f"card {PAN} declined",
    )
    (line,) = _lines(captured)
    text = captured.getvalue()
    assert line["pan"] == "412345******2345"
    assert line["pin_block"] == line["cvv2"] == line["track2"] == "<redacted>"
    assert line["note"] == "card 412345******2345 declined"
    assert PAN not in text and "123456789abcdef0" not in text


def test_pyiso8583_decode_error_is_scrubbed(captured: io.StringIO) -> None:
    spec = spec_for("ascii")
    raw, _ = iso8583.encode({"t": "0100", "2": PAN, "3": "000000", "4": "000000000100"}, spec)
    broken = bytes(raw)[:-3]  # DE4 cut short: pyiso8583 quotes the raw bytes in its error
    try:
        iso8583.decode(broken, spec)
    except iso8583.DecodeError as exc:
        assert PAN in str(exc.doc_dec)  # the raw message rides along on the exception
        log_mod.get_logger("test").error(
            "decode_failed", exc_info=exc, error=exc, decoded=exc.doc_dec
        )
    text = captured.getvalue()
    assert PAN not in text
    assert "decode_failed" in text


def test_codec_format_errors_carry_no_raw_bytes() -> None:
    spec = spec_for("ascii")
    raw, _ = iso8583.encode({"t": "0100", "2": PAN, "3": "000000", "4": "000000000100"}, spec)
    with pytest.raises(codec.FormatError) as info:
        codec.decode(bytes(raw)[:-3])
    assert PAN not in str(info.value) and PAN not in repr(info.value)


def test_scrub_masks_pan_shapes_in_free_text() -> None:
    assert scrub(f"x{PAN}y") == "x412345******2345y"
    assert scrub("stan 000123 amount 000000001000") == "stan 000123 amount 000000001000"
    assert "4761739001010010" not in scrub("4761739001010010D25122011143878089")


def test_mask_pan_keeps_the_first_six_and_last_four_digits() -> None:
    assert mask_pan(PAN) == "412345******2345"
    assert mask_pan("1234567890123") == "123456***0123"  # 13 digits, the shortest PAN
    assert mask_pan("123456789") == "*********"  # too short to show anything
    assert scrub(f"bad field 2: '{PAN}' at 4") == "bad field 2: '412345******2345' at 4"


def test_lines_are_sorted_json_whatever_the_values(captured: io.StringIO) -> None:
    logger = log_mod.get_logger("test")

    class Opaque:
        def __repr__(self) -> str:
            return "<opaque>"

    logger.info("first", zeta=1, alpha="a", odd=Opaque(), by_number={7: "x"})
    logger.info("second", huge=2**70)  # beyond orjson's 64 bits: the stdlib encoder takes it
    first, second = captured.getvalue().splitlines()
    keys = list(json.loads(first))
    assert keys == sorted(keys)
    assert json.loads(first)["odd"] == "<opaque>" and json.loads(first)["by_number"] == {"7": "x"}
    assert json.loads(second)["huge"] == 2**70


@settings(max_examples=2000, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.text("0123456789", min_size=10, max_size=20),
            st.text("0123456789abcdefABCDEF", min_size=14, max_size=18),
            st.sampled_from(["b'", 'b"', "'", "=", "D", "\\", " "]),
            st.text(max_size=8),
        ),
        max_size=8,
    ).map("".join)
)
def test_scrub_short_cut_changes_nothing(text: str) -> None:
    # The one-search short cut of scrub against its four passes applied in full.
    full = pan._BYTES_RE.sub("b'<redacted>'", text)
    full = pan._TRACK2_RE.sub("<track-redacted>", full)
    full = pan._PAN_RE.sub(lambda m: m.group(1) + "*" * len(m.group(2)) + m.group(3), full)
    full = pan._HEX_RE.sub("<hex-redacted>", full)
    assert scrub(text) == full
