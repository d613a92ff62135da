"""``cardswitch pki init``: write the development PKI (``switch.pki``).

What lives here: the options and output of the command (one ``wrote``/``kept`` line per
file). What does not: certificate generation (``switch.pki``).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import trio

from switch.cli.common import config_parent
from switch.cli.runner import ExitStatus, runner
from switch.config import Config
from switch.pki import all_files, ensure_pki


def register(sub: Any) -> None:
    """Add ``pki init [--dir DIR] [--force]``."""
    pki = sub.add_parser("pki", help="development PKI (CA, server and client certificates)")
    actions = pki.add_subparsers(dest="pki_command", required=True, metavar="ACTION")
    init = actions.add_parser(
        "init",
        parents=[config_parent()],
        help="write a dev CA, server and client certificates (keeps existing files)",
    )
    init.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="target directory; default: the directory of [tls] ca in the configuration "
        "(var/pki with the built-in defaults)",
    )
    init.add_argument("--force", action="store_true", help="replace existing files")
    init.set_defaults(func=runner(_init))


async def _init(args: argparse.Namespace, cfg: Config) -> int:
    target: Path = args.dir or cfg.tls.ca.parent
    report = await trio.to_thread.run_sync(lambda: ensure_pki(target, force=args.force))
    for path in all_files(report.paths):
        print(f"{'wrote' if path in report.written else 'kept '} {path}")
    return ExitStatus.OK
