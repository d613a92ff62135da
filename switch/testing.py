"""Library code the tests and the benchmarks share: configurations on disk, switch processes,
and a whole decision engine without SoftHSM, a database file or TLS.

What lives here: ``write_config`` (a typed ``switch.config.Config`` written as the TOML the
loader reads back to an equal Config, so no test or benchmark writes TOML by hand); the
switch-process helper: ``start_switch`` runs ``python -m switch serve --config F
--ready-file R`` (or another command that writes the same ready file) as a subprocess, waits
a bounded time for the ready file and returns a ``SwitchProcess`` (pid, bound listeners),
whose ``stop`` sends SIGTERM and waits for the drain, and ``log_events`` reads back the JSON
lines of the log it was given as ``output``; ``software_engine``, the pipeline on
the software HSM (demo keys: public test keys only) and the in-memory store, provisioned
with card rows and run on a pinned clock; ``context_for``, the ``RequestContext`` a
listener's connection would give a request.

``free_port``, a loopback port that was free a moment ago, for a process to bind (a metrics
or health port, which the ready file does not report).

What does not: pytest fixtures (tests/*_fixtures.py), assertions, anything the running
switch itself uses (a software HSM and an in-memory store are never defaults). Nothing in
``switch`` outside tests and benchmarks imports this module.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import trio

from hsm.api import Hsm, KeyAlgorithm, KeyGeneration, KeyImport, KeyUsage
from hsm.carddata import HsmVault
from hsm.config import HsmConfig
from hsm.token import open_hsm
from switch.config import Config, ListenerConfig, PipelineConfig
from switch.decisions import profile
from switch.handler import RequestContext
from switch.pipeline import Pipeline
from switch.provision import CardRow, import_cards, load_keys
from switch.store.memory import MemoryStore

#: The directory that holds the ``switch`` package (put on PYTHONPATH of subprocesses).
SOURCE_ROOT = Path(__file__).resolve().parents[1]
#: Seconds a switch may take to be ready (SoftHSM login, SQLite recovery, bind) by default.
START_TIMEOUT = 30.0
#: Seconds ``SwitchProcess.stop`` waits for the drain after SIGTERM before SIGKILL.
STOP_TIMEOUT = 15.0
#: Seconds between two looks at the ready file.
_POLL_INTERVAL = 0.02

# -- configuration files --------------------------------------------------------------------

#: TOML table names of the Config fields whose documented name differs (config/switch.toml).
_TABLE_NAMES = {"listeners": "listener", "card_data": "card-data"}


def free_port() -> int:
    """A 127.0.0.1 TCP port nothing was bound to a moment ago (racy by nature: for ports a
    child process binds and does not report back, such as its metrics port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(cfg: Config, path: Path | str) -> Path:
    """Write ``cfg`` as TOML to ``path``; ``switch.config.load(path) == cfg``.

    Every key is written, so the file does not depend on the embedded defaults of the
    version that reads it. Returns the path.
    """
    out = Path(path)
    out.write_text(config_toml(cfg))
    return out


def config_toml(cfg: Config) -> str:
    """The TOML text of ``cfg`` (what ``write_config`` writes)."""
    lines: list[str] = []
    for f in dataclasses.fields(cfg):
        name = _TABLE_NAMES.get(f.name, f.name)
        value = getattr(cfg, f.name)
        tables = value if isinstance(value, tuple) else (value,)
        header = f"[[{name}]]" if isinstance(value, tuple) else f"[{name}]"
        for table in tables:
            lines.append(header)
            lines += [
                f"{g.name} = {_toml_value(getattr(table, g.name))}"
                for g in dataclasses.fields(table)
            ]
            lines.append("")
    return "\n".join(lines)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, Path):
        return _toml_string(str(value))
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML form for {type(value).__name__}")


#: Escapes of a TOML basic string that have a short form.
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n"}
_SHORT_ESCAPES.update({"\f": "\\f", "\r": "\\r"})


def _toml_string(text: str) -> str:
    """``text`` as a TOML basic string (control characters escaped)."""
    out = []
    for ch in text:
        if ch in _SHORT_ESCAPES:
            out.append(_SHORT_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


# -- switch processes -----------------------------------------------------------------------


class SwitchStartError(RuntimeError):
    """The switch process exited, or did not write its ready file in time."""


@dataclass(frozen=True)
class BoundListener:
    """One listener as ``serve --ready-file`` reports it."""

    name: str
    host: str
    port: int


@dataclass(frozen=True)
class Ready:
    """The content of a ready file: the switch's pid and what it listens on."""

    pid: int
    listeners: tuple[BoundListener, ...]

    @property
    def port(self) -> int:
        """The port of the first listener."""
        return self.listeners[0].port


def read_ready(path: Path | str) -> Ready:
    """Parse a ready file written by ``cardswitch serve --ready-file``."""
    raw = json.loads(Path(path).read_text())
    listeners = tuple(
        BoundListener(str(x["name"]), str(x["host"]), int(x["port"])) for x in raw["listeners"]
    )
    return Ready(int(raw["pid"]), listeners)


def serve_command(
    config: Path | None, ready_file: Path, *, prefix: Sequence[str] = ()
) -> list[str]:
    """``[*prefix, python, -m, switch, serve, --config F, --ready-file R]``.

    ``config`` None leaves ``--config`` out (the switch then reads ``config/switch.toml`` of
    its working directory); ``prefix`` runs it under another program (``taskset -c 1``).
    """
    cmd = [*prefix, sys.executable, "-m", "switch", "serve"]
    if config is not None:
        cmd += ["--config", str(config)]
    return [*cmd, "--ready-file", str(ready_file)]


def switch_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with the source tree first on PYTHONPATH, plus ``extra``."""
    path = os.environ.get("PYTHONPATH")
    python_path = str(SOURCE_ROOT) + (os.pathsep + path if path else "")
    return {**os.environ, "PYTHONPATH": python_path, **(extra or {})}


@dataclass(frozen=True)
class SwitchProcess:
    """A switch running as a subprocess, ready to accept connections."""

    process: trio.Process
    ready: Ready

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def port(self) -> int:
        """The port of the first listener."""
        return self.ready.port

    async def stop(self, grace: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, then wait up to ``grace`` s for the drain; SIGKILL after that.

        Returns:
            The exit status, or None when the process had to be killed.
        """
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(grace):
            return await self.process.wait()
        self.kill()
        await self.process.wait()
        return None

    def kill(self) -> None:
        """SIGKILL the process if it still runs (a crash; no drain)."""
        if self.process.poll() is None:
            self.process.kill()


def log_events(path: Path) -> list[dict[str, Any]]:
    """The JSON log lines of a switch process (the file ``start_switch`` wrote its ``output``
    to), decoded, in order; other lines (a traceback, a tool's text) are skipped."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


async def start_switch(
    config: Path | None,
    ready_file: Path,
    *,
    command: Sequence[str] | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    output: int | IO[Any] | None = subprocess.DEVNULL,
    ready_within: float = START_TIMEOUT,
) -> SwitchProcess:
    """Start a switch process and return it once its ready file says it accepts.

    Args:
        config: its configuration file (None: ``config/switch.toml`` of ``cwd``).
        ready_file: where it reports its listeners; removed first if present.
        command: the argv to run instead of ``serve_command(config, ready_file)``; it must
            write ``ready_file`` the way ``serve --ready-file`` does.
        env: its environment (default: ``switch_env()``).
        cwd: its working directory.
        output: where its stdout and stderr go (a file, ``subprocess.DEVNULL``, or None to
            inherit ours).
        ready_within: seconds to wait for the ready file.

    Raises:
        SwitchStartError: it exited first, or was not ready within ``ready_within`` (then it is
            killed).
    """
    await trio.Path(ready_file).unlink(missing_ok=True)
    argv = list(command) if command is not None else serve_command(config, ready_file)
    process = await trio.lowlevel.open_process(
        argv,
        env=dict(env) if env is not None else switch_env(),
        cwd=cwd,
        stdout=output,
        stderr=subprocess.STDOUT if output is not None else None,
    )
    try:
        with trio.fail_after(ready_within):
            ready = await _wait_ready(ready_file, process)
    except trio.TooSlowError:
        process.kill()
        await process.wait()
        raise SwitchStartError(f"switch not ready after {ready_within:g} s: {argv}") from None
    except BaseException:
        process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
        raise
    return SwitchProcess(process, ready)


@asynccontextmanager
async def switch_process(
    config: Path | None, ready_file: Path, **kwargs: Any
) -> AsyncIterator[SwitchProcess]:
    """``start_switch`` for the duration of the block, then ``stop`` (SIGTERM, drain)."""
    proc = await start_switch(config, ready_file, **kwargs)
    try:
        yield proc
    finally:
        with trio.CancelScope(shield=True):
            await proc.stop()


async def _wait_ready(path: Path, process: trio.Process) -> Ready:
    ready = trio.Path(path)
    while not await ready.exists():
        if process.poll() is not None:
            raise SwitchStartError(f"switch exited with {process.returncode} before it was ready")
        await trio.sleep(_POLL_INTERVAL)
    return await trio.to_thread.run_sync(read_ready, path)


# -- a decision engine without SoftHSM, database file or TLS ----------------------------------

#: The demo key set of the repository (public test keys).
DEMO_KEYS = Path(__file__).resolve().parents[1] / "config" / "demo" / "keys.json"
#: Labels of the card-data keys the software engine generates.
FINGERPRINT_KEY = "test-pan-fingerprint"
ENCRYPTION_KEY = "test-pan-encryption"
#: The moment the pinned clock shows unless told otherwise.
PINNED_NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@dataclass
class SoftwareEngine:
    """A pipeline over the software HSM and the in-memory store, with what tests look at."""

    pipeline: Pipeline
    store: MemoryStore
    hsm: Hsm
    config: Config


async def software_engine(
    rows: Sequence[CardRow],
    *,
    network: str = "visa",
    pipeline: PipelineConfig | None = None,
    hsm_wrapper: Callable[[Hsm], Hsm] | None = None,
    clock: Callable[[], datetime] = lambda: PINNED_NOW,
) -> SoftwareEngine:
    """Provision ``rows`` into a fresh in-memory store and return the engine over them.

    Args:
        rows: card rows (``switch.provision.load_rows``).
        network: the profile of the one listener.
        pipeline: budget and stand-in policy.
        hsm_wrapper: wraps the HSM the pipeline talks to (a slow or failing HSM); the
            provisioning talks to the software HSM itself.
        clock: the pipeline's clock (expiry, velocity periods).
    """
    hsm = open_hsm(HsmConfig(backend="software"))
    for key in load_keys(DEMO_KEYS):
        algorithm = KeyAlgorithm(key.algorithm) if key.algorithm else None
        value = bytes.fromhex(key.clear_hex)
        await hsm.import_key(KeyImport(key.label, KeyUsage(key.usage), value, algorithm))
    await hsm.generate_key(KeyGeneration(FINGERPRINT_KEY, KeyUsage.HMAC))
    await hsm.generate_key(KeyGeneration(ENCRYPTION_KEY, KeyUsage.DATA))
    vault = HsmVault(hsm, FINGERPRINT_KEY, ENCRYPTION_KEY)
    store = MemoryStore()
    report = await import_cards(store, hsm, vault, rows)
    if not report.ok:
        raise ValueError(f"test cards not provisioned: {report.failures}")
    listener = ListenerConfig(name=network, network=network, port=0, zpk="demo-zpk")
    cfg = Config(listeners=(listener,), pipeline=pipeline or PipelineConfig())
    engine_hsm = hsm_wrapper(hsm) if hsm_wrapper else hsm
    engine = Pipeline(cfg, store=store, hsm=engine_hsm, vault=vault, clock=clock)
    return SoftwareEngine(engine, store, hsm, cfg)


def context_for(
    cfg: Config, *, listener: int = 0, received_at: float | None = None
) -> RequestContext:
    """The context of a request read now (or at ``received_at``) on a listener of ``cfg``."""
    lst = cfg.listeners[listener]
    when = trio.current_time() if received_at is None else received_at
    return RequestContext(lst, profile(lst.network), frozenset({"test-acquirer"}), when)
