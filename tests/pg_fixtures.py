"""PostgreSQL for the tests and benchmarks: a throwaway cluster and a fresh database per test.

What lives here: ``LocalCluster`` (a cluster made with Debian's server binaries in a temp
directory, run as an unprivileged user when the tests run as root, listening only on a Unix
socket in that directory), ``find_bindir``, and the fixtures ``pg_cluster`` (session: that
cluster, or the server ``CARDSWITCH_TEST_PG_DSN`` names, with a migrated template database)
and ``pg_dsn`` (a new database cloned from the template for one test, dropped after).

No PostgreSQL test is skipped: without the binaries (and without ``CARDSWITCH_TEST_PG_DSN``)
the fixture fails with the install hint. What does not live here: assertions.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from switch.config import StoreConfig
from switch.store import postgres

#: A server to use instead of a throwaway cluster; its role must be allowed CREATE DATABASE.
DSN_ENV = "CARDSWITCH_TEST_PG_DSN"
#: Where Debian's postgresql-NN packages put the server binaries.
DEBIAN_BINDIRS = "/usr/lib/postgresql/*/bin"
INSTALL_HINT = (
    "PostgreSQL server binaries not found in /usr/lib/postgresql/*/bin: install them "
    "(apt-get install postgresql, or run scripts/bootstrap.sh as root), or point "
    f"{DSN_ENV} at a server where the role may CREATE DATABASE"
)
#: The unprivileged account the server runs as when the tests run as root (initdb refuses root).
SERVER_USER = "postgres"
#: Superuser role created in the throwaway cluster.
ROLE = "cardswitch"


def find_bindir() -> Path | None:
    """The newest Debian PostgreSQL bin directory with ``initdb``, else ``pg_config``'s."""
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/initdb"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if candidates:
        return candidates[-1].parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


@dataclass
class LocalCluster:
    """A PostgreSQL cluster in ``root`` (data, Unix socket and log), started by ``start``."""

    bindir: Path
    root: Path
    fsync: bool = False
    port: int = 5432
    _as_user: list[str] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log(self) -> Path:
        return self.root / "server.log"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host={self.root} port={self.port} user={ROLE} dbname={dbname}"

    @classmethod
    def create(cls, *, fsync: bool = False) -> LocalCluster:
        """initdb in a new temp directory (owned by the server user when run as root)."""
        bindir = find_bindir()
        if bindir is None:
            raise RuntimeError(INSTALL_HINT)
        root = Path(tempfile.mkdtemp(prefix="cardswitch-pg-"))
        as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise RuntimeError(
                    f"running as root, the test cluster needs the unprivileged user "
                    f"{SERVER_USER!r} (created by the postgresql package)"
                ) from None
            os.chown(root, account.pw_uid, account.pw_gid)
            as_user = ["runuser", "-u", SERVER_USER, "--"]
        cluster = cls(bindir, root, fsync, _as_user=as_user)
        cluster._run(
            "initdb", "-D", str(cluster.data), "-U", ROLE, "-A", "trust", "-E", "UTF8",
            "--locale=C", "--no-sync", "--no-instructions",
        )  # fmt: skip
        return cluster

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        command = [*self._as_user, str(self.bindir / tool), *args]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        if check and done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise RuntimeError(f"{tool} failed ({done.returncode}): {' | '.join(tail)}")
        return done

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = (
            f"-k {self.root} -c listen_addresses='' -p {self.port} "
            f"-c fsync={'on' if self.fsync else 'off'} "
            f"-c full_page_writes={'on' if self.fsync else 'off'} "
            "-c max_connections=200 -c shared_buffers=64MB"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-o", options, "-w",
                  "-t", "60", "start")  # fmt: skip

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m mode`` (``immediate`` is a crash: recovery runs at the next start)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class PgServer:
    """The server the tests use: an admin DSN and the migrated template to clone."""

    admin_dsn: str
    template: str
    local: LocalCluster | None
    _names: Iterator[int] = field(default_factory=itertools.count)

    def dsn_for(self, dbname: str) -> str:
        return psycopg.conninfo.make_conninfo(self.admin_dsn, dbname=dbname)

    def create_database(self) -> str:
        """A new database cloned from the template; its name."""
        name = f"cardswitch_t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                    sql.Identifier(name), sql.Identifier(self.template)
                )
            )
        return name

    def drop_database(self, name: str) -> None:
        with psycopg.connect(self.admin_dsn, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    @contextlib.contextmanager
    def database(self) -> Iterator[str]:
        """A fresh migrated database for the block; its DSN."""
        name = self.create_database()
        try:
            yield self.dsn_for(name)
        finally:
            self.drop_database(name)


def store_config(dsn: str, **changes: object) -> StoreConfig:
    """The PostgreSQL ``StoreConfig`` of a test database."""
    return StoreConfig(backend="postgres", dsn=dsn, **changes)  # type: ignore[arg-type]


@contextlib.contextmanager
def pg_server(*, fsync: bool = False) -> Iterator[PgServer]:
    """``CARDSWITCH_TEST_PG_DSN``'s server, else a throwaway cluster; with a migrated
    template database, removed afterwards."""
    external = os.environ.get(DSN_ENV)
    local: LocalCluster | None = None
    if external:
        admin = external
    else:
        local = LocalCluster.create(fsync=fsync)
        local.start()
        admin = local.dsn()
    server = PgServer(admin, f"cardswitch_template_{os.getpid()}", local)
    try:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {}").format(sql.Identifier(server.template))
            )
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(server.template)))
        postgres.migrate(store_config(server.dsn_for(server.template)))
        yield server
    finally:
        if local is not None:
            local.destroy()
        else:
            with contextlib.suppress(psycopg.Error):
                server.drop_database(server.template)


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgServer]:
    """The session's PostgreSQL server (see ``pg_server``); fails, never skips, without one."""
    if not os.environ.get(DSN_ENV) and find_bindir() is None:
        pytest.fail(INSTALL_HINT, pytrace=False)
    with pg_server() as server:
        yield server


@pytest.fixture
def pg_dsn(pg_cluster: PgServer) -> Iterator[str]:
    """The DSN of a fresh, migrated database of its own for one test."""
    with pg_cluster.database() as dsn:
        yield dsn
