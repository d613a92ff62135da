"""A whole switch for end-to-end tests: server + pipeline + store + SoftHSM (PKCS#11).

What lives here: the session token (shared with the HSM tests: SoftHSM reads its
configuration once per process) with the demo keys added, the demo cards plus a few test
cards, ``e2e_store`` (the store of a test, parametrized over SQLite and PostgreSQL), and
``running_switch``, which starts the real server over mutual TLS on 127.0.0.1 with a fresh
store per test. Logs of the run go to a file the test can search for card data.

What does not: assertions.
"""

from __future__ import annotations

import contextlib
import io
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trio
from server_fixtures import make_config

from hsm.api import Hsm, KeyAlgorithm, KeyImport, KeyUsage
from hsm.carddata import HsmVault
from hsm.errors import KeyExists
from hsm.pkcs11 import Pkcs11Hsm
from switch import log as log_mod
from switch.acquirer import build_auth
from switch.config import Config, PipelineConfig, ServerConfig, StoreConfig
from switch.handler import Dispatcher
from switch.pipeline import Pipeline
from switch.pki import PkiPaths
from switch.provision import import_cards, load_keys, load_rows
from switch.server import Server
from switch.store import Store, open_store
from switch.tls import server_context
from switch.wire import emv
from switch.wire.messages import AuthRequest

REPO = Path(__file__).resolve().parents[1]
#: pyemv's Visa CVN 10 vector: the data the ARQC covers, split into its DE55 tags, and the
#: ARQC and ARPC (ARC "00", method 1) published with it.
CVN10_TAGS = [
    (0x9F02, "000000004000"),
    (0x9F03, "000000000000"),
    (0x9F1A, "0124"),
    (0x95, "8000048000"),
    (0x5F2A, "0124"),
    (0x9A, "191105"),
    (0x9C, "01"),
    (0x9F37, "52BF4585"),
    (0x82, "1800"),
    (0x9F36, "001C"),
    (0x9F10, "06010A03A06010"),  # Visa IAD: length, DKI, CVN 0A, CVR 03A06010
]
CVN10_ARQC = "29CCA15AE665FA2E"
CVN10_ARPC_ARC_3030 = "28993816AFAE4AEB"
EMV_PAN = "1234567890123456"


def cvn10_de55(arqc: str = CVN10_ARQC, **tags: str) -> bytes:
    """The vector's DE55 (tags by hex name override its values, e.g. ``{"9F02": ...}``)."""
    items = [(tag, bytes.fromhex(tags.get(f"{tag:X}", value))) for tag, value in CVN10_TAGS]
    return emv.build([*items, (0x9F26, bytes.fromhex(arqc))])


def cvn10_request(arqc: str = CVN10_ARQC, **changes: Any) -> AuthRequest:
    """The chip purchase the vector's cryptogram covers: CAD 40.00, cash (9C 01), terminal in
    Canada (9F1A 0124), 5 November (9A 191105), as the clear ISO fields say it too."""
    fields: dict[str, Any] = {
        "emv": cvn10_de55(arqc),
        "pos_entry_mode": "051",
        "currency": "124",
        "country": "124",
        "processing_code": "010000",
        "when": "1105120000",
    }
    fields.update(changes)
    return build_auth(EMV_PAN, 4000, **fields)


DEMO_CARDS = REPO / "config" / "demo" / "cards.json"
DEMO_KEYS = REPO / "config" / "demo" / "keys.json"
#: Cards only the tests use, next to the demo set (public test PANs, own accounts).
EXTRA_CARDS: list[dict[str, Any]] = [
    {
        "pan": "4000001234567899",
        "expiry": "3012",
        "service_code": "101",
        "account": "acct-velocity",
        "currency": "978",
        "balance": 1000000,
        "cvk": "demo-cvk",
        "daily_count": 2,
        "daily_amount": 5000,
    },
    {
        "pan": "4000009876543210",
        "expiry": "3012",
        "service_code": "101",
        "account": "acct-race",
        "currency": "978",
        "balance": 20 * 700,
        "cvk": "demo-cvk",
    },
    {
        "pan": "4000005555555555",
        "expiry": "3012",
        "service_code": "101",
        "account": "acct-pin",
        "currency": "978",
        "balance": 1000000,
        "cvk": "demo-cvk",
        "pvk": "demo-pvk",
        "pvki": "1",
        "pin": "2468",
    },
]


@pytest.fixture(scope="module")
def demo_hsm(pkcs11_hsm: Pkcs11Hsm) -> Pkcs11Hsm:
    """The module's SoftHSM token (see hsm_fixtures) with the demo keys (public test keys)."""

    async def load() -> None:
        for key in load_keys(DEMO_KEYS):
            algorithm = KeyAlgorithm(key.algorithm) if key.algorithm else None
            with contextlib.suppress(KeyExists):
                await pkcs11_hsm.import_key(
                    KeyImport(
                        key.label, KeyUsage(key.usage), bytes.fromhex(key.clear_hex), algorithm
                    )
                )

    trio.run(load)
    return pkcs11_hsm


@pytest.fixture(scope="session")
def card_rows(tmp_path_factory: pytest.TempPathFactory) -> list[Any]:
    path = tmp_path_factory.mktemp("cards") / "cards.json"
    demo = json.loads(DEMO_CARDS.read_text())["cards"]
    path.write_text(json.dumps({"cards": demo + EXTRA_CARDS}))
    return load_rows(path)


@pytest.fixture(params=["sqlite", "postgres"])
def e2e_store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreConfig:
    """The store of an end-to-end test: a new SQLite file, or a new PostgreSQL database."""
    if request.param == "postgres":
        return StoreConfig(backend="postgres", dsn=request.getfixturevalue("pg_dsn"))
    return StoreConfig(path=tmp_path / "cardswitch.db")


#: Tables of the store (both backends), for tests that look at every row.
TABLES = ("accounts", "cards", "velocity", "journal", "holds", "unmatched_reversals")


@dataclass
class Switch:
    port: int
    store: Store
    hsm: Hsm
    config: Config
    log: io.StringIO
    db_path: Path

    def query(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one SQL query (``?`` placeholders) on the store's database, outside the switch."""
        if self.config.store.backend == "postgres":
            with psycopg.connect(self.config.store.dsn, autocommit=True) as pg:
                return [tuple(r) for r in pg.execute(query.replace("?", "%s"), params)]
        conn = sqlite3.connect(self.db_path)
        try:
            return [tuple(r) for r in conn.execute(query, params)]
        finally:
            conn.close()

    def stored_bytes(self) -> dict[str, bytes]:
        """What the database keeps, by where: SQLite's files (main and WAL); PostgreSQL's
        rows of every table as text (bytea as hex) and the database's own files when the
        server is local."""
        if self.config.store.backend != "postgres":
            files = [self.db_path, self.db_path.with_name(self.db_path.name + "-wal")]
            return {str(f): f.read_bytes() for f in files if f.exists()}
        blobs: dict[str, bytes] = {}
        with psycopg.connect(self.config.store.dsn, autocommit=True) as pg:
            for table in TABLES:
                rows = pg.execute(f"SELECT t::text FROM {table} t").fetchall()  # noqa: S608
                blobs[table] = "\n".join(r[0] for r in rows).encode()
            pg.execute("CHECKPOINT")
            found = pg.execute(
                "SELECT current_setting('data_directory'), oid FROM pg_database "
                "WHERE datname = current_database()"
            ).fetchone()
        assert found is not None
        base = Path(found[0]) / "base" / str(found[1])
        if base.is_dir():
            blobs[str(base)] = b"".join(p.read_bytes() for p in sorted(base.iterdir()))
        return blobs


@asynccontextmanager
async def running_switch(
    pki: PkiPaths,
    hsm: Hsm,
    rows: list[Any],
    tmp: Path,
    *,
    pipeline_hsm: Hsm | None = None,
    pipeline_store: Callable[[Store], Store] | None = None,
    pipeline: PipelineConfig | None = None,
    store: StoreConfig | None = None,
    server: ServerConfig | None = None,
    **listener: Any,
) -> AsyncIterator[Switch]:
    """A switch with a fresh store holding ``rows``, serving on an ephemeral port.

    ``pipeline_hsm`` replaces the HSM the pipeline talks to (provisioning still uses ``hsm``),
    for tests of a slow or failing HSM; ``pipeline_store`` wraps the store the pipeline talks
    to (tests of a failing store); ``pipeline`` sets the budget and stand-in policy; ``store``
    the store (default: a new SQLite file in ``tmp``; see ``e2e_store``); ``server`` the
    process-wide limits. Other
    keyword arguments are ``ListenerConfig`` fields (``zpk`` defaults to ``demo-zpk``).
    """
    base = make_config(pki, **{"zpk": "demo-zpk", **listener})
    cfg = replace(
        base,
        pipeline=pipeline or base.pipeline,
        server=server or base.server,
        store=store or StoreConfig(path=tmp / "cardswitch.db"),
        card_data=replace(base.card_data, fingerprint_key="fp", encryption_key="pan"),
    )
    logs = io.StringIO()
    log_mod.configure("info", "json", stream=logs)
    vault = HsmVault(hsm, "fp", "pan")
    async with open_store(cfg.store) as opened:
        report = await import_cards(opened, hsm, vault, rows)
        assert report.ok, report.failures
        engine_store = pipeline_store(opened) if pipeline_store else opened
        engine = Pipeline(cfg, store=engine_store, hsm=pipeline_hsm or hsm, vault=vault)
        handler = Dispatcher(engine, keys=hsm, journal=engine_store)
        listening = Server(cfg, handler, server_context(cfg.tls))
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(listening.serve)
            try:
                yield Switch(bound[0][2], opened, hsm, cfg, logs, cfg.store.path)
            finally:
                listening.shutdown()
    log_mod.configure("info", "console")
