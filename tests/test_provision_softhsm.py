"""`cards import` on the real path: a SoftHSM2 token through PKCS#11 (own SOFTHSM2_CONF in a
tmp dir), demo keys imported with `keys import`, then `cards import`, `cards list` and
`accounts show`, each in its own process as an operator runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hsm.config import HsmConfig
from switch.config import Config, StoreConfig
from switch.testing import write_config

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "config" / "demo"
SOFTHSM = Path("/usr/lib/softhsm/libsofthsm2.so")
#: Seconds one CLI process may take (token creation included).
CLI_TIMEOUT = 60

#: Runs the provisioning commands as `cardswitch` dispatches them; the full dispatcher also
#: imports modules of other areas, which this test does not depend on.
_RUNNER = """
import argparse, sys
import switch.cli.provision
parser = argparse.ArgumentParser(prog="cardswitch")
switch.cli.provision.register(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
sys.exit(args.func(args))
"""
#: Creates the token (hsm.token.ensure_hsm), imports the demo keys and generates the card-data
#: keys the configuration names, through the Hsm interface.
_SETUP = """
import sys, trio
from pathlib import Path
from hsm.api import KeyAlgorithm, KeyUsage, KeyGeneration, KeyImport
from hsm.token import ensure_hsm
from switch.config import load
from switch.provision import load_keys

async def main(cfg_path, keys_path):
    cfg = load(cfg_path)
    hsm = ensure_hsm(cfg.hsm)
    try:
        for key in load_keys(keys_path):
            algorithm = KeyAlgorithm(key.algorithm) if key.algorithm else None
            value = bytes.fromhex(key.clear_hex)
            await hsm.import_key(KeyImport(key.label, KeyUsage(key.usage), value, algorithm))
        await hsm.generate_key(KeyGeneration(cfg.card_data.fingerprint_key, KeyUsage.HMAC))
        await hsm.generate_key(KeyGeneration(cfg.card_data.encryption_key, KeyUsage.DATA))
    finally:
        await hsm.aclose()

trio.run(main, Path(sys.argv[1]), Path(sys.argv[2]))
"""

pytestmark = pytest.mark.skipif(not SOFTHSM.exists(), reason="softhsm2 is not installed")


def cardswitch(config: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _RUNNER, *argv, "--config", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def test_cards_import_through_softhsm_then_list_and_show(tmp_path: Path) -> None:
    cfg = Config(
        hsm=HsmConfig(
            softhsm_conf=tmp_path / "softhsm" / "softhsm2.conf", token_label="provision-test"
        ),
        store=StoreConfig(path=tmp_path / "cardswitch.db"),
    )
    config = write_config(cfg, tmp_path / "switch.toml")
    setup = subprocess.run(
        [sys.executable, "-c", _SETUP, str(config), str(DEMO / "keys.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )
    assert setup.returncode == 0, setup.stderr

    imported = cardswitch(config, "cards", "import", str(DEMO / "cards.json"))
    assert imported.returncode == 0, imported.stderr
    assert "cards created: 6, updated: 0, accounts created: 5, failed: 0" in imported.stdout

    listed = cardswitch(config, "cards", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    cards = {c["pan"]: c for c in map(json.loads, listed.stdout.splitlines())}
    assert cards["433332******1222"]["status"] == "blocked"
    assert cards["112233******7718"]["pin_method"] == "pvv"
    assert cards["499998******7000"]["pin_method"] == "ibm3624"

    shown = cardswitch(config, "accounts", "show", "demo-acct-small", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["available_balance"] == 100

    again = cardswitch(config, "cards", "import", str(DEMO / "cards.json"))
    assert "cards created: 0, updated: 6, accounts created: 0, failed: 0" in again.stdout

    everything = "".join(p.stdout + p.stderr for p in (imported, listed, shown, again))
    database = (tmp_path / "cardswitch.db").read_bytes()
    for row in json.loads((DEMO / "cards.json").read_text())["cards"]:
        assert row["pan"] not in everything
        assert row["pan"].encode() not in database
