"""The listener: accept TCP, mutual TLS, peer allow-list, connection counting, graceful drain.

What lives here: ``Server``, which opens every configured listener, accepts connections,
checks the client address (``allowed_sources``), wraps each in TLS (client certificate
required, handshake under the listener's deadline),
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

Behind a TCP load balancer (``proxy_protocol = "v2"``): a peer outside ``proxy_trusted`` is
closed at accept; otherwise the PROXY v2 header (switch.proxy_protocol) is read off the
socket before TLS, not one byte further, under the same deadline as the handshake. Its
source address is then the connection's ``remote`` in every log line (the balancer's is
``via``), the address of ``max_handshakes_per_ip`` (checked once the header is in, since the
socket's address is the balancer's) and of ``allowed_sources``. No header, a late,
truncated or malformed one: the connection is closed before TLS, logged (rate-limited) and
counted by reason. A connection refused before TLS is closed as TCP: an ``SSLStream``'s
close would run the handshake first.

Shutdown (``Server.shutdown()``, wired to SIGTERM/SIGINT by app.py): stop accepting, stop
every connection reading new frames, let the requests in flight finish and their answers be
written, bounded by the drain deadline. ``Server.hurry()`` (a second SIGTERM/SIGINT) ends
the drain early: requests not yet answered are abandoned, the answers already queued are
still written, within ``FLUSH_TIMEOUT``.

Shared ports (``reuse_port``, the workers of ``switch.supervisor``): every listening socket
is bound with ``SO_REUSEPORT``, so several processes listen on the same address and the
kernel spreads new connections over them; ``trio.open_tcp_listeners`` cannot set it, so
``open_reuseport_listeners`` makes the sockets.

What does not live here: the connection loop, backpressure and frame deadlines
(connection.py), what each frame means and how it is answered (session.py), the decision
(handler.py and the engine behind it), TLS context construction (tls.py), process setup and
signals (app.py).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import math
import socket
import ssl
from collections import Counter
from collections.abc import Callable

import trio

from switch import metrics
from switch.admission import WaitForecast
from switch.config import Config, ListenerConfig
from switch.connection import Connection, describe
from switch.decisions import Profile, profile
from switch.handler import RequestHandler
from switch.keys import ListenerSessions
from switch.log import get_logger
from switch.proxy_protocol import ProxyHeader, ProxyHeaderError, ProxyHeaderReader
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
#: Connection outcomes counted where the refusal is recorded (``_ListenerLoad``), which may
#: be the accept loop: the connection's task does not count them again.
_COUNTED_WHEN_REFUSED = frozenset({"proxy_refused", "source_not_allowed"})


class _ListenerLoad:
    """What one listener holds now, against its bounds; refusal log lines rate-limited.

    Counts only: the server increments when it admits and decrements in ``finally``.
    """

    def __init__(self, lst: ListenerConfig) -> None:
        self.lst = lst
        self.proxied = lst.proxy_protocol == "v2"
        self.trusted = _networks(lst.proxy_trusted)
        self.sources = _networks(lst.allowed_sources)
        self.open = 0
        self.handshakes = 0
        self.handshakes_by_ip: Counter[str] = Counter()
        self.by_peer: Counter[frozenset[str]] = Counter()
        self._last_logged: dict[str, float] = {}
        self._unlogged: Counter[str] = Counter()

    def at_accept(self, ip: str | None) -> str | None:
        """The bound a new connection from ``ip`` would exceed, or None to admit it; with
        ``ip`` None (not known yet: a PROXY header will tell) only the listener-wide ones."""
        lst = self.lst
        if self.open >= lst.max_connections:
            return "max_connections"
        if self.handshakes >= lst.max_handshakes:
            return "max_handshakes"
        if ip is not None and self.handshakes_by_ip[ip] >= lst.max_handshakes_per_ip:
            return "max_handshakes_per_ip"
        return None

    def refused(self, limit: str, remote: str, **extra: object) -> None:
        """Count a refusal by ``limit``; log it unless one was logged within the interval."""
        metrics.observe_limit(self.lst.name, limit)
        suppressed = self._should_log(limit)
        if suppressed is not None:
            log.warning("connection_limit", listener=self.lst.name, limit=limit, remote=remote,
                        value=getattr(self.lst, limit), suppressed=suppressed or None,
                        **extra)  # fmt: skip

    def proxy_refused(self, reason: str, remote: str, detail: str | None = None) -> None:
        """Count a connection closed before TLS for a PROXY header ``reason``; log it unless
        one with that reason was logged within the interval."""
        metrics.observe_proxy_refused(self.lst.name, reason)
        metrics.CONNECTIONS.labels(self.lst.name, "proxy_refused").inc()
        suppressed = self._should_log(f"proxy:{reason}")
        if suppressed is not None:
            log.warning("proxy_header_refused", listener=self.lst.name, reason=reason,
                        remote=remote, detail=detail, suppressed=suppressed or None)  # fmt: skip

    def source_refused(self, remote: str, via: str | None) -> None:
        """Count and (rate-limited) log a client address not in ``allowed_sources``."""
        metrics.CONNECTIONS.labels(self.lst.name, "source_not_allowed").inc()
        suppressed = self._should_log("source_not_allowed")
        if suppressed is not None:
            log.warning("source_not_allowed", listener=self.lst.name, remote=remote, via=via,
                        suppressed=suppressed or None)  # fmt: skip

    def _should_log(self, key: str) -> int | None:
        """None when a line of ``key`` was logged within the interval (this one is counted
        as suppressed); else how many were suppressed since the last line."""
        now = trio.current_time()
        last = self._last_logged.get(key, -math.inf)
        if now - last < _REFUSAL_LOG_INTERVAL:
            self._unlogged[key] += 1
            return None
        self._last_logged[key] = now
        return self._unlogged.pop(key, 0)


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
        *,
        reuse_port: bool = False,
    ) -> None:
        self._config = config
        self._reuse_port = reuse_port
        self.sessions = sessions if sessions is not None else ListenerSessions(config.listeners)
        self._handler = handler
        self._context_for = ssl_context if callable(ssl_context) else (lambda: ssl_context)
        self._global_slots = trio.Semaphore(config.server.max_in_flight)
        self._forecast = WaitForecast(config.server.max_in_flight)
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
                if self._reuse_port:
                    listeners = await open_reuseport_listeners(lst.port, host=lst.host)
                else:
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
                    if load.proxied and not _contains(load.trusted, ip, empty=True):
                        # Closed now, nothing read: only a balancer may say who the client is.
                        load.proxy_refused("untrusted_peer", remote)
                        _close_now(tcp)
                        continue
                    if not load.proxied and not _contains(load.sources, ip, empty=True):
                        load.source_refused(remote, None)
                        _close_now(tcp)
                        continue
                    # Behind a balancer the socket's address is the balancer's: the bound per
                    # address waits for the PROXY header's (``_proxied_client``).
                    limit = load.at_accept(None if load.proxied else ip)
                    if limit is not None:
                        # Closed now, before any TLS work: a flood costs an accept and a close.
                        load.refused(limit, remote)
                        metrics.CONNECTIONS.labels(lst.name, "refused").inc()
                        _close_now(tcp)
                        continue
                    load.open += 1
                    load.handshakes += 1
                    counted_ip = None
                    if not load.proxied:
                        load.handshakes_by_ip[ip] += 1
                        counted_ip = ip
                    self._nursery.start_soon(self._handle_tcp, lst, tcp, counted_ip, remote)

    async def _handle_tcp(
        self, lst: ListenerConfig, tcp: trio.SocketStream, ip: str | None, remote: str
    ) -> None:
        """Read the PROXY header (when the listener asks for one), handshake, check the
        peer, then serve the connection until it ends.

        The accept loop has counted the connection and its handshake in the listener's load,
        and the handshake under ``ip`` unless that waits for the PROXY header (``ip`` None);
        all are given back here.
        """
        load = self._load[lst.name]
        handshaking = True
        peer_counted: frozenset[str] | None = None
        outcome = "closed"
        via: str | None = None
        metrics.CONNECTIONS_OPEN.labels(lst.name).inc()
        # Made once the connection may start TLS: closing an SSLStream runs the handshake
        # first (to send close_notify), which a connection refused before TLS must not get.
        stream: trio.SSLStream[trio.SocketStream] | None = None
        # One deadline for the PROXY header and the TLS handshake together.
        deadline = trio.current_time() + lst.handshake_timeout
        try:
            if load.proxied:
                client = await self._proxied_client(load, tcp, remote, deadline)
                if isinstance(client, str):
                    outcome = client
                    return
                via = remote
                client_ip, remote = client
                if not _contains(load.sources, client_ip, empty=True):
                    load.source_refused(remote, via)
                    outcome = "source_not_allowed"
                    return
                if load.handshakes_by_ip[client_ip] >= lst.max_handshakes_per_ip:
                    load.refused("max_handshakes_per_ip", remote, via=via)
                    outcome = "refused"
                    return
                load.handshakes_by_ip[client_ip] += 1
                ip = client_ip
            stream = trio.SSLStream(tcp, self._context_for(), server_side=True)
            peer = await self._handshake(lst, stream, remote, deadline)
            handshaking = False
            _release_handshake(load, ip)
            if isinstance(peer, str):
                outcome = peer
                return
            if load.by_peer[peer] >= lst.max_connections_per_peer:
                load.refused("max_connections_per_peer", remote, peer=sorted(peer), via=via)
                outcome = "refused"
                return
            load.by_peer[peer] += 1
            peer_counted = peer
            log.info("connected", listener=lst.name, remote=remote, peer=sorted(peer), via=via)
            profile = self._profiles[lst.name]
            conn = Connection(
                stream,
                self._handler,
                lst,
                profile,
                linger=self._config.server.drain_timeout,
                global_slots=self._global_slots,
                forecast=self._forecast,
                peer=peer,
                remote=remote,
                session=self.sessions[lst.name],
                budget=profile.budget_or(self._config.pipeline.budget),
                min_remaining=self._config.pipeline.min_remaining,
                max_queue_wait=self._config.server.max_queue_wait,
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
            if handshaking:  # refused or cancelled before the handshake ended
                _release_handshake(load, ip)
            if peer_counted is not None:
                load.by_peer[peer_counted] -= 1
                if not load.by_peer[peer_counted]:
                    del load.by_peer[peer_counted]
            metrics.CONNECTIONS_OPEN.labels(lst.name).dec()
            if outcome not in _COUNTED_WHEN_REFUSED:
                metrics.CONNECTIONS.labels(lst.name, outcome).inc()
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
                await _aclose_quietly(stream if stream is not None else tcp)
            load.open -= 1
            log.info("disconnected", listener=lst.name, remote=remote, outcome=outcome, via=via)

    @staticmethod
    async def _proxied_client(
        load: _ListenerLoad, tcp: trio.SocketStream, remote: str, deadline: float
    ) -> tuple[str, str] | str:
        """Read the PROXY v2 header off ``tcp``, not one byte further (the ClientHello after
        it is the handshake's); the client's (IP, "ip:port"), the socket's own for a LOCAL
        header, or "proxy_refused" once counted and logged."""
        reader = ProxyHeaderReader()
        header: ProxyHeader | None = None
        reason, detail = "timeout", None
        try:
            with trio.move_on_at(deadline):
                while header is None:
                    data = await tcp.receive_some(reader.wanted())
                    if not data:
                        reason = "eof"
                        break
                    header = reader.feed(data)
        except ProxyHeaderError as exc:
            reason, detail = exc.reason, exc.detail
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            reason = "eof"
        if header is None:
            load.proxy_refused(reason, remote, detail)
            return "proxy_refused"
        if header.source is None:  # LOCAL: the balancer speaking for itself
            return _remote(tcp)
        host, port = header.source
        return _plain_ip(host), f"{host}:{port}"

    @staticmethod
    async def _handshake(
        lst: ListenerConfig,
        stream: trio.SSLStream[trio.SocketStream],
        remote: str,
        deadline: float,
    ) -> frozenset[str] | str:
        """The peer's verified identities, or why the connection is refused (a metric label)."""
        try:
            with trio.move_on_at(deadline) as scope:
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


#: Pending connections queued per listening socket (what trio.open_tcp_listeners asks).
_BACKLOG = 0xFFFF


async def open_reuseport_listeners(port: int, *, host: str) -> list[trio.SocketListener]:
    """Listen on every address of ``host``:``port`` with ``SO_REUSEPORT`` set (and
    ``SO_REUSEADDR``), so other processes of the same user may listen there too.

    Raises:
        OSError: an address cannot be bound (``EADDRINUSE`` when a socket without
            ``SO_REUSEPORT``, or of another user, holds it), or the platform has no
            ``SO_REUSEPORT``.
    """
    if not hasattr(socket, "SO_REUSEPORT"):  # pragma: no cover - Linux and the BSDs have it
        raise OSError(errno.ENOPROTOOPT, "SO_REUSEPORT is not available on this platform")
    infos = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners: list[trio.SocketListener] = []
    try:
        for family, kind, proto, _, address in infos:
            sock = trio.socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await sock.bind(address)
                sock.listen(_BACKLOG)
            except BaseException:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except BaseException:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners


def _remote(tcp: trio.SocketStream) -> tuple[str, str]:
    """The peer's IP address and ``ip:port`` of an accepted socket (``"?"`` when gone)."""
    try:
        host, port = tcp.socket.getpeername()[:2]
    except OSError:
        return "?", "?"
    return str(host), f"{host}:{port}"


def _release_handshake(load: _ListenerLoad, ip: str | None) -> None:
    """Give back a handshake slot, and its address's when one was counted."""
    load.handshakes -= 1
    if ip is None:
        return
    load.handshakes_by_ip[ip] -= 1
    if not load.handshakes_by_ip[ip]:
        del load.handshakes_by_ip[ip]


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _networks(cidrs: tuple[str, ...]) -> tuple[Network, ...]:
    """The networks of a listener setting (validated by switch.config)."""
    return tuple(ipaddress.ip_network(c) for c in cidrs)


def _plain_ip(host: str) -> str:
    """``host`` with an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``) as its IPv4 form."""
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _contains(networks: tuple[Network, ...], ip: str, *, empty: bool) -> bool:
    """Whether ``ip`` is in one of ``networks``; ``empty`` when there are none."""
    if not networks:
        return empty
    try:
        addr = ipaddress.ip_address(_plain_ip(ip))
    except ValueError:  # "?": the peer left before its address could be read
        return False
    return any(addr in net for net in networks)


def _close_now(tcp: trio.SocketStream) -> None:
    """Close a socket refused at accept without waiting (nothing was sent on it)."""
    with contextlib.suppress(OSError):
        tcp.socket.close()


async def _aclose_quietly(stream: trio.abc.AsyncResource) -> None:
    with contextlib.suppress(
        trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, OSError
    ):
        await stream.aclose()
