"""Keep-alive over the real server (mutual TLS on loopback): zero-length frames per the
listener's setting, the switch's own echo test on an idle link, and the close of a link whose
echo goes unanswered. The virtual-time cases (exact deadlines) are in test_connection.py;
here the timers are a fraction of a second of real time and only what happens is asserted.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
from server_fixtures import make_config, running_server

from switch.acquirer import echo
from switch.pki import PkiPaths
from switch.wire import codec
from switch.wire.framing import FrameDecoder, encode_frame
from switch.wire.messages import NetworkRequest, NetworkResponse

#: Seconds any exchange may take (a bound, not a measurement).
TIMEOUT = 30


@asynccontextmanager
async def tls_stream(
    port: int, ctx: ssl.SSLContext
) -> AsyncIterator[trio.SSLStream[trio.SocketStream]]:
    """A bare mutual-TLS stream (the client of switch.client refuses zero-length frames)."""
    tcp = await trio.open_tcp_stream("127.0.0.1", port)
    stream = trio.SSLStream(tcp, ctx, server_hostname="127.0.0.1")
    await stream.do_handshake()
    try:
        yield stream
    finally:
        await trio.aclose_forcefully(stream)


async def read_frames(
    stream: trio.abc.Stream, count: int, decoder: FrameDecoder | None = None
) -> list[bytes]:
    """The next ``count`` frames (zero-length ones included) the switch sends."""
    decoder = decoder or FrameDecoder(empty_frames=True)
    frames: list[bytes] = []
    while len(frames) < count:
        data = await stream.receive_some(65536)
        assert data, "the switch closed the connection"
        frames += decoder.feed(bytes(data))
    return frames


@pytest.mark.parametrize("policy", ["answer", "ignore"])
async def test_zero_length_frames_over_tls(
    pki: PkiPaths, client_ctx: ssl.SSLContext, policy: str
) -> None:
    cfg = make_config(pki, zero_length_frames=policy)
    async with running_server(cfg) as (_server, port), tls_stream(port, client_ctx) as stream:
        with trio.fail_after(TIMEOUT):
            body = codec.encode(echo(stan="000042"))
            await stream.send_all(b"\x00\x00" + encode_frame(body) + b"\x00\x00")
            frames = await read_frames(stream, 3 if policy == "answer" else 1)
    answers = [codec.decode(f) for f in frames if f]
    assert all(isinstance(a, NetworkResponse) for a in answers)
    assert [
        (a.mti, a.stan, a.response_code) for a in answers if isinstance(a, NetworkResponse)
    ] == [("0810", "000042", "00")]
    assert frames.count(b"") == (2 if policy == "answer" else 0)


async def test_zero_length_frame_closes_by_default(
    pki: PkiPaths, client_ctx: ssl.SSLContext
) -> None:
    async with running_server(make_config(pki)) as (_server, port):
        async with tls_stream(port, client_ctx) as stream:
            with trio.fail_after(TIMEOUT):
                await stream.send_all(b"\x00\x00")
                assert await stream.receive_some(65536) == b""


async def test_switch_echo_answered_then_unanswered(
    pki: PkiPaths, client_ctx: ssl.SSLContext
) -> None:
    cfg = make_config(pki, idle_echo_after=0.2, echo_timeout=2.0)
    async with running_server(cfg) as (_server, port), tls_stream(port, client_ctx) as stream:
        with trio.fail_after(TIMEOUT):
            decoder = FrameDecoder()
            (frame,) = await read_frames(stream, 1, decoder)
            first = codec.decode(frame)
            assert isinstance(first, NetworkRequest)
            assert (first.mti, first.code) == ("0800", "301")
            await stream.send_all(encode_frame(codec.encode(NetworkResponse.answer(first))))
            (frame,) = await read_frames(stream, 1, decoder)
            second = codec.decode(frame)
            assert isinstance(second, NetworkRequest) and second.stan != first.stan
            # Not answered: the switch closes the link (TLS close_notify, then EOF).
            rest = b""
            while data := await stream.receive_some(65536):
                rest += data
    assert rest == b""
