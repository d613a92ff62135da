"""The trio TCP server: mutual TLS, framing, concurrency and graceful drain.

What lives here: everything that touches sockets on the issuer side. Listeners accept TCP
connections, wrap them in TLS (client certificate required, handshake under a deadline,
optional allow-list of peer identities), then run one connection loop each:

- a reader that feeds bytes to the sans-IO ``FrameDecoder`` under a per-frame deadline (the
  clock starts at a frame's first byte, so a body dripped slowly is cut off however steady
  the drip) and spawns one task per complete frame, bounded per connection and globally;
- request tasks that decode, answer network management themselves, hand authorizations and
  reversals to the ``RequestHandler``, and queue the encoded answer; answers go out in the
  order they are ready, not the order requests came in (networks match by STAN/RRN);
- a single writer that drains every answer ready at that moment into one ``send_all``.

Bad input has a defined answer: a framing error (zero or oversize length, non-digit ASCII
header, EOF inside a frame, a frame slower than its deadline) closes the connection; a body
that cannot be decoded but whose MTI and STAN can be recovered is answered with DE39 30 and
the connection stays open; a request-class MTI we do not serve is answered 12; an unsolicited
response-class message is dropped. Each of those is one log line and one metric.

Shutdown (``Server.shutdown()``, wired to SIGTERM/SIGINT by app.py): stop accepting, stop
reading new frames, finish the requests in flight and flush their answers, bounded by the
drain deadline.

What does not live here: message parsing (wire/), TLS context construction (tls.py), the
decision (pipeline.py via handler.py), process setup and signals (app.py).
"""

from __future__ import annotations

import contextlib
import math
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from hsm.pan import mask_pan
from switch import metrics
from switch.config import Config, ListenerConfig
from switch.handler import RequestContext, RequestHandler
from switch.log import get_logger
from switch.tls import identity_allowed, peer_identities
from switch.wire import codec
from switch.wire.framing import FrameDecoder, FramingError, encode_frame
from switch.wire.messages import (
    AuthRequest,
    AuthResponse,
    NetworkRequest,
    NetworkResponse,
    ReversalRequest,
    ReversalResponse,
    UnsupportedMessage,
    is_request,
)

log = get_logger("switch.server")

#: Bytes asked of the TLS stream per read; frames are at most a few KiB.
_RECEIVE_SIZE = 65536
#: DE70 network-management codes answered 00: sign-on, sign-off, echo test.
_NETWORK_CODES_OK = frozenset({"001", "002", "301"})
#: DE39 for a well-formed request of a kind we do not serve ("invalid transaction").
_INVALID_TRANSACTION = "12"
#: DE39 when the handler raised instead of deciding ("system malfunction").
_SYSTEM_MALFUNCTION = "96"


class _CloseConnection(Exception):
    """Raised inside a connection to drop it (the stream can no longer be trusted)."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


@dataclass(eq=False)
class _Connection:
    """State of one accepted connection, owned by its tasks."""

    listener: ListenerConfig
    stream: trio.SSLStream[trio.SocketStream]
    peer: frozenset[str]
    remote: str
    #: Answers waiting for the writer; the writer sends all that are ready in one call.
    outbox_send: trio.MemorySendChannel[bytes]
    outbox_recv: trio.MemoryReceiveChannel[bytes]
    #: Requests of this connection being processed (bounded by listener.max_in_flight).
    slots: trio.Semaphore
    reader_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: Scope of all the connection's tasks; cancelled to drop the connection.
    cancel_scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    closing_kind: str | None = None


class Server:
    """An issuer-side ISO 8583 server over mutual TLS.

    Args:
        config: the switch configuration (listeners, limits, drain deadline).
        handler: decides authorizations and reversals.
        ssl_context: server TLS context (tls.server_context); a callable returning the
            current context is accepted so that a reload takes effect for new connections.
    """

    def __init__(
        self,
        config: Config,
        handler: RequestHandler,
        ssl_context: ssl.SSLContext | Callable[[], ssl.SSLContext],
    ) -> None:
        self._config = config
        self._handler = handler
        self._context_for = ssl_context if callable(ssl_context) else (lambda: ssl_context)
        self._global_slots = trio.Semaphore(config.server.max_in_flight)
        self._accept_scopes: list[trio.CancelScope] = []
        self._connections: set[_Connection] = set()
        self._draining = False
        self._nursery: trio.Nursery | None = None
        #: (listener name, host, port) actually bound; known once serve() has started.
        self.bound: list[tuple[str, str, int]] = []

    async def serve(self, *, task_status: trio.TaskStatus[list[tuple[str, str, int]]]) -> None:
        """Listen on every configured listener until shutdown() and the drain have finished.

        ``task_status.started`` receives the bound (listener, host, port) list, which tells
        tests the port chosen when the configuration asks for port 0.
        """
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for lst in self._config.listeners:
                listeners = await trio.open_tcp_listeners(lst.port, host=lst.host)
                for sock_listener in listeners:
                    host, port = sock_listener.socket.getsockname()[:2]
                    self.bound.append((lst.name, host, port))
                    scope = trio.CancelScope()
                    self._accept_scopes.append(scope)
                    nursery.start_soon(self._accept_loop, lst, sock_listener, scope)
            log.info("listening", listeners=[f"{n}@{h}:{p}" for n, h, p in self.bound])
            task_status.started(list(self.bound))
        log.info("stopped")

    def shutdown(self) -> None:
        """Begin a graceful drain: no new connections or frames, in-flight requests finish."""
        if self._draining:
            return
        self._draining = True
        log.info("draining", connections=len(self._connections))
        for scope in self._accept_scopes:
            scope.cancel()
        for conn in list(self._connections):
            conn.reader_scope.cancel()
        if self._nursery is not None:
            self._nursery.cancel_scope.deadline = (
                trio.current_time() + self._config.server.drain_timeout
            )

    @property
    def draining(self) -> bool:
        return self._draining

    async def _accept_loop(
        self, lst: ListenerConfig, listener: trio.SocketListener, scope: trio.CancelScope
    ) -> None:
        assert self._nursery is not None
        with scope:
            async with listener:
                while True:
                    try:
                        tcp = await listener.accept()
                    except OSError as exc:  # EMFILE and friends: back off, keep serving
                        log.warning("accept_failed", listener=lst.name, error=str(exc))
                        metrics.CONNECTIONS.labels(lst.name, "accept_error").inc()
                        await trio.sleep(0.1)
                        continue
                    self._nursery.start_soon(self._handle_tcp, lst, tcp)

    async def _handle_tcp(self, lst: ListenerConfig, tcp: trio.SocketStream) -> None:
        try:
            remote = "{}:{}".format(*tcp.socket.getpeername()[:2])
        except OSError:
            remote = "?"
        stream = trio.SSLStream(tcp, self._context_for(), server_side=True)
        outcome = "closed"
        metrics.CONNECTIONS_OPEN.labels(lst.name).inc()
        try:
            with trio.move_on_after(lst.handshake_timeout) as hs_scope:
                await stream.do_handshake()
            if hs_scope.cancelled_caught:
                outcome = "handshake_timeout"
                log.warning("tls_handshake_timeout", listener=lst.name, remote=remote)
                return
            peer = peer_identities(stream)
            if not identity_allowed(peer, lst.allowed_clients):
                outcome = "peer_not_allowed"
                log.warning(
                    "tls_peer_not_allowed", listener=lst.name, remote=remote, peer=sorted(peer)
                )
                return
            log.info("connected", listener=lst.name, remote=remote, peer=sorted(peer))
            send, recv = trio.open_memory_channel[bytes](math.inf)
            conn = _Connection(
                lst, stream, peer, remote, send, recv, trio.Semaphore(lst.max_in_flight)
            )
            if self._draining:
                conn.reader_scope.cancel()
            self._connections.add(conn)
            try:
                await self._run_connection(conn)
            finally:
                self._connections.discard(conn)
            outcome = conn.closing_kind or "closed"
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError) as exc:
            outcome = "tls_error" if outcome == "closed" else outcome
            log.info("connection_error", listener=lst.name, remote=remote, error=_describe(exc))
        finally:
            metrics.CONNECTIONS_OPEN.labels(lst.name).dec()
            metrics.CONNECTIONS.labels(lst.name, outcome).inc()
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await _aclose_quietly(stream)
            log.info("disconnected", listener=lst.name, remote=remote, outcome=outcome)

    async def _run_connection(self, conn: _Connection) -> None:
        """Reader, request tasks and writer of one connection; returns when it is closed.

        Each task handles its own errors and, when the stream is lost, records why and
        cancels the connection, so no exception crosses the nurseries.
        """
        async with trio.open_nursery() as conn_nursery:
            conn.cancel_scope = conn_nursery.cancel_scope
            conn_nursery.start_soon(self._writer, conn)
            async with trio.open_nursery() as requests:
                kind: str | None = None  # stays None when the drain cancels the reader
                with conn.reader_scope:
                    kind = await self._reader(conn, requests)
                if kind is not None:
                    self._close(conn, kind)
                # EOF or drain: the requests in flight finish and are answered.
            conn.outbox_send.close()

    @staticmethod
    def _close(conn: _Connection, kind: str) -> None:
        """Drop the connection now: in-flight requests are abandoned, nothing more is sent."""
        if conn.closing_kind is None:
            conn.closing_kind = kind
        conn.cancel_scope.cancel()

    async def _reader(self, conn: _Connection, requests: trio.Nursery) -> str | None:
        """Read frames until EOF (None) or until the stream is lost (the reason, a metric label)."""
        lst = conn.listener
        decoder = FrameDecoder(lst.header, lst.max_frame)
        frame_deadline = math.inf
        while True:
            with trio.move_on_at(frame_deadline) as frame_scope:
                try:
                    data = await conn.stream.receive_some(_RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    log.info("read_failed", listener=lst.name, remote=conn.remote,
                             error=_describe(exc.__cause__ or exc))  # fmt: skip
                    return "broken"
            if frame_scope.cancelled_caught:
                metrics.observe_protocol_error(lst.name, "frame_timeout")
                log.warning("frame_timeout", listener=lst.name, remote=conn.remote)
                return "frame_timeout"
            if not data:
                if decoder.in_progress:
                    metrics.observe_protocol_error(lst.name, "truncated_frame")
                    log.warning("truncated_frame", listener=lst.name, remote=conn.remote)
                    return "truncated_frame"
                return None
            try:
                frames = decoder.feed(bytes(data))
            except FramingError as exc:
                metrics.observe_protocol_error(lst.name, exc.kind)
                log.warning("framing_error", listener=lst.name, remote=conn.remote, kind=exc.kind)
                return exc.kind
            for frame in frames:
                received_at = trio.current_time()
                # Backpressure: stop reading while this connection or the switch is full.
                await conn.slots.acquire()
                await self._global_slots.acquire()
                requests.start_soon(self._request, conn, frame, received_at)
            if not decoder.in_progress:
                frame_deadline = math.inf
            elif frames or frame_deadline == math.inf:
                frame_deadline = trio.current_time() + lst.frame_timeout

    async def _writer(self, conn: _Connection) -> None:
        """Send every answer that is ready in one TLS write; exits when the outbox closes."""
        async for first in conn.outbox_recv:
            batch = [first]
            while True:
                try:
                    batch.append(conn.outbox_recv.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            try:
                await conn.stream.send_all(b"".join(batch))
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                log.warning("write_failed", listener=conn.listener.name, remote=conn.remote,
                            unsent=len(batch), error=_describe(exc.__cause__ or exc))  # fmt: skip
                self._close(conn, "write_failed")
                return

    async def _request(self, conn: _Connection, frame: bytes, received_at: float) -> None:
        metrics.IN_FLIGHT.inc()
        try:
            answer = await self._answer(conn, frame, received_at)
            if answer is not None:
                framed = encode_frame(answer, conn.listener.header)
                try:
                    conn.outbox_send.send_nowait(framed)
                except (trio.ClosedResourceError, trio.BrokenResourceError):
                    log.warning("answer_dropped_connection_closed", listener=conn.listener.name)
        except _CloseConnection as exc:
            self._close(conn, exc.kind)
        except Exception as exc:
            # A bug, not bad input: keep the switch and the connection up, say so loudly.
            metrics.observe_protocol_error(conn.listener.name, "internal_error")
            log.error("request_failed", listener=conn.listener.name, error=_describe(exc),
                      exc_info=exc)  # fmt: skip
        finally:
            metrics.IN_FLIGHT.dec()
            self._global_slots.release()
            conn.slots.release()

    async def _answer(self, conn: _Connection, frame: bytes, received_at: float) -> bytes | None:
        """Decode, decide and encode one frame; None when nothing is to be sent back."""
        lst = conn.listener
        try:
            message = codec.decode(frame, lst.spec)
        except codec.FormatError as err:
            metrics.observe_protocol_error(lst.name, "format_error")
            answer = codec.format_error_response(err, lst.spec)
            log.warning(
                "format_error",
                listener=lst.name,
                mti=err.mti,
                stan=err.stan,
                field=err.field,
                reason=err.reason,
                answered=answer is not None,
            )
            if answer is None:
                if err.mti is not None and not is_request(err.mti):
                    return None  # a garbled response-class message: nothing to answer, drop it
                raise _CloseConnection("undecodable") from None
            metrics.observe_request(lst.network, err.mti or "????", "30", _since(received_at))
            return answer

        context = RequestContext(lst.name, lst.network, conn.peer, received_at)
        response: Any
        if isinstance(message, NetworkRequest):
            code = "00" if message.code in _NETWORK_CODES_OK else _INVALID_TRANSACTION
            response = NetworkResponse.answer(message, code)
        elif isinstance(message, AuthRequest):
            response = await self._decide(
                self._handler.authorize, message, context, AuthResponse.answer
            )
        elif isinstance(message, ReversalRequest):
            response = await self._decide(
                self._handler.reverse, message, context, ReversalResponse.answer
            )
        elif isinstance(message, UnsupportedMessage) and (
            response := message.answer(_INVALID_TRANSACTION)
        ):
            pass
        else:
            metrics.observe_protocol_error(lst.name, "unsolicited_response")
            log.warning(
                "unsolicited_message_dropped",
                listener=lst.name,
                mti=message.mti,
                stan=getattr(message, "stan", None),
            )
            return None
        code = response.response_code
        self._log_answer(
            lst, message.mti, message.stan, code, received_at, pan=getattr(message, "pan", None)
        )
        return codec.encode(response, lst.spec)

    async def _decide(
        self,
        decide: Callable[[Any, RequestContext], Awaitable[Any]],
        message: Any,
        ctx: RequestContext,
        fallback: Callable[[Any, str], Any],
    ) -> Any:
        try:
            return await decide(message, ctx)
        except Exception as exc:
            # The engine could not decide: say so (96) rather than drop the request.
            log.error(
                "handler_failed",
                listener=ctx.listener,
                mti=message.mti,
                stan=message.stan,
                error=_describe(exc),
            )
            metrics.observe_protocol_error(ctx.listener, "handler_error")
            return fallback(message, _SYSTEM_MALFUNCTION)

    @staticmethod
    def _log_answer(
        lst: ListenerConfig,
        mti: str,
        stan: str | None,
        code: str,
        received_at: float,
        *,
        pan: str | None = None,
    ) -> None:
        seconds = _since(received_at)
        metrics.observe_request(lst.network, mti, code, seconds)
        log.info(
            "answered",
            listener=lst.name,
            network=lst.network,
            mti=mti,
            stan=stan,
            response_code=code,
            masked_pan=mask_pan(pan) if pan else None,
            ms=round(seconds * 1000, 3),
        )


def _since(t0: float) -> float:
    return max(0.0, trio.current_time() - t0)


def _describe(exc: BaseException) -> str:
    """A log-safe one-liner for an exception (the log processor scrubs it again)."""
    return f"{type(exc).__name__}: {exc}"


async def _aclose_quietly(stream: trio.abc.AsyncResource) -> None:
    with contextlib.suppress(
        trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError
    ):
        await stream.aclose()
