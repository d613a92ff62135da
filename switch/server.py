"""The listener: accept TCP, mutual TLS, peer allow-list, connection counting, graceful drain.

What lives here: ``Server``, which opens every configured listener, accepts connections,
wraps each in TLS (client certificate required, handshake under the listener's deadline),
refuses a peer whose certificate identities are not on the listener's allow-list, and hands
the stream to a ``Connection`` with the listener's network profile and the switch-wide
in-flight slots. It counts connections (open gauge, and how each ended) and logs one line
when a connection starts and one when it ends.

Resource bounds, per listener (``ListenerConfig``): connections open (``max_connections``),
handshakes in progress (``max_handshakes``) and handshakes in progress from one remote IP
(``max_handshakes_per_ip``) are checked at accept, established connections of one peer
identity (``max_connections_per_peer``) right after the handshake. A connection over a bound
is closed at once, never queued; each refusal is counted (``metrics.observe_limit``) and
logged, at most once a second per listener and bound with the number of refusals since the
last line (a flood must not become a log flood). The idle timeout is the connection's.

Shutdown (``Server.shutdown()``, wired to SIGTERM/SIGINT by app.py): stop accepting, stop
every connection reading new frames, let the requests in flight finish and their answers be
written, bounded by the drain deadline. ``Server.hurry()`` (a second SIGTERM/SIGINT) ends
the drain early: requests not yet answered are abandoned, the answers already queued are
still written, within ``FLUSH_TIMEOUT``.

What does not live here: the connection loop, backpressure and frame deadlines
(connection.py), what each frame means and how it is answered (session.py), the decision
(handler.py and the engine behind it), TLS context construction (tls.py), process setup and
signals (app.py).
"""

from __future__ import annotations

import contextlib
import math
import ssl
from collections import Counter
from collections.abc import Callable

import trio

from switch import metrics
from switch.config import Config, ListenerConfig
from switch.connection import Connection, describe
from switch.decisions import Profile, profile
from switch.handler import RequestHandler
from switch.keys import ListenerSessions
from switch.log import get_logger
from switch.tls import identity_allowed, peer_identities

log = get_logger("switch.server")

#: Seconds a refused or failed TLS stream may take to close before it is just dropped.
_CLOSE_TIMEOUT = 1.0
#: Seconds to wait before accepting again after accept() failed (EMFILE and friends).
_ACCEPT_BACKOFF = 0.1
#: Seconds a drain cut short (``Server.hurry``) allows to write the answers already queued.
FLUSH_TIMEOUT = 1.0
#: Seconds between two log lines about the same bound of the same listener being hit.
_REFUSAL_LOG_INTERVAL = 1.0


class _ListenerLoad:
    """What one listener holds now, against its bounds; refusal log lines rate-limited.

    Counts only: the server increments when it admits and decrements in ``finally``.
    """

    def __init__(self, lst: ListenerConfig) -> None:
        self.lst = lst
        self.open = 0
        self.handshakes = 0
        self.handshakes_by_ip: Counter[str] = Counter()
        self.by_peer: Counter[frozenset[str]] = Counter()
        self._last_logged: dict[str, float] = {}
        self._unlogged: Counter[str] = Counter()

    def at_accept(self, ip: str) -> str | None:
        """The bound a new connection from ``ip`` would exceed, or None to admit it."""
        lst = self.lst
        if self.open >= lst.max_connections:
            return "max_connections"
        if self.handshakes >= lst.max_handshakes:
            return "max_handshakes"
        if self.handshakes_by_ip[ip] >= lst.max_handshakes_per_ip:
            return "max_handshakes_per_ip"
        return None

    def refused(self, limit: str, remote: str, **extra: object) -> None:
        """Count a refusal by ``limit``; log it unless one was logged within the interval."""
        metrics.observe_limit(self.lst.name, limit)
        now = trio.current_time()
        last = self._last_logged.get(limit, -math.inf)
        if now - last < _REFUSAL_LOG_INTERVAL:
            self._unlogged[limit] += 1
            return
        self._last_logged[limit] = now
        suppressed = self._unlogged.pop(limit, 0)
        log.warning("connection_limit", listener=self.lst.name, limit=limit, remote=remote,
                    value=getattr(self.lst, limit), suppressed=suppressed or None,
                    **extra)  # fmt: skip


class Server:
    """An issuer-side ISO 8583 server over mutual TLS.

    Args:
        config: the switch configuration (listeners, limits, drain deadline).
        handler: decides every decodable request (``Dispatcher(engine)`` in a switch).
        ssl_context: server TLS context (tls.server_context); a callable returning the
            current context is accepted so that a reload takes effect for new connections.
        sessions: each listener's session state (ZPK in force, sign-on), shared by its
            connections; fresh ones from ``config`` when not given.
    """

    def __init__(
        self,
        config: Config,
        handler: RequestHandler,
        ssl_context: ssl.SSLContext | Callable[[], ssl.SSLContext],
        sessions: ListenerSessions | None = None,
    ) -> None:
        self._config = config
        self.sessions = sessions if sessions is not None else ListenerSessions(config.listeners)
        self._handler = handler
        self._context_for = ssl_context if callable(ssl_context) else (lambda: ssl_context)
        self._global_slots = trio.Semaphore(config.server.max_in_flight)
        self._accept_scopes: list[trio.CancelScope] = []
        self._connections: set[Connection] = set()
        self._profiles: dict[str, Profile] = {
            lst.name: profile(lst.network) for lst in config.listeners
        }
        self._load: dict[str, _ListenerLoad] = {
            lst.name: _ListenerLoad(lst) for lst in config.listeners
        }
        self._draining = False
        self._hurried = False
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

    def hurry(self) -> None:
        """End the drain early (a second SIGTERM/SIGINT): abandon the requests not yet
        answered, write the answers already queued within ``FLUSH_TIMEOUT``, then stop."""
        self.shutdown()
        if self._hurried:
            return
        self._hurried = True
        log.warning("drain_cut_short", connections=len(self._connections))
        for conn in list(self._connections):
            conn.abort(FLUSH_TIMEOUT)
        if self._nursery is not None:
            scope = self._nursery.cancel_scope
            scope.deadline = min(
                scope.deadline, trio.current_time() + FLUSH_TIMEOUT + 2 * _CLOSE_TIMEOUT
            )

    def status(self) -> dict[str, object]:
        """What an operator asks of a running switch (``cardswitch status``): per listener its
        addresses, open connections, handshakes in progress and connected peer identities;
        requests in flight; whether it drains. No card data, no remote addresses."""
        in_flight = self._config.server.max_in_flight - self._global_slots.value
        listeners = {}
        for name, load in self._load.items():
            peers: dict[str, int] = {}
            for identities, count in load.by_peer.items():
                if count:
                    peers[",".join(sorted(identities)) or "(none)"] = count
            listeners[name] = {
                "network": load.lst.network,
                "bound": [f"{h}:{p}" for n, h, p in self.bound if n == name],
                "connections": load.open,
                "handshakes": load.handshakes,
                "peers": peers,
            }
        return {"draining": self._draining, "in_flight": in_flight, "listeners": listeners}

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
                    ip, remote = _remote(tcp)
                    load = self._load[lst.name]
                    limit = load.at_accept(ip)
                    if limit is not None:
                        # Closed now, before any TLS work: a flood costs an accept and a close.
                        load.refused(limit, remote)
                        metrics.CONNECTIONS.labels(lst.name, "refused").inc()
                        _close_now(tcp)
                        continue
                    load.open += 1
                    load.handshakes += 1
                    load.handshakes_by_ip[ip] += 1
                    self._nursery.start_soon(self._handle_tcp, lst, tcp, ip, remote)

    async def _handle_tcp(
        self, lst: ListenerConfig, tcp: trio.SocketStream, ip: str, remote: str
    ) -> None:
        """Handshake, check the peer, then serve the connection until it ends.

        The accept loop has counted the connection and its handshake in the listener's load;
        both are given back here.
        """
        load = self._load[lst.name]
        handshaking = True
        peer_counted: frozenset[str] | None = None
        outcome = "closed"
        metrics.CONNECTIONS_OPEN.labels(lst.name).inc()
        stream = trio.SSLStream(tcp, self._context_for(), server_side=True)
        try:
            peer = await self._handshake(lst, stream, remote)
            handshaking = False
            _release_handshake(load, ip)
            if isinstance(peer, str):
                outcome = peer
                return
            if load.by_peer[peer] >= lst.max_connections_per_peer:
                load.refused("max_connections_per_peer", remote, peer=sorted(peer))
                outcome = "refused"
                return
            load.by_peer[peer] += 1
            peer_counted = peer
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
                session=self.sessions[lst.name],
                budget=self._config.pipeline.budget,
                min_remaining=self._config.pipeline.min_remaining,
            )
            if self._hurried:
                conn.abort(FLUSH_TIMEOUT)
            elif self._draining:
                conn.stop_reading()
            self._connections.add(conn)
            try:
                outcome = await conn.run()
            finally:
                self._connections.discard(conn)
        finally:
            if handshaking:  # cancelled during the handshake (a drain deadline)
                _release_handshake(load, ip)
            if peer_counted is not None:
                load.by_peer[peer_counted] -= 1
                if not load.by_peer[peer_counted]:
                    del load.by_peer[peer_counted]
            metrics.CONNECTIONS_OPEN.labels(lst.name).dec()
            metrics.CONNECTIONS.labels(lst.name, outcome).inc()
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
                await _aclose_quietly(stream)
            load.open -= 1
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


def _remote(tcp: trio.SocketStream) -> tuple[str, str]:
    """The peer's IP address and ``ip:port`` of an accepted socket (``"?"`` when gone)."""
    try:
        host, port = tcp.socket.getpeername()[:2]
    except OSError:
        return "?", "?"
    return str(host), f"{host}:{port}"


def _release_handshake(load: _ListenerLoad, ip: str) -> None:
    load.handshakes -= 1
    load.handshakes_by_ip[ip] -= 1
    if not load.handshakes_by_ip[ip]:
        del load.handshakes_by_ip[ip]


def _close_now(tcp: trio.SocketStream) -> None:
    """Close a socket refused at accept without waiting (nothing was sent on it)."""
    with contextlib.suppress(OSError):
        tcp.socket.close()


async def _aclose_quietly(stream: trio.abc.AsyncResource) -> None:
    with contextlib.suppress(
        trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError
    ):
        await stream.aclose()
