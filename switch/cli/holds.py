"""``cardswitch holds list|release|expire``: the operator's view of money held for cards.

What lives here: options, tables and JSON output. A hold's PAN is shown masked. What does
not: the release rules (``switch.store.rules.plan_hold_release``), the sweeper the daemon runs
(``switch.sweeper``), the store.
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Any

from switch.cli.common import config_parent
from switch.cli.runner import CommandError, ExitStatus, UsageError, runner
from switch.config import Config
from switch.store import open_store
from switch.store.models import HoldView
from switch.sweeper import sweep_once


def register(sub: Any) -> None:
    """Add ``holds list|release|expire``."""
    config = config_parent()
    holds = sub.add_parser("holds", help="list, release and expire holds")
    holds_sub = holds.add_subparsers(dest="holds_command", required=True, metavar="ACTION")
    lst = holds_sub.add_parser("list", parents=[config], help="holds, newest first")
    lst.add_argument("--account", default=None, help="only this account's")
    lst.add_argument("--card", default=None, help="only this card's (card id)")
    lst.add_argument("--all", action="store_true", help="also released holds and debits")
    lst.add_argument("--limit", type=int, default=100, help="at most this many")
    lst.add_argument("--json", action="store_true", help="one JSON object per hold")
    lst.set_defaults(func=runner(_list))
    release = holds_sub.add_parser(
        "release", parents=[config], help="give back what remains of a hold (journaled)"
    )
    release.add_argument("hold_id", type=int, metavar="HOLD", help="hold id (holds list)")
    release.add_argument(
        "--actor", default=os.environ.get("USER") or "operator", help="who releases it"
    )
    release.set_defaults(func=runner(_release))
    expire = holds_sub.add_parser(
        "expire", parents=[config], help="release the holds expired now, as the sweeper does"
    )
    expire.add_argument("--dry-run", action="store_true", help="list them, release nothing")
    expire.add_argument("--now", default=None, help="ISO 8601 time to expire at (UTC); default now")
    expire.add_argument("--batch", type=int, default=100, help="holds per transaction")
    expire.set_defaults(func=runner(_expire))


def _now(text: str | None) -> datetime:
    if text is None:
        return datetime.now(UTC)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--now: not an ISO 8601 time: {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def _print(holds: list[HoldView], *, as_json: bool) -> None:
    if as_json:
        for hold in holds:
            print(json.dumps(asdict(hold), sort_keys=True))
        return
    head = f"{'HOLD':>6}  {'PAN':19}  {'KIND':5}  {'AMOUNT':>12}  {'LEFT':>12}  {'EXPIRES':25}"
    print(f"{head}  ACCOUNT")
    for h in holds:
        print(
            f"{h.id:>6}  {h.masked_pan:19}  {h.kind:5}  {h.amount:>12}  {h.remaining:>12}  "
            f"{h.expires_at or '-':25}  {h.account_id}"
        )


async def _list(args: argparse.Namespace, cfg: Config) -> int:
    async with open_store(cfg.store) as store:
        holds = await store.list_holds(
            account_id=args.account, card_id=args.card, active=not args.all, limit=args.limit
        )
    _print(holds, as_json=args.json)
    return ExitStatus.OK


async def _release(args: argparse.Namespace, cfg: Config) -> int:
    async with open_store(cfg.store) as store:
        released = await store.release_hold(args.hold_id, actor=args.actor)
    if released is None:
        raise CommandError(
            f"hold {args.hold_id}: nothing to release (unknown, released or a debit)"
        )
    print(f"hold {released.hold_id} ({released.masked_pan}): {released.amount} released "
          f"by {released.by} at {released.at}")  # fmt: skip
    return ExitStatus.OK


async def _expire(args: argparse.Namespace, cfg: Config) -> int:
    now = _now(args.now)
    stamp = now.isoformat(timespec="seconds")
    async with open_store(cfg.store) as store:
        if args.dry_run:
            due = [
                h for h in await store.list_holds(limit=1_000_000)
                if h.expires_at is not None and h.expires_at <= stamp
            ]  # fmt: skip
            _print(due, as_json=False)
            print(f"{len(due)} holds would be released ({sum(h.remaining for h in due)})")
            return ExitStatus.OK
        total = count = 0
        while released := await sweep_once(store, now, args.batch):
            count += len(released)
            total += sum(r.amount for r in released)
            if len(released) < args.batch:
                break
    print(f"{count} holds released ({total})")
    return ExitStatus.OK
