"""The acquirer side: a trio client that sends ISO 8583 requests over mutual TLS.

What lives here: ``Client``, which connects with a client certificate, keeps one reader task
that matches responses to waiting requests by STAN (and DE7/DE41 when several share one),
and lets many requests be in flight at once. ``cardswitch send``, the tests and the
benchmarks use it. ``Client.send_frame`` writes raw bytes for tests of bad input.

What does not: anything of the issuer side (server.py), message definitions (wire/).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio

from switch.wire import codec
from switch.wire.framing import FrameDecoder, Framing, FramingError, HeaderKind, encode_frame
from switch.wire.messages import Message
from switch.wire.spec import SpecChoice

#: Bytes asked of the TLS stream per read.
_RECEIVE_SIZE = 65536
#: Seconds a graceful TLS close may take before the socket is just dropped.
_CLOSE_TIMEOUT = 1.0
#: Largest response frame accepted from the switch.
_MAX_FRAME = 65535


class ClientError(Exception):
    """The connection failed or a response did not arrive in time."""


@dataclass
class _Pending:
    key: tuple[str, str | None, str | None]
    done: trio.Event = field(default_factory=trio.Event)
    response: Message | None = None


class Client:
    """One mutual-TLS connection to a switch. Create with ``Client.connect``."""

    def __init__(
        self,
        stream: trio.SSLStream[trio.SocketStream],
        header: HeaderKind | Framing,
        spec: SpecChoice,
    ) -> None:
        self._stream = stream
        self._header: HeaderKind | Framing = header
        self._spec: SpecChoice = spec
        self._pending: list[_Pending] = []
        self._send_lock = trio.Lock()
        self._closed = trio.Event()
        #: Messages the reader could not match to a request (unsolicited or late answers),
        #: and their frames, for callers that need fields the typed message does not carry.
        self.unmatched: list[Message] = []
        self.unmatched_frames: list[bytes] = []
        #: Why the reader stopped, once it has.
        self.closed_reason: str | None = None

    @property
    def local_port(self) -> int:
        """The TCP port this client's connection leaves from."""
        return int(self._stream.transport_stream.socket.getsockname()[1])

    @classmethod
    @asynccontextmanager
    async def connect(
        cls,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext,
        *,
        server_hostname: str | None = None,
        header: HeaderKind | Framing = "binary2",
        spec: SpecChoice = "ascii",
        connect_timeout: float = 10.0,
        local_address: str | None = None,
        preamble: bytes = b"",
    ) -> AsyncIterator[Client]:
        """Connect, handshake, and run the response reader until the block exits.

        ``local_address`` is the source IP to connect from (127.0.0.x on loopback stand in
        for other hosts); ``preamble`` is sent before the TLS handshake (a PROXY protocol
        header, as a load balancer would send it).

        ``spec`` is the listener's wire spec: a kind, or a ``WireSpec`` (a profile's, from
        ``switch.session.listener_spec``, or ``wire_spec(kind, pin_block_format=4)`` for ISO
        9564 format 4 blocks); ``header`` its length header or whole framing
        (``listener_framing``; an envelope is not added by this client).
        """
        with trio.fail_after(connect_timeout):
            tcp = await trio.open_tcp_stream(host, port, local_address=local_address)
            stream = trio.SSLStream(tcp, ssl_context, server_hostname=server_hostname or host)
            try:
                if preamble:
                    await tcp.send_all(preamble)
                await stream.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
        client = cls(stream, header, spec)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client._read_loop)
                try:
                    yield client
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            with trio.move_on_after(_CLOSE_TIMEOUT) as scope:
                try:
                    await stream.aclose()  # close_notify, so the server sees a clean EOF
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    scope.cancel()
            if scope.cancelled_caught:
                await trio.aclose_forcefully(stream)

    async def request(self, message: Message) -> Message:
        """Send ``message`` and return the response matched to it.

        Bound the wait with a cancel scope (``trio.fail_after``) around the call.

        Raises:
            ClientError: the connection closed before the answer came.
        """
        pending = _Pending(_key(message))
        self._pending.append(pending)
        try:
            await self.send_frame(codec.encode(message, self._spec))
            await _first_of(pending.done, self._closed)
            if pending.response is not None:
                return pending.response
            raise ClientError(f"connection closed: {self.closed_reason}")
        finally:
            if pending in self._pending:
                self._pending.remove(pending)

    async def send_frame(self, body: bytes, *, raw: bool = False) -> None:
        """Write one body with its length header (or ``raw`` bytes as they are)."""
        data = body if raw else encode_frame(body, self._header)
        async with self._send_lock:
            await self._stream.send_all(data)

    @property
    def closed(self) -> bool:
        """Whether the server has closed the connection (the reader saw EOF or an error)."""
        return self._closed.is_set()

    async def wait_closed(self) -> None:
        """Wait until the server closes the connection (bound it with a cancel scope)."""
        await self._closed.wait()

    async def _read_loop(self) -> None:
        decoder = FrameDecoder(self._header, _MAX_FRAME)
        try:
            while True:
                data = await self._stream.receive_some(_RECEIVE_SIZE)
                if not data:
                    self.closed_reason = "eof"
                    return
                for frame in decoder.feed(bytes(data)):
                    if not self._deliver(codec.decode(frame, self._spec)):
                        self.unmatched_frames.append(frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError) as exc:
            self.closed_reason = type(exc).__name__
        except (FramingError, codec.FormatError) as exc:
            self.closed_reason = f"bad response: {type(exc).__name__}"
        finally:
            self._closed.set()

    def _deliver(self, response: Message) -> bool:
        """Hand ``response`` to the request waiting for it; False when none was."""
        stan, when, terminal = _key(response)
        same_stan = [p for p in self._pending if p.key[0] == stan and p.response is None]
        exact = [p for p in same_stan if p.key == (stan, when, terminal)]
        chosen = exact or same_stan
        if not chosen:
            self.unmatched.append(response)
            return False
        chosen[0].response = response
        chosen[0].done.set()
        return True


def _key(message: Any) -> tuple[str, str | None, str | None]:
    return (
        str(getattr(message, "stan", "")),
        getattr(message, "transmission_time", None),
        getattr(message, "terminal_id", None),
    )


async def _first_of(*events: trio.Event) -> None:
    async with trio.open_nursery() as nursery:
        for event in events:

            async def wait(ev: trio.Event = event) -> None:
                await ev.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(wait)
