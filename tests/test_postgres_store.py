"""The PostgreSQL store's own behaviour: races between stores on one database, cancellation,
timeouts, a database that stops answering or restarts, secrets and schema versions.

The decision semantics it shares with the other backends are in test_store_semantics.py.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psycopg
import pytest
import trio
import trio.testing
from pg_fixtures import LocalCluster, PgServer, find_bindir, store_config
from test_store_support import ACCOUNT_ID, CURRENCY, auth, dup_key, make_card, reversal

from switch.__main__ import main
from switch.config import Config, ConfigError, StoreConfig, from_mapping
from switch.store import Account, AuthOutcome, Store, StoreError, open_store
from switch.store import postgres as pg
from switch.testing import config_toml

BALANCE = 100_000


def _roomy(dsn: str) -> StoreConfig:
    """A store config with timeouts that a loaded CI machine cannot reach under a race."""
    return store_config(dsn, statement_timeout=10.0, lock_timeout=8.0)


async def _seed(dsn: str, balance: int = BALANCE) -> None:
    async with open_store(store_config(dsn)) as store:
        await store.put_account(Account(ACCOUNT_ID, CURRENCY, balance, balance))
        await store.put_card(make_card())


async def test_originals_and_reversals_racing_on_two_stores_never_leave_a_hold(
    pg_dsn: str,
) -> None:
    """An original on one instance and its reversal on another at the same moment: the
    reversal is matched (the hold released) or recorded first (the original declined 05),
    never unmatched beside an approved original."""
    await _seed(pg_dsn)
    cfg = _roomy(pg_dsn)
    async with open_store(cfg) as a, open_store(cfg) as b:
        async with trio.open_nursery() as nursery:
            for i in range(40):
                nursery.start_soon(a.commit_auth, auth(f"{i:06d}", 100))
                nursery.start_soon(b.commit_reversal, reversal(f"{500 + i:06d}", f"{i:06d}", 100))
        assert await a.active_holds_total(ACCOUNT_ID) == 0
        account = await a.get_account(ACCOUNT_ID)
        assert account is not None and account.available_balance == BALANCE
    with psycopg.connect(pg_dsn) as conn:
        unresolved = conn.execute(
            "SELECT count(*) FROM unmatched_reversals u JOIN journal r ON r.id = u.journal_id "
            "JOIN journal o ON o.stan = r.orig_stan AND o.mti_class = '010' "
            "WHERE u.resolved_journal_id IS NULL"
        ).fetchone()
        assert unresolved == (0,)


async def test_same_request_on_two_stores_is_decided_once(pg_dsn: str) -> None:
    await _seed(pg_dsn, balance=1000)
    cfg = _roomy(pg_dsn)
    outcomes: list[AuthOutcome] = []

    async def send(store: Store, stan: str) -> None:
        outcomes.append(await store.commit_auth(auth(stan, 100)))

    async with open_store(cfg) as a, open_store(cfg) as b:
        async with trio.open_nursery() as nursery:
            for i in range(20):
                for store in (a, b):
                    nursery.start_soon(send, store, f"{i:06d}")
        assert await a.active_holds_total(ACCOUNT_ID) == 1000
    assert sum(o.approved and not o.replayed for o in outcomes) == 10
    assert sum(o.replayed for o in outcomes) == 20


async def test_cancelled_operations_are_withdrawn_if_waiting_and_answered_if_started(
    pg_dsn: str,
) -> None:
    await _seed(pg_dsn)
    cfg = store_config(pg_dsn, pool_size=1, lock_timeout=5.0, statement_timeout=10.0)
    blocker = psycopg.connect(pg_dsn)
    async with open_store(cfg) as store:
        # Another session holds the account row, so the first commit waits for its lock in
        # the database and the second waits for the only connection.
        blocker.execute("SELECT 1 FROM accounts WHERE id = %s FOR UPDATE", (ACCOUNT_ID,))
        results: dict[str, object] = {}

        async def submit(stan: str, scope: trio.CancelScope) -> None:
            with scope:
                results[stan] = await store.commit_auth(auth(stan, 100))
            results[stan + "-cancelled"] = scope.cancelled_caught

        started, waiting = trio.CancelScope(), trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(submit, "000001", started)
            await trio.sleep(0.3)  # let its thread reach the row lock
            nursery.start_soon(submit, "000002", waiting)
            await trio.testing.wait_all_tasks_blocked()
            started.cancel()
            waiting.cancel()
            await trio.sleep(0.1)
            blocker.commit()
        blocker.close()
        first = results["000001"]
        assert isinstance(first, AuthOutcome) and first.approved
        assert results["000001-cancelled"] is False
        assert "000002" not in results and results["000002-cancelled"] is True
        assert await store.find_outcome(dup_key("000002"), auth("000002", 100).digest) is None


async def test_a_held_lock_fails_the_decision_as_unavailable_not_a_hang(pg_dsn: str) -> None:
    await _seed(pg_dsn)
    blocker = psycopg.connect(pg_dsn)
    blocker.execute("SELECT 1 FROM accounts WHERE id = %s FOR UPDATE", (ACCOUNT_ID,))
    try:
        async with open_store(store_config(pg_dsn, lock_timeout=0.2)) as store:
            with trio.fail_after(5), pytest.raises(StoreError) as err:
                await store.commit_auth(auth("000001", 100))
            assert err.value.kind == "unavailable" and "lock" in str(err.value)
            blocker.rollback()
            assert (await store.commit_auth(auth("000001", 100))).approved
    finally:
        blocker.close()


def _server_pids(cluster: LocalCluster) -> list[int]:
    """The postmaster of ``cluster`` and its children (from /proc)."""
    postmaster = int((cluster.data / "postmaster.pid").read_text().split()[0])
    pids = [postmaster]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == postmaster:
                pids.append(int(entry.name))
    return pids


async def test_a_frozen_database_yields_unavailable_within_the_budget(
    pg_cluster: PgServer, pg_dsn: str
) -> None:
    """Every server process stopped (SIGSTOP): the statement timeout cannot fire, the
    client-side deadline cuts the connection; once the server runs again the same store
    answers."""
    if pg_cluster.local is None:
        pytest.fail("this test freezes the local cluster; unset CARDSWITCH_TEST_PG_DSN")
    await _seed(pg_dsn)
    async with open_store(store_config(pg_dsn, statement_timeout=0.5)) as store:
        assert await store.get_account(ACCOUNT_ID) is not None
        pids = _server_pids(pg_cluster.local)
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            with trio.fail_after(3), pytest.raises(StoreError) as err:
                await store.commit_auth(auth("000001", 100))
            assert err.value.kind == "unavailable"
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        with trio.fail_after(10):
            while True:
                try:
                    outcome = await store.commit_auth(auth("000002", 100))
                    break
                except StoreError:
                    await trio.sleep(0.2)
        assert outcome.approved
        assert isinstance(store, pg.PostgresStore) and store.stats.cuts >= 1


async def test_immediate_shutdown_stands_in_then_recovers_without_restart() -> None:
    """``pg_ctl stop -m immediate`` (a crash) under a running store: operations fail as
    unavailable within the budget while it is down; after crash recovery the same store
    answers, and what was committed before the crash is there."""
    if find_bindir() is None:
        pytest.fail("PostgreSQL server binaries missing (apt-get install postgresql)")
    cluster = LocalCluster.create(fsync=True)
    try:
        cluster.start()
        with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE crash")
        cfg = store_config(cluster.dsn("crash"), statement_timeout=0.5)
        pg.migrate(cfg)
        await _seed(cfg.dsn)
        async with open_store(cfg) as store:
            before = await store.commit_auth(auth("000001", 100))
            assert before.approved
            await trio.to_thread.run_sync(cluster.stop, "immediate")
            for stan in ("000002", "000003"):
                with trio.fail_after(2), pytest.raises(StoreError) as err:
                    await store.commit_auth(auth(stan, 100))
                assert err.value.kind == "unavailable"
            await trio.to_thread.run_sync(cluster.start)
            with trio.fail_after(20):
                while True:
                    try:
                        after = await store.commit_auth(auth("000004", 100))
                        break
                    except StoreError:
                        await trio.sleep(0.2)
            assert after.approved
            replay = await store.commit_auth(auth("000001", 100))
            assert replay.replayed and replay.approval_code == before.approval_code
            assert await store.active_holds_total(ACCOUNT_ID) == 200
    finally:
        cluster.destroy()


# -- secrets and configuration ------------------------------------------------------------


def test_password_comes_from_the_environment_or_a_file_never_the_dsn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(pg.PASSWORD_ENV, raising=False)
    assert pg.password(store_config("dbname=x")) is None
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    assert pg.password(store_config("dbname=x", password_file=str(secret))) == "from-file"
    monkeypatch.setenv(pg.PASSWORD_ENV, "from-env")
    assert pg.connection_kwargs(store_config("dbname=x"))["password"] == "from-env"
    for dsn in (
        "host=db password=x",
        "postgresql://u:x@db/cardswitch",
        "postgres://db/c?password=x",
    ):
        with pytest.raises(ConfigError, match="password"):
            from_mapping({"store": {"backend": "postgres", "dsn": dsn}})
    cfg = from_mapping({"store": {"backend": "postgres", "dsn": "host=db user=u dbname=c"}})
    assert cfg.store.dsn == "host=db user=u dbname=c"
    with pytest.raises(ConfigError, match=r"below pipeline\.budget"):
        from_mapping({"store": {"backend": "postgres", "dsn": "host=db", "statement_timeout": 5}})
    with pytest.raises(ConfigError, match="required"):
        from_mapping({"store": {"backend": "postgres"}})


async def test_missing_password_file_is_one_line_unavailable(tmp_path: Path) -> None:
    cfg = store_config("dbname=x", password_file=str(tmp_path / "missing"))
    with pytest.raises(StoreError) as err:
        async with open_store(cfg):
            pass  # pragma: no cover
    assert err.value.kind == "unavailable" and "\n" not in str(err.value)


# -- schema versions ------------------------------------------------------------------------


def _write_config(tmp_path: Path, dsn: str) -> Path:
    path = tmp_path / "switch.toml"
    path.write_text(config_toml(Config(store=store_config(dsn))))
    return path


async def test_db_migrate_and_version_on_postgres(
    pg_cluster: PgServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name = f"cardswitch_empty_{os.getpid()}"
    with psycopg.connect(pg_cluster.admin_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        path = _write_config(tmp_path, pg_cluster.dsn_for(name))
        assert await trio.to_thread.run_sync(main, ["db", "version", "--config", str(path)]) == 1
        with pytest.raises(StoreError, match="run cardswitch db migrate"):
            async with open_store(store_config(pg_cluster.dsn_for(name))):
                pass  # pragma: no cover
        assert await trio.to_thread.run_sync(main, ["db", "migrate", "--config", str(path)]) == 0
        assert await trio.to_thread.run_sync(main, ["db", "migrate", "--config", str(path)]) == 0
        assert await trio.to_thread.run_sync(main, ["db", "version", "--config", str(path)]) == 0
        out = capsys.readouterr().out
        assert f"schema 0 -> {pg.SCHEMA_VERSION}" in out and "up to date" in out
        with psycopg.connect(pg_cluster.dsn_for(name), autocommit=True) as conn:
            conn.execute("INSERT INTO schema_migrations (version, name) VALUES (99, 'future')")
        with pytest.raises(StoreError, match="newer than this code"):
            async with open_store(store_config(pg_cluster.dsn_for(name))):
                pass  # pragma: no cover
        assert await trio.to_thread.run_sync(main, ["db", "migrate", "--config", str(path)]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "newer than this code" in err[0]
    finally:
        pg_cluster.drop_database(name)
