"""The pieces of ``serve --workers`` in one process: shared ports, the merged metrics page, the
supervisor's health routes over fake workers, and the configuration and command-line bounds.
The real processes are test_workers.py's."""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families
from test_health import aget

from switch import health, metrics, testing
from switch.__main__ import main
from switch.config import Config, ConfigError, ListenerConfig, ServerConfig, from_mapping
from switch.server import open_reuseport_listeners
from switch.supervisor import Supervisor, backoff, reserve_ports, worker_ports


async def test_two_listeners_share_a_reserved_port_and_both_accept() -> None:
    cfg = Config(listeners=(ListenerConfig(name="visa", host="127.0.0.1", port=0),))
    held = reserve_ports(cfg)
    try:
        port = held.ports["visa"]
        assert port > 0
        a = await open_reuseport_listeners(port, host="127.0.0.1")
        b = await open_reuseport_listeners(port, host="127.0.0.1")
        listeners = [*a, *b]
        assert {x.socket.getsockname()[1] for x in listeners} == {port}
        accepted: list[int] = []

        async def accept(index: int) -> None:
            stream = await listeners[index].accept()
            accepted.append(index)
            await stream.aclose()

        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                for i in range(len(listeners)):
                    nursery.start_soon(accept, i)
                # Connections until each listener took one (the kernel hashes each one).
                streams = []
                for _ in range(200):
                    if len(accepted) == len(listeners):
                        break
                    streams.append(await trio.open_tcp_stream("127.0.0.1", port))
                    await trio.sleep(0.005)
                for s in streams:
                    await s.aclose()
        assert sorted(accepted) == list(range(len(listeners)))
        for x in listeners:
            await x.aclose()
    finally:
        held.close()


def test_a_port_held_without_reuseport_is_refused() -> None:
    with socket.socket() as plain:
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        port = plain.getsockname()[1]
        cfg = Config(listeners=(ListenerConfig(host="127.0.0.1", port=port),))
        with pytest.raises(OSError, match="in use"):
            reserve_ports(cfg)


def _page(registry_text: bytes) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(registry_text.decode()):
        out[family.name] = [(s.name, dict(s.labels), s.value) for s in family.samples]
    return out


def test_merged_page_labels_every_sample_with_its_worker() -> None:
    metrics.configure_workers(2)
    metrics.REQUESTS.labels("visa", "0100", "00").inc()
    worker_page = metrics.exposition()
    merged = _page(metrics.merge_expositions({"0": worker_page, "1": worker_page}))
    workers_of = {
        name: {labels.get("worker") for _, labels, _ in samples} for name, samples in merged.items()
    }
    assert all(None not in seen for seen in workers_of.values()), workers_of
    requests = merged["cardswitch_requests"]
    assert {labels["worker"] for _, labels, _ in requests} == {"0", "1"}
    # Same page twice: each worker's samples equal the page's own.
    own = _page(worker_page)["cardswitch_requests"]
    for worker in ("0", "1"):
        mine = [(n, {k: v for k, v in lb.items() if k != "worker"}, v)
                for n, lb, v in requests if lb["worker"] == worker]  # fmt: skip
        assert sorted(mine, key=repr) == sorted(own, key=repr)
    assert workers_of["process_cpu_seconds"] == {"0", "1", "supervisor"}
    assert workers_of["cardswitch_worker_restarts"] == {"0", "1"}


@contextmanager
def _http(readiness: health.Readiness, **kwargs: object) -> Iterator[health.HealthServer]:
    server = health.HealthServer("127.0.0.1", 0, health.Heartbeat(), readiness, **kwargs)  # type: ignore[arg-type]
    server.start()
    try:
        yield server
    finally:
        server.close()


async def test_supervisor_routes_name_the_failing_worker() -> None:
    good, bad = health.Readiness(["hsm"]), health.Readiness(["hsm"])
    good.record("hsm", None)
    bad.record("hsm", "HsmTimeout: no answer")
    running = True
    with _http(good) as w0, _http(bad) as w1:

        def workers() -> list[health.WorkerEndpoint]:
            second = health.WorkerEndpoint(1, 4242 if running else None, w1.address, 3)
            return [health.WorkerEndpoint(0, 4241, w0.address), second]

        with _http(health.Readiness([]), workers=workers) as sup:
            port = sup.address[1]
            ready = await aget(port, "/readyz")
            assert ready.status == 503
            assert ready.json()["failed"] == {"worker 1: hsm": "HsmTimeout: no answer"}
            alive = await aget(port, "/healthz")
            assert alive.status == 200 and alive.json()["workers"]["1"]["restarts"] == 3
            status = await aget(port, "/status")
            assert status.status == 200 and status.json()["ready"] is False

            running = False
            for path in ("/healthz", "/readyz"):
                reply = await aget(port, path)
                assert reply.status == 503
                assert reply.json()["failed"]["worker 1"].startswith("NotRunning")
            page = _page((await aget(port, "/metrics")).body)
            up = {lb["worker"]: v for _, lb, v in page["cardswitch_worker_up"]}
            assert up == {"0": 1.0, "1": 0.0}


def test_workers_bounds_in_the_configuration() -> None:
    assert Config().server == ServerConfig(workers=1)
    assert from_mapping({"server": {"workers": 4}}).server.workers == 4
    for bad in (0, 65):
        with pytest.raises(ConfigError, match=r"server\.workers"):
            from_mapping({"server": {"workers": bad}})


def test_serve_refuses_workers_out_of_range(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = testing.write_config(Config(), tmp_path / "switch.toml")
    assert main(["serve", "--config", str(path), "--workers", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cardswitch: --workers must be between 1 and 64, got 0"]


def test_small_parsers() -> None:
    assert worker_ports(["visa=1", "a=b=2"]) == {"visa": 1, "a=b": 2}
    with pytest.raises(ValueError, match="NAME=PORT"):
        worker_ports(["visa"])
    assert backoff(0) < backoff(1) < backoff(3) and backoff(50) == backoff(60)


async def test_the_health_threads_read_worker_pids_without_touching_the_process() -> None:
    """Regression (found by ``make soak``'s worker kills on PostgreSQL): the supervisor's
    /readyz ran ``trio.Process.returncode`` from an HTTP thread; on a worker that had just
    died that closes the pidfd, which only the trio thread may do, so the route raised and
    the connection closed without an answer. ``endpoints`` now reads plain attributes."""
    sup = Supervisor(Config(), None, 1)
    proc = await trio.lowlevel.open_process([sys.executable, "-c", "pass"])
    slot = sup._slots[0]
    slot.process, slot.pid, slot.address = proc, proc.pid, ("127.0.0.1", 1)
    # Until it has exited, leaving it unreaped (a zombie) as a worker that just died is.
    await trio.to_thread.run_sync(os.waitid, os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    (seen,) = await trio.to_thread.run_sync(sup.endpoints)
    assert (seen.pid, seen.address) == (proc.pid, ("127.0.0.1", 1))
    assert await proc.wait() == 0
