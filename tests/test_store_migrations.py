"""Schema migrations: the numbered SQL files of both backends, SQLite's step from schema 2, and
``cardswitch db`` on a SQLite file (PostgreSQL's are in test_postgres_store.py)."""

from __future__ import annotations

import doctest
import sqlite3
from pathlib import Path

import pytest
from test_store_support import ACCOUNT_ID, auth, seeded_store

from switch.__main__ import main
from switch.config import Config, StoreConfig
from switch.store import migrations
from switch.store.sqlite import SCHEMA_VERSION
from switch.testing import config_toml


def test_both_backends_have_the_same_consecutive_versions() -> None:
    for dialect in ("sqlite", "postgres"):
        versions = [m.version for m in migrations.migrations(dialect)]
        assert versions[0] == migrations.FIRST_VERSION
        assert versions == list(range(versions[0], versions[0] + len(versions)))
    assert [m.name for m in migrations.migrations("sqlite")] == [
        m.name for m in migrations.migrations("postgres")
    ]
    assert doctest.testmod(migrations).failed == 0


async def test_a_schema_2_file_is_migrated_when_opened(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for statement in migrations.split_statements(migrations.migrations("sqlite")[0].sql):
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    async with seeded_store(path) as store:
        assert (await store.commit_auth(auth("000001", 100))).approved
        assert await store.active_holds_total(ACCOUNT_ID) == 100
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        columns = {row[1] for row in conn.execute("PRAGMA table_info(holds)")}
        assert {"expires_at", "released_at", "released_by"} <= columns
    finally:
        conn.close()


def test_db_migrate_and_version_on_a_sqlite_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "var" / "s.db"
    config = tmp_path / "switch.toml"
    config.write_text(config_toml(Config(store=StoreConfig(path=db))))
    assert main(["db", "version", "--config", str(config)]) == 1
    assert main(["db", "migrate", "--config", str(config)]) == 0
    assert main(["db", "migrate", "--config", str(config)]) == 0
    assert main(["db", "version", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"schema 0 -> {SCHEMA_VERSION}" in out and "up to date" in out
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    assert main(["db", "migrate", "--config", str(config)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "newer than this code" in err[0]
