"""The README stays true: its demo `cardswitch send` lines, against a switch set up as
`make run` sets it up (dev-setup, then serve), all as real processes in a scratch directory."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import trio

from switch import config, testing

REPO = Path(__file__).resolve().parents[1]
#: A README demo line: the command (with continuations joined) and the DE39 its comment expects.
_COMMAND = re.compile(r"^\.venv/bin/cardswitch send .*$")
_EXPECT = re.compile(r"-> (?:\d+\w*, )?DE39 (\w\w)")


def readme_commands() -> list[tuple[list[str], str | None]]:
    """(argv after 'cardswitch', expected DE39 or None) for each demo line of the README."""
    lines = (REPO / "README.md").read_text().splitlines()
    out: list[tuple[list[str], str | None]] = []
    expected: str | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            found = _EXPECT.search(line)
            expected = found.group(1) if found else expected
        elif _COMMAND.match(line):
            text = line
            while text.endswith("\\"):
                i += 1
                text = text[:-1] + " " + lines[i].strip()
            out.append((shlex.split(text)[1:], expected))
            expected = None
        i += 1
    return out


def _scratch_config(root: Path) -> None:
    """The repository's config/ in ``root``, its switch.toml on ephemeral ports."""
    shutil.copytree(REPO / "config", root / "config")
    path = root / "config" / "switch.toml"
    cfg = config.load(path)
    cfg = replace(
        cfg,
        listeners=tuple(replace(lst, port=0) for lst in cfg.listeners),
        metrics=replace(cfg.metrics, port=0),
    )
    testing.write_config(cfg, path)


def _run(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "switch", *args],
        cwd=cwd,
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_readme_has_the_demo_lines() -> None:
    expectations = [e for _, e in readme_commands()]
    assert len(expectations) >= 5
    assert {"00", "51", "82"} <= set(filter(None, expectations))


async def test_readme_demo_lines_against_a_dev_setup_switch(tmp_path: Path) -> None:
    await trio.to_thread.run_sync(_scratch_config, tmp_path)
    setup = await trio.to_thread.run_sync(_run, ["dev-setup"], tmp_path)
    assert setup.returncode == 0, setup.stderr
    assert "demo cards" in setup.stdout
    log = tmp_path / "switch.log"
    with log.open("wb") as out:
        switch = await testing.start_switch(
            None, tmp_path / "ready.json", cwd=tmp_path, output=out, ready_within=30
        )
        try:
            for readme_argv, expected in readme_commands():
                argv = [readme_argv[0], "--port", str(switch.port), *readme_argv[1:]]
                result = await trio.to_thread.run_sync(_run, argv, tmp_path)
                assert result.returncode == 0, (argv, result.stderr)
                answer = json.loads(result.stdout)
                assert "4123456789012345" not in result.stdout  # the PAN is printed masked
                if expected is not None:
                    assert answer["response_code"] == expected, (argv, answer)
        finally:
            assert await switch.stop() == 0
    # The engine's switch logs its start and its end, and no PAN in between.
    text = log.read_text()
    assert "4123456789012345" not in text and "4666655554444111" not in text
    events = [e["event"] for e in testing.log_events(log)]
    assert events.count("startup_heap_frozen") == 1
    assert events[-1] == "exit", events[-5:]
