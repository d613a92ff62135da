"""Baseline targets for the load generator: what the switch is compared with in one run.

What lives here: two trio servers with the switch's framing and TLS, so a report can give the
switch's figures as ratios to them, measured in the same invocation on the same core:

- ``echo``: framing only. Each frame is sent back as it came (the generator matches it by
  its STAN; it has no DE39). The ceiling of TLS + trio + framing in Python.
- ``bare``: a bare pyiso8583 responder. Each frame is decoded with the switch's wire spec,
  answered with the response MTI (0100 -> 0110, 0400 -> 0410, 0800 -> 0810), its key
  fields copied and DE39 ``00``, encoded and sent: decode + encode and nothing of an issuer.
  With ``delay`` each request also holds ONE process-wide lock for that many seconds (a
  serialized sleep: a single server of known capacity ``1/delay``), the deliberately slowed
  target that shows whether the harness hides queueing.

``handle_echo``/``handle_bare`` serve any ``trio.abc.Stream`` (the unit tests use memory
streams and a virtual clock); ``serve`` listens on TCP, with TLS from the switch's own
``server_context`` when a ``TlsConfig`` is given; ``python -m benchmarks.baselines`` runs one
as a process that writes a ready file like ``cardswitch serve --ready-file`` (so
``switch.testing.start_switch`` starts it) and exits 0 on SIGTERM.

What does not: anything of the switch's pipeline, HSM or store.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import iso8583
import trio

from switch.config import TlsConfig
from switch.tls import server_context
from switch.wire.framing import FrameDecoder, FramingError, HeaderKind, encode_frame
from switch.wire.spec import SpecChoice, SpecKind, shared_spec

Kind = Literal["echo", "bare"]
#: Bytes asked of a stream per read.
RECEIVE_SIZE = 65536
#: Largest frame accepted.
MAX_FRAME = 65535
#: Seconds a TLS handshake may take.
HANDSHAKE_TIMEOUT = 10.0
#: Fields a bare answer copies from its request when present (ISO 8583:1987 numbering).
ECHOED_FIELDS = ("2", "3", "4", "7", "11", "12", "13", "32", "37", "41", "42", "49", "70")
#: DE39 of every bare answer.
APPROVED = "00"


@dataclass(frozen=True)
class Options:
    """How a baseline serves."""

    kind: Kind = "bare"
    header: HeaderKind = "binary2"
    spec: SpecChoice = "ascii"
    #: Bare only: seconds each request holds the process-wide lock (0: none).
    delay: float = 0.0


def response_mti(mti: str) -> str:
    """The answer's MTI: the function digit (third) of a request plus one (0100 -> 0110)."""
    return mti[:2] + str(int(mti[2]) + 1) + mti[3]


def answer(body: bytes, spec: dict[str, Any]) -> bytes:
    """The bare responder's answer to one request frame body.

    Raises:
        iso8583.DecodeError: the frame is not a message of ``spec``.
    """
    doc, _ = iso8583.decode(body, spec)
    out = {"t": response_mti(doc["t"]), "39": APPROVED}
    for key in ECHOED_FIELDS:
        if key in doc:
            out[key] = doc[key]
    encoded, _ = iso8583.encode(out, spec)
    return bytes(encoded)


async def handle_echo(stream: trio.abc.Stream, opts: Options) -> None:
    """Echo every frame of ``stream`` back until EOF (framing only)."""
    decoder = FrameDecoder(opts.header, MAX_FRAME)
    while True:
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            return
        frames = decoder.feed(bytes(data))
        if frames:
            await stream.send_all(b"".join(encode_frame(f, opts.header) for f in frames))


async def handle_bare(stream: trio.abc.Stream, opts: Options, lock: trio.Lock) -> None:
    """Answer every request of ``stream`` (decode, encode) until EOF; bad frames are dropped."""
    decoder = FrameDecoder(opts.header, MAX_FRAME)
    spec = shared_spec(opts.spec)
    while True:
        data = await stream.receive_some(RECEIVE_SIZE)
        if not data:
            return
        out = []
        for body in decoder.feed(bytes(data)):
            try:
                out.append(encode_frame(answer(body, spec), opts.header))
            except (iso8583.DecodeError, iso8583.EncodeError):
                continue
            if opts.delay > 0:
                # Serialized: one request at a time in the whole process sleeps; send its
                # answer before the next one's turn, so the queue is the lock's.
                async with lock:
                    await trio.sleep(opts.delay)
                await stream.send_all(b"".join(out))
                out = []
        if out:
            await stream.send_all(b"".join(out))


def handler(opts: Options) -> Callable[[trio.abc.Stream], Awaitable[None]]:
    """The per-stream handler of ``opts.kind`` (one lock shared by all its streams)."""
    if opts.kind == "echo":
        return partial(handle_echo, opts=opts)
    return partial(handle_bare, opts=opts, lock=trio.Lock())


async def serve(
    opts: Options,
    host: str = "127.0.0.1",
    port: int = 0,
    tls: ssl.SSLContext | None = None,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Listen on ``host:port`` (TLS when ``tls``) and serve each connection until cancelled."""
    handle = handler(opts)

    async def connection(stream: trio.SocketStream) -> None:
        try:
            if tls is None:
                await handle(stream)
                return
            wrapped = trio.SSLStream(stream, tls, server_side=True)
            with trio.move_on_after(HANDSHAKE_TIMEOUT) as scope:
                await wrapped.do_handshake()
            if scope.cancelled_caught:
                return
            await handle(wrapped)
        except (trio.BrokenResourceError, trio.ClosedResourceError, ssl.SSLError, FramingError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    listeners = await trio.open_tcp_listeners(port, host=host)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(trio.serve_listeners, connection, listeners))
        task_status.started(listeners)


def _bound(listeners: Sequence[trio.SocketListener]) -> tuple[str, int]:
    host, port, *_ = listeners[0].socket.getsockname()
    return str(host), int(port)


async def _main(opts: Options, host: str, port: int, tls: TlsConfig | None, ready: Path) -> int:
    ctx = server_context(tls) if tls is not None else None
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(serve, opts, host, port, ctx)
            bound_host, bound_port = _bound(listeners)
            listener = {"name": opts.kind, "host": bound_host, "port": bound_port}
            tmp = ready.with_suffix(".tmp")
            tmp.write_text(json.dumps({"pid": os.getpid(), "listeners": [listener]}))
            tmp.replace(ready)
            async for _sig in signals:
                nursery.cancel_scope.cancel()
                break
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.baselines", description=__doc__[:60])
    p.add_argument("kind", choices=["echo", "bare"], help="echo: framing only; bare: decode+encode")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=0, help="port (0: any free one)")
    p.add_argument("--ca", type=Path, help="CA of the client certificates (mutual TLS)")
    p.add_argument("--cert", type=Path, help="server certificate")
    p.add_argument("--key", type=Path, help="server key")
    p.add_argument("--header", default="binary2", choices=["binary2", "ascii4", "bcd2"])
    p.add_argument("--spec", default="ascii", choices=["ascii", "binary", "bcd"])
    p.add_argument("--delay-ms", type=float, default=0.0, help="bare: serialized ms per request")
    p.add_argument("--ready-file", type=Path, required=True, help="where to write pid and port")
    a = p.parse_args(argv)
    tls = None
    if a.ca or a.cert or a.key:
        if not (a.ca and a.cert and a.key):
            p.error("--ca, --cert and --key go together")
        tls = TlsConfig(ca=a.ca, cert=a.cert, key=a.key)
    spec: SpecKind = a.spec
    opts = Options(a.kind, a.header, spec, a.delay_ms / 1000)
    return trio.run(_main, opts, a.host, a.port, tls, a.ready_file)


def command(
    kind: Kind, ready_file: Path, *, tls: TlsConfig | None = None, delay_ms: float = 0.0
) -> list[str]:
    """The argv of a baseline process (run with the repository root as working directory)."""
    argv = [sys.executable, "-m", "benchmarks.baselines", kind, "--ready-file", str(ready_file)]
    if tls is not None:
        argv += ["--ca", str(tls.ca), "--cert", str(tls.cert), "--key", str(tls.key)]
    if delay_ms:
        argv += ["--delay-ms", str(delay_ms)]
    return argv


if __name__ == "__main__":
    sys.exit(main())
