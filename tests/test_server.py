"""The trio server over real mutual-TLS sockets on loopback (issue 2's list of proofs)."""

from __future__ import annotations

import random
import ssl
from pathlib import Path

import iso8583
import pytest
import trio
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
from switch.handler import RequestContext
from switch.pki import PkiPaths
from switch.wire import codec
from switch.wire.framing import encode_frame
from switch.wire.messages import (
    AuthRequest,
    AuthResponse,
    ErrorResponse,
    NetworkResponse,
    ReversalRequest,
    ReversalResponse,
)
from switch.wire.spec import spec_for

PAN = "4123456789012345"


async def test_echo_and_interim_91(pki: PkiPaths, client_ctx: ssl.SSLContext) -> None:
    async with running_server(make_config(pki)) as (_, port):
        async with Client.connect("127.0.0.1", port, client_ctx) as client:
            with trio.fail_after(5):
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
    assert (auth.mti, auth.stan, auth.response_code) == ("0110", "000124", "91")


@pytest.mark.parametrize("code", ["001", "002", "301"])
async def test_sign_on_sign_off_echo_echo_fields(
    pki: PkiPaths, client_ctx: ssl.SSLContext, code: str
) -> None:
    request = echo(stan="000777", code=code)
    async with running_server(make_config(pki)) as (_, port):
        async with Client.connect("127.0.0.1", port, client_ctx) as client:
            with trio.fail_after(5):
                answer = await client.request(request)
    assert isinstance(answer, NetworkResponse)
    assert answer.transmission_time == request.transmission_time
    assert (answer.stan, answer.code, answer.response_code) == ("000777", code, "00")


async def _refused(port: int, ctx: ssl.SSLContext) -> bool:
    """True when the server refuses this client: the handshake, or the first read, fails."""
    try:
        with trio.fail_after(5):
            async with Client.connect("127.0.0.1", port, ctx) as client:
                # TLS 1.3: a rejected client certificate surfaces on the first read.
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
            with trio.fail_after(5):
                assert isinstance(await client.request(echo()), NetworkResponse)


async def test_handshake_that_never_completes_is_closed(pki: PkiPaths) -> None:
    cfg = make_config(pki, handshake_timeout=0.3)
    async with running_server(cfg) as (_, port):
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        async with tcp:
            t0 = trio.current_time()
            with trio.fail_after(5):
                data = await tcp.receive_some(1024)  # we never send a ClientHello
            assert data == b""
            assert trio.current_time() - t0 < 3


async def _closed_without_answer(
    port: int, ctx: ssl.SSLContext, payload: bytes, *, header: str = "binary2"
) -> None:
    async with Client.connect("127.0.0.1", port, ctx, header=header) as client:  # type: ignore[arg-type]
        await client.send_frame(payload, raw=True)
        with trio.fail_after(5):
            await client.wait_closed()
        assert client.unmatched == []


@pytest.mark.parametrize(
    ("header", "payload"),
    [
        ("binary2", b"\xff\xff" + b"0" * 10),  # 65535 > max_frame
        ("binary2", b"\x00\x00"),  # zero length
        ("ascii4", b"+120" + b"0" * 120),  # int() would accept the sign
        ("ascii4", b"01_0" + b"0" * 10),  # and the underscore
        ("ascii4", b"00a1"),
    ],
)
async def test_bad_length_header_closes(
    pki: PkiPaths, client_ctx: ssl.SSLContext, header: str, payload: bytes
) -> None:
    cfg = make_config(pki, header=header)
    async with running_server(cfg) as (_, port):
        await _closed_without_answer(port, client_ctx, payload, header=header)
        # The switch is still serving.
        async with Client.connect("127.0.0.1", port, client_ctx, header=header) as client:  # type: ignore[arg-type]
            with trio.fail_after(5):
                assert isinstance(await client.request(echo()), NetworkResponse)


async def test_truncated_frame_then_eof_closes(pki: PkiPaths, client_ctx: ssl.SSLContext) -> None:
    async with running_server(make_config(pki)) as (server, port):
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, client_ctx, server_hostname="127.0.0.1")
        await stream.do_handshake()
        body = codec.encode(echo())
        await stream.send_all(encode_frame(body)[: len(body) // 2])
        await stream.aclose()  # close_notify: EOF in the middle of a frame
        with trio.fail_after(5):
            while server._connections:  # noqa: ASYNC110 - polling the server's own state
                await trio.sleep(0.01)


async def test_body_dripped_slower_than_frame_deadline_is_closed(
    pki: PkiPaths, client_ctx: ssl.SSLContext
) -> None:
    cfg = make_config(pki, frame_timeout=0.5)
    async with running_server(cfg) as (_, port):
        async with Client.connect("127.0.0.1", port, client_ctx) as client:
            frame = encode_frame(codec.encode(echo()))
            t0 = trio.current_time()
            with trio.fail_after(5):
                for byte in frame:  # one byte every 0.1 s: steady, but the whole frame > 0.5 s
                    if client.closed:
                        break
                    try:
                        await client.send_frame(bytes([byte]), raw=True)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        break
                    await trio.sleep(0.1)
                await client.wait_closed()
            assert trio.current_time() - t0 < 3
            assert client.unmatched == []


async def test_garbage_body_with_mti_and_stan_gets_30(
    pki: PkiPaths, client_ctx: ssl.SSLContext
) -> None:
    good = codec.encode(build_auth(PAN, 1000, stan="004242"))
    # Keep MTI, bitmap and the leading fields; spoil the amount (DE4) with letters.
    fields = codec.decode_fields(good)
    bad = good.replace(fields["4"].encode(), b"00000000ABCD", 1)
    async with running_server(make_config(pki)) as (_, port):
        async with Client.connect("127.0.0.1", port, client_ctx) as client:
            await client.send_frame(bad)
            with trio.fail_after(5):
                while not client.unmatched:  # noqa: ASYNC110 - the reader fills it
                    await trio.sleep(0.01)
                answer = client.unmatched[0]
                assert isinstance(answer, AuthResponse | ErrorResponse)
                assert answer.mti == "0110"
                assert answer.stan == "004242"
                assert answer.response_code == "30"
                # The connection stays usable.
                assert isinstance(await client.request(echo()), NetworkResponse)


async def test_garbled_response_class_message_is_dropped_connection_kept(
    pki: PkiPaths, client_ctx: ssl.SSLContext
) -> None:
    good = codec.encode(AuthResponse.answer(build_auth(PAN, 1000, stan="004343"), "00"))
    fields = codec.decode_fields(good)
    bad = good.replace(fields["4"].encode(), b"00000000ABCD", 1)
    async with running_server(make_config(pki)) as (_, port):
        async with Client.connect("127.0.0.1", port, client_ctx) as client:
            await client.send_frame(bad)
            with trio.fail_after(5):
                assert isinstance(await client.request(echo()), NetworkResponse)
            assert client.unmatched == []


async def test_unrecoverable_body_closes_the_connection(
    pki: PkiPaths, client_ctx: ssl.SSLContext
) -> None:
    async with running_server(make_config(pki)) as (_, port):
        await _closed_without_answer(port, client_ctx, encode_frame(b"\xff\xfe garbage"))


async def test_unknown_request_mti_gets_12_and_response_mti_is_dropped(
    pki: PkiPaths, client_ctx: ssl.SSLContext
) -> None:
    fields = codec.decode_fields(codec.encode(echo(stan="000555")))
    fields = {k: v for k, v in fields.items() if k.isdigit() and k not in ("0", "1")}
    unknown = _encode_raw({**fields, "t": "0600"})
    unsolicited = _encode_raw({**fields, "t": "0810", "39": "00"})
    async with running_server(make_config(pki)) as (_, port):
        async with Client.connect("127.0.0.1", port, client_ctx) as client:
            await client.send_frame(unsolicited)
            await client.send_frame(unknown)
            with trio.fail_after(5):
                while not client.unmatched:  # noqa: ASYNC110 - the reader fills it
                    await trio.sleep(0.01)
                assert isinstance(await client.request(echo()), NetworkResponse)
    assert [m.mti for m in client.unmatched] == ["0610"]
    answer = codec.decode_fields(client.unmatched_frames[0])
    assert (answer["11"], answer["39"]) == ("000555", "12")


def _encode_raw(fields: dict[str, str]) -> bytes:
    """Encode a field dict with pyiso8583 directly (for MTIs our typed codec won't build)."""
    raw, _ = iso8583.encode(dict(fields), spec_for("ascii"))
    return bytes(raw)


class _ShuffledHandler:
    """Answers after a random delay, so replies leave in another order than requests came."""

    def __init__(self) -> None:
        self.seen = 0
        self.running = 0
        self.most_running = 0

    async def authorize(self, request: AuthRequest, context: RequestContext) -> AuthResponse:
        self.seen += 1
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await trio.sleep(random.uniform(0, 0.2))
        finally:
            self.running -= 1
        return AuthResponse.answer(request, "00", approval_code=request.stan)

    async def reverse(self, request: ReversalRequest, context: RequestContext) -> ReversalResponse:
        return ReversalResponse.answer(request, "00")


async def test_64_in_flight_on_one_connection_answered_out_of_order(
    pki: PkiPaths, client_ctx: ssl.SSLContext
) -> None:
    handler = _ShuffledHandler()
    order: list[str] = []
    results: dict[str, AuthResponse] = {}
    async with running_server(make_config(pki), handler) as (_, port):
        async with Client.connect("127.0.0.1", port, client_ctx) as client:

            async def one(i: int) -> None:
                stan = f"{i + 1:06d}"
                answer = await client.request(build_auth(PAN, 100 + i, stan=stan))
                assert isinstance(answer, AuthResponse)
                order.append(answer.stan)
                results[stan] = answer

            with trio.fail_after(10):
                async with trio.open_nursery() as nursery:
                    for i in range(64):
                        nursery.start_soon(one, i)
    assert handler.seen == 64
    assert len(results) == 64
    for stan, answer in results.items():
        assert answer.stan == stan and answer.approval_code == stan
        assert answer.amount == 100 + int(stan) - 1
    assert order != sorted(order)  # out of order, matched by STAN


async def test_in_flight_caps_apply_backpressure(pki: PkiPaths, client_ctx: ssl.SSLContext) -> None:
    handler = _ShuffledHandler()
    cfg = make_config(pki, max_in_flight=2)
    answered = 0
    async with running_server(cfg, handler) as (_, port):
        async with Client.connect("127.0.0.1", port, client_ctx) as client:

            async def one(i: int) -> None:
                nonlocal answered
                answer = await client.request(build_auth(PAN, 100, stan=f"{i + 1:06d}"))
                assert isinstance(answer, AuthResponse) and answer.response_code == "00"
                answered += 1

            with trio.fail_after(20):
                async with trio.open_nursery() as nursery:
                    for i in range(24):
                        nursery.start_soon(one, i)
    assert answered == 24
    assert handler.most_running == 2  # the per-connection cap, reached and never passed
