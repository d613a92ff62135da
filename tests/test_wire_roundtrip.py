"""Property tests of the wire layer: typed round-trips for every message type and spec, and
random or mutated bytes through framing and codec raising nothing but the typed errors."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from switch.wire import codec, messages
from switch.wire.codec import FormatError
from switch.wire.framing import FrameDecoder, FramingError, HeaderKind
from switch.wire.messages import (
    AdditionalAmount,
    AuthRequest,
    AuthResponse,
    MerchantLocation,
    Message,
    NetworkRequest,
    NetworkResponse,
    OriginalData,
    ReversalRequest,
    ReversalResponse,
    Track2,
    UnsupportedMessage,
)
from switch.wire.spec import SpecKind

SPECS: tuple[SpecKind, ...] = ("ascii", "binary", "bcd")
# Keep the suite fast on a shared 2-core machine.
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

#: A 16-digit test PAN (Visa test range), longer than any other generated text field.
TEST_PAN = "4761739001010010"
PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))


def digits(n: int, m: int | None = None) -> st.SearchStrategy[str]:
    return st.text("0123456789", min_size=n, max_size=n if m is None else m)


def text(n: int, m: int | None = None) -> st.SearchStrategy[str]:
    return st.text(PRINTABLE, min_size=n, max_size=n if m is None else m)


T = TypeVar("T")


def opt(s: st.SearchStrategy[T]) -> st.SearchStrategy[T | None]:
    return st.none() | s


mmdd = st.dates(dt.date(2024, 1, 1), dt.date(2024, 12, 31)).map(lambda d: d.strftime("%m%d"))
hhmmss = st.times().map(lambda t: t.strftime("%H%M%S"))
transmission = st.tuples(mmdd, hhmmss).map("".join)
yymm = st.tuples(digits(2), st.integers(1, 12)).map(lambda t: f"{t[0]}{t[1]:02d}")
pans = digits(12, 19)
currencies = st.sampled_from(sorted(messages.ISO4217_NUMERIC))
amounts = st.integers(0, 999_999_999_999)
stans = digits(6)
response_codes = st.text("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=2, max_size=2)


@st.composite
def track2s(draw: st.DrawFn, pan: str) -> Track2:
    room = 37 - len(pan) - 8
    return Track2(
        pan=pan,
        expiry=draw(yymm),
        service_code=draw(digits(3)),
        discretionary=draw(digits(0, room)),
    )


@st.composite
def auth_requests(draw: st.DrawFn) -> AuthRequest:
    pan = draw(pans)
    items = draw(
        st.lists(st.tuples(digits(2).filter(lambda s: s != "92"), text(0, 20)), max_size=3).map(
            tuple
        )
    )
    cvv2 = draw(opt(digits(3)))
    if cvv2 is not None:
        items = (*items, ("92", cvv2))
    return AuthRequest(
        mti=draw(st.sampled_from(sorted(messages.AUTH_REQUEST_MTIS))),
        pan=pan,
        processing_code=draw(digits(6)),
        amount=draw(amounts),
        transmission_time=draw(transmission),
        stan=draw(stans),
        currency=draw(currencies),
        local_time=draw(opt(hhmmss)),
        local_date=draw(opt(mmdd)),
        expiry=draw(opt(yymm)),
        mcc=draw(opt(digits(4))),
        acquirer_country=draw(opt(digits(3))),
        pos_entry_mode=draw(opt(digits(3))),
        pan_sequence=draw(opt(digits(3))),
        acquirer_id=draw(opt(digits(0, 11))),
        forwarding_id=draw(opt(digits(1, 11))),
        track2=draw(opt(track2s(pan))),
        rrn=draw(opt(text(12))),
        terminal_id=draw(opt(text(8))),
        merchant_id=draw(opt(text(15))),
        merchant_location=draw(
            opt(
                st.builds(
                    MerchantLocation,
                    name=text(0, 25).map(str.rstrip),
                    city=text(0, 13).map(str.rstrip),
                    country=text(2),
                )
            )
        ),
        category_code=draw(opt(st.sampled_from("ABCDRTUXZ"))),
        cvv2=cvv2,
        additional_data=items,
        pin_block=draw(opt(st.binary(min_size=8, max_size=8))),
        security_control=draw(opt(digits(16))),
        emv=draw(opt(st.binary(min_size=1, max_size=300))),
        response_code=draw(opt(response_codes)),
    )


additional_amounts = st.builds(
    AdditionalAmount,
    account_type=digits(2),
    amount_type=digits(2),
    currency=currencies,
    amount=st.integers(-999_999_999_999, 999_999_999_999),
)
originals = st.builds(
    OriginalData,
    mti=digits(4),
    stan=stans,
    transmission_time=digits(10),
    acquirer_id=digits(11),
    forwarding_id=digits(11),
)


@st.composite
def auth_responses(draw: st.DrawFn) -> AuthResponse:
    return AuthResponse(
        mti=draw(st.sampled_from(sorted(messages.AUTH_RESPONSE_MTIS))),
        stan=draw(stans),
        response_code=draw(response_codes),
        transmission_time=draw(opt(transmission)),
        pan=draw(opt(pans)),
        processing_code=draw(opt(digits(6))),
        amount=draw(opt(amounts)),
        local_time=draw(opt(hhmmss)),
        local_date=draw(opt(mmdd)),
        acquirer_id=draw(opt(digits(1, 11))),
        rrn=draw(opt(text(12))),
        terminal_id=draw(opt(text(8))),
        merchant_id=draw(opt(text(15))),
        currency=draw(opt(currencies)),
        approval_code=draw(opt(text(6))),
        additional_amounts=tuple(draw(st.lists(additional_amounts, max_size=6))),
        emv=draw(opt(st.binary(min_size=1, max_size=64))),
    )


@st.composite
def reversal_requests(draw: st.DrawFn) -> ReversalRequest:
    return ReversalRequest(
        mti=draw(st.sampled_from(sorted(messages.REVERSAL_REQUEST_MTIS))),
        stan=draw(stans),
        transmission_time=draw(transmission),
        amount=draw(amounts),
        original=draw(originals),
        pan=draw(opt(pans)),
        processing_code=draw(opt(digits(6))),
        currency=draw(opt(currencies)),
        local_time=draw(opt(hhmmss)),
        local_date=draw(opt(mmdd)),
        acquirer_id=draw(opt(digits(1, 11))),
        forwarding_id=draw(opt(digits(1, 11))),
        rrn=draw(opt(text(12))),
        terminal_id=draw(opt(text(8))),
        merchant_id=draw(opt(text(15))),
        response_code=draw(opt(response_codes)),
        replacement_amount=draw(opt(amounts)),
        emv=draw(opt(st.binary(min_size=1, max_size=64))),
    )


@st.composite
def reversal_responses(draw: st.DrawFn) -> ReversalResponse:
    return ReversalResponse.answer(draw(reversal_requests()), draw(response_codes))


network_requests = st.builds(
    NetworkRequest,
    mti=st.just("0800"),
    transmission_time=transmission,
    stan=stans,
    code=st.sampled_from(["001", "002", "301", "101", "161"]),
    security_control=opt(digits(16)),
    key_data=opt(text(1, 60)),
)
network_responses = st.builds(
    NetworkResponse,
    mti=st.just("0810"),
    transmission_time=transmission,
    stan=stans,
    code=digits(3),
    response_code=response_codes,
)
typed = (
    messages.AUTH_REQUEST_MTIS
    | messages.AUTH_RESPONSE_MTIS
    | messages.REVERSAL_REQUEST_MTIS
    | messages.REVERSAL_RESPONSE_MTIS
    | messages.NETWORK_REQUEST_MTIS
    | messages.NETWORK_RESPONSE_MTIS
)
unsupported = st.builds(
    UnsupportedMessage,
    mti=digits(4).filter(lambda m: m not in typed),
    stan=opt(stans),
    transmission_time=opt(transmission),
    acquirer_id=opt(digits(1, 11)),
    rrn=opt(text(12)),
    terminal_id=opt(text(8)),
)

all_messages: st.SearchStrategy[Message] = st.one_of(
    auth_requests(),
    auth_responses(),
    reversal_requests(),
    reversal_responses(),
    network_requests,
    network_responses,
    unsupported,
)


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize(
    "strategy",
    [
        auth_requests(),
        auth_responses(),
        reversal_requests(),
        reversal_responses(),
        network_requests,
        network_responses,
        unsupported,
    ],
    ids=["auth_req", "auth_resp", "rev_req", "rev_resp", "net_req", "net_resp", "unsupported"],
)
def test_round_trip(spec: SpecKind, strategy: st.SearchStrategy[Message]) -> None:
    @FAST
    @given(strategy)
    def check(msg: Message) -> None:
        assert codec.decode(codec.encode(msg, spec), spec) == msg

    check()


@pytest.mark.parametrize(
    "strategy",
    [
        auth_requests(),
        auth_responses(),
        reversal_requests(),
        reversal_responses(),
        network_requests,
        network_responses,
        unsupported,
    ],
    ids=["auth_req", "auth_resp", "rev_req", "rev_resp", "net_req", "net_resp", "unsupported"],
)
def test_field_dict_round_trip(strategy: st.SearchStrategy[Message]) -> None:
    """The generated mapping alone (no bytes): to_fields then from_fields gives the message."""

    @FAST
    @given(strategy)
    def check(msg: Message) -> None:
        fields = messages.to_fields(msg)
        assert all(isinstance(value, str) for value in fields.values())
        assert messages.from_fields(fields) == msg

    check()


@pytest.mark.parametrize("spec", SPECS)
def test_random_bytes_raise_only_format_error(spec: SpecKind) -> None:
    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300))
    @example(b"0100")
    @example(b"0100" + b"F" * 16)
    @example(b"0100" + b"\xff" * 16)
    @example(b"0100C000000000000000" + b"0" * 16)  # tertiary-bitmap bit
    @example(b"\x01\x00\xc0" + b"\x00" * 7 + b"\xff" * 8)
    def check(frame: bytes) -> None:
        try:
            codec.decode(frame, spec)
        except FormatError as err:
            answer = codec.format_error_response(err, spec, response_code="30")
            if answer is not None:
                fields = codec.decode_fields(answer, spec)
                assert fields["39"] == "30"
                assert not messages.is_request(fields["0"])

    check()


def _mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    out = bytearray(data)
    for kind, pos, value in ops:
        if not out:
            break
        i = pos % len(out)
        if kind == 0:
            out[i] = value
        elif kind == 1:
            del out[i]
        elif kind == 2:
            out.insert(i, value)
        else:
            del out[i:]
    return bytes(out)


@pytest.mark.parametrize("spec", SPECS)
def test_mutated_messages_raise_only_format_error(spec: SpecKind) -> None:
    ops = st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 10_000), st.integers(0, 255)),
        min_size=1,
        max_size=4,
    )

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(auth_requests(), ops)
    def check(msg: AuthRequest, mutation: list[tuple[int, int, int]]) -> None:
        # A PAN no other generated field can contain (at most 15 characters long).
        msg = dataclasses.replace(msg, pan=TEST_PAN, track2=None)
        frame = _mutate(codec.encode(msg, spec), mutation)
        try:
            codec.decode(frame, spec)
        except FormatError as err:
            # Errors never carry the PAN or the message bytes.
            assert msg.pan not in str(err)
            assert msg.pan not in repr(err.__dict__)
            codec.format_error_response(err, spec, response_code="30")

    check()


@pytest.mark.parametrize("header", ["binary2", "ascii4", "bcd2"])
def test_random_bytes_through_framing(header: HeaderKind) -> None:
    @settings(max_examples=200, deadline=None)
    @given(st.lists(st.binary(max_size=64), max_size=8))
    def check(chunks: list[bytes]) -> None:
        dec = FrameDecoder(header, max_frame=128)
        try:
            for chunk in chunks:
                for frame in dec.feed(chunk):
                    assert 1 <= len(frame) <= 128
        except FramingError as err:
            assert err.kind in {"zero_length", "oversize", "bad_header"}

    check()
