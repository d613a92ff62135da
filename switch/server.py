"""The listener: accept TCP, mutual TLS, peer allow-list, connection counting, graceful drain.

What lives here: ``Server``, which opens every configured listener, accepts connections,
wraps each in TLS (client certificate required, handshake under the listener's deadline),
refuses a peer whose certificate identities are not on the listener's allow-list, and hands
the stream to a ``Connection`` with the listener's network profile and the switch-wide
in-flight slots. It counts connections (open gauge, and how each ended) and logs one line
when a connection starts and one when it ends.

Shutdown (``Server.shutdown()``, wired to SIGTERM/SIGINT by app.py): stop accepting, stop
every connection reading new frames, let the requests in flight finish and their answers be
written, bounded by the drain deadline.

What does not live here: the connection loop, backpressure and frame deadlines
(connection.py), what each frame means and how it is answered (session.py), the decision
(handler.py and the engine behind it), TLS context construction (tls.py), process setup and
signals (app.py).
"""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import Callable

import trio

from switch import metrics
from switch.config import Config, ListenerConfig
from switch.connection import Connection, describe
from switch.decisions import Profile, profile
from switch.handler import RequestHandler
from switch.log import get_logger
from switch.tls import identity_allowed, peer_identities

log = get_logger("switch.server")

#: Seconds a refused or failed TLS stream may take to close before it is just dropped.
_CLOSE_TIMEOUT = 1.0
#: Seconds to wait before accepting again after accept() failed (EMFILE and friends).
_ACCEPT_BACKOFF = 0.1


class Server:
    """An issuer-side ISO 8583 server over mutual TLS.

    Args:
        config: the switch configuration (listeners, limits, drain deadline).
        handler: decides every decodable request (``Dispatcher(engine)`` in a switch).
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
        self._connections: set[Connection] = set()
        self._profiles: dict[str, Profile] = {
            lst.name: profile(lst.network) for lst in config.listeners
        }
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
            conn.stop_reading()
        if self._nursery is not None:
            self._nursery.cancel_scope.deadline = (
                trio.current_time() + self._config.server.drain_timeout
            )

    @property
    def draining(self) -> bool:
        """Whether ``shutdown()`` has been called."""
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
                        await trio.sleep(_ACCEPT_BACKOFF)
                        continue
                    self._nursery.start_soon(self._handle_tcp, lst, tcp)

    async def _handle_tcp(self, lst: ListenerConfig, tcp: trio.SocketStream) -> None:
        """Handshake, check the peer, then serve the connection until it ends."""
        try:
            remote = "{}:{}".format(*tcp.socket.getpeername()[:2])
        except OSError:
            remote = "?"
        stream = trio.SSLStream(tcp, self._context_for(), server_side=True)
        outcome = "closed"
        metrics.CONNECTIONS_OPEN.labels(lst.name).inc()
        try:
            peer = await self._handshake(lst, stream, remote)
            if isinstance(peer, str):
                outcome = peer
                return
            log.info("connected", listener=lst.name, remote=remote, peer=sorted(peer))
            conn = Connection(
                stream,
                self._handler,
                lst,
                self._profiles[lst.name],
                linger=self._config.server.drain_timeout,
                global_slots=self._global_slots,
                peer=peer,
                remote=remote,
            )
            if self._draining:
                conn.stop_reading()
            self._connections.add(conn)
            try:
                outcome = await conn.run()
            finally:
                self._connections.discard(conn)
        finally:
            metrics.CONNECTIONS_OPEN.labels(lst.name).dec()
            metrics.CONNECTIONS.labels(lst.name, outcome).inc()
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
                await _aclose_quietly(stream)
            log.info("disconnected", listener=lst.name, remote=remote, outcome=outcome)

    @staticmethod
    async def _handshake(
        lst: ListenerConfig, stream: trio.SSLStream[trio.SocketStream], remote: str
    ) -> frozenset[str] | str:
        """The peer's verified identities, or why the connection is refused (a metric label)."""
        try:
            with trio.move_on_after(lst.handshake_timeout) as scope:
                await stream.do_handshake()
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("tls_handshake_failed", listener=lst.name, remote=remote,
                     error=describe(exc.__cause__ or exc))  # fmt: skip
            return "tls_error"
        if scope.cancelled_caught:
            log.warning("tls_handshake_timeout", listener=lst.name, remote=remote)
            return "handshake_timeout"
        peer = peer_identities(stream)
        if not identity_allowed(peer, lst.allowed_clients):
            log.warning("tls_peer_not_allowed", listener=lst.name, remote=remote,
                        peer=sorted(peer))  # fmt: skip
            return "peer_not_allowed"
        return peer


async def _aclose_quietly(stream: trio.abc.AsyncResource) -> None:
    with contextlib.suppress(
        trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError
    ):
        await stream.aclose()
