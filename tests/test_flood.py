"""Floods against a listener on real mutual TLS: bounded, and a legitimate peer still served.

An in-process server with the listener bounds of ``ListenerConfig`` takes a flood of TCP
connections that never start TLS (from three loopback addresses, so the per-address bound
keeps handshake slots free) and a few hundred idle mutual-TLS connections of one identity
(the per-peer bound admits a few and refuses the rest right after the handshake). During
the flood a peer with another identity, from another address, opens a fresh connection and
its echo (0800 301) is answered within 1 s. When the flood has gone, the process holds as
many file descriptors as before it and no connection is open.

Two sizes, both in the default run (each takes a few seconds on loopback): a small one,
and the counts of the adversarial report (1,000 TCP, 300 idle mTLS).

The same adversarial flood against the real process (``python -m switch serve`` on SoftHSM
and SQLite, started as the crash tests start it): after the flood has gone, the process's
open descriptors (/proc/PID/fd) are back at the baseline taken after a warm-up, within a
slack of 2, and its resident memory (VmRSS) within 20 MiB of it (allocator growth, not a
per-connection leak: ``FD_SLACK``, ``RSS_TOLERANCE``).
"""

from __future__ import annotations

import gc
import os
import resource
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from crash_support import SEED_CARDS, seed, start_switch, stop_now, write_config
from server_fixtures import make_config, running_server
from test_limits import echo_ok, hits, identity_ctx, open_now

from benchmarks.procstat import sample
from switch.acquirer import build_auth
from switch.client import Client
from switch.pki import PkiPaths
from switch.wire.messages import AuthResponse

#: Addresses the TCP flood comes from; times max_handshakes_per_ip stays below
#: max_handshakes, so the flood never holds every handshake slot.
FLOOD_SOURCES = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
#: Address of the idle mutual-TLS connections, and of the legitimate peer.
IDLE_SOURCE = "127.0.0.5"
LEGIT_SOURCE = "127.0.0.1"
#: Listener bounds of the flood (the shipped defaults, named here so the test reads alone).
MAX_HANDSHAKES = 16
MAX_HANDSHAKES_PER_IP = 4
MAX_PER_PEER = 8
#: Connections opened at once by the flood (bounded: a 2-core machine).
FLOOD_CONCURRENCY = 50
#: Handshakes the idle-mTLS opener runs at once (below the per-address bound).
IDLE_CONCURRENCY = 2
#: Upper bound on waiting for the server to release everything after the flood, and the
#: interval of looking.
SETTLE_TIMEOUT = 15
POLL = 0.05


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@dataclass
class Flood:
    streams: list[trio.abc.AsyncResource] = field(default_factory=list)
    refused_at_connect: int = 0

    async def aclose(self) -> None:
        for stream in self.streams:
            await trio.aclose_forcefully(stream)
        self.streams.clear()


async def tcp_flood(port: int, count: int, flood: Flood) -> None:
    limiter = trio.CapacityLimiter(FLOOD_CONCURRENCY)

    async def one(i: int) -> None:
        async with limiter:
            source = FLOOD_SOURCES[i % len(FLOOD_SOURCES)]
            try:
                with trio.fail_after(10):
                    tcp = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
            except (OSError, trio.TooSlowError):
                flood.refused_at_connect += 1
                return
            flood.streams.append(tcp)

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, i)


async def idle_tls_flood(port: int, ctx: ssl.SSLContext, count: int, flood: Flood) -> None:
    limiter = trio.CapacityLimiter(IDLE_CONCURRENCY)

    async def one() -> None:
        async with limiter:
            try:
                with trio.fail_after(10):
                    tcp = await trio.open_tcp_stream("127.0.0.1", port, local_address=IDLE_SOURCE)
                    stream = trio.SSLStream(tcp, ctx, server_hostname="127.0.0.1")
                    flood.streams.append(stream)
                    await stream.do_handshake()
            except (OSError, ssl.SSLError, trio.BrokenResourceError, trio.TooSlowError):
                flood.refused_at_connect += 1

    async with trio.open_nursery() as nursery:
        for _ in range(count):
            nursery.start_soon(one)


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"needs {needed} file descriptors, hard limit {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


async def run_flood(
    pki: PkiPaths, client_ctx: ssl.SSLContext, tmp: Path, *, tcp: int, idle: int, name: str
) -> None:
    _raise_fd_limit(2 * (tcp + idle) + 256)
    legit = identity_ctx(pki, tmp, "acquirer-legit")
    cfg = make_config(
        pki,
        name=name,
        max_connections=64,
        max_handshakes=MAX_HANDSHAKES,
        max_handshakes_per_ip=MAX_HANDSHAKES_PER_IP,
        max_connections_per_peer=MAX_PER_PEER,
        handshake_timeout=30.0,  # the stalled handshakes outlast the flood
    )
    refused_ip = hits(name, "max_handshakes_per_ip")
    refused_peer = hits(name, "max_connections_per_peer")
    flood = Flood()
    async with running_server(cfg) as (_, port):
        gc.collect()  # earlier tests' unreferenced sockets would close mid-flood
        baseline = fd_count()
        try:
            await tcp_flood(port, tcp, flood)
            await idle_tls_flood(port, client_ctx, idle, flood)
            # Held now: the stalled handshakes of each flood address, and MAX_PER_PEER
            # idle links; everything else was closed when it came.
            assert open_now(name) <= len(FLOOD_SOURCES) * MAX_HANDSHAKES_PER_IP + MAX_PER_PEER
            with trio.fail_after(1.0):
                assert await echo_ok(port, legit, source=LEGIT_SOURCE)
        finally:
            await flood.aclose()
        for _ in range(int(SETTLE_TIMEOUT / POLL)):
            if fd_count() <= baseline and open_now(name) == 0:
                break
            await trio.sleep(POLL)
        # At most the baseline: descriptors of other code may close meanwhile, never ours stay.
        assert fd_count() <= baseline and open_now(name) == 0
    assert flood.refused_at_connect == 0  # refused by closing, never left to time out
    held = len(FLOOD_SOURCES) * MAX_HANDSHAKES_PER_IP
    assert hits(name, "max_handshakes_per_ip") - refused_ip >= tcp - held
    assert hits(name, "max_connections_per_peer") - refused_peer >= idle - MAX_PER_PEER


async def test_flood_small(pki: PkiPaths, client_ctx: ssl.SSLContext, tmp_path: Path) -> None:
    await run_flood(pki, client_ctx, tmp_path, tcp=200, idle=40, name="flood-ci")


async def test_flood_adversarial_size(
    pki: PkiPaths, client_ctx: ssl.SSLContext, tmp_path: Path
) -> None:
    await run_flood(pki, client_ctx, tmp_path, tcp=1000, idle=300, name="flood-full")


# -- the real process: file descriptors and memory back to baseline ---------------------------

#: File descriptors the real process may hold above its baseline once the flood has gone:
#: none of the flood's. The slack of 2 covers descriptors opened lazily by code the flood does
#: not touch (a log rotation, a SoftHSM or SQLite file reopened on a reconnect).
FD_SLACK = 2
#: Resident memory the real process may keep above its baseline after the flood, bytes. The
#: allocator keeps the arenas it grew for the flood's buffers and TLS objects (a one-off of a
#: few MiB); a per-connection leak of even 16 KiB over 1,300 connections would exceed it.
RSS_TOLERANCE = 20 * 2**20
#: Echoes and authorizations of the warm-up before the baseline (lazy imports, first TLS
#: session objects, the SQLite page cache, the first PIN-less authorization path).
WARM_UP = 5


async def warm_up(port: int, ctx: ssl.SSLContext) -> None:
    for _ in range(WARM_UP):
        assert await echo_ok(port, ctx, source=LEGIT_SOURCE)
    async with Client.connect("127.0.0.1", port, ctx) as client:
        for i in range(WARM_UP):
            with trio.fail_after(10):
                answer = await client.request(build_auth(SEED_CARDS[0].pan, 100, stan=f"9{i:05d}"))
            assert isinstance(answer, AuthResponse) and answer.response_code == "00"


async def test_flood_real_process_gives_back_fds_and_memory(
    pki: PkiPaths, client_ctx: ssl.SSLContext, tmp_path: Path
) -> None:
    """``python -m switch serve`` under the adversarial flood (1,000 TCP connections that
    never handshake, 300 idle mutual-TLS connections of one identity): once the flood's
    connections are closed, the process's open descriptors (/proc/PID/fd) come back to the
    baseline measured after a warm-up, within ``FD_SLACK``, after a bounded polling wait;
    its resident memory (VmRSS) stays within ``RSS_TOLERANCE`` of the baseline."""
    tcp, idle = 1000, 300
    _raise_fd_limit(2 * (tcp + idle) + 256)
    config = write_config(tmp_path, pki)
    await seed(config, tmp_path)
    legit = identity_ctx(pki, tmp_path, "acquirer-legit")
    proc, port = await start_switch(config, tmp_path, "flood")
    flood = Flood()
    try:
        await warm_up(port, legit)
        baseline = sample(proc.pid)
        try:
            await tcp_flood(port, tcp, flood)
            await idle_tls_flood(port, client_ctx, idle, flood)
            peak = sample(proc.pid)
            with trio.fail_after(1.0):
                assert await echo_ok(port, legit, source=LEGIT_SOURCE)
        finally:
            await flood.aclose()
        after = sample(proc.pid)
        for _ in range(int(SETTLE_TIMEOUT / POLL)):
            if after.fds <= baseline.fds + FD_SLACK:
                break
            await trio.sleep(POLL)
            after = sample(proc.pid)
        print(f"real-process flood: baseline {baseline}, flood {peak}, after {after}")
        assert after.fds <= baseline.fds + FD_SLACK, (baseline, peak, after)
        assert after.rss <= baseline.rss + RSS_TOLERANCE, (baseline, peak, after)
        assert peak.fds > baseline.fds  # the flood did reach the process
        assert proc.poll() is None
        assert await echo_ok(port, legit, source=LEGIT_SOURCE)  # still serving afterwards
    finally:
        stop_now(proc)
        with trio.move_on_after(10):
            await proc.wait()
    log = (tmp_path / "switch-flood.log").read_text(errors="replace")
    assert "Traceback" not in log
