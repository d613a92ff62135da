"""``cardswitch dev-setup``: make a fresh checkout runnable on its embedded defaults.

What lives here: the idempotent first-run sequence of ``make run``: the dev PKI, the SoftHSM
dev token with the card-data keys, the public demo test keys, and the demo cards and accounts
(only when the store has no cards yet). Everything it creates lives under ``var/``.

What does not: the operations themselves (switch.pki, hsm.token, switch.cli.hsm, switch.provision);
this module only sequences them. Never run it against production configuration: the demo
keys are public test keys.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import trio

from hsm.api import Hsm, KeyAlgorithm, KeyUsage
from hsm.carddata import open_vault
from hsm.errors import KeyExists
from hsm.token import open_hsm
from switch import config as config_mod
from switch.cli.hsm import ensure_card_data_keys
from switch.config import Config
from switch.pki import ensure_pki
from switch.provision import import_cards, load_keys, load_rows
from switch.store import open_store

#: Demo data shipped with the repository (public test keys and cards built on them).
DEMO_KEYS = Path("config/demo/keys.json")
DEMO_CARDS = Path("config/demo/cards.json")


def register(sub: Any) -> None:
    p = sub.add_parser(
        "dev-setup", help="first-run setup: dev PKI, SoftHSM token, demo keys and cards"
    )
    p.add_argument("--config", type=Path, default=None)
    p.add_argument("--keys", type=Path, default=DEMO_KEYS, help="demo key list (JSON)")
    p.add_argument("--cards", type=Path, default=DEMO_CARDS, help="demo cards (JSON or CSV)")
    p.set_defaults(func=_cmd_dev_setup)


def _cmd_dev_setup(args: argparse.Namespace) -> int:
    cfg = config_mod.load_default_or_embedded(args.config)
    report = ensure_pki(cfg.tls.ca.parent)
    written = ", ".join(p.name for p in report.written) or "nothing new"
    print(f"pki {cfg.tls.ca.parent}: {written}")
    return trio.run(_seed, cfg, args.keys, args.cards)


async def _seed(cfg: Config, keys_path: Path, cards_path: Path) -> int:
    hsm = open_hsm(cfg.hsm)
    try:
        for line in await ensure_card_data_keys(hsm, cfg):
            print(line)
        await _import_demo_keys(hsm, keys_path)
        vault = open_vault(cfg, hsm)
        async with open_store(cfg.store) as store:
            if await store.list_cards():
                print(f"store {cfg.store.path}: cards present, demo data not imported again")
                return 0
            report = await import_cards(store, hsm, vault, load_rows(cards_path))
            print(
                f"store {cfg.store.path}: {report.cards_created} demo cards, "
                f"{report.accounts_created} accounts"
            )
            for failure in report.failures:
                print(f"  row {failure.index} ({failure.masked_pan}): {failure.reason}")
            return 1 if report.failures else 0
    finally:
        await hsm.aclose()


async def _import_demo_keys(hsm: Hsm, path: Path) -> None:
    for key in load_keys(path):
        algorithm = KeyAlgorithm(key.algorithm) if key.algorithm else None
        try:
            info = await hsm.import_key(
                key.label, KeyUsage(key.usage), bytes.fromhex(key.clear_hex), algorithm
            )
        except KeyExists:
            print(f"key {key.label!r}: present")
        else:
            print(f"key {key.label!r} ({info.usage}) KCV {info.kcv}: imported")
