"""`cards import` on the real path: a SoftHSM2 token through PKCS#11 (own SOFTHSM2_CONF in a
tmp dir), demo keys imported with `keys import`, then `cards import`, `cards list` and
`accounts show`, each in its own process as an operator runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio

from hsm.config import HsmConfig
from switch.config import Config, StoreConfig
from switch.store import CardStatus, open_store
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


def _cards_in(db: Path) -> dict[str, Any]:
    """Every card of the database, by masked PAN, as the store reads it."""

    async def read() -> dict[str, Any]:
        async with open_store(StoreConfig(path=db)) as store:
            return {c.masked_pan: c for c in await store.list_cards()}

    return trio.run(read)


def test_card_maintenance_changes_only_what_it_names(tmp_path: Path) -> None:
    """Block then unblock leaves every other attribute as it was (before: `cards import` of
    the whole row was the only way, and left-out columns were wiped); set-limits changes
    only the limits named; an import of an existing card changes only the columns its row
    names, and says which; every change is journaled with who and when."""
    cfg = Config(
        hsm=HsmConfig(
            softhsm_conf=tmp_path / "softhsm" / "softhsm2.conf", token_label="maintain-test"
        ),
        store=StoreConfig(path=tmp_path / "cardswitch.db"),
    )
    config = write_config(cfg, tmp_path / "switch.toml")
    setup = subprocess.run(
        [sys.executable, "-c", _SETUP, str(config), str(DEMO / "keys.json")],
        cwd=REPO, capture_output=True, text=True, timeout=CLI_TIMEOUT, check=False,
    )  # fmt: skip
    assert setup.returncode == 0, setup.stderr
    assert cardswitch(config, "cards", "import", str(DEMO / "cards.json")).returncode == 0
    db = tmp_path / "cardswitch.db"
    before = _cards_in(db)["412345******2345"]

    for action in ("block", "unblock"):
        done = cardswitch(config, "cards", action, before.id, "--actor", "alice")
        assert done.returncode == 0, done.stderr
        assert "status" in done.stdout and "alice" in done.stdout
    assert _cards_in(db)["412345******2345"] == before  # keys, PVV, limits all kept

    by_pan = cardswitch(config, "cards", "block", "4123456789012345")  # by PAN, via the HSM
    assert by_pan.returncode == 0, by_pan.stderr
    assert "4123456789012345" not in by_pan.stdout + by_pan.stderr
    assert _cards_in(db)["412345******2345"].status is CardStatus.BLOCKED
    cardswitch(config, "cards", "unblock", before.id)

    limits = cardswitch(config, "cards", "set-limits", before.id, "--daily-amount", "2000",
                        "--monthly-count", "none")  # fmt: skip
    assert limits.returncode == 0, limits.stderr
    after = _cards_in(db)["412345******2345"]
    assert after.controls == replace(before.controls, daily_amount=2000, monthly_count=None)
    assert replace(after, controls=before.controls) == before

    row = {"pan": "4123456789012345", "expiry": "8701", "service_code": "101",
           "account": "demo-acct-main", "currency": "978", "daily_count": 7}  # fmt: skip
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps([row]))
    updated = cardswitch(config, "cards", "import", str(partial))
    assert updated.returncode == 0, updated.stderr
    assert "412345******2345: daily_count" in updated.stdout
    final = _cards_in(db)["412345******2345"]
    assert final.controls == replace(after.controls, daily_count=7)
    assert (final.cvk, final.pvk, final.pin_verification_value, final.pin_try_limit) == (
        before.cvk, before.pvk, before.pin_verification_value, before.pin_try_limit,
    )  # fmt: skip

    shown = cardswitch(config, "cards", "show", before.id, "--json")
    assert shown.returncode == 0, shown.stderr
    history = json.loads(shown.stdout)["changes"]
    assert [h["actor"] for h in history[:2]] == ["alice", "alice"]
    assert [list(h["changed"]) for h in history] == [
        ["status"], ["status"], ["status"], ["status"],
        ["daily_amount"], ["daily_count"],  # monthly_count was unset already
    ]  # fmt: skip
    assert "4123456789012345" not in shown.stdout

    refused = cardswitch(config, "cards", "set-limits", before.id)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    unknown = cardswitch(config, "cards", "block", "no-such-card")
    assert unknown.returncode == 1 and unknown.stderr.count("\n") == 1
