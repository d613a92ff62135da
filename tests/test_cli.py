"""The ``cardswitch`` command line as an operator meets it: each test runs the real command
in a subprocess and checks its one stderr line, its exit status and that no traceback shows.

Exit statuses are those of ``switch.cli.runner.ExitStatus`` (documented in README).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import trio
from server_fixtures import make_config, running_server

from switch import testing
from switch.__main__ import build_parser
from switch.cli.runner import ExitStatus
from switch.config import Config, ListenerConfig, MetricsConfig, StoreConfig, TlsConfig
from switch.pki import PkiPaths, init_pki
from switch.testing import switch_env, write_config

#: Seconds one command may take.
CLI_TIMEOUT = 60


async def cardswitch(*argv: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m switch ARGV`` in ``cwd`` and capture its output."""
    with trio.fail_after(CLI_TIMEOUT):
        return await trio.run_process(
            [sys.executable, "-m", "switch", *argv],
            cwd=cwd,
            env=switch_env(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


def one_line(done: subprocess.CompletedProcess[bytes]) -> str:
    """The single ``cardswitch: ...`` line on stderr (asserted to be the only output there)."""
    err = done.stderr.decode()
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cardswitch: "), err
    return lines[0]


@pytest.fixture
def free_port() -> int:
    """A loopback port nothing listens on (bound then released)."""
    return testing.free_port()


async def test_version_and_help_with_defaults_and_examples(tmp_path: Path) -> None:
    version = await cardswitch("--version", cwd=tmp_path)
    assert version.returncode == 0
    assert version.stdout.decode().startswith("cardswitch ")
    send_help = (await cardswitch("send", "--help", cwd=tmp_path)).stdout.decode()
    assert "examples:" in send_help and "cardswitch send auth --pan" in send_help
    assert "(default: 10.0)" in send_help
    auth_help = (await cardswitch("send", "auth", "--help", cwd=tmp_path)).stdout.decode()
    assert "(default: 978)" in auth_help and "(default: 0100)" in auth_help
    serve_help = (await cardswitch("serve", "--help", cwd=tmp_path)).stdout.decode()
    assert "--ready-file PATH" in serve_help and "config/switch.toml" in serve_help


async def test_a_bad_config_is_one_line_and_usage(tmp_path: Path) -> None:
    done = await cardswitch("serve", "--config", str(tmp_path / "none.toml"), cwd=tmp_path)
    assert done.returncode == ExitStatus.USAGE
    assert one_line(done) == f"cardswitch: {tmp_path / 'none.toml'}: file not found"


@pytest.mark.parametrize("before_kind", [True, False], ids=["before-kind", "after-kind"])
async def test_send_refused_takes_options_before_or_after_the_kind(
    pki: PkiPaths, tmp_path: Path, free_port: int, before_kind: bool
) -> None:
    options = ["--port", str(free_port), "--pki-dir", str(pki.ca.parent)]
    argv = ["send", *options, "echo"] if before_kind else ["send", "echo", *options]
    done = await cardswitch(*argv, cwd=tmp_path)
    assert done.returncode == ExitStatus.REFUSED
    assert one_line(done) == f"cardswitch: connection to 127.0.0.1:{free_port} refused"


async def test_send_timeout_when_the_switch_never_answers(pki: PkiPaths, tmp_path: Path) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, silent, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        argv = ["send", "--port", str(port), "--pki-dir", str(pki.ca.parent), "--timeout", "0.5"]
        done = await cardswitch(*argv, "echo", cwd=tmp_path)
        nursery.cancel_scope.cancel()
    assert done.returncode == ExitStatus.TIMEOUT
    assert one_line(done) == f"cardswitch: no answer from 127.0.0.1:{port} within 0.5 s"


async def test_send_tls_failure_with_another_ca(pki: PkiPaths, tmp_path: Path) -> None:
    other = init_pki(tmp_path / "other-pki")
    async with running_server(make_config(pki)) as (_, port):
        argv = ["send", "echo", "--port", str(port), "--pki-dir", str(other.ca.parent)]
        done = await cardswitch(*argv, cwd=tmp_path)
    assert done.returncode == ExitStatus.TLS
    line = one_line(done)
    assert line.startswith(f"cardswitch: TLS handshake with 127.0.0.1:{port} failed: ")
    assert "CERTIFICATE_VERIFY_FAILED" in line


async def test_send_closed_by_an_allow_list_refusal(pki: PkiPaths, tmp_path: Path) -> None:
    cfg = make_config(pki, allowed_clients=("someone-else",))
    async with running_server(cfg) as (_, port):
        argv = ["send", "echo", "--port", str(port), "--pki-dir", str(pki.ca.parent)]
        done = await cardswitch(*argv, cwd=tmp_path)
    assert done.returncode == ExitStatus.CLOSED
    assert one_line(done).startswith(
        f"cardswitch: 127.0.0.1:{port} closed the connection without an answer"
    )


async def test_send_answer_is_printed_and_ok(pki: PkiPaths, tmp_path: Path) -> None:
    async with running_server(make_config(pki)) as (_, port):
        argv = ["send", "--pki-dir", str(pki.ca.parent), "signon", "--port", str(port)]
        done = await cardswitch(*argv, cwd=tmp_path)
    assert done.returncode == ExitStatus.OK, done.stderr
    assert b'"mti": "0810"' in done.stdout and done.stderr == b""


async def test_serve_on_a_busy_port_names_it(pki: PkiPaths, tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = Config(
            listeners=(ListenerConfig(port=port),),
            tls=TlsConfig(ca=pki.ca, cert=pki.server_cert, key=pki.server_key),
            metrics=MetricsConfig(port=0),
        )
        path = write_config(cfg, tmp_path / "switch.toml")
        done = await cardswitch("serve", "--no-engine", "--config", str(path), cwd=tmp_path)
    assert done.returncode == ExitStatus.UNAVAILABLE
    assert (
        one_line(done) == f"cardswitch: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


async def test_cards_list_into_a_closed_pipe_exits_quietly(tmp_path: Path) -> None:
    path = write_config(Config(store=StoreConfig(path=tmp_path / "s.db")), tmp_path / "s.toml")
    argv = [sys.executable, "-m", "switch", "cards", "list", "--config", str(path)]
    # The reader is gone before the command writes: what `cards list | head -0` does.
    with trio.fail_after(CLI_TIMEOUT):
        proc = await trio.lowlevel.open_process(
            argv, cwd=tmp_path, env=switch_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert proc.stdout is not None and proc.stderr is not None
        await proc.stdout.aclose()
        err = b""
        async for chunk in proc.stderr:
            err += chunk
        status = await proc.wait()
    assert (status, err) == (ExitStatus.OK, b"")


def test_every_option_of_every_command_has_help() -> None:
    def missing(parser: argparse.ArgumentParser, path: str) -> Iterator[str]:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from missing(sub, f"{path} {name}")
            elif not action.help:
                yield f"{path} {'/'.join(action.option_strings) or action.dest}"

    assert list(missing(build_parser(), "cardswitch")) == []
