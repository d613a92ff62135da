"""``cardswitch dev-setup``: the command line of the first-run sequence (``switch.devsetup``).

What lives here: its options and output (one progress line each on stdout). What does not:
the sequence itself (``switch.devsetup``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from switch import devsetup
from switch.cli.common import config_parent
from switch.cli.runner import ExitStatus, runner
from switch.config import Config


def register(sub: Any) -> None:
    p = sub.add_parser(
        "dev-setup",
        parents=[config_parent()],
        help="first-run setup: dev PKI, SoftHSM token, demo keys and cards",
        description="Create what the embedded defaults need under var/ (idempotent). "
        "Development only: the demo keys are public test keys.",
    )
    p.add_argument("--keys", type=Path, default=devsetup.DEMO_KEYS, help="demo key list (JSON)")
    p.add_argument(
        "--cards", type=Path, default=devsetup.DEMO_CARDS, help="demo cards (JSON or CSV)"
    )
    p.set_defaults(func=runner(_dev_setup))


async def _dev_setup(args: argparse.Namespace, cfg: Config) -> int:
    ok = await devsetup.dev_setup(cfg, args.keys, args.cards, print)
    return ExitStatus.OK if ok else ExitStatus.FAILED
