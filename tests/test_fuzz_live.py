"""Fuzzed frames over a real in-process server with mutual TLS, each followed by an echo.

A bounded number of frames (``CARDSWITCH_LIVE_FUZZ_FRAMES``, default 300): mutated valid
messages and published messages (bytes flipped, inserted, deleted, cut, spliced) in a correct
length header, and now and then a bad header. After each, an 0800 echo (DE70 301) on the same
connection; when the session policy says the fuzzed frame closes the connection, the server
must close it and the echo goes on a fresh one. The echo is answered every time, the server
never crashes, no answer is a 96 (an engine that raised) and nothing is logged with a
traceback. The frames come from a seeded ``random.Random``; a failure names the seed
(``CARDSWITCH_LIVE_FUZZ_SEED`` replays it) and the frame.
"""

from __future__ import annotations

import json
import os
import random
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
import trio
from data_paths import CORPUS_PATH
from fuzz.build_corpus import valid_messages
from server_fixtures import make_config, running_server

from switch.acquirer import echo
from switch.config import ListenerConfig
from switch.decisions import profile
from switch.handler import Dispatcher
from switch.pki import PkiPaths
from switch.provision import CardRow
from switch.session import Close, Session
from switch.testing import software_engine
from switch.wire import codec
from switch.wire.framing import FrameDecoder, encode_frame

FRAMES = int(os.environ.get("CARDSWITCH_LIVE_FUZZ_FRAMES", "300"))
SEED = int(os.environ.get("CARDSWITCH_LIVE_FUZZ_SEED", str(random.randrange(2**32))))
#: Seconds any one exchange may take on loopback (an echo, a close, a reconnect).
TIMEOUT = 10
#: Bad length headers: zero length, oversize, non-digits (of binary2 only 0 and > max).
BAD_HEADERS = (b"\x00\x00", b"\xff\xff", b"\x7f\x00")


def _bodies() -> list[bytes]:
    out = [codec.encode(m, "ascii") for m in valid_messages()]
    for m in json.loads(CORPUS_PATH.read_text())["messages"]:
        if not m["encoding"]["bitmap"].startswith("binary"):
            out.append(bytes.fromhex(m["raw_hex"]))
    return out


def _mutate(rng: random.Random, bodies: list[bytes]) -> bytes:
    data = bytearray(rng.choice(bodies))
    for _ in range(rng.randint(1, 6)):
        op = rng.choice(("flip", "insert", "delete", "cut", "splice", "digit"))
        at = rng.randint(0, len(data))
        if op == "flip" and at < len(data):
            data[at] = rng.randrange(256)
        elif op == "digit" and at < len(data):
            data[at] = rng.choice(b"0123456789ABCDEF =D")
        elif op == "insert":
            data[at:at] = rng.randbytes(rng.randint(1, 8))
        elif op == "delete":
            del data[at : at + rng.randint(1, 8)]
        elif op == "cut":
            del data[max(at, 1) :]
        elif op == "splice":
            other = rng.choice(bodies)
            start = rng.randint(0, len(other))
            data[at:at] = other[start : start + rng.randint(1, 64)]
    return bytes(data) or b"0"


def _frames(rng: random.Random) -> list[bytes]:
    bodies = _bodies()
    out = []
    for _ in range(FRAMES):
        if rng.random() < 0.05:
            out.append(rng.choice(BAD_HEADERS))
        else:
            out.append(encode_frame(_mutate(rng, bodies)))
    return out


class _Peer:
    """A raw mutual-TLS connection: sends bytes as they are and reads answers frame by frame,
    decoding them with the switch's codec (not ``switch.client.Client``, which stops at the
    first answer it cannot decode)."""

    def __init__(self, stream: trio.SSLStream[trio.SocketStream]) -> None:
        self.stream = stream
        self._decoder = FrameDecoder("binary2", 0xFFFF)
        self._frames: list[bytes] = []
        #: Answers the codec rejects, by (request MTI, error): only the open defect may occur.
        self.undecodable: list[tuple[str, codec.FormatError]] = []
        self.answers: list[dict[str, str]] = []

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def answer_to(self, stan: str) -> dict[str, str] | None:
        """The fields of the answer with DE11 ``stan``; None when the server closed first."""
        while True:
            while self._frames:
                fields = self._take(self._frames.pop(0))
                if fields.get("11") == stan:
                    return fields
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:
                return None
            if not data:
                return None
            self._frames += self._decoder.feed(bytes(data))

    def _take(self, frame: bytes) -> dict[str, str]:
        fields = codec.decode_fields(frame, "ascii")
        try:
            codec.decode(frame, "ascii")
        except codec.FormatError as err:
            self.undecodable.append((fields["0"], err))
        self.answers.append(fields)
        return fields


@asynccontextmanager
async def _peer(port: int, ctx: ssl.SSLContext) -> AsyncIterator[_Peer]:
    with trio.fail_after(TIMEOUT):
        tcp = await trio.open_tcp_stream("127.0.0.1", port)
        stream = trio.SSLStream(tcp, ctx, server_hostname="127.0.0.1")
        await stream.do_handshake()
    try:
        yield _Peer(stream)
    finally:
        await trio.aclose_forcefully(stream)


async def test_fuzzed_frames_never_stop_the_echo(
    pki: PkiPaths, client_ctx: ssl.SSLContext, card_rows: list[CardRow]
) -> None:
    frames = _frames(random.Random(SEED))
    engine = await software_engine(card_rows)
    cfg = make_config(pki, zpk="demo-zpk")
    listener = cfg.listeners[0]
    peers: list[_Peer] = []
    i = 0
    with structlog.testing.capture_logs() as logs:
        async with running_server(cfg, Dispatcher(engine.pipeline)) as (_, port):
            while i < len(frames):
                async with _peer(port, client_ctx) as peer:
                    peers.append(peer)
                    if i:  # the connection before was closed: the echo on a fresh one
                        await _echo(peer, f"9{i:05d}", f"seed {SEED}, after frame {i - 1}")
                    while i < len(frames):
                        frame = frames[i]
                        where = f"seed {SEED}, frame {i}: {frame.hex()}"
                        i += 1
                        await peer.send(frame)
                        if _closes(listener, frame):
                            with trio.fail_after(TIMEOUT):
                                assert await peer.answer_to("closed") is None, where
                            break
                        await _echo(peer, f"8{i:05d}", where)
    assert len(peers) == sum(_closes(listener, f) for f in frames[:-1]) + 1
    answers = [a for p in peers for a in p.answers]
    assert len(answers) >= len(frames) - len(peers)  # at least every echo
    assert not [a for a in answers if a.get("39") == "96"], f"an engine raised (seed {SEED})"
    undecodable = [u for p in peers for u in p.undecodable]
    assert not undecodable, (SEED, undecodable[:3])  # every answer is one its peer can read
    tracebacks = [e for e in logs if "exc_info" in e or "exception" in e]
    assert not tracebacks, (SEED, tracebacks[:3])
    assert not [e for e in logs if e.get("log_level") == "critical"], SEED


def _closes(listener: ListenerConfig, frame: bytes) -> bool:
    """Whether the session policy closes a connection on ``frame``."""
    actions = Session(listener, profile(listener.network)).receive(frame)
    return bool(actions) and isinstance(actions[-1], Close)


async def _echo(peer: _Peer, stan: str, where: str) -> None:
    with trio.fail_after(TIMEOUT):
        await peer.send(encode_frame(codec.encode(echo(stan), "ascii")))
        answer = await peer.answer_to(stan)
    assert answer is not None, f"echo not answered: the server closed; {where}"
    assert (answer["0"], answer["39"], answer["70"]) == ("0810", "00", "301"), where
