"""What the switch does with each frame a connection delivers: the sans-IO session policy.

What lives here: ``Session``, fed the bytes one connection reads and returning one action per
complete frame, in stream order, and ``classify``, the rule for a single frame body:

- ``Decide(message)``: a decodable request-class message (authorization, reversal, network
  management, or a request MTI we do not serve): hand it to the ``RequestHandler``;
- ``Answer(body, reason, ...)``: a body that cannot be decoded but whose request MTI and STAN
  were recovered, answered at once with the profile's code for ``Reason.FORMAT_ERROR``; the
  connection stays open;
- ``Drop(kind)``: a response-class message (unsolicited, or garbled beyond use): nothing
  is answered, the connection stays open (the connection recognises the 0810 answering an
  echo of its own among them);
- ``KeepAlive(answer)``: a zero-length frame, when the listener accepts them
  (``zero_length_frames`` "ignore" or "answer"; with "close", the default, it is a framing
  error): ``answer`` says whether a zero-length frame goes back;
- ``Close(kind)``: the byte stream cannot be trusted any more (a framing error, a body with
  no recoverable request MTI and STAN, EOF inside a frame): stop reading. The connection
  still finishes and writes the answers of the requests before it.

``listener_spec`` is the wire spec a listener's frames are decoded with: its network profile's
layout (or the one its ``spec`` names) and sub-layouts, with DE52 of 16 bytes when its PIN
block format is ISO 9564 format 4 (AES), else 8; ``listener_framing`` its length header (the
profile's, or the listener's override) and envelope. The session strips a request's envelope
(TPDU, message header) and frames answers with the envelope of the latest request.

Nothing here knows a response code: every DE39 comes from the listener's ``Profile``. Like
h11, this module does no I/O and imports no trio, so the whole policy is tested with bytes.

What does not: reading, deadlines, backpressure and writing (connection.py), accepting and
TLS (server.py), deciding a request (handler.py and the engine behind it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from switch.config import SPEC_ALIASES, ListenerConfig
from switch.decisions import Profile, Reason, profile
from switch.handler import Request
from switch.wire import codec
from switch.wire.framing import (
    FrameDecoder,
    Framing,
    FramingError,
    answer_envelope,
    encode_frame,
    keepalive_frame,
    split_envelope,
)
from switch.wire.messages import (
    AuthRequest,
    NetworkRequest,
    ReversalRequest,
    UnsupportedMessage,
    is_request,
)
from switch.wire.profile import NetworkProfile
from switch.wire.spec import SpecChoice, WireSpec

__all__ = [
    "Action",
    "Answer",
    "Close",
    "Decide",
    "Drop",
    "KeepAlive",
    "Session",
    "classify",
    "listener_framing",
    "listener_spec",
]

#: Close kind of a body whose MTI or STAN cannot be recovered (nothing to answer it with).
UNDECODABLE: Final = "undecodable"
#: Close kind of an end of stream in the middle of a frame.
TRUNCATED_FRAME: Final = "truncated_frame"
#: Drop kind of a well-formed response-class message nobody asked for.
UNSOLICITED_RESPONSE: Final = "unsolicited_response"
#: Drop kind of a response-class message that does not even decode.
GARBLED_RESPONSE: Final = "garbled_response"


@dataclass(frozen=True, slots=True)
class Decide:
    """Hand ``message`` to the request handler and send what it decides."""

    message: Request


@dataclass(frozen=True, slots=True)
class Answer:
    """Send ``body`` (an encoded message, no length header) now; nothing is decided.

    ``mti`` and ``stan`` are those of the request answered; ``field`` and ``detail`` say
    what was wrong with it (fixed texts, never message bytes).
    """

    body: bytes
    reason: Reason
    response_code: str
    mti: str
    stan: str
    field: str | None
    detail: str


@dataclass(frozen=True, slots=True)
class Drop:
    """Ignore this frame; the connection stays open."""

    kind: str
    mti: str | None = None
    stan: str | None = None


@dataclass(frozen=True, slots=True)
class KeepAlive:
    """A zero-length frame: answer it with one (``answer``) or ignore it; the link is alive."""

    answer: bool


@dataclass(frozen=True, slots=True)
class Close:
    """Stop reading this connection: its byte stream is lost.

    ``kind`` is a short fixed identifier for logs and metrics (a ``FramingError`` kind,
    ``"undecodable"`` or ``"truncated_frame"``); ``detail`` a fixed text without data.
    """

    kind: str
    detail: str = ""


Action = Decide | Answer | Drop | KeepAlive | Close


def classify(frame: bytes, spec: SpecChoice, profile: Profile) -> Decide | Answer | Drop | Close:
    """The action for one complete frame body.

    >>> from switch.decisions import profile
    >>> classify(b"not iso 8583", "ascii", profile("iso")).kind
    'undecodable'

    Args:
        frame: the body, length header removed.
        spec: the listener's wire spec (see ``listener_spec``).
        profile: the listener's network profile (the source of every response code).
    """
    try:
        message = codec.decode(frame, spec)
    except codec.FormatError as err:
        return _format_error(err, spec, profile)
    if isinstance(message, AuthRequest | ReversalRequest | NetworkRequest):
        return Decide(message)
    if isinstance(message, UnsupportedMessage) and message.is_request:
        return Decide(message)
    return Drop(UNSOLICITED_RESPONSE, message.mti, getattr(message, "stan", None))


def _format_error(
    err: codec.FormatError, spec: SpecChoice, profile: Profile
) -> Answer | Drop | Close:
    code = profile.code(Reason.FORMAT_ERROR)
    body = codec.format_error_response(err, spec, response_code=code)
    if body is not None:
        assert err.mti is not None and err.stan is not None  # an answer needs both
        return Answer(body, Reason.FORMAT_ERROR, code, err.mti, err.stan, err.field, err.reason)
    if err.mti is not None and not is_request(err.mti):
        return Drop(GARBLED_RESPONSE, err.mti, err.stan)
    return Close(UNDECODABLE, err.reason)


def _wire_of(listener: ListenerConfig, prof: Profile | None) -> NetworkProfile:
    """The network profile file of a listener (a Profile built in code has none: the
    listener's network's is used)."""
    if prof is not None and prof.wire is not None:
        return prof.wire
    wire = profile(listener.network).wire
    assert wire is not None, "a listener's profile is loaded from its file"
    return wire


def listener_spec(
    listener: ListenerConfig, pin_block_format: int | None = None, prof: Profile | None = None
) -> WireSpec:
    """The wire spec a listener speaks: its profile's layout (or the one its ``spec`` names)
    and sub-layouts, with DE52 sized by its PIN block format (or ``pin_block_format``).

    >>> ws = listener_spec(ListenerConfig(network="visa", spec="bcd", pin_block_format=4))
    >>> ws.layout.name, ws.pin_block_bytes, ws.sub.cvv2
    ('iso87-bcd', 16, 'de126.10')
    """
    own = _wire_of(listener, prof)
    layout = own
    if listener.spec and listener.spec != listener.network:
        other = profile(SPEC_ALIASES.get(listener.spec, listener.spec)).wire
        assert other is not None
        layout = other
    fmt = listener.pin_block_format if pin_block_format is None else pin_block_format
    spec = own.wire_spec(fmt)
    return WireSpec(spec.kind, spec.pin_block_bytes, layout.layout, own.sub)


def listener_framing(listener: ListenerConfig, prof: Profile | None = None) -> Framing:
    """How a listener's frames are delimited: its profile's framing, with the listener's
    length header when it sets one.

    >>> listener_framing(ListenerConfig(network="iso87-ascii", header="ascii4")).header
    'ascii4'
    """
    framing = _wire_of(listener, prof).framing
    if listener.header:
        framing = Framing(listener.header, framing.includes_itself, framing.envelope,
                          framing.envelope_size)  # fmt: skip
    return framing


class Session:
    """The policy of one connection: bytes in, actions out, in stream order.

    >>> from switch.config import ListenerConfig
    >>> from switch.decisions import profile
    >>> s = Session(ListenerConfig(network="iso", header="ascii4"), profile("iso"))
    >>> s.receive(b"00")
    []
    >>> s.in_progress
    True
    >>> s.receive(b"00")
    [Close(kind='zero_length', detail='framing error (zero_length): frame announces an empty body')]

    A listener that accepts keep-alives gets a ``KeepAlive`` instead:

    >>> s = Session(ListenerConfig(zero_length_frames="answer"), profile("iso"))
    >>> s.receive(b"\\x00\\x00")
    [KeepAlive(answer=True)]

    After a ``Close`` the session is finished: later bytes give no action.
    """

    def __init__(self, listener: ListenerConfig, profile: Profile) -> None:
        self._framing = listener_framing(listener, profile)
        self._header_size = self._framing.header_size
        self._max_frame = listener.max_frame
        self._keepalive = listener.zero_length_frames
        self._empty_frames = listener.zero_length_frames != "close"
        self._decoder = FrameDecoder(
            self._framing, listener.max_frame, empty_frames=self._empty_frames
        )
        self._spec = listener_spec(listener, prof=profile)
        self._profile = profile
        #: The envelope (TPDU, message header) of the latest request, echoed in answers.
        self._envelope = b""
        self._closed = False
        #: Bytes received since the last frame boundary (at most one header and one body),
        #: kept so that the frames before a framing error can be recovered.
        self._partial = b""

    @property
    def in_progress(self) -> bool:
        """Whether part of a frame has been received (the frame deadline is running)."""
        return not self._closed and self._decoder.in_progress

    @property
    def spec(self) -> WireSpec:
        """The wire spec of this connection's messages."""
        return self._spec

    def frame(self, body: bytes) -> bytes:
        """An encoded answer framed for the wire: envelope (from the latest request's) and
        length header.

        Raises:
            ValueError: ``body`` is empty or too long for the header.
        """
        envelope = answer_envelope(self._framing, self._envelope, body)
        return encode_frame(envelope + body, self._framing)

    def keepalive(self) -> bytes:
        """The zero-length frame of this connection's framing (answer to a keep-alive)."""
        return keepalive_frame(self._framing)

    @property
    def closed(self) -> bool:
        """Whether a ``Close`` has been returned."""
        return self._closed

    def receive(self, data: bytes) -> list[Action]:
        """The actions of the frames ``data`` completes; a ``Close``, if any, comes last.

        Frames before a framing error or an undecodable body are still returned (and must
        be decided and answered); bytes after it are not looked at.
        """
        if self._closed:
            return []
        failure: Close | None = None
        try:
            frames = self._decoder.feed(data)
        except FramingError as exc:
            frames = self._frames_before_error(self._partial + data)
            failure = Close(exc.kind, str(exc))
        else:
            received = self._partial + data if self._partial else data
            consumed = sum(self._header_size + len(f) for f in frames)
            self._partial = received[consumed:]
        actions: list[Action] = []
        for frame in frames:
            if not frame:  # only when keep-alives are accepted
                actions.append(KeepAlive(answer=self._keepalive == "answer"))
                continue
            try:
                self._envelope, frame = split_envelope(self._framing, frame)  # noqa: PLW2901
            except FramingError as exc:
                self._closed = True
                actions.append(Close(exc.kind, str(exc)))
                return actions
            action = classify(frame, self._spec, self._profile)
            actions.append(action)
            if isinstance(action, Close):
                self._closed = True
                return actions
        if failure is not None:
            self._closed = True
            actions.append(failure)
        return actions

    def end_of_stream(self) -> Close | None:
        """The action for an end of stream: a ``Close`` when it cut a frame, else None."""
        if self._closed:
            return None
        self._closed = True
        if self._decoder.in_progress:
            return Close(TRUNCATED_FRAME, "end of stream inside a frame")
        return None

    def _frames_before_error(self, data: bytes) -> list[bytes]:
        """Replay ``data`` into a fresh decoder, a byte at a time, up to the framing error.

        ``FrameDecoder.feed`` raises without returning the frames it completed earlier in
        the same call; this slow path (taken once, just before a close) recovers them.
        """
        decoder = FrameDecoder(self._framing, self._max_frame, empty_frames=self._empty_frames)
        frames: list[bytes] = []
        for i in range(len(data)):
            try:
                frames += decoder.feed(data[i : i + 1])
            except FramingError:
                break
        return frames
