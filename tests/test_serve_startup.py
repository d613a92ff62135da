"""``cardswitch serve`` refuses to start on an HSM configuration that names what does not exist.

Each test runs the real command (``python -m switch serve --config F``) against a SoftHSM token
that ``cardswitch dev-setup`` made in a temporary directory, with one configuration key
wrong: a mistyped token label, a listener ZPK or a card-data key that is not in the token, a
SoftHSM configuration file that is not there, a PKCS#11 module that is not installed. Each
must give exactly one line on stderr naming the key, exit status 2 (``ExitStatus.USAGE``), no
traceback, and leave the token directory as it was (serve creates no token and no key; only
dev-setup and ``hsm init`` do). A control run with the right configuration starts.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from hsm.config import CardDataConfig, HsmConfig
from switch import testing
from switch.cli.runner import ExitStatus
from switch.config import Config, ListenerConfig, MetricsConfig, StoreConfig, TlsConfig
from switch.pki import PkiPaths

REPO = Path(__file__).resolve().parents[1]
DEMO_KEYS = REPO / "config" / "demo" / "keys.json"
#: Seconds one command may take (dev-setup logs in, generates keys, writes the store).
COMMAND_TIMEOUT = 60
#: Seconds serve may take to start in the control run.
START_TIMEOUT = 20.0

Snapshot = dict[str, str]
#: SoftHSM's file holding the token's own information (label, flags, PINs).
TOKEN_RECORD = "token.object"


def base_config(var: Path, pki: PkiPaths) -> Config:
    return Config(
        listeners=(ListenerConfig(name="visa", host="127.0.0.1", port=0, zpk="demo-zpk"),),
        tls=TlsConfig(ca=pki.ca, cert=pki.server_cert, key=pki.server_key),
        hsm=HsmConfig(softhsm_conf=var / "softhsm" / "softhsm2.conf", timeout=5.0),
        card_data=CardDataConfig(fingerprint_key="start-fp", encryption_key="start-pan"),
        store=StoreConfig(path=var / "cardswitch.db"),
        metrics=MetricsConfig(port=0),
    )


async def run(*argv: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(COMMAND_TIMEOUT):
        return await trio.run_process(
            [sys.executable, "-m", "switch", *argv],
            cwd=cwd,
            env=testing.switch_env(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


def snapshot(directory: Path) -> Snapshot:
    """Every file and directory under ``directory`` and the SHA-256 of each file's content
    (not the times: SoftHSM rewrites its lock and generation files, unchanged, when it reads).

    ``token.object`` (the token's own record) is named but not hashed: a login rewrites it.
    Every key is a file of its own, so a created token or key is a new path.
    """
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
        if p.is_file() and p.name != TOKEN_RECORD
        else p.name
        for p in sorted(directory.rglob("*"))
    }


@pytest.fixture(scope="module")
def var(tmp_path_factory: pytest.TempPathFactory, pki: PkiPaths) -> Path:
    """A dev token with the demo keys and the card-data keys, made by ``dev-setup``."""
    var = tmp_path_factory.mktemp("var-start")
    cards = var / "cards.json"
    cards.write_text(json.dumps({"cards": []}))
    config = testing.write_config(base_config(var, pki), var / "setup.toml")
    argv = ["dev-setup", "--config", str(config), "--keys", str(DEMO_KEYS), "--cards", str(cards)]
    done = trio.run(lambda: run(*argv, cwd=var))
    assert done.returncode == 0, done.stdout + done.stderr
    return var


async def refused(cfg: Config, tmp_path: Path, var: Path) -> str:
    """Run serve on ``cfg``; assert exit 2, one line, no traceback, token dir unchanged."""
    tokens = var / "softhsm" / "tokens"
    before = snapshot(tokens)
    config = testing.write_config(cfg, tmp_path / "switch.toml")
    done = await run("serve", "--config", str(config), cwd=tmp_path)
    out, err = done.stdout.decode(), done.stderr.decode()
    assert "Traceback" not in out + err, out + err
    assert done.returncode == ExitStatus.USAGE, out + err
    assert int(ExitStatus.USAGE) == 2
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("cardswitch: "), err
    assert snapshot(tokens) == before
    assert not (tmp_path / "var").exists()  # nothing created relative to the working directory
    return lines[0]


async def test_a_mistyped_token_label_is_refused_and_no_token_is_created(
    pki: PkiPaths, tmp_path: Path, var: Path
) -> None:
    cfg = base_config(var, pki)
    line = await refused(
        replace(cfg, hsm=replace(cfg.hsm, token_label="cardswitch-dve")), tmp_path, var
    )
    assert line.startswith("cardswitch: hsm.token_label: ") and "'cardswitch-dve'" in line


async def test_a_missing_listener_zpk_is_refused(pki: PkiPaths, tmp_path: Path, var: Path) -> None:
    cfg = base_config(var, pki)
    listener = replace(cfg.listeners[0], zpk="demo-zkp")
    line = await refused(replace(cfg, listeners=(listener,)), tmp_path, var)
    assert line.startswith("cardswitch: listener[visa].zpk: ") and "'demo-zkp'" in line


async def test_a_key_of_another_usage_is_refused(pki: PkiPaths, tmp_path: Path, var: Path) -> None:
    cfg = base_config(var, pki)
    listener = replace(cfg.listeners[0], zpk="demo-cvk")  # exists, but is a CVK
    line = await refused(replace(cfg, listeners=(listener,)), tmp_path, var)
    assert line.startswith("cardswitch: listener[visa].zpk: ")
    assert "'demo-cvk'" in line and "cvk" in line and "zpk" in line


@pytest.mark.parametrize("field", ["fingerprint_key", "encryption_key"])
async def test_a_missing_card_data_key_is_refused(
    pki: PkiPaths, tmp_path: Path, var: Path, field: str
) -> None:
    cfg = base_config(var, pki)
    card_data = (
        replace(cfg.card_data, fingerprint_key="not-in-the-token")
        if field == "fingerprint_key"
        else replace(cfg.card_data, encryption_key="not-in-the-token")
    )
    line = await refused(replace(cfg, card_data=card_data), tmp_path, var)
    assert line.startswith(f"cardswitch: card-data.{field}: ") and "'not-in-the-token'" in line


async def test_a_missing_softhsm_configuration_is_refused(
    pki: PkiPaths, tmp_path: Path, var: Path
) -> None:
    cfg = base_config(var, pki)
    conf = tmp_path / "elsewhere" / "softhsm2.conf"
    line = await refused(replace(cfg, hsm=replace(cfg.hsm, softhsm_conf=conf)), tmp_path, var)
    assert line.startswith("cardswitch: hsm.softhsm_conf: ") and str(conf) in line
    assert not (tmp_path / "elsewhere").exists()


async def test_softhsm_not_installed_names_the_module_and_the_package(
    pki: PkiPaths, tmp_path: Path, var: Path
) -> None:
    cfg = base_config(var, pki)
    module = tmp_path / "lib" / "libsofthsm2.so"  # where no library is
    line = await refused(replace(cfg, hsm=replace(cfg.hsm, module=module)), tmp_path, var)
    assert line.startswith("cardswitch: hsm.module: ")
    assert str(module) in line and "softhsm2" in line.removeprefix(
        f"cardswitch: hsm.module: {module}"
    )


async def test_the_right_configuration_starts(pki: PkiPaths, tmp_path: Path, var: Path) -> None:
    """The control: the token and keys the other tests break are the ones serve needs."""
    config = testing.write_config(base_config(var, pki), tmp_path / "switch.toml")
    async with testing.switch_process(
        config, tmp_path / "ready.json", ready_within=START_TIMEOUT
    ) as proc:
        assert proc.port != 0
    assert proc.process.returncode == 0
