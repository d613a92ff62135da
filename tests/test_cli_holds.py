"""``cardswitch holds list|expire|release`` as an operator runs them, each in its own process,
over a SQLite store seeded with holds of known expiry (a pinned ``--now``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import trio
from test_store_support import ACCOUNT_ID, auth, seeded_store

from switch.config import Config, StoreConfig
from switch.store import DeliveryMark, JournalRef
from switch.testing import write_config

REPO = Path(__file__).resolve().parent.parent


def _cardswitch(config: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "switch", *argv, "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_holds_list_expire_and_release(tmp_path: Path) -> None:
    db = tmp_path / "cardswitch.db"

    async def seed() -> None:
        async with seeded_store(db, 10_000) as store:
            await store.commit_auth(
                auth("000001", 700, hold_expires_at="2026-12-08T12:00:00+00:00")
            )
            await store.commit_auth(
                auth("000002", 300, hold_expires_at="2027-01-01T12:00:00+00:00")
            )

    trio.run(seed)
    config = write_config(Config(store=StoreConfig(path=db)), tmp_path / "switch.toml")

    listed = _cardswitch(config, "holds", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    holds = [json.loads(line) for line in listed.stdout.splitlines()]
    assert sorted(h["remaining"] for h in holds) == [300, 700]
    assert all("*" in h["masked_pan"] for h in holds)

    dry = _cardswitch(config, "holds", "expire", "--dry-run", "--now", "2026-12-10T00:00:00")
    assert dry.returncode == 0, dry.stderr
    assert "1 holds would be released (700)" in dry.stdout
    again = _cardswitch(config, "holds", "list", "--json", "--account", ACCOUNT_ID)
    assert len(again.stdout.splitlines()) == 2  # the dry run released nothing

    done = _cardswitch(config, "holds", "expire", "--now", "2026-12-10T00:00:00")
    assert done.returncode == 0 and "1 holds released (700)" in done.stdout
    repeat = _cardswitch(config, "holds", "expire", "--now", "2026-12-10T00:00:00")
    assert "0 holds released (0)" in repeat.stdout

    left = [
        json.loads(line)
        for line in _cardswitch(config, "holds", "list", "--json").stdout.splitlines()
    ]
    assert [h["remaining"] for h in left] == [300]
    released = _cardswitch(config, "holds", "release", str(left[0]["id"]), "--actor", "bob")
    assert released.returncode == 0 and "300 released by bob" in released.stdout
    twice = _cardswitch(config, "holds", "release", str(left[0]["id"]))
    assert twice.returncode == 1 and twice.stderr.count("\n") == 1
    assert "Traceback" not in twice.stderr
    bad = _cardswitch(config, "holds", "expire", "--now", "yesterday")
    assert bad.returncode == 2 and "--now" in bad.stderr


def test_journal_search_command_masks_and_refuses_full_pans(tmp_path: Path) -> None:
    db = tmp_path / "cardswitch.db"

    async def seed() -> None:
        async with seeded_store(db, 10_000) as store:
            await store.commit_auth(auth("000007", 700))

    trio.run(seed)
    config = write_config(Config(store=StoreConfig(path=db)), tmp_path / "switch.toml")
    found = _cardswitch(config, "journal", "search", "--stan", "000007", "--json")
    assert found.returncode == 0, found.stderr
    (row,) = [json.loads(line) for line in found.stdout.splitlines()]
    assert (row["stan"], row["amount"], row["response_code"]) == ("000007", 700, "00")
    assert "*" in row["masked_pan"]
    table = _cardswitch(config, "journal", "search", "--pan", row["masked_pan"])
    assert table.returncode == 0 and "000007" in table.stdout
    refused = _cardswitch(config, "journal", "search", "--pan", "4123456789012345")
    assert refused.returncode == 2 and "4123456789012345" not in refused.stderr
    assert refused.stderr.count("\n") == 1


def test_journal_search_undelivered_lists_only_the_marked_rows(tmp_path: Path) -> None:
    db = tmp_path / "cardswitch.db"

    async def seed() -> None:
        async with seeded_store(db, 10_000) as store:
            await store.commit_auth(auth("000007", 700))
            lost = auth("000008", 300)
            await store.commit_auth(lost)
            mark = DeliveryMark(JournalRef(lost.dup_key, lost.digest), "write_failed", "t")
            assert await store.mark_delivery([mark]) == 1

    trio.run(seed)
    config = write_config(Config(store=StoreConfig(path=db)), tmp_path / "switch.toml")
    table = _cardswitch(config, "journal", "search", "--undelivered")
    assert table.returncode == 0, table.stderr
    (_head, line) = table.stdout.splitlines()
    assert "000008" in line and line.endswith("(undelivered: write_failed)")
    every = _cardswitch(config, "journal", "search")
    assert "000007" in every.stdout and every.stdout.count("undelivered") == 1
