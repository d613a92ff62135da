"""``cardswitch db``: the store's schema (``db migrate``, ``db version``).

What lives here: the options and one-line output of the commands. What does not: the
migrations and how each backend applies them (``switch.store.migrate``,
``switch/store/migrations``).

Exit statuses: 0 when the schema is this code's (after migrating, for ``migrate``); 1 when
the database cannot be reached, a migration fails, or the schema is newer than this code (a
newer switch migrated it: upgrade this one) or, for ``version``, older (run ``db migrate``).
``cardswitch serve`` refuses a schema other than its own the same way: one line, exit 1.
"""

from __future__ import annotations

import argparse
from typing import Any

import trio

from switch.cli.common import config_parent
from switch.cli.runner import CommandError, ExitStatus, runner
from switch.config import Config, StoreConfig
from switch.store import migrate, postgres, sqlite

_EPILOG = (
    "exit status: 0 schema current; 1 database unreachable, migration failed, or schema "
    "newer than this code (or, for version, older)"
)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "db",
        help="store schema: migrate, version",
        description="The store's schema migrations (SQLite file or PostgreSQL database).",
    )
    commands = p.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    m = commands.add_parser(
        "migrate",
        parents=[config_parent()],
        help="apply the migrations the store lacks (idempotent)",
        description="Bring the configured store's schema to this code's version. With "
        "PostgreSQL, run it once before starting (or upgrading) the instances; instances "
        "migrating at the same time are serialised by an advisory lock.",
        epilog=_EPILOG,
    )
    m.set_defaults(func=runner(_migrate))
    v = commands.add_parser(
        "version",
        parents=[config_parent()],
        help="print the store's schema version and this code's",
        epilog=_EPILOG,
    )
    v.set_defaults(func=runner(_version))


def _where(cfg: StoreConfig) -> str:
    if cfg.backend == "postgres":
        return "store postgres"
    return f"store {cfg.path}"


async def _migrate(args: argparse.Namespace, cfg: Config) -> int:
    report = await migrate(cfg.store)
    if report.before == report.after:
        print(f"{_where(cfg.store)}: schema {report.after}, up to date")
    else:
        print(f"{_where(cfg.store)}: schema {report.before} -> {report.after}")
    return ExitStatus.OK


async def _version(args: argparse.Namespace, cfg: Config) -> int:
    store = cfg.store
    if store.backend == "postgres":
        found, expected = await trio.to_thread.run_sync(postgres.database_version, store)
    else:
        found, expected = await trio.to_thread.run_sync(sqlite.file_version, store.path)
    print(f"{_where(store)}: schema {found}, this code {expected}")
    if found != expected:
        hint = "run cardswitch db migrate" if found < expected else "upgrade cardswitch"
        raise CommandError(f"schema {found} is not this code's ({expected}): {hint}")
    return ExitStatus.OK
