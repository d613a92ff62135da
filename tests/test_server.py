"""The listener (switch/server.py) over real mutual-TLS sockets on loopback.

Only what needs a socket and a handshake is here: one request end to end, the refusal of
bad client certificates and of identities off the allow-list, the handshake deadline, a
TLS reload seen by new connections, a drain with a request in flight, and the listener
serving on after one connection closes for bad input. Connection behaviour (concurrency,
backpressure, deadlines, bad frames) is tested over memory streams in test_connection.py,
and the per-frame policy in test_session.py.

TLS 1.3: the client finishes its handshake before the server has judged its certificate,
so a refused client may only see the failure on its first read; refusals send and read.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trio
import trio.testing
from server_fixtures import (
    anonymous_client_ctx,
    expired_client_ctx,
    foreign_client_ctx,
    make_config,
    running_server,
    tls11_client_ctx,
)

from switch.acquirer import build_auth, echo
from switch.client import Client
from switch.config import TlsConfig
from switch.decisions import Reason
from switch.handler import Decision, Dispatcher, RequestContext
from switch.pki import PkiPaths, init_pki
from switch.server import Server
from switch.tls import TlsContextHolder, client_context, server_context
from switch.wire import codec
from switch.wire.messages import AuthRequest, AuthResponse, NetworkResponse, ReversalRequest

PAN = "4123456789012345"
#: Upper bound on any exchange here (loopback handshakes take milliseconds).
TIMEOUT = 5


class SlowEngine:
    """Approves after ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.started = trio.Event()

    async def authorize(self, request: AuthRequest, context: RequestContext) -> Decision:
        self.started.set()
        await trio.sleep(self.delay)
        code = context.profile.code(Reason.APPROVED)
        return Decision(AuthResponse.answer(request, code, approval_code="123456"), Reason.APPROVED)

    async def reverse(self, request: ReversalRequest, context: RequestContext) -> Decision:
        raise NotImplementedError


async def test_one_request_end_to_end(pki: PkiPaths, client_ctx: ssl.SSLContext) -> None:
    async with running_server(make_config(pki)) as (_, port):
        async with Client.connect("127.0.0.1", port, client_ctx) as client:
            with trio.fail_after(TIMEOUT):
                answer = await client.request(echo(stan="000123"))
                auth = await client.request(build_auth(PAN, 1000, stan="000124"))
    assert isinstance(answer, NetworkResponse)
    assert (answer.mti, answer.stan, answer.code, answer.response_code) == (
        "0810",
        "000123",
        "301",
        "00",
    )
    assert isinstance(auth, AuthResponse)
    # The switch without an engine: the visa profile's code for ISSUER_UNAVAILABLE.
    assert (auth.mti, auth.stan, auth.response_code) == ("0110", "000124", "91")


async def _refused(port: int, ctx: ssl.SSLContext) -> bool:
    """True when the server refuses this client: the handshake, or the first read, fails."""
    try:
        with trio.fail_after(TIMEOUT):
            async with Client.connect("127.0.0.1", port, ctx) as client:
                try:
                    await client.send_frame(codec.encode(echo()))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    return True
                await client.wait_closed()
                return not client.unmatched
    except (ssl.SSLError, trio.BrokenResourceError, OSError):
        return True


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
@pytest.mark.parametrize("kind", ["anonymous", "foreign_ca", "expired", "tls11"])
async def test_bad_clients_are_refused(pki: PkiPaths, tmp_path: Path, kind: str) -> None:
    ctx = {
        "anonymous": lambda: anonymous_client_ctx(pki),
        "foreign_ca": lambda: foreign_client_ctx(pki, tmp_path),
        "expired": lambda: expired_client_ctx(pki, tmp_path),
        "tls11": lambda: tls11_client_ctx(pki),
    }[kind]()
    async with running_server(make_config(pki)) as (_, port):
        assert await _refused(port, ctx)


async def test_allowed_clients_list_refuses_other_identities(
    pki: PkiPaths, client_ctx: ssl.SSLContext
) -> None:
    cfg = make_config(pki, allowed_clients=("visa-gateway",))
    async with running_server(cfg) as (_, port):
        assert await _refused(port, client_ctx)
    cfg = make_config(pki, allowed_clients=("acquirer-dev",))
    async with running_server(cfg) as (_, port):
        async with Client.connect("127.0.0.1", port, client_ctx) as client:
            with trio.fail_after(TIMEOUT):
                assert isinstance(await client.request(echo()), NetworkResponse)


async def test_handshake_that_never_completes_is_closed(
    pki: PkiPaths, autojump_clock: trio.testing.MockClock
) -> None:
    # Virtual time: the clock jumps while both sides wait, so the deadline costs nothing.
    cfg = make_config(pki, handshake_timeout=30.0)
    async with running_server(cfg) as (_, port):
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        async with tcp:
            t0 = trio.current_time()
            with trio.fail_after(60):
                data = await tcp.receive_some(1024)  # we never send a ClientHello
    assert data == b""
    assert trio.current_time() - t0 == pytest.approx(30.0, abs=1.0)


async def test_bad_input_closes_one_connection_and_the_listener_serves_on(
    pki: PkiPaths, client_ctx: ssl.SSLContext
) -> None:
    async with running_server(make_config(pki)) as (_, port):
        async with Client.connect("127.0.0.1", port, client_ctx) as bad:
            await bad.send_frame(b"\x00\x00", raw=True)  # a zero-length frame
            with trio.fail_after(TIMEOUT):
                await bad.wait_closed()
            assert bad.unmatched == []
        async with Client.connect("127.0.0.1", port, client_ctx) as good:
            with trio.fail_after(TIMEOUT):
                assert isinstance(await good.request(echo()), NetworkResponse)


async def test_reload_applies_to_new_connections(pki: PkiPaths, tmp_path: Path) -> None:
    cfg = make_config(pki)
    holder = TlsContextHolder(cfg.tls)
    rotated = init_pki(tmp_path / "rotated")
    server = Server(cfg, Dispatcher(SlowEngine(0)), holder.get)
    async with trio.open_nursery() as nursery:
        port = (await nursery.start(server.serve))[0][2]
        old_client = client_context(pki.ca, pki.client_cert, pki.client_key)
        new_client = client_context(rotated.ca, rotated.client_cert, rotated.client_key)
        async with Client.connect("127.0.0.1", port, old_client) as client:
            with trio.fail_after(TIMEOUT):
                assert isinstance(await client.request(echo()), NetworkResponse)
            rotated_tls = TlsConfig(ca=rotated.ca, cert=rotated.server_cert, key=rotated.server_key)
            assert holder.reload(rotated_tls).reloaded
            # The connection made before the reload is served on.
            with trio.fail_after(TIMEOUT):
                assert isinstance(await client.request(echo()), NetworkResponse)
        async with Client.connect("127.0.0.1", port, new_client) as client:
            with trio.fail_after(TIMEOUT):
                assert isinstance(await client.request(echo()), NetworkResponse)
        assert await _refused(port, old_client)
        server.shutdown()


async def test_drain_answers_the_request_in_flight_then_serve_returns(
    pki: PkiPaths, client_ctx: ssl.SSLContext
) -> None:
    engine = SlowEngine(0.1)
    cfg = make_config(pki)
    server = Server(cfg, Dispatcher(engine), server_context(cfg.tls))
    async with trio.open_nursery() as nursery:
        port = (await nursery.start(server.serve))[0][2]
        async with Client.connect("127.0.0.1", port, client_ctx) as client:
            answer: list[object] = []

            async def one() -> None:
                answer.append(await client.request(build_auth(PAN, 100, stan="000001")))

            with trio.fail_after(TIMEOUT):
                async with trio.open_nursery() as requests:
                    requests.start_soon(one)
                    await engine.started.wait()
                    server.shutdown()
                    assert server.draining
                await client.wait_closed()
        # serve() returns on its own once the drain has finished: the nursery exits.
    (response,) = answer
    assert isinstance(response, AuthResponse) and response.response_code == "00"
