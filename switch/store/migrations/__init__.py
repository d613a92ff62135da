"""Versioned schema migrations of the store: plain numbered SQL files, one folder per backend.

What lives here: ``Migration`` and ``migrations(dialect)``, which reads the packaged files
``sqlite/NNNN_name.sql`` and ``postgres/NNNN_name.sql`` (NNNN is the schema version the file
brings the database to, consecutive from ``FIRST_VERSION``), ``latest(dialect)``, and
``split_statements`` (a script into the statements a driver executes one at a time).

What does not: applying them (each backend: ``sqlite._ensure_schema`` records the version
in ``PRAGMA user_version``; ``postgres.migrate`` in the ``schema_migrations`` table, under an
advisory lock so that two instances cannot migrate at once), the command line
(``cardswitch db migrate``).

Why plain files and not a migration tool: the two backends' schemas are small, their SQL is
what both the DBA and the tests read, and every maintained tool that knows both SQLite and
PostgreSQL (alembic, yoyo) brings an ORM or a DB-API layer of its own into the process; a
version number and a transaction per file are all this needs.

Schema 1 (0.1 development builds) cannot be migrated: the first file is version 2.
"""

from __future__ import annotations

import re
import sqlite3
from dataclasses import dataclass
from importlib import resources
from typing import Literal

#: The backends that have a folder of migrations.
Dialect = Literal["sqlite", "postgres"]
#: Version of the first migration file (the schema of the first release).
FIRST_VERSION = 2
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True, slots=True)
class Migration:
    """One SQL file: the schema version it brings the database to, its name and its text."""

    version: int
    name: str
    sql: str


def migrations(dialect: Dialect) -> tuple[Migration, ...]:
    """The migrations of ``dialect`` in version order.

    Raises:
        RuntimeError: a file is misnamed or the versions are not consecutive (a packaging bug).
    """
    found: list[Migration] = []
    for entry in resources.files(__package__).joinpath(dialect).iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _NAME.match(entry.name)
        if match is None:  # pragma: no cover - a packaging bug
            raise RuntimeError(f"misnamed migration {dialect}/{entry.name}")
        found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    expected = list(range(FIRST_VERSION, FIRST_VERSION + len(found)))
    if not found or [m.version for m in found] != expected:  # pragma: no cover - packaging bug
        raise RuntimeError(f"{dialect} migrations are not consecutive from {FIRST_VERSION}")
    return tuple(found)


def latest(dialect: Dialect) -> int:
    """The schema version this code expects for ``dialect``."""
    return migrations(dialect)[-1].version


def split_statements(script: str) -> list[str]:
    """The complete SQL statements of ``script`` (comments kept with the statement after them).

    Uses SQLite's own notion of a complete statement, which also fits the plain DDL of the
    PostgreSQL files (no dollar-quoted bodies).

    >>> split_statements("CREATE TABLE a (x TEXT DEFAULT ';');\\n-- note\\nDROP TABLE a;")
    ["CREATE TABLE a (x TEXT DEFAULT ';');", '-- note\\nDROP TABLE a;']
    """
    statements: list[str] = []
    buffer = ""
    for line in script.splitlines(keepends=True):
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip() and not all(
        ln.strip().startswith("--") or not ln.strip() for ln in buffer.splitlines()
    ):  # pragma: no cover - a migration bug
        raise RuntimeError("incomplete SQL statement at the end of a migration")
    return statements
