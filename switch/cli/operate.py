"""``cardswitch status`` and ``cardswitch journal search``: what an operator asks of a switch.

What lives here: ``status`` (reads ``/status`` of the running switch's health port: listeners,
connections, peers, in-flight requests, readiness and what failed) and ``journal search`` (by
STAN, RRN, masked PAN, card id and time range; a table or JSON lines). PANs only ever appear
masked. What does not: the health server (``switch.health``), the journal
(``switch.store``), holds (``switch.cli.holds``).
"""

from __future__ import annotations

import argparse
import json
import urllib.error
import urllib.request
from dataclasses import asdict
from typing import Any

import trio

from switch.cli.common import config_parent
from switch.cli.runner import CommandError, ExitStatus, UsageError, runner
from switch.config import Config
from switch.store import open_store
from switch.store.models import JournalQuery

#: Seconds ``status`` waits for the running switch.
_STATUS_TIMEOUT = 5.0


def register(sub: Any) -> None:
    """Add ``status`` and ``journal search``."""
    config = config_parent()
    status = sub.add_parser(
        "status",
        parents=[config],
        help="listeners, connections and readiness of the running switch",
    )
    status.add_argument("--json", action="store_true", help="print the JSON document")
    status.set_defaults(func=runner(_status))
    journal = sub.add_parser("journal", help="search the authorization journal")
    jsub = journal.add_subparsers(dest="journal_command", required=True, metavar="ACTION")
    search = jsub.add_parser(
        "search",
        parents=[config],
        help="journal rows, newest first",
        description="examples:\n  cardswitch journal search --stan 123456\n"
        "  cardswitch journal search --pan 412345******2345 --since 2026-12-01T00:00",
    )
    search.add_argument("--stan", default=None, help="DE11")
    search.add_argument("--rrn", default=None, help="DE37")
    search.add_argument("--pan", default=None, help="masked PAN (412345******2345) or its parts")
    search.add_argument("--card", default=None, help="card id")
    search.add_argument("--since", default=None, help="ISO 8601 UTC, inclusive")
    search.add_argument("--until", default=None, help="ISO 8601 UTC, exclusive")
    search.add_argument(
        "--stand-in",
        action="store_true",
        help="only decisions taken in stand-in (for reconciliation once the HSM is back)",
    )
    search.add_argument(
        "--undelivered",
        action="store_true",
        help="only decisions whose answer could not be delivered (for reconciliation)",
    )
    search.add_argument("--limit", type=int, default=50, help="at most this many rows")
    search.add_argument("--json", action="store_true", help="one JSON object per row")
    search.set_defaults(func=runner(_search))


def _fetch(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(url, timeout=_STATUS_TIMEOUT) as reply:  # noqa: S310 - our own port
        document: dict[str, Any] = json.loads(reply.read())
        return document


async def _status(args: argparse.Namespace, cfg: Config) -> int:
    if not cfg.metrics.port:
        raise UsageError("metrics.port is 0: the switch serves no status endpoint")
    url = f"http://{cfg.metrics.host}:{cfg.metrics.port}/status"
    try:
        status = await trio.to_thread.run_sync(_fetch, url)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        message = f"no switch answers at {url}: {reason}"
        raise CommandError(message, ExitStatus.UNAVAILABLE) from None
    if args.json:
        print(json.dumps(status, sort_keys=True))
    else:
        state = "ready" if status.get("ready") else "NOT READY"
        print(f"switch pid {status.get('pid')}: {state}, in flight {status.get('in_flight')}"
              + (", draining" if status.get("draining") else ""))  # fmt: skip
        for check, error in (status.get("failed") or {}).items():
            print(f"  failed {check}: {error}")
        for name, lst in (status.get("listeners") or {}).items():
            print(f"  listener {name} ({lst['network']}) on {', '.join(lst['bound'])}: "
                  f"{lst['connections']} connections, {lst['handshakes']} handshaking")  # fmt: skip
            for peer, count in lst["peers"].items():
                print(f"    {peer}: {count}")
    return ExitStatus.OK if status.get("ready") else ExitStatus.UNAVAILABLE


async def _search(args: argparse.Namespace, cfg: Config) -> int:
    if (
        args.pan
        and any(c.isdigit() for c in args.pan)
        and "*" not in args.pan
        and len(args.pan) > 6
    ):
        raise UsageError("--pan takes a masked PAN (first six, last four), never a full PAN")
    query = JournalQuery(
        stan=args.stan, rrn=args.rrn, masked_pan=args.pan, card_id=args.card,
        since=args.since, until=args.until, stand_in=True if args.stand_in else None,
        undelivered=args.undelivered, limit=args.limit,
    )  # fmt: skip
    async with open_store(cfg.store) as store:
        rows = await store.search_journal(query)
    if args.json:
        for row in rows:
            print(json.dumps(asdict(row), sort_keys=True))
        return ExitStatus.OK
    head = f"{'ID':>7}  {'WHEN':26}  {'MTI':4}  {'STAN':6}  {'PAN':19}  {'AMOUNT':>12}"
    print(f"{head}  DE39  REASON")
    for r in rows:
        flag = " (stand-in)" if r.stand_in else ""
        if r.delivery is not None:
            flag += f" ({r.delivery}: {r.delivery_reason})"
        print(
            f"{r.id:>7}  {r.created_at:26}  {r.mti:4}  {r.stan:6}  {r.masked_pan:19}  "
            f"{r.amount:>12}  {r.response_code:4}  {r.reason}{flag}"
        )
    return ExitStatus.OK
