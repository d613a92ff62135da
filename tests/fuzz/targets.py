"""Fuzz targets of the sans-IO wire layer and the session policy: one function per target,
each taking the fuzzer's bytes and failing (an exception other than the documented ones, or
an ``AssertionError``) only on a defect.

What lives here: ``TARGETS`` (name -> target) for ``framing`` (``FrameDecoder.feed`` over
random splits, against a one-shot decode), ``codec`` (``codec.decode`` and ``decode_fields``
of every spec kind: a message or ``FormatError``; what decodes re-encodes to itself; every
format error gets an answer or none, never an exception), ``messages``
(``messages.from_fields`` of mutated valid field dictionaries: a message or ``FieldError``)
and ``session`` (``Session.receive`` over random splits: a defined action per frame, a
``Close`` last and nothing after it), and ``Input``, the small reader that turns fuzzer
bytes into choices so that atheris (tests/fuzz/run.py) and hypothesis
(tests/test_fuzz_targets.py) drive the same code.

What does not: the fuzzer drivers, the seed corpus (tests/fuzz/corpus/, built by
tests/fuzz/build_corpus.py), the crasher replays (tests/test_fuzz_regressions.py).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Final, TypeVar

from switch.config import ListenerConfig
from switch.decisions import Reason, profile
from switch.session import (
    Action,
    Answer,
    Close,
    Decide,
    Drop,
    Session,
    classify,
    listener_spec,
)
from switch.wire import codec
from switch.wire.framing import FrameDecoder, FramingError, HeaderKind, encode_frame, header_size
from switch.wire.messages import FieldError, from_fields
from switch.wire.spec import SPEC_KINDS, SpecChoice, wire_spec

T = TypeVar("T")
FUZZ_DIR: Final = Path(__file__).resolve().parent
CORPUS_DIR: Final = FUZZ_DIR / "corpus"
CRASHERS_DIR: Final = FUZZ_DIR / "crashers"
HEADERS: Final[tuple[HeaderKind, ...]] = ("binary2", "ascii4", "bcd2")
#: Frame limits a target picks from: tiny (oversize quickly), the default, the largest.
MAX_FRAMES: Final = (1, 64, 8192, 0xFFFF)
#: Every wire spec a listener can have: each kind with an 8- and a 16-byte DE52.
SPECS: Final[tuple[SpecChoice, ...]] = tuple(
    wire_spec(kind, pin_block_format=fmt) for kind in SPEC_KINDS for fmt in (0, 4)
)
NETWORKS: Final = ("visa", "mastercard", "iso")


class Input:
    """Choices read from the front of fuzzer bytes; past the end every choice is the first."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def byte(self) -> int:
        if self._pos >= len(self._data):
            return 0
        self._pos += 1
        return self._data[self._pos - 1]

    def pick(self, options: Sequence[T]) -> T:
        return options[self.byte() % len(options)]

    def chunk(self, most: int) -> bytes:
        """The next ``n`` bytes, ``n`` read first (at most ``most``)."""
        n = self.byte() % (most + 1)
        out = self._data[self._pos : self._pos + n]
        self._pos += len(out)
        return out

    def rest(self) -> bytes:
        out = self._data[self._pos :]
        self._pos = len(self._data)
        return out


def split(stream: bytes, cuts: bytes) -> list[bytes]:
    """``stream`` cut into pieces whose sizes come from ``cuts`` in turn (a size 0 piece is an
    empty read); one piece when ``cuts`` is empty."""
    if not cuts:
        return [stream]
    pieces = []
    pos = 0
    i = 0
    while pos < len(stream):
        n = cuts[i % len(cuts)]
        i += 1
        step = 0 if n == 0xFF and i % 7 else n % 37 + 1 if n < 0xC0 else n * 3
        pieces.append(stream[pos : pos + step])
        pos += step
    return pieces


# -- framing --------------------------------------------------------------------------------


def _one_shot(
    header: HeaderKind, max_frame: int, stream: bytes
) -> tuple[list[bytes], FramingError | None]:
    """The frames of ``stream`` fed a byte at a time, and the framing error after them."""
    decoder = FrameDecoder(header, max_frame)
    frames: list[bytes] = []
    for i in range(len(stream)):
        try:
            frames += decoder.feed(stream[i : i + 1])
        except FramingError as exc:
            return frames, exc
    return frames, None


def fuzz_framing(data: bytes) -> None:
    """Random splits give the frames of a byte-at-a-time feed; an error is a FramingError,
    sticky, and comes after the frames that preceded it."""
    inp = Input(data)
    header = inp.pick(HEADERS)
    max_frame = inp.pick(MAX_FRAMES)
    cuts = inp.chunk(16)
    stream = inp.rest()
    pieces = split(stream, cuts)
    expected, exc_expected = _one_shot(header, max_frame, stream)
    error = None if exc_expected is None else exc_expected.kind
    decoder = FrameDecoder(header, max_frame)
    got: list[bytes] = []
    failed: str | None = None
    for piece in pieces:
        try:
            got += decoder.feed(piece)
        except FramingError as exc:
            failed = exc.kind
            assert str(exc).startswith("framing error (")
            try:
                decoder.feed(b"")
            except FramingError as again:
                assert again.kind == exc.kind
            else:
                raise AssertionError("a framing error is not sticky")
            break
    assert failed == error, (failed, error)
    if failed is None:
        assert got == expected
    else:
        # frames completed inside the failing feed are not returned: a prefix of them
        assert got == expected[: len(got)]
    for frame in got:
        assert 0 < len(frame) <= max_frame
    if failed is None:
        consumed = b"".join(encode_frame(f, header, max_frame=0xFFFF) for f in got)
        assert stream.startswith(consumed)
        assert decoder.in_progress == (len(consumed) < len(stream))


# -- codec ----------------------------------------------------------------------------------


def fuzz_codec(data: bytes) -> None:
    """Any body decodes to a message or a FormatError in every spec; a decoded message
    re-encodes to a body that decodes to it again; a FormatError is answered or not, never
    raises, and its answer decodes in the same spec (tests/fuzz/crashers/codec/
    de70-missing-on-0810: an 0810 without the DE70 it needs was once sent)."""
    inp = Input(data)
    spec = inp.pick(SPECS)
    body = inp.rest()
    with contextlib.suppress(codec.FormatError):
        codec.decode_fields(body, spec)
    try:
        message = codec.decode(body, spec)
    except codec.FormatError as err:
        assert "\n" not in err.reason
        answer = codec.format_error_response(err, spec, response_code="30")
        if answer is not None:
            assert err.mti is not None and err.stan is not None
            fields = codec.decode_fields(answer, spec)
            assert fields["39"] == "30" and fields["11"] == err.stan
            try:
                codec.decode(answer, spec)
            except codec.FormatError as bad:
                raise AssertionError(
                    f"the answer to a format error does not decode: {bad}"
                ) from bad
        return
    again = codec.decode(codec.encode(message, spec), spec)
    assert again == message, (again, message)


# -- message mapping ------------------------------------------------------------------------


@cache
def valid_field_dicts() -> tuple[Mapping[str, str], ...]:
    """Field dictionaries of valid messages (tests/fuzz/corpus/messages/valid_fields.json)."""
    raw = json.loads((CORPUS_DIR / "messages" / "valid_fields.json").read_text())
    return tuple(raw)


#: Values a mutated field takes besides random text: edges of lengths, digits and formats.
_VALUES: Final = ("", "0", "00", "0000", "9" * 19, "A", " ", "0100", "0400", "0800", "1231",
                  "1301", "0230", "=", "D", "301", "99999999999999999999", "-1", "1.5", "\x00",
                  "é", "F" * 16, "0" * 42, "000000000000")  # fmt: skip
#: Keys a mutation may add: the MTI, every data element, bitmaps and stray keys.
_KEYS: Final = ("t", "p", "1", *(str(i) for i in range(2, 129)), "h", "x", "129")


def fuzz_messages(data: bytes) -> None:
    """A valid field dictionary mutated (fields removed, replaced, added, the MTI changed)
    maps to a message or raises FieldError."""
    inp = Input(data)
    fields = dict(inp.pick(valid_field_dicts()))
    for _ in range(inp.byte() % 8 + 1):
        op = inp.byte() % 4
        keys = sorted(fields)
        if op == 0 and keys:
            del fields[inp.pick(keys)]
        elif op == 1:
            fields[inp.pick(_KEYS)] = inp.pick(_VALUES)
        elif op == 2:
            key = inp.pick(keys or list(_KEYS))
            fields[key] = inp.chunk(40).decode("latin-1")
        elif keys:  # a byte of an existing value changed
            key = inp.pick(keys)
            value = fields[key]
            if value:
                i = inp.byte() % len(value)
                fields[key] = value[:i] + chr(inp.byte()) + value[i + 1 :]
    with contextlib.suppress(FieldError):
        from_fields(fields)


# -- session policy -------------------------------------------------------------------------


def fuzz_session(data: bytes) -> None:
    """Every complete frame yields one defined action, in order; a Close is the last action
    and nothing follows it; an Answer carries the profile's format-error code."""
    inp = Input(data)
    listener = ListenerConfig(
        header=inp.pick(HEADERS),
        spec=inp.pick(SPEC_KINDS),
        max_frame=inp.pick(MAX_FRAMES),
        network=inp.pick(NETWORKS),
        pin_block_format=inp.pick((0, 4)),
    )
    prof = profile(listener.network)
    spec = listener_spec(listener)
    cuts = inp.chunk(16)
    stream = inp.rest()
    # the oracle: the frames of the whole stream and the framing error after them
    frames, error = _one_shot(listener.header, listener.max_frame, stream)
    expected: list[Action] = []
    for frame in frames:
        action = classify(frame, spec, prof)
        assert isinstance(action, Decide | Answer | Drop | Close), action
        if isinstance(action, Answer):
            assert action.response_code == prof.code(Reason.FORMAT_ERROR)
            assert codec.decode_fields(action.body, spec)["39"] == action.response_code
        expected.append(action)
        if isinstance(action, Close):
            break
    else:
        if error is not None:
            expected.append(Close(error.kind, str(error)))
    session = Session(listener, prof)
    actions: list[Action] = []
    for piece in split(stream, cuts):
        got = session.receive(piece)
        assert not (got and session.closed and actions and isinstance(actions[-1], Close))
        actions += got
    assert actions == expected, (actions, expected)
    closed = bool(actions) and isinstance(actions[-1], Close)
    assert session.closed == closed
    consumed = sum(header_size(listener.header) + len(f) for f in frames)
    end = session.end_of_stream()
    if closed:
        assert end is None
    else:
        assert (end is not None) == (consumed < len(stream))
        assert end is None or end.kind == "truncated_frame"
    assert session.receive(stream[:8]) == []


TARGETS: Final[dict[str, Callable[[bytes], None]]] = {
    "framing": fuzz_framing,
    "codec": fuzz_codec,
    "messages": fuzz_messages,
    "session": fuzz_session,
}
