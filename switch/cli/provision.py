"""``cardswitch cards import|list|show|block|unblock|set-status|set-limits|reset-pin-tries``
and ``cardswitch accounts show``: the operator's view of provisioning (``switch.provision``).

Every change of a card is journaled with who (``--actor``, default the login name), when and
what, and changes only what it names: blocking a card keeps its keys, PIN reference and
limits.

What lives here: options, tables and JSON output of the commands. PANs are only ever printed
masked. What does not: reading card files and importing them, the store (``switch.provision``,
``switch.store``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from switch import provision
from switch.cli.common import config_parent
from switch.cli.runner import CommandError, ExitStatus, UsageError, runner
from switch.config import Config
from switch.store import Card, CardStatus


def register(sub: Any) -> None:
    """Add ``cards import|list`` and ``accounts show``."""
    config = config_parent()
    cards = sub.add_parser("cards", help="provision and list cards")
    cards_sub = cards.add_subparsers(dest="cards_command", required=True, metavar="ACTION")
    imp = cards_sub.add_parser(
        "import", parents=[config], help="import cards from a JSON or CSV file"
    )
    imp.add_argument("file", type=Path, help="JSON (list of objects) or CSV with a header")
    imp.add_argument(
        "--replace",
        action="store_true",
        help="replace existing cards whole (attributes a row leaves out take their defaults); "
        "without it an existing card changes only in the attributes its row names",
    )
    _actor(imp)
    imp.set_defaults(func=runner(_import))
    show_card = cards_sub.add_parser(
        "show", parents=[config], help="one card (masked), its balances and change history"
    )
    _card_arg(show_card)
    show_card.add_argument("--json", action="store_true", help="print a JSON object")
    show_card.set_defaults(func=runner(_show_card))
    for name, status, text in (
        ("block", CardStatus.BLOCKED, "block a card (declined 62); nothing else changes"),
        ("unblock", CardStatus.ACTIVE, "make a blocked card active again"),
    ):
        action = cards_sub.add_parser(name, parents=[config], help=text)
        _card_arg(action)
        _actor(action)
        action.set_defaults(func=runner(_set_status), status=status.value)
    set_status = cards_sub.add_parser(
        "set-status", parents=[config], help="set a card's status (lost, stolen, closed, ...)"
    )
    _card_arg(set_status)
    set_status.add_argument("status", choices=[s.value for s in CardStatus], help="new status")
    _actor(set_status)
    set_status.set_defaults(func=runner(_set_status))
    limits = cards_sub.add_parser(
        "set-limits",
        parents=[config],
        help="change only the limits named (minor units; 'none' removes a limit)",
    )
    _card_arg(limits)
    for limit in _LIMITS:
        limits.add_argument(
            f"--{limit.replace('_', '-')}",
            dest=limit,
            metavar="N|none",
            type=_limit,
            default=argparse.SUPPRESS,
            help=f"new {limit.replace('_', ' ')} (unchanged when not given)",
        )
    _actor(limits)
    limits.set_defaults(func=runner(_set_limits))
    reset = cards_sub.add_parser(
        "reset-pin-tries", parents=[config], help="reset the wrong-PIN counter to zero"
    )
    _card_arg(reset)
    _actor(reset)
    reset.set_defaults(func=runner(_reset_pin_tries))
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


#: The spend limits ``set-limits`` changes.
_LIMITS = ("per_txn_max", "daily_amount", "daily_count", "monthly_amount", "monthly_count")


def _limit(text: str) -> int | None:
    if text.lower() == "none":
        return None
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected minor units or none: {text!r}")
    return int(text)


def _card_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("card", metavar="CARD", help="card id (cards list) or PAN")


def _actor(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--actor",
        default=os.environ.get("USER") or "operator",
        help="who makes the change, journaled with it",
    )


async def _import(args: argparse.Namespace, cfg: Config) -> int:
    rows = provision.load_rows(args.file)
    report = await provision.import_with_config(
        cfg, rows, replace_existing=args.replace, actor=args.actor
    )
    print(
        f"cards created: {report.cards_created}, updated: {report.cards_updated}, "
        f"accounts created: {report.accounts_created}, failed: {len(report.failures)}"
    )
    for masked, changed in report.changes:
        print(f"  {masked}: {', '.join(changed) if changed else 'no change'}")
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


async def _change(args: argparse.Namespace, cfg: Config, changes: dict[str, object]) -> int:
    try:
        change = await provision.change_card(cfg, args.card, changes, actor=args.actor)
    except provision.ProvisionError as exc:
        raise CommandError(str(exc)) from None
    what = ", ".join(f"{k} {v[0]} -> {v[1]}" for k, v in change.changed.items()) or "no change"
    print(f"card {change.masked_pan}: {what} (by {change.actor} at {change.at})")
    return ExitStatus.OK


async def _set_status(args: argparse.Namespace, cfg: Config) -> int:
    return await _change(args, cfg, {"status": args.status})


async def _set_limits(args: argparse.Namespace, cfg: Config) -> int:
    # An option not given is absent (argparse.SUPPRESS); "none" removes the limit.
    changes = {n: getattr(args, n) for n in _LIMITS if hasattr(args, n)}
    if not changes:
        raise UsageError("name at least one limit, e.g. --daily-amount 50000")
    return await _change(args, cfg, changes)


async def _reset_pin_tries(args: argparse.Namespace, cfg: Config) -> int:
    return await _change(args, cfg, {"pin_tries": 0})


async def _show_card(args: argparse.Namespace, cfg: Config) -> int:
    view = await provision.show_card(cfg, args.card)
    if view is None:
        raise CommandError("no such card")
    card = view.card
    summary: dict[str, Any] = {
        **_card_summary(card),
        "service_code": card.service_code,
        "pin_try_limit": card.pin_try_limit,
        "keys": {"cvk": card.cvk, "pvk": card.pvk, "imk_ac": card.imk_ac},
        "limits": {n: getattr(card.controls, n) for n in _LIMITS},
        "blocked_mccs": sorted(card.controls.blocked_mccs),
        "blocked_countries": sorted(card.controls.blocked_countries),
        "changes": [{"actor": c.actor, "at": c.at, "changed": c.changed} for c in view.changes],
    }
    if view.account is not None:
        summary["ledger_balance"] = view.account.ledger_balance
        summary["available_balance"] = view.account.available_balance
    if args.json:
        print(json.dumps(summary, sort_keys=True))
        return ExitStatus.OK
    for key, value in summary.items():
        if key != "changes":
            print(f"{key + ':':18} {value}")
    for c in view.changes:
        print(f"change by {c.actor} at {c.at}: {c.changed}")
    return ExitStatus.OK
