"""Tests of the declarative mapping (switch/wire/mapping.py) as messages.py uses it: the echo
set of each answer is the one its request declares, every message field declares its data
element, and inconsistent declarations fail at import time."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_wire_roundtrip import FAST, auth_requests, network_requests, reversal_requests

from switch.wire import mapping, messages
from switch.wire.mapping import de, digits, echo_names, element_of, message, text
from switch.wire.messages import (
    AuthRequest,
    AuthResponse,
    ErrorResponse,
    Message,
    NetworkRequest,
    NetworkResponse,
    ReversalRequest,
    ReversalResponse,
    UnsupportedMessage,
)

#: Each answer class, the request class it answers, and how to answer (DE39 "Z9").
ANSWERS: list[tuple[type[Any], type[Any], Callable[[Any], Message | None]]] = [
    (AuthResponse, AuthRequest, lambda req: AuthResponse.answer(req, "Z9")),
    (ReversalResponse, ReversalRequest, lambda req: ReversalResponse.answer(req, "Z9")),
    (NetworkResponse, NetworkRequest, lambda req: NetworkResponse.answer(req, "Z9")),
    (ErrorResponse, UnsupportedMessage, lambda req: req.answer("Z9")),
]
ANSWER_IDS = ["auth", "reversal", "network", "unsupported"]


def declared_echo(cls: type[Any]) -> set[str]:
    """The attributes a request class declares ``echo=True``, read from its field metadata."""
    return {
        f.name for f in dataclasses.fields(cls) if (el := element_of(f)) is not None and el.echo
    }


def echo_keys(cls: type[Any]) -> set[str]:
    """The data elements (pyiso8583 keys) of the attributes ``cls`` declares echoed."""
    by_name = {f.name: element_of(f) for f in dataclasses.fields(cls)}
    return {el.key for name in declared_echo(cls) if (el := by_name[name]) is not None}


@pytest.mark.parametrize(("response", "request_cls", "answer"), ANSWERS, ids=ANSWER_IDS)
def test_echo_set_is_the_requests_declaration(
    response: type[Any], request_cls: type[Any], answer: Callable[[Any], Message | None]
) -> None:
    assert declared_echo(request_cls)  # every request class echoes something
    assert echo_names(response) == declared_echo(request_cls)


def test_auth_and_reversal_answers_echo_the_same_elements() -> None:
    # DE90 is the reversal's own addition; the rest is the family's shared echo.
    assert echo_keys(ReversalRequest) - echo_keys(AuthRequest) == {"90"}
    assert echo_keys(AuthRequest) == echo_keys(ReversalRequest) - {"90"}


unsupported_requests = st.builds(
    UnsupportedMessage,
    mti=st.sampled_from(["0600", "0620", "9100"]),
    stan=st.just("000123"),
    transmission_time=st.none() | st.just("0611123456"),
    acquirer_id=st.none() | st.just("123456"),
    rrn=st.none() | st.just("RRN000000001"),
    terminal_id=st.none() | st.just("TERM0001"),
)


@pytest.mark.parametrize(
    ("answer", "requests"),
    [
        (ANSWERS[0][2], auth_requests()),
        (ANSWERS[1][2], reversal_requests()),
        (ANSWERS[2][2], network_requests),
        (ANSWERS[3][2], unsupported_requests),
    ],
    ids=ANSWER_IDS,
)
def test_answer_repeats_exactly_the_declared_elements(
    answer: Callable[[Any], Message | None], requests: st.SearchStrategy[Any]
) -> None:
    @FAST
    @given(requests)
    def check(req: Any) -> None:
        resp = answer(req)
        assert resp is not None
        req_fields = messages.to_fields(req)
        resp_fields = messages.to_fields(resp)
        assert resp_fields["t"] == messages.response_mti(req.mti)
        assert resp_fields["39"] == "Z9"
        repeated = {
            key for key, value in req_fields.items() if key != "t" and resp_fields.get(key) == value
        }
        assert repeated - {"39"} == echo_keys(type(req)) & req_fields.keys()

    check()


@pytest.mark.parametrize(
    "cls",
    [
        AuthRequest,
        AuthResponse,
        ReversalRequest,
        ReversalResponse,
        NetworkRequest,
        NetworkResponse,
        UnsupportedMessage,
        ErrorResponse,
    ],
)
def test_every_field_but_the_mti_declares_its_element(cls: type[Any]) -> None:
    undeclared = [f.name for f in dataclasses.fields(cls) if element_of(f) is None]
    assert undeclared == ["mti"]


def test_field_error_is_one_class() -> None:
    assert messages.FieldError is mapping.FieldError


def test_answer_lacking_an_echoed_element_fails_at_import() -> None:
    @message()
    class Ping:
        mti: str
        stan: str = de(11, digits(6), echo=True)
        rrn: str | None = de(37, text(12), echo=True, default=None)

    with pytest.raises(TypeError, match=r"Ping\.rrn"):

        @message(answers=Ping)
        class Pong:
            mti: str
            stan: str = de(11, digits(6))

    with pytest.raises(TypeError, match=r"Ping\.rrn"):

        @message(answers=Ping)
        class WrongPong:  # the same name on another element
            mti: str
            stan: str = de(11, digits(6))
            rrn: str | None = de(38, text(12), default=None)


def test_spread_kind_must_cover_its_attributes() -> None:
    pair = text(4).then(lambda v: (v[:2], v[2:]), lambda v: v[0] + v[1]).spread_over("a", "b")
    with pytest.raises(TypeError, match="spreads"):

        @message()
        class Half:
            mti: str
            a: str | None = de(48, pair, default=None)


def test_one_element_two_fields_fails_at_import() -> None:
    with pytest.raises(TypeError, match="two fields"):

        @message()
        class Twice:
            mti: str
            a: str | None = de(48, text(), default=None)
            b: str | None = de(48, text(), default=None)


def test_unsupported_message_is_read_leniently() -> None:
    msg = messages.from_fields({"t": "0600", "11": "00012X", "41": "TERM0001", "7": "1311123456"})
    assert msg == UnsupportedMessage(mti="0600", terminal_id="TERM0001")
    assert isinstance(msg, UnsupportedMessage) and msg.answer() is None
