"""The first-run sequence behind ``cardswitch dev-setup``: a fresh checkout made runnable.

What lives here: ``dev_setup``, the idempotent sequence of ``make run``: the dev PKI, the
card-data keys in the HSM (``hsm.carddata.ensure_card_data_keys``, also run by
``hsm init``), the public demo test keys, the store's schema migrations
(``switch.store.migrate``), and the demo cards and accounts (only when the store has no
cards yet). Everything it creates lives where the configuration says (``var/``
by default).

What does not: the operations themselves (switch.pki, hsm.token, hsm.carddata,
switch.provision), the command line (switch.cli.devsetup). Never run it against production
configuration: the demo
keys are public test keys.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import trio

from hsm.api import Hsm, KeyAlgorithm, KeyImport, KeyUsage
from hsm.carddata import ensure_card_data_keys, open_vault
from hsm.errors import KeyExists
from hsm.token import ensure_hsm
from switch.config import Config
from switch.pki import ensure_pki
from switch.provision import import_cards, load_keys, load_rows
from switch.store import migrate, open_store

#: Demo data shipped with the repository (public test keys and cards built on them).
DEMO_KEYS = Path("config/demo/keys.json")
DEMO_CARDS = Path("config/demo/cards.json")

#: Where progress lines go (one call per line).
Say = Callable[[str], None]


async def dev_setup(cfg: Config, keys_path: Path, cards_path: Path, say: Say) -> bool:
    """Run the first-run sequence; True when every demo card was imported (or present).

    Raises:
        HsmError: the token cannot be opened or a key has the wrong usage.
        StoreError: the store cannot be opened.
        ProvisionError: the key or card file cannot be read.
    """
    report = await trio.to_thread.run_sync(ensure_pki, cfg.tls.ca.parent)
    written = ", ".join(p.name for p in report.written) or "nothing new"
    say(f"pki {cfg.tls.ca.parent}: {written}")
    hsm = ensure_hsm(cfg.hsm)  # creates the dev token if missing: dev-setup may
    try:
        for line in await ensure_card_data_keys(hsm, cfg.card_data):
            say(line)
        await _import_demo_keys(hsm, keys_path, say)
        vault = open_vault(cfg.card_data, hsm)
        schema = await migrate(cfg.store)
        moved = f" (migrated from {schema.before})" if schema.before != schema.after else ""
        say(f"store {cfg.store.backend}: schema {schema.after}{moved}")
        async with open_store(cfg.store) as store:
            if await store.list_cards():
                say(f"store {cfg.store.path}: cards present, demo data not imported again")
                return True
            imported = await import_cards(store, hsm, vault, load_rows(cards_path))
            say(
                f"store {cfg.store.path}: {imported.cards_created} demo cards, "
                f"{imported.accounts_created} accounts"
            )
            for failure in imported.failures:
                say(f"  row {failure.index} ({failure.masked_pan}): {failure.reason}")
            return imported.ok
    finally:
        await hsm.aclose()


async def _import_demo_keys(hsm: Hsm, path: Path, say: Say) -> None:
    for key in load_keys(path):
        algorithm = KeyAlgorithm(key.algorithm) if key.algorithm else None
        try:
            info = await hsm.import_key(
                KeyImport(key.label, KeyUsage(key.usage), bytes.fromhex(key.clear_hex), algorithm)
            )
        except KeyExists:
            say(f"key {key.label!r}: present")
        else:
            say(f"key {key.label!r} ({info.usage}) KCV {info.kcv}: imported")
