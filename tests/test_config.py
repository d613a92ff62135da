"""Configuration: typed, strict, and every error one line naming the file and the key."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from switch.__main__ import main
from switch.config import Config, ConfigError, load
from switch.testing import write_config

REPO = Path(__file__).resolve().parents[1]


def test_shipped_default_equals_the_embedded_defaults_it_documents() -> None:
    cfg = load(REPO / "config" / "switch.toml")
    defaults = Config()
    # The file spells out the defaults; only the demo ZPK label differs on purpose.
    assert cfg.listeners[0].zpk == "demo-zpk"
    assert cfg.tls == defaults.tls
    assert cfg.store == defaults.store
    assert cfg.pipeline == defaults.pipeline
    assert (cfg.listeners[0].host, cfg.listeners[0].port) == ("127.0.0.1", 8583)
    assert cfg.listeners[0].completion_mtis == defaults.listeners[0].completion_mtis == ("0220",)


@pytest.mark.parametrize(
    ("text", "key", "message"),
    [
        ("[[listener]]\nprot = 1\n", "listener[0].prot", "unknown key"),
        ('[[listener]]\nport = "8583"\n', "listener[0].port", "expected an integer"),
        ('[[listener]]\nheader = "ascii2"\n', "listener[0].header", "must be one of"),
        ("[pipeline]\nbudget = true\n", "pipeline.budget", "expected a number"),
        ("[pipeline]\nbudget = 0\n", "pipeline.budget", "must be positive"),
        ("[events]\npublishers = 0\n", "events.publishers", "must be 1 to 32"),
        ("[nonsense]\nx = 1\n", "nonsense", "unknown key"),
        ("[tls]\nca = 5\n", "tls.ca", "expected a path string"),
        ("[[listener]]\nport = 70000\n", "listener[0].port", "out of range"),
        (
            '[[listener]]\ncompletion_mtis = ["0120", "0100"]\n',
            "listener[0].completion_mtis[1]",
            "must be one of '0120', '0220'",
        ),
        ('[[listener]]\ncompletion_mtis = "0120"\n', "listener[0].completion_mtis", "array"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, text: str, key: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load(path)
    line = str(info.value)
    assert "\n" not in line
    assert line.startswith(f"{path}: {key}: ")
    assert message in line


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[listener\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad)


def test_cli_exits_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[store]\nbatch_max = "many"\n')
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"cardswitch: {path}: store.batch_max: expected an integer, got a string"


def test_cli_process_exit_status_for_missing_file(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "switch", "serve", "--config", str(tmp_path / "nope.toml")],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"cardswitch: {tmp_path / 'nope.toml'}: file not found"
    ]


def test_container_config_differs_only_in_bind_addresses() -> None:
    local = load(REPO / "config" / "switch.toml")
    container = load(REPO / "config" / "container.toml")
    every_interface = "0.0.0.0"  # noqa: S104 - what the container must bind
    assert container.listeners[0].host == every_interface
    assert container.metrics.host == every_interface
    assert replace(container.listeners[0], host="127.0.0.1") == local.listeners[0]
    assert replace(container, listeners=local.listeners, metrics=local.metrics) == local


def test_completion_mtis_load_and_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[[listener]]\ncompletion_mtis = ["0120", "0220"]\n')
    cfg = load(path)
    assert cfg.listeners[0].completion_mtis == ("0120", "0220")
    assert load(write_config(cfg, tmp_path / "again.toml")) == cfg
