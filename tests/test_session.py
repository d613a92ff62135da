"""The sans-IO session policy (switch/session.py): bytes in, one action per frame out.

No trio and no sockets: every case is a byte string and the action it must give. The
response codes come from a profile whose format-error code is not 30, so that a literal
anywhere on the path would show.
"""

from __future__ import annotations

import doctest
import random
import re
from dataclasses import replace
from pathlib import Path

import iso8583
import pytest

from switch import session as session_mod
from switch.acquirer import build_auth, build_reversal, echo
from switch.config import ListenerConfig
from switch.decisions import Profile, Reason, profile
from switch.session import Answer, Close, Decide, Drop, KeepAlive, Session, classify
from switch.wire import codec
from switch.wire.framing import HeaderKind, encode_frame, keepalive_frame
from switch.wire.messages import AuthRequest, AuthResponse, NetworkRequest, UnsupportedMessage
from switch.wire.spec import spec_for

PAN = "4123456789012345"
#: A network whose format-error and invalid-transaction codes differ from ISO's.
ODD = Profile(
    "odd",
    {**profile("iso").table, Reason.FORMAT_ERROR: "F1", Reason.INVALID_TRANSACTION: "T2"},
)
LISTENER = ListenerConfig()


def auth_body(stan: str = "000001") -> bytes:
    return codec.encode(build_auth(PAN, 1000, stan=stan))


def spoil_amount(body: bytes) -> bytes:
    """Keep MTI, bitmap and the leading fields; put letters into DE4."""
    amount = codec.decode_fields(body)["4"].encode()
    return body.replace(amount, b"00000000ABCD", 1)


def raw(fields: dict[str, str]) -> bytes:
    """Encode with pyiso8583 directly, for MTIs the typed codec will not build."""
    data, _ = iso8583.encode(dict(fields), spec_for("ascii"))
    return bytes(data)


def echo_fields(stan: str) -> dict[str, str]:
    fields = codec.decode_fields(codec.encode(echo(stan=stan)))
    return {k: v for k, v in fields.items() if k.isdigit() and k not in ("0", "1")}


# ------------------------------------------------------------------------ one frame


def test_requests_are_decided() -> None:
    auth = build_auth(PAN, 1000, stan="000001")
    for message in (auth, build_reversal(auth, stan="000002"), echo(stan="000003")):
        action = classify(codec.encode(message), "ascii", ODD)
        assert isinstance(action, Decide)
        assert action.message.stan == message.stan
        assert action.message.mti == message.mti


def test_request_mti_we_do_not_serve_goes_to_the_handler() -> None:
    action = classify(raw({**echo_fields("000555"), "t": "0600"}), "ascii", ODD)
    assert isinstance(action, Decide)
    assert isinstance(action.message, UnsupportedMessage)
    assert action.message.stan == "000555"


def test_format_error_is_answered_with_the_profile_code() -> None:
    action = classify(spoil_amount(auth_body("004242")), "ascii", ODD)
    assert isinstance(action, Answer)
    assert (action.reason, action.response_code) == (Reason.FORMAT_ERROR, "F1")
    assert (action.mti, action.stan, action.field) == ("0100", "004242", "4")
    fields = codec.decode_fields(action.body)
    assert (fields["0"], fields["11"], fields["39"]) == ("0110", "004242", "F1")
    assert "2" not in fields  # the answer never carries the PAN
    assert PAN not in action.detail


def test_iso_profile_answers_format_errors_30() -> None:
    action = classify(spoil_amount(auth_body()), "ascii", profile("iso"))
    assert isinstance(action, Answer)
    assert codec.decode_fields(action.body)["39"] == "30"


def test_unsolicited_and_garbled_responses_are_dropped() -> None:
    answer = AuthResponse.answer(build_auth(PAN, 1000, stan="004343"), "00")
    body = codec.encode(answer)
    assert classify(body, "ascii", ODD) == Drop("unsolicited_response", "0110", "004343")
    assert classify(spoil_amount(body), "ascii", ODD) == Drop("garbled_response", "0110", "004343")
    unsolicited = raw({**echo_fields("000556"), "t": "0810", "39": "00"})
    assert classify(unsolicited, "ascii", ODD) == Drop("unsolicited_response", "0810", "000556")


@pytest.mark.parametrize(
    "body",
    [b"\xff\xfe garbage", b"0100" + b"Z" * 16, b"01", b"XXXX" + b"0" * 16],
)
def test_body_without_request_mti_and_stan_closes(body: bytes) -> None:
    action = classify(body, "ascii", ODD)
    assert isinstance(action, Close)
    assert action.kind == "undecodable"


# ------------------------------------------------------------------------ a stream


def test_frames_split_anywhere_give_the_same_actions() -> None:
    rng = random.Random(8583)
    bodies = [auth_body(f"{i:06d}") for i in range(1, 9)]
    stream = b"".join(encode_frame(b) for b in bodies)
    for _ in range(50):
        s = Session(LISTENER, ODD)
        actions = []
        cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(1, 30)))
        for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            actions += s.receive(stream[a:b])
        assert [a.message.stan for a in actions if isinstance(a, Decide)] == [
            f"{i:06d}" for i in range(1, 9)
        ]
        assert not s.in_progress
        assert s.end_of_stream() is None


def test_in_progress_follows_the_frame_boundary() -> None:
    s = Session(LISTENER, ODD)
    frame = encode_frame(auth_body())
    assert not s.in_progress
    assert s.receive(frame[:1]) == []
    assert s.in_progress
    assert len(s.receive(frame[1:] + frame[:3])) == 1
    assert s.in_progress
    assert len(s.receive(frame[3:])) == 1
    assert not s.in_progress


@pytest.mark.parametrize(
    ("header", "bad", "kind"),
    [
        ("binary2", b"\xff\xff", "oversize"),
        ("binary2", b"\x00\x00", "zero_length"),
        ("ascii4", b"+120", "bad_header"),
        ("ascii4", b"01_0", "bad_header"),
        ("ascii4", b"00a1", "bad_header"),
        ("bcd2", b"\x0a\x00", "bad_header"),
    ],
)
def test_frames_before_a_framing_error_in_the_same_read_are_kept(
    header: HeaderKind, bad: bytes, kind: str
) -> None:
    s = Session(replace(LISTENER, header=header), ODD)
    good = b"".join(encode_frame(auth_body(f"00000{i}"), header) for i in (1, 2))
    actions = s.receive(good + bad + b"0" * 40)
    assert [type(a) for a in actions] == [Decide, Decide, Close]
    assert isinstance(actions[-1], Close) and actions[-1].kind == kind
    assert s.closed and not s.in_progress
    assert s.receive(encode_frame(auth_body(), header)) == []
    assert s.end_of_stream() is None


def test_framing_error_after_a_partial_frame_keeps_the_frame_it_completes() -> None:
    s = Session(LISTENER, ODD)
    frame = encode_frame(auth_body("000007"))
    assert s.receive(frame[:10]) == []
    actions = s.receive(frame[10:] + b"\x00\x00")
    assert [type(a) for a in actions] == [Decide, Close]
    first = actions[0]
    assert isinstance(first, Decide) and isinstance(first.message, AuthRequest)
    assert first.message.stan == "000007"


def test_undecodable_frame_ends_the_actions_of_a_read() -> None:
    s = Session(LISTENER, ODD)
    data = b"".join(
        encode_frame(b) for b in (auth_body("000001"), b"\xff\xfe garbage", auth_body("000002"))
    )
    actions = s.receive(data)
    assert [type(a) for a in actions] == [Decide, Close]
    assert s.receive(encode_frame(auth_body("000003"))) == []


def test_format_error_answer_keeps_the_session_open() -> None:
    s = Session(LISTENER, ODD)
    data = encode_frame(spoil_amount(auth_body("000001"))) + encode_frame(auth_body("000002"))
    actions = s.receive(data)
    assert [type(a) for a in actions] == [Answer, Decide]
    assert not s.closed


def test_end_of_stream_inside_a_frame_is_a_truncated_frame() -> None:
    s = Session(LISTENER, ODD)
    s.receive(encode_frame(auth_body())[:20])
    assert s.end_of_stream() == Close("truncated_frame", "end of stream inside a frame")
    assert s.closed


def test_network_management_is_decided_not_answered_here() -> None:
    # The session hands 0800 to the handler (the Dispatcher answers it); it knows no DE70.
    s = Session(LISTENER, ODD)
    (action,) = s.receive(encode_frame(codec.encode(echo(stan="000009", code="999"))))
    assert isinstance(action, Decide) and isinstance(action.message, NetworkRequest)


# ------------------------------------------------------------------------ house rules


def test_session_doctests() -> None:
    result = doctest.testmod(session_mod, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("module", ["server.py", "connection.py", "session.py"])
def test_no_response_code_literal_on_the_server_path(module: str) -> None:
    source = (Path(session_mod.__file__).parent / module).read_text()
    assert not re.findall(r"""(?<![bB])["'](?:00|05|12|30|51|91|96)["']""", source)
    if module == "session.py":
        assert not re.search(r"^(?:import|from) trio", source, re.MULTILINE)


@pytest.mark.parametrize("header", ["binary2", "ascii4", "bcd2"])
@pytest.mark.parametrize(("policy", "answer"), [("answer", True), ("ignore", False)])
def test_zero_length_frames_are_keepalives_in_stream_order(
    header: HeaderKind, policy: str, answer: bool
) -> None:
    lst = replace(LISTENER, header=header, zero_length_frames=policy)  # type: ignore[arg-type]
    s = Session(lst, ODD)
    ka = keepalive_frame(header)
    data = ka + encode_frame(auth_body("000001"), header) + ka + ka
    # Byte by byte too: a header split across reads is still one keep-alive.
    for chunks in ([data], [data[i : i + 1] for i in range(len(data))]):
        actions = [a for chunk in chunks for a in s.receive(chunk)]
        assert [type(a) for a in actions] == [KeepAlive, Decide, KeepAlive, KeepAlive]
        assert all(a.answer is answer for a in actions if isinstance(a, KeepAlive))
        assert not s.in_progress and not s.closed


def test_zero_length_frame_still_closes_by_default() -> None:
    assert LISTENER.zero_length_frames == "close"
    (action,) = Session(LISTENER, ODD).receive(b"\x00\x00")
    assert isinstance(action, Close) and action.kind == "zero_length"
