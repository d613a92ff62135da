"""``cardswitch cards import|list`` and ``cardswitch accounts show``: the operator's view of
provisioning (``switch.provision``).

What lives here: options, tables and JSON output of the commands. PANs are only ever printed
masked. What does not: reading card files and importing them, the store (``switch.provision``,
``switch.store``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from switch import provision
from switch.cli.common import config_parent
from switch.cli.runner import CommandError, ExitStatus, runner
from switch.config import Config
from switch.store import Card


def register(sub: Any) -> None:
    """Add ``cards import|list`` and ``accounts show``."""
    config = config_parent()
    cards = sub.add_parser("cards", help="provision and list cards")
    cards_sub = cards.add_subparsers(dest="cards_command", required=True, metavar="ACTION")
    imp = cards_sub.add_parser(
        "import", parents=[config], help="import cards from a JSON or CSV file"
    )
    imp.add_argument("file", type=Path, help="JSON (list of objects) or CSV with a header")
    imp.set_defaults(func=runner(_import))
    lst = cards_sub.add_parser("list", parents=[config], help="list cards (masked PANs)")
    lst.add_argument("--json", action="store_true", help="one JSON object per card")
    lst.set_defaults(func=runner(_list))

    accounts = sub.add_parser("accounts", help="inspect accounts")
    acc_sub = accounts.add_subparsers(dest="accounts_command", required=True, metavar="ACTION")
    show = acc_sub.add_parser(
        "show", parents=[config], help="balances, active holds and cards of an account"
    )
    show.add_argument("account_id", metavar="ID", help="account id")
    show.add_argument("--json", action="store_true", help="print a JSON object")
    show.set_defaults(func=runner(_show))


async def _import(args: argparse.Namespace, cfg: Config) -> int:
    rows = provision.load_rows(args.file)
    report = await provision.import_with_config(cfg, rows)
    print(
        f"cards created: {report.cards_created}, updated: {report.cards_updated}, "
        f"accounts created: {report.accounts_created}, failed: {len(report.failures)}"
    )
    for failure in report.failures:
        print(f"row {failure.index}: {failure.masked_pan}: {failure.reason}", file=sys.stderr)
    return ExitStatus.OK if report.ok else ExitStatus.FAILED


async def _list(args: argparse.Namespace, cfg: Config) -> int:
    _print_cards(await provision.list_cards(cfg), as_json=args.json, out=sys.stdout)
    return ExitStatus.OK


async def _show(args: argparse.Namespace, cfg: Config) -> int:
    view = await provision.find_account(cfg, args.account_id)
    if view is None:
        raise CommandError(f"no account {args.account_id!r}")
    account = view.account
    if args.json:
        summary = {
            "id": account.id,
            "currency": account.currency,
            "ledger_balance": account.ledger_balance,
            "available_balance": account.available_balance,
            "active_holds": view.active_holds,
            "cards": [_card_summary(c) for c in view.cards],
        }
        print(json.dumps(summary, sort_keys=True))
        return ExitStatus.OK
    print(f"account:   {account.id}")
    print(f"currency:  {account.currency}")
    print(f"ledger:    {account.ledger_balance}")
    print(f"available: {account.available_balance}")
    print(f"holds:     {view.active_holds}")
    _print_cards(view.cards, as_json=False, out=sys.stdout)
    return ExitStatus.OK


def _card_summary(card: Card) -> dict[str, Any]:
    return {
        "id": card.id,
        "pan": card.masked_pan,
        "status": card.status.value,
        "account": card.account_id,
        "expiry": card.expiry,
        "pin_method": card.pin_method,
        "pin_tries": card.pin_tries,
    }


def _print_cards(cards: Sequence[Card], *, as_json: bool, out: TextIO) -> None:
    if as_json:
        for card in cards:
            print(json.dumps(_card_summary(card), sort_keys=True), file=out)
        return
    print(f"{'CARD ID':36}  {'PAN':19}  {'STATUS':7}  {'EXPIRY':6}  ACCOUNT", file=out)
    for card in cards:
        print(
            f"{card.id:36}  {card.masked_pan:19}  {card.status.value:7}  {card.expiry:6}  "
            f"{card.account_id}",
            file=out,
        )
