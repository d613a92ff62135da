"""switch/wire/fastpath.py against pyiso8583, the reference: where the fast path answers it
gives exactly pyiso8583's result, both ways, and on valid messages of the byte-counted specs
it always answers. Hypothesis draws messages from each spec, then mutates their bytes."""

from __future__ import annotations

import copy
from typing import Any

import iso8583
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from switch.wire import codec, fastpath
from switch.wire.spec import shared_spec

#: The spec kinds; the BCD one counts numerics in nibbles, which the fast path leaves alone.
KINDS = ("ascii", "binary", "bcd")
FAST_KINDS = ("ascii", "binary")
#: Characters drawn for text fields (the ASCII specs' printable range, EBCDIC-encodable too).
TEXT = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
EXAMPLES = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _value(draw: st.DrawFn, item: dict[str, Any]) -> str:
    nibbles = item.get("len_count", "bytes") == "nibbles"
    top = item["max_len"]
    size = top if item["len_type"] == 0 else draw(st.integers(0, min(top, 40)))
    if item["data_enc"] == "b":
        if nibbles:
            return draw(st.text("0123456789", min_size=size, max_size=size))
        return draw(st.binary(min_size=size, max_size=size)).hex().upper()
    return draw(st.text(TEXT, min_size=size, max_size=size))


@st.composite
def messages(draw: st.DrawFn, kind: str) -> dict[str, Any]:
    spec = shared_spec(kind)
    numbers = [n for n in range(2, 129) if n != 65 and str(n) in spec]
    chosen = draw(st.lists(st.sampled_from(numbers), max_size=14, unique=True))
    fields: dict[str, Any] = {"t": draw(st.sampled_from(["0100", "0110", "0800", "0420"]))}
    for n in chosen:
        fields[str(n)] = _value(draw, spec[str(n)])
    return fields


def _reference_encode(fields: dict[str, Any], spec: dict[str, Any]) -> bytes | None:
    try:
        return bytes(iso8583.encode(copy.deepcopy(fields), spec)[0])
    except iso8583.EncodeError:
        return None


def _reference_decode(frame: bytes, spec: dict[str, Any]) -> dict[str, str] | None:
    try:
        return iso8583.decode(frame, spec)[0]
    except iso8583.DecodeError:
        return None


@pytest.mark.parametrize("kind", KINDS)
@EXAMPLES
@given(data=st.data())
def test_valid_messages_are_read_and_written_as_pyiso8583_does(kind: str, data: Any) -> None:
    spec = shared_spec(kind)
    fields = data.draw(messages(kind))
    reference = _reference_encode(fields, spec)
    assert reference is not None
    fast = fastpath.encode(fields, spec)
    assert fast is None or fast == reference
    decoded = fastpath.decode(reference, spec)
    assert decoded is None or decoded == iso8583.decode(reference, spec)[0]
    if kind in FAST_KINDS:  # the byte-counted specs: always the fast path
        assert fast == reference and decoded is not None
    # The guarded spec codec.py decodes with defines every element: the same answers.
    guarded = codec._guarded_spec(kind)
    assert fastpath.decode(reference, guarded) in (None, iso8583.decode(reference, guarded)[0])


@st.composite
def mutated(draw: st.DrawFn, kind: str) -> bytes:
    frame = bytearray(_reference_encode(draw(messages(kind)), shared_spec(kind)) or b"")
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.sampled_from(["set", "cut", "insert", "append"]))
        at = draw(st.integers(0, max(0, len(frame) - 1)))
        byte = draw(st.sampled_from([0x00, 0x20, 0x2B, 0x30, 0x39, 0x41, 0x66, 0x80, 0xF0, 0xFF]))
        if how == "set" and frame:
            frame[at] = byte
        elif how == "cut":
            del frame[at:]
        elif how == "insert":
            frame.insert(at, byte)
        else:
            frame.append(byte)
    return bytes(frame)


@pytest.mark.parametrize("kind", KINDS)
@EXAMPLES
@given(data=st.data())
def test_what_the_fast_path_reads_from_damaged_bytes_is_what_pyiso8583_reads(
    kind: str, data: Any
) -> None:
    for spec in (shared_spec(kind), codec._guarded_spec(kind)):
        frame = data.draw(mutated(kind))
        fast = fastpath.decode(frame, spec)
        if fast is not None:
            assert fast == _reference_decode(frame, spec)


@pytest.mark.parametrize("kind", KINDS)
@EXAMPLES
@given(fields=st.dictionaries(
    st.sampled_from(["t", "2", "3", "4", "11", "35", "39", "52", "55", "70", "90", "128", "1",
                     "65", "02", "p", "x"]),
    st.one_of(st.text(TEXT, max_size=30), st.text("0123456789ABCDEFabcdef", max_size=40),
              st.binary(max_size=4), st.integers(0, 9)),
    max_size=8,
))  # fmt: skip
def test_what_the_fast_path_writes_from_any_fields_is_what_pyiso8583_writes(
    kind: str, fields: dict[str, Any]
) -> None:
    spec = shared_spec(kind)
    fast = fastpath.encode(fields, spec)
    if fast is not None:
        assert fast == _reference_encode(fields, spec)


@pytest.mark.parametrize("kind", KINDS)
def test_an_echo_and_a_purchase_decode_the_same_both_ways(kind: str) -> None:
    # Two fixed messages (encoded by pyiso8583) of the shapes the switch answers most.
    spec = codec._guarded_spec(kind)
    for fields in (
        {"t": "0800", "7": "1203120000", "11": "000001", "70": "301"},
        {"t": "0100", "2": "4761739001010010", "3": "000000", "4": "000000001000",
         "11": "000002", "22": "051", "49": "978"},
    ):  # fmt: skip
        frame = _reference_encode(fields, shared_spec(kind))
        assert frame is not None
        fast = fastpath.decode(frame, spec)
        assert fast is None or fast == iso8583.decode(frame, spec)[0]
        if kind in FAST_KINDS:
            assert fast is not None and fastpath.encode(fields, shared_spec(kind)) == frame


def test_a_spec_with_a_header_is_left_to_pyiso8583() -> None:
    spec = copy.deepcopy(shared_spec("ascii"))
    spec["h"] = {**spec["h"], "max_len": 4, "len_type": 0, "data_enc": "ascii"}
    fields = {"h": "HDR1", "t": "0800", "11": "000001"}
    frame = bytes(iso8583.encode(copy.deepcopy(fields), spec)[0])
    assert fastpath.decode(frame, spec) is None and fastpath.encode(fields, spec) is None
