"""Protocol gaps closed in the session policy: tertiary bitmaps, undefined elements, DE70.

A message with a tertiary bitmap (DE65 in pyiso8583 4.x) or with a data element the
listener's spec does not define is answered as a format error with the profile's code, in
every wire spec, and the answer decodes with the switch's own decoder; every 08xx answer
echoes the request's DE70, served code or not, served MTI or not. Bytes in, actions out:
no trio, no sockets. The profile's format-error code is not 30, so a literal would show.
"""

from __future__ import annotations

import copy
from typing import Any

import iso8583
import pytest
import trio

from switch.config import ListenerConfig
from switch.decisions import Profile, Reason, profile
from switch.handler import Dispatcher, RequestContext, UnavailableEngine
from switch.session import Answer, Decide, classify
from switch.wire import codec
from switch.wire.messages import AuthResponse, NetworkResponse, UnsupportedMessage
from switch.wire.spec import SPEC_KINDS, SpecKind, spec_for

#: A network whose format-error and invalid-transaction codes differ from ISO's.
ODD = Profile(
    "odd",
    {**profile("iso").table, Reason.FORMAT_ERROR: "F1", Reason.INVALID_TRANSACTION: "T2"},
)
ECHO = {"t": "0800", "7": "0101120000", "11": "000042", "70": "301"}
AUTH = {
    "t": "0100",
    "2": "4123456789012345",
    "3": "000000",
    "4": "000000001000",
    "7": "0101120000",
    "11": "000043",
    "37": "000000000043",
    "41": "TERM0001",
    "49": "978",
}


def with_tertiary(kind: SpecKind, fields: dict[str, str]) -> bytes:
    """Encode ``fields`` with a spec that defines DE129-192 (a peer with a tertiary bitmap)."""
    spec: dict[str, Any] = spec_for(kind)
    for i in range(129, 193):
        spec[str(i)] = copy.deepcopy(spec["48"])  # LLLVAR text
    data, _ = iso8583.encode(dict(fields), spec)
    return bytes(data)


@pytest.mark.parametrize("kind", SPEC_KINDS)
@pytest.mark.parametrize("element", ["129", "150", "192"])
def test_an_element_behind_a_tertiary_bitmap_is_a_format_error(
    kind: SpecKind, element: str
) -> None:
    frame = with_tertiary(kind, {**ECHO, element: "ABC"})
    action = classify(frame, kind, ODD)
    assert isinstance(action, Answer)
    assert (action.mti, action.stan, action.response_code) == ("0800", "000042", "F1")
    assert action.reason is Reason.FORMAT_ERROR
    answer = codec.decode(action.body, kind)
    assert isinstance(answer, NetworkResponse)
    assert (answer.mti, answer.stan, answer.code, answer.response_code) == (
        "0810",
        "000042",
        "301",
        "F1",
    )


@pytest.mark.parametrize("kind", SPEC_KINDS)
def test_an_authorization_with_a_tertiary_element_is_answered_not_decided(
    kind: SpecKind,
) -> None:
    frame = with_tertiary(kind, {**AUTH, "130": "X"})
    action = classify(frame, kind, ODD)
    assert isinstance(action, Answer)
    answer = codec.decode(action.body, kind)
    assert isinstance(answer, AuthResponse)
    assert (answer.mti, answer.stan, answer.rrn, answer.response_code) == (
        "0110",
        "000043",
        "000000000043",
        "F1",
    )
    assert answer.pan is None  # a format-error answer carries no card data


def test_de65_set_with_an_empty_tertiary_bitmap_is_a_format_error() -> None:
    # Bits 1, 7, 11 | bits 65 (tertiary bitmap follows), 70 | an all-zero tertiary bitmap.
    frame = (
        b"0800"
        + b"8220000000000000"
        + b"8400000000000000"
        + b"0000000000000000"
        + b"0101120000000042301"
    )
    with pytest.raises(codec.FormatError) as err:
        codec.decode(frame)
    assert err.value.field == "65"
    action = classify(frame, "ascii", ODD)
    assert isinstance(action, Answer) and action.field == "65"
    answer = codec.decode(action.body)
    assert isinstance(answer, NetworkResponse)
    assert (answer.code, answer.response_code) == ("301", "F1")


def test_the_same_message_without_the_tertiary_element_is_decided() -> None:
    # The control case: only the tertiary element makes it a format error.
    for kind in SPEC_KINDS:
        assert isinstance(classify(with_tertiary(kind, dict(ECHO)), kind, ODD), Decide)


async def _answer_of(fields: dict[str, str]) -> bytes:
    data, _ = iso8583.encode(dict(fields), spec_for("ascii"))
    action = classify(bytes(data), "ascii", ODD)
    assert isinstance(action, Decide)
    context = RequestContext(ListenerConfig(), ODD, frozenset(), trio.current_time())
    decision = await Dispatcher(UnavailableEngine()).handle(action.message, context)
    assert decision is not None
    return codec.encode(decision.response)


@pytest.mark.parametrize(
    ("mti", "code", "answer_mti", "response_code"),
    [
        ("0800", "301", "0810", "00"),
        ("0800", "999", "0810", "T2"),  # a DE70 code not served
        ("0800", "161", "0810", "T2"),  # key change: not served yet
        ("0801", "301", "0810", "T2"),  # a repeat: an MTI not served
        ("0802", "001", "0810", "T2"),
        ("0804", "301", "0810", "T2"),
    ],
)
async def test_every_0810_echoes_de70_and_decodes(
    mti: str, code: str, answer_mti: str, response_code: str
) -> None:
    body = await _answer_of({"t": mti, "7": "0101120000", "11": "000050", "70": code})
    assert codec.decode_fields(body)["70"] == code
    answer = codec.decode(body)  # the switch's own decoder accepts its answer
    assert isinstance(answer, NetworkResponse)
    assert (answer.mti, answer.stan, answer.code, answer.response_code) == (
        answer_mti,
        "000050",
        code,
        response_code,
    )


async def test_an_0830_echoes_de70() -> None:
    body = await _answer_of({"t": "0820", "7": "0101120000", "11": "000051", "70": "301"})
    answer = codec.decode(body)
    assert isinstance(answer, UnsupportedMessage)
    assert (answer.mti, answer.network_code) == ("0830", "301")
    assert codec.decode_fields(body)["39"] == "T2"
