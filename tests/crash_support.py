"""Helpers of the crash-safety tests: real switch processes killed with SIGKILL under load.

What lives here: the tests' own configuration and seed data (``write_config``, through
``switch.testing``, on SQLite or a given ``StoreConfig``; ``seed``, ``SEED_CARDS`` and the
``PIN_CARDS``), starting the switch as a subprocess (``start_switch``, over
``switch.testing.start_switch``), the load generator that records every request and the
answers that came back (``Load``: ``round`` against one switch, ``send`` for tests that drive
several; ``Driver``, the same load on a live switch in ``Phases`` until stopped, with echo
tests beside it), ``crash_rounds`` (CARDSWITCH_CRASH_ROUNDS), and the one checker of the database
against what the clients were told (``check_database``, reading an SQLite file or a
PostgreSQL database through ``Reader``; ``pin_tries`` samples the PIN-try counters during a
run), which returns the list of violations instead of asserting so the test can report them
all at once.

What does not: the tests themselves (test_crash_safety.py, test_instances_crash.py,
test_workers_crash.py, ...), several instances (cluster_support.py). Expected values come
from what the clients sent and received and from the opening balances written here, never
from the switch's own code.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import sqlite3
import ssl
import sys
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import psycopg
import trio
from psycopg.rows import dict_row

from hsm.config import CardDataConfig, HsmConfig
from switch import testing
from switch.acquirer import build_auth, build_reversal, echo, encipher_pin
from switch.client import Client, ClientError
from switch.config import (
    Config,
    ListenerConfig,
    LogConfig,
    MetricsConfig,
    PipelineConfig,
    ServerConfig,
    StoreConfig,
    TlsConfig,
)
from switch.pki import PkiPaths
from switch.wire.messages import (
    AuthRequest,
    AuthResponse,
    NetworkResponse,
    ReversalRequest,
    ReversalResponse,
)

REPO = Path(__file__).resolve().parents[1]
#: The demo key list (public test keys); dev-setup needs one, these cards use none of them.
DEMO_KEYS = REPO / "config" / "demo" / "keys.json"
#: Network (listener profile) of the test listener, as the journal records it.
NETWORK = "visa"
#: Currency of every account and request (EUR).
CURRENCY = "978"
#: Seconds the switch may take to start (import, SoftHSM login, SQLite recovery, bind).
START_TIMEOUT = 20.0
#: Seconds one request may wait for its answer while the switch is alive.
REQUEST_TIMEOUT = 10.0
#: Connections per round and requests each keeps in flight (one task per slot).
CONNECTIONS = 4
SLOTS_PER_CONNECTION = 6
#: Amount range of a new request, minor units.
MIN_AMOUNT, MAX_AMOUNT = 100, 3000
#: Share of each action in the load (the rest are new 0100 authorizations).
P_DUPLICATE = 0.12
P_REVERSAL = 0.14
P_FINANCIAL = 0.08
#: Share of duplicates sent as an 0101 repeat (same duplicate key as their 0100).
P_REPEAT_MTI = 0.3
#: Share of first reversals that are partial (DE95 keeps half of the amount).
P_PARTIAL = 0.3
#: With ``Load(pins=True)``: share of new authorizations on a PIN card with a wrong PIN.
P_WRONG_PIN = 0.06
#: ``Driver``: connections of its load (each with ``SLOTS_PER_CONNECTION`` requests in
#: flight), answers each phase must see before a test moves on and the bound on waiting for
#: them, and seconds between two echo tests of one connection (``Driver(echoes=True)``).
DRIVER_CONNECTIONS = 2
PER_PHASE = 30
PHASE_TIMEOUT = 60.0
ECHO_PAUSE = 0.1
#: Environment variable: how many crash rounds (kills) the crash tests run instead of their
#: CI-sized default (``make soak`` sets it to 100 and more).
ROUNDS_ENV = "CARDSWITCH_CRASH_ROUNDS"


def crash_rounds(default: int) -> int:
    """The number of kills a crash test runs: ``CARDSWITCH_CRASH_ROUNDS``, else ``default``."""
    raw = os.environ.get(ROUNDS_ENV, "").strip()
    return int(raw) if raw else default


@dataclass(frozen=True)
class SeedCard:
    """A test card and its account; ``balance`` is the account's opening balance."""

    pan: str = field(repr=False)
    account: str
    balance: int


#: Test PANs on three accounts. The low account is shared by two cards and covers only a
#: handful of requests, so insufficient-funds declines (51) are part of every run.
SEED_CARDS: tuple[SeedCard, ...] = (
    SeedCard("4000002000000001", "crash-acct-a", 50_000_000),
    SeedCard("4000002000000019", "crash-acct-a", 50_000_000),
    SeedCard("4000002000000027", "crash-acct-b", 20_000_000),
    SeedCard("4000002000000035", "crash-acct-low", 20_000),
    SeedCard("4000002000000043", "crash-acct-low", 20_000),
)
#: Cards with a PIN (the demo PVK, PVKI 1) whose try limit is never reached in a run: the load
#: sends them only wrong PINs, so their counters may only go up, by one per request decided.
PIN_CARDS: tuple[SeedCard, ...] = (
    SeedCard("4000002000000050", "crash-acct-pin", 1_000_000),
    SeedCard("4000002000000068", "crash-acct-pin", 1_000_000),
)
#: The PIN of the PIN cards, and the one the load enters instead.
RIGHT_PIN, WRONG_PIN = "2468", "1357"
#: Try limit of the PIN cards.
PIN_TRY_LIMIT = 1_000_000
#: The clear demo ZPK (config/demo/keys.json, a public test key): the acquirer's PIN key.
DEMO_ZPK = "0123456789ABCDEFFEDCBA9876543210"
#: Opening balance (ledger = available) of each account.
OPENING: dict[str, int] = {c.account: c.balance for c in (*SEED_CARDS, *PIN_CARDS)}
#: Account of each PAN.
ACCOUNT_OF: dict[str, str] = {c.pan: c.account for c in (*SEED_CARDS, *PIN_CARDS)}


def write_config(
    tmp: Path,
    pki: PkiPaths,
    *,
    store: StoreConfig | None = None,
    pipeline: PipelineConfig | None = None,
    metrics_port: int = 0,
) -> Path:
    """The switch's TOML: one listener on port 0, the test PKI, SoftHSM, and ``store`` (by
    default SQLite under ``tmp``); ``pipeline`` (default: a 5 s budget) and the metrics port
    (default 0: none) for tests that need others."""
    cfg = Config(
        listeners=(
            ListenerConfig(name=NETWORK, network=NETWORK, host="127.0.0.1", port=0, zpk="demo-zpk"),
        ),
        tls=TlsConfig(ca=pki.ca, cert=pki.server_cert, key=pki.server_key),
        hsm=HsmConfig(
            backend="pkcs11", softhsm_conf=tmp / "softhsm" / "softhsm2.conf", timeout=5.0
        ),
        store=store or StoreConfig(path=tmp / "cardswitch.db"),
        card_data=CardDataConfig(
            backend="hsm", fingerprint_key="crash-fp", encryption_key="crash-pan"
        ),
        metrics=MetricsConfig(host="127.0.0.1", port=metrics_port),
        pipeline=pipeline or PipelineConfig(budget=5.0),
        server=ServerConfig(drain_timeout=5.0),
        log=LogConfig(level="info", format="json"),
    )
    return testing.write_config(cfg, tmp / "switch.toml")


def switch_env(tmp: Path) -> dict[str, str]:
    """Environment of the switch processes: the repository on the path, our SoftHSM conf."""
    return testing.switch_env({"SOFTHSM2_CONF": str(tmp / "softhsm" / "softhsm2.conf")})


async def seed(config: Path, tmp: Path) -> None:
    """Card-data keys, demo keys and the test cards, through ``cardswitch dev-setup``.

    Raises:
        AssertionError: dev-setup failed (its output is in the message).
    """
    cards = tmp / "cards.json"
    rows = [
        {
            "pan": c.pan,
            "expiry": "3012",
            "service_code": "101",
            "account": c.account,
            "currency": CURRENCY,
            "balance": c.balance,
        }
        for c in SEED_CARDS
    ]
    rows += [
        {
            "pan": c.pan,
            "expiry": "3012",
            "service_code": "101",
            "account": c.account,
            "currency": CURRENCY,
            "balance": c.balance,
            "pvk": "demo-pvk",
            "pvki": "1",
            "pin": RIGHT_PIN,
            "pin_try_limit": PIN_TRY_LIMIT,
        }
        for c in PIN_CARDS
    ]
    cards.write_text(json.dumps({"cards": rows}))
    with trio.fail_after(60):
        done = await trio.run_process(
            [
                *(sys.executable, "-m", "switch", "dev-setup", "--config", str(config)),
                *("--keys", str(DEMO_KEYS), "--cards", str(cards)),
            ],
            env=switch_env(tmp),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, f"dev-setup failed ({done.returncode}):\n{output}"


async def start_switch(config: Path, tmp: Path, tag: str) -> tuple[trio.Process, int]:
    """Start ``python -m switch serve`` and return it with its port once it accepts.

    Its stdout and stderr go to ``tmp/switch-<tag>.log``.
    """
    with (tmp / f"switch-{tag}.log").open("wb") as logfile:
        switch = await testing.start_switch(
            config,
            tmp / f"ready-{tag}.json",
            env=switch_env(tmp),
            output=logfile,
            ready_within=START_TIMEOUT,
        )
    return switch.process, switch.port


def stop_now(proc: trio.Process) -> None:
    """SIGKILL ``proc`` if it still runs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)


# -- the load ---------------------------------------------------------------------------------

Request = AuthRequest | ReversalRequest
Response = AuthResponse | ReversalResponse


@dataclass
class Exchange:
    """One request as sent, and its answer if one came (``sent_at`` and ``answered_at`` on
    trio's clock; ``target``: which switch instance of a test with several it went to)."""

    request: Request
    round: int
    response: Response | None = None
    sent_at: float = 0.0
    answered_at: float | None = None
    target: int = 0


@dataclass
class RoundStats:
    """What one round did: requests sent and answered, approvals, requests in flight at the
    kill."""

    round: int
    sent: int = 0
    answered: int = 0
    approvals: int = 0
    in_flight_at_kill: int = 0
    load_seconds: float = 0.0


#: Errors that mean the connection to the switch is gone (it was killed).
CONNECTION_LOST = (
    ClientError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.TooSlowError,
    OSError,
)


class Load:
    """Concurrent acquirers sending new 0100/0200s, duplicates (some as 0101 repeats) and
    reversals (with 0401 repeats and second reversals); with ``pins``, also requests with a
    wrong PIN on the PIN cards; keeps a record.

    ``exchanges`` lists every request sent, in sending order, with its answer or ``None``.
    ``send`` is one request on a given client; ``round`` runs the whole mix against one
    switch until it is killed. A test with several switches drives ``send`` itself.
    """

    def __init__(self, rng: random.Random, *, pins: bool = False) -> None:
        self.rng = rng
        self.pins = pins
        self.exchanges: list[Exchange] = []
        self.timeouts = 0
        self._stan = 0
        self._round = 0
        #: STANs in flight, with how many copies of each (the same request may be sent to two
        #: switches at once).
        self._in_flight: Counter[str] = Counter()
        self._in_flight_on: Counter[int] = Counter()
        #: Set when a request goes in flight (the kill waits for one).
        self._busy = trio.Event()
        #: New authorizations that are complete (answered, or their connection is gone).
        self._completed: list[AuthRequest] = []
        #: New authorizations still in flight (moved to completed when they are complete).
        self._current: list[AuthRequest] = []
        #: Authorizations the clients saw approved: what reversals are sent for.
        self._approved: list[AuthRequest] = []
        self._approved_stans: set[str] = set()
        #: The first reversal sent for an original (by the original's STAN).
        self._first_reversal: dict[str, ReversalRequest] = {}

    def new_stan(self) -> str:
        """A STAN used by no other request of the test (DE11, six digits)."""
        self._stan += 1
        return f"{self._stan:06d}"

    # -- choosing requests ----------------------------------------------------------------------

    def next_request(self) -> tuple[Request, bool]:
        """The next request of the mix and whether it is a new authorization."""
        rng = self.rng
        r = rng.random()
        if r < P_DUPLICATE and self._completed:
            again = rng.choice(self._completed)
            if again.stan not in self._in_flight:
                if again.mti == "0100" and rng.random() < P_REPEAT_MTI:
                    again = replace(again, mti="0101")  # the acquirer's repeat: same key
                return again, False
        elif P_DUPLICATE <= r < P_DUPLICATE + P_REVERSAL and self._approved:
            rev = self._reversal(rng.choice(self._approved))
            if rev.stan not in self._in_flight:
                return rev, False
        if self.pins and rng.random() < P_WRONG_PIN:
            pin_card = rng.choice(PIN_CARDS)
            block = encipher_pin(WRONG_PIN, pin_card.pan, DEMO_ZPK)
            amount = rng.randint(MIN_AMOUNT, MAX_AMOUNT)
            return build_auth(pin_card.pan, amount, stan=self.new_stan(), pin_block=block), True
        card = rng.choice(SEED_CARDS)
        mti = "0200" if rng.random() < P_FINANCIAL else "0100"
        amount = rng.randint(MIN_AMOUNT, MAX_AMOUNT)
        return build_auth(card.pan, amount, mti=mti, stan=self.new_stan()), True

    def racing_reversal(self, original: AuthRequest) -> ReversalRequest:
        """A full reversal of ``original`` to send while ``original`` itself is in flight
        (it may arrive first: recorded unmatched, and the original then declined); later
        reversals of ``original`` repeat it."""
        first = build_reversal(original, stan=self.new_stan())
        self._first_reversal[original.stan] = first
        return first

    def _reversal(self, original: AuthRequest) -> ReversalRequest:
        """A first reversal of ``original``, or one of its repeats.

        Repeats are the same message again (a duplicate), its 0401 repeat, or another
        reversal (0400 or 0420, new STAN) with the same DE95: each must release nothing more.
        """
        rng = self.rng
        first = self._first_reversal.get(original.stan)
        if first is None:
            keep = original.amount // 2 if rng.random() < P_PARTIAL else None
            first = build_reversal(original, replacement_amount=keep, stan=self.new_stan())
            self._first_reversal[original.stan] = first
            return first
        v = rng.random()
        if v < 0.35:
            return first
        if v < 0.7:
            return replace(first, mti="0401")
        return build_reversal(
            original,
            mti=rng.choice(["0400", "0420"]),
            replacement_amount=first.replacement_amount,
            stan=self.new_stan(),
        )

    # -- running -----------------------------------------------------------------------------

    @property
    def in_flight(self) -> int:
        return sum(self._in_flight.values())

    def in_flight_on(self, target: int) -> int:
        """Requests in flight to switch instance ``target``."""
        return self._in_flight_on[target]

    async def send(
        self, client: Client, request: Request, *, new: bool, stats: RoundStats, target: int = 0
    ) -> Response | None:
        """Send ``request`` on ``client`` and record it; its answer, or None when the
        connection was lost first (or the answer took longer than ``REQUEST_TIMEOUT``).

        ``new``: it is a new authorization (sent for the first time; a copy of it sent to
        another switch at the same moment is not new)."""
        exchange = Exchange(request, self._round, sent_at=trio.current_time(), target=target)
        self.exchanges.append(exchange)
        stats.sent += 1
        if new:
            assert isinstance(request, AuthRequest)
            self._current.append(request)
        self._in_flight[request.stan] += 1
        self._in_flight_on[target] += 1
        self._busy.set()
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                response = await client.request(request)
        except CONNECTION_LOST as exc:
            if isinstance(exc, trio.TooSlowError):
                self.timeouts += 1
            response = None
        finally:
            self._in_flight[request.stan] -= 1
            self._in_flight_on[target] -= 1
            if self._in_flight[request.stan] <= 0:
                del self._in_flight[request.stan]
        if response is not None:
            assert isinstance(response, AuthResponse | ReversalResponse), type(response)
            exchange.response = response
            exchange.answered_at = trio.current_time()
            stats.answered += 1
            if isinstance(response, AuthResponse) and response.response_code == "00":
                stats.approvals += 1
                assert isinstance(request, AuthRequest)
                if request.stan not in self._approved_stans:
                    self._approved_stans.add(request.stan)
                    self._approved.append(request)
        if new:
            # Answered, or its connection is gone (its switch was killed): either way a
            # later duplicate finds its commit, or is decided afresh.
            assert isinstance(request, AuthRequest)
            self._current.remove(request)
            self._completed.append(request)
        return response

    async def _slot(self, client: Client, stats: RoundStats) -> None:
        while True:
            request, new = self.next_request()
            if await self.send(client, request, new=new, stats=stats) is None:
                return

    async def _connection(self, port: int, ctx: ssl.SSLContext, stats: RoundStats) -> None:
        try:
            async with Client.connect("127.0.0.1", port, ctx, connect_timeout=5.0) as client:
                async with trio.open_nursery() as nursery:
                    for _ in range(SLOTS_PER_CONNECTION):
                        nursery.start_soon(self._slot, client, stats)
        except CONNECTION_LOST:
            return

    async def wait_in_flight(self, limit: float = 5.0) -> None:
        """Return once a request is in flight (at most ``limit`` s)."""
        with trio.move_on_after(limit):
            while not self._in_flight:
                self._busy = trio.Event()
                await self._busy.wait()

    async def round(
        self, number: int, proc: trio.Process, port: int, ctx: ssl.SSLContext, kill_after: float
    ) -> RoundStats:
        """Load the switch, SIGKILL it after ``kill_after`` s with requests in flight, and
        return once every client has seen its connection close."""
        self._round = number
        stats = RoundStats(number)
        started = trio.current_time()
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for _ in range(CONNECTIONS):
                    nursery.start_soon(self._connection, port, ctx, stats)
                await trio.sleep(kill_after)
                await self.wait_in_flight()
                stats.in_flight_at_kill = self.in_flight
                proc.send_signal(signal.SIGKILL)
                stats.load_seconds = trio.current_time() - started
                await proc.wait()
        return stats


# -- the checks of the database ---------------------------------------------------------------


def _dup_params(req: Request) -> tuple[str, ...]:
    """The duplicate key columns of ``req``'s journal row, from the fields it was sent with."""
    return (
        NETWORK,
        (req.acquirer_id or "").lstrip("0") or "0",
        req.transmission_time,
        req.stan,
        req.rrn or "",
        req.terminal_id or "",
        req.mti[:3],
    )


_KEY_COLUMNS = (
    "network",
    "acquirer_id",
    "transmission_time",
    "stan",
    "rrn",
    "terminal_id",
    "mti_class",
)
#: The key an original is found by (DE37 and DE41 are not compared), and its orig_* columns.
_ORIGINAL_COLUMNS = ("network", "acquirer_id", "transmission_time", "stan", "mti_class")


@dataclass
class DbReport:
    """Violations found and figures of the database after the run."""

    violations: list[str] = field(default_factory=list)
    journal_rows: int = 0
    holds: int = 0
    #: Approvals the journal holds whose answer no client received (committed, then killed).
    approvals_unanswered: int = 0
    #: Answered requests (other than 91 stand-ins) by response code.
    codes: dict[str, int] = field(default_factory=dict)
    #: Approvals the clients received, each checked against its journal row and hold.
    approvals_checked: int = 0
    #: Reversals recorded unmatched (they arrived before their original).
    unmatched_reversals: int = 0
    #: Wrong PINs counted, over all cards, and PIN-try samples compared.
    pin_tries: int = 0
    pin_samples: int = 0


class Reader:
    """Read-only rows of the switch's database: an SQLite file (a ``Path``) or a PostgreSQL
    database (its DSN, a ``str``). Queries are written once with ``?`` placeholders, in the
    SQL both accept; rows come back as dicts."""

    def __init__(self, db: Path | str) -> None:
        self.backend = "sqlite" if isinstance(db, Path) else "postgres"
        self._sqlite: sqlite3.Connection | None = None
        self._pg: psycopg.Connection[dict[str, Any]] | None = None
        if isinstance(db, Path):
            self._sqlite = open_readonly(db)
        else:
            # One snapshot for every query of the check.
            self._pg = psycopg.connect(db, row_factory=dict_row, connect_timeout=10)
            self._pg.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
            self._pg.read_only = True

    def rows(self, query: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        if self._sqlite is not None:
            return [dict(r) for r in self._sqlite.execute(query, params)]
        assert self._pg is not None
        return self._pg.execute(query.replace("?", "%s"), params).fetchall()

    def close(self) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        if self._pg is not None:
            self._pg.rollback()
            self._pg.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_readonly(db: Path) -> sqlite3.Connection:
    """A read-only connection to the switch's database file."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    conn.row_factory = sqlite3.Row
    return conn


def pin_tries(db: Path | str) -> dict[str, int]:
    """Each card's PIN-try counter now (a sample for ``check_database``)."""
    with Reader(db) as reader:
        return {r["id"]: r["pin_tries"] for r in reader.rows("SELECT id, pin_tries FROM cards")}


def available_balance(db: Path | str, account: str) -> int:
    """The available balance of ``account`` now."""
    with Reader(db) as reader:
        rows = reader.rows("SELECT available_balance FROM accounts WHERE id = ?", (account,))
    return int(rows[0]["available_balance"])


def check_database(
    db: Path | str,
    exchanges: Iterable[Exchange],
    *,
    pin_samples: Sequence[Mapping[str, int]] = (),
) -> DbReport:
    """Compare the database (an SQLite file, or a PostgreSQL DSN) with what the clients sent
    and were told.

    Checked: the SQLite file's integrity; one journal row per duplicate key and one hold per
    original; every answer except a 91 stand-in is journaled with the same response code
    (and approval code), and answers to the same key agree; every approval has its hold of
    the right kind, amount and account; every acknowledged reversal is journaled as a
    reversal, matched unless it overtook its original (which then holds no money); per
    hold, what reversals released adds up to what it lost, never more than its amount, and
    matches the reversals the clients had acknowledged; an unmatched reversal's original, if
    it came, was declined; every account's balances equal the opening balance minus what
    its holds and debits still keep, and every card's velocity counters what its holds keep;
    every card's PIN-try counter equals the wrong PINs journaled for it and never went down
    between the ``pin_samples`` (taken in order during the run); no journal row or hold
    comes from a request not sent.
    """
    report = DbReport()
    bad = report.violations
    exchanges = list(exchanges)
    with Reader(db) as conn:
        if conn.backend == "sqlite":
            integrity = [r["integrity_check"] for r in conn.rows("PRAGMA integrity_check")]
            if integrity != ["ok"]:
                bad.append(f"integrity_check: {integrity[:5]}")
            fk = conn.rows("PRAGMA foreign_key_check")
            if fk:
                bad.append(f"foreign_key_check: {len(fk)} rows, e.g. {fk[0]}")
        journal = conn.rows("SELECT * FROM journal ORDER BY id")
        holds = conn.rows(
            "SELECT h.*, j.stan AS orig_stan FROM holds h JOIN journal j ON j.id = h.journal_id "
            "ORDER BY h.id"
        )
        accounts = {r["id"]: r for r in conn.rows("SELECT * FROM accounts")}
        cards = {r["id"]: r["pin_tries"] for r in conn.rows("SELECT id, pin_tries FROM cards")}
        unmatched = conn.rows("SELECT * FROM unmatched_reversals")
        velocity = conn.rows("SELECT card_id, period, amount, count FROM velocity")
        _check_uniqueness(conn, bad)
    report.journal_rows, report.holds = len(journal), len(holds)
    report.unmatched_reversals = len(unmatched)

    _check_answers(journal, holds, exchanges, report)
    _check_reversals(exchanges, journal, holds, bad)
    _check_unmatched(journal, unmatched, holds, bad)
    _check_balances(accounts, holds, bad)
    _check_velocity(velocity, holds, bad)
    _check_pin_tries(cards, journal, pin_samples, report)

    sent_stans = {x.request.stan for x in exchanges}
    strangers = [r["id"] for r in journal if r["stan"] not in sent_stans]
    if strangers:
        bad.append(f"journal rows {strangers[:5]} belong to no request that was sent")
    answered_keys = {_dup_params(x.request) for x in exchanges if x.response is not None}
    report.approvals_unanswered = sum(
        1
        for r in journal
        if r["kind"] != "reversal"
        and r["response_code"] == "00"
        and tuple(r[c] for c in _KEY_COLUMNS) not in answered_keys
    )
    return report


def _check_uniqueness(conn: Reader, bad: list[str]) -> None:
    cols = ", ".join(_KEY_COLUMNS)
    twice = conn.rows(
        f"SELECT {cols}, count(*) AS n FROM journal WHERE kind <> 'duplicate' "  # noqa: S608 - constant columns
        f"GROUP BY {cols} HAVING count(*) > 1"
    )
    for row in twice:
        bad.append(f"duplicate key stan={row['stan']} has {row['n']} journal rows")
    jcols = ", ".join(f"j.{c}" for c in _KEY_COLUMNS)
    doubled = conn.rows(
        f"SELECT j.stan AS orig_stan, count(*) AS n FROM holds h "  # noqa: S608 - constant columns
        f"JOIN journal j ON j.id = h.journal_id GROUP BY {jcols} HAVING count(*) > 1"
    )
    for row in doubled:
        bad.append(f"original stan={row['orig_stan']} has {row['n']} holds")


def _check_answers(
    journal: list[dict[str, Any]],
    holds: list[dict[str, Any]],
    exchanges: list[Exchange],
    report: DbReport,
) -> None:
    bad = report.violations
    by_key = {tuple(r[c] for c in _KEY_COLUMNS): r for r in journal if r["kind"] != "duplicate"}
    hold_of = {h["journal_id"]: h for h in holds}
    seen: dict[tuple[str, ...], tuple[str, str | None]] = {}
    codes: dict[str, int] = defaultdict(int)
    for x in exchanges:
        resp = x.response
        if resp is None:
            continue
        req = x.request
        code = resp.response_code
        codes[code] += 1
        if code == "91":  # stand-in: nothing is kept, the network may ask again
            continue
        key = _dup_params(req)
        approval = resp.approval_code if isinstance(resp, AuthResponse) else None
        earlier = seen.setdefault(key, (code, approval))
        if earlier != (code, approval):
            bad.append(
                f"stan={req.stan} mti={req.mti}: answered {code}/{approval} after "
                f"{earlier[0]}/{earlier[1]} for the same duplicate key"
            )
        row = by_key.get(key)
        where = f"round {x.round} stan={req.stan} mti={req.mti}"
        if row is None:
            bad.append(f"{where}: answered {code}/{approval} but not in the journal")
            continue
        if isinstance(req, ReversalRequest):
            if code != "00":
                bad.append(f"{where}: reversal answered {code}")
            if row["kind"] != "reversal":
                bad.append(f"{where}: reversal journaled as {row['kind']}")
            # Matched, or unmatched because it overtook its original: _check_unmatched.
            continue
        if (row["response_code"], row["approval_code"]) != (code, approval):
            bad.append(
                f"{where}: answered {code}/{approval}, journal has "
                f"{row['response_code']}/{row['approval_code']}"
            )
        if code != "00":
            continue
        report.approvals_checked += 1
        if not approval:
            bad.append(f"{where}: approval without DE38")
        hold = hold_of.get(row["id"])
        kind = "debit" if req.mti[1] == "2" else "hold"
        expected = (kind, req.amount, ACCOUNT_OF[req.pan])
        if hold is None:
            bad.append(f"{where}: approved without a hold")
        elif (hold["kind"], hold["amount"], hold["account_id"]) != expected:
            found = (hold["kind"], hold["amount"], hold["account_id"])
            bad.append(f"{where}: hold {found}, expected {expected}")
    report.codes = dict(sorted(codes.items()))


def _check_reversals(
    exchanges: list[Exchange],
    journal: list[dict[str, Any]],
    holds: list[dict[str, Any]],
    bad: list[str],
) -> None:
    released: dict[int, int] = defaultdict(int)
    for row in journal:
        if row["kind"] == "reversal" and row["original_journal_id"] is not None:
            released[row["original_journal_id"]] += row["released_amount"] or 0
    by_stan = {h["orig_stan"]: h for h in holds}
    for h in holds:
        lost = h["amount"] - h["remaining"]
        if not 0 <= h["remaining"] <= h["amount"]:
            bad.append(
                f"hold of stan={h['orig_stan']}: remaining {h['remaining']} of {h['amount']}"
            )
        if released[h["journal_id"]] != lost:
            bad.append(
                f"hold of stan={h['orig_stan']}: reversals released "
                f"{released[h['journal_id']]}, the hold lost {lost}"
            )
    # What remains of each reversed original, from what the clients were told. An original
    # without a hold was declined (or never decided): _check_answers holds every approval
    # a client received to its hold.
    sent: dict[str, list[Exchange]] = defaultdict(list)
    for x in exchanges:
        if isinstance(x.request, ReversalRequest):
            sent[x.request.original.stan].append(x)
    for stan, revs in sent.items():
        hold = by_stan.get(stan)
        if hold is None:
            continue
        first = revs[0].request
        assert isinstance(first, ReversalRequest)
        keep = first.replacement_amount or 0
        if any(x.response is not None and x.response.response_code == "00" for x in revs):
            allowed = {keep}
        else:
            allowed = {keep, hold["amount"]}
        if hold["remaining"] not in allowed:
            bad.append(
                f"original stan={stan}: {hold['remaining']} of {hold['amount']} remains, "
                f"expected one of {sorted(allowed)} after {len(revs)} reversal messages"
            )


def _check_unmatched(
    journal: list[dict[str, Any]],
    unmatched: list[dict[str, Any]],
    holds: list[dict[str, Any]],
    bad: list[str],
) -> None:
    """An unmatched reversal overtook its original: the original, if it was decided at all,
    moved no money, and the row that resolved it is that original, declined."""
    rows = {r["id"]: r for r in journal}
    originals = {
        tuple(r[c] for c in _ORIGINAL_COLUMNS): r
        for r in journal
        if r["kind"] not in ("duplicate", "reversal")
    }
    with_money = {h["journal_id"] for h in holds}
    for u in unmatched:
        rev = rows.get(u["journal_id"])
        if rev is None or rev["kind"] != "reversal":
            bad.append(f"unmatched reversal {u['journal_id']}: no reversal row")
            continue
        original = originals.get(tuple(rev[f"orig_{c}"] for c in _ORIGINAL_COLUMNS))
        where = f"unmatched reversal stan={rev['stan']} of stan={rev['orig_stan']}"
        if original is not None and original["id"] in with_money:
            bad.append(f"{where}: its original holds money (approved {original['reason']})")
        resolved = u["resolved_journal_id"]
        if resolved is not None and (original is None or resolved != original["id"]):
            bad.append(f"{where}: resolved by journal row {resolved}, not by its original")
        if original is not None and original["response_code"] == "00":
            bad.append(f"{where}: its original was answered 00 ({original['reason']})")


def _check_velocity(
    velocity: list[dict[str, Any]], holds: list[dict[str, Any]], bad: list[str]
) -> None:
    """Each card's day and month counters equal what its holds keep: the amount that
    remains, and the number of holds not fully reversed (committed with the decision)."""
    expected: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0])
    for h in holds:
        for period in ("D" + h["velocity_day"], "M" + h["velocity_month"]):
            totals = expected[(h["card_id"], period)]
            totals[0] += h["remaining"]
            totals[1] += 1 if h["remaining"] > 0 else 0
    found = {(r["card_id"], r["period"]): [r["amount"], r["count"]] for r in velocity}
    for key in sorted(set(expected) | set(found)):
        want, got = expected.get(key, [0, 0]), found.get(key, [0, 0])
        if want != got:
            bad.append(f"velocity {key[1]} of card {key[0]}: [amount, count] {got}, holds {want}")


def _check_balances(
    accounts: dict[str, dict[str, Any]], holds: list[dict[str, Any]], bad: list[str]
) -> None:
    on_hold: dict[str, int] = defaultdict(int)
    debited: dict[str, int] = defaultdict(int)
    for h in holds:
        (debited if h["kind"] == "debit" else on_hold)[h["account_id"]] += h["remaining"]
    for account_id, opening in OPENING.items():
        acct = accounts.get(account_id)
        if acct is None:
            bad.append(f"account {account_id} missing")
            continue
        ledger, available = acct["ledger_balance"], acct["available_balance"]
        if available != ledger - on_hold[account_id]:
            bad.append(
                f"account {account_id}: available {available} != ledger {ledger} - "
                f"active holds {on_hold[account_id]}"
            )
        if ledger != opening - debited[account_id]:
            bad.append(
                f"account {account_id}: ledger {ledger} != opening {opening} - "
                f"debits {debited[account_id]}"
            )
        if available < 0:
            bad.append(f"account {account_id}: available {available} < 0 without advices")


def _check_pin_tries(
    cards: dict[str, int],
    journal: list[dict[str, Any]],
    samples: Sequence[Mapping[str, int]],
    report: DbReport,
) -> None:
    """Every card's counter is the number of wrong PINs journaled for it (the load sends no
    right PIN and never reaches a limit), and it never went down from one sample to the
    next, nor from the last sample to the end."""
    bad = report.violations
    wrong: dict[str, int] = defaultdict(int)
    for r in journal:
        if r["kind"] != "duplicate" and r["reason"] == "wrong_pin" and r["card_id"]:
            wrong[r["card_id"]] += 1
    for card_id, tries in sorted(cards.items()):
        if tries != wrong[card_id]:
            bad.append(f"card {card_id}: {tries} PIN tries, {wrong[card_id]} wrong PINs journaled")
    report.pin_tries = sum(wrong.values())
    report.pin_samples = len(samples)
    series = [*samples, cards]
    for i, (before, after) in enumerate(itertools.pairwise(series)):
        for card_id, tries in before.items():
            if after.get(card_id, 0) < tries:
                bad.append(
                    f"card {card_id}: PIN tries went back from {tries} to "
                    f"{after.get(card_id, 0)} after sample {i}"
                )


@dataclass
class Phases:
    """When each phase began (trio clock): an exchange belongs to the phase it was sent in."""

    starts: list[tuple[float, str]]

    def begin(self, name: str) -> None:
        self.starts.append((trio.current_time(), name))

    def of(self, x: Exchange) -> str:
        name = self.starts[0][1]
        for at, phase in self.starts:
            if x.sent_at >= at:
                name = phase
        return name

    @property
    def current(self) -> str:
        return self.starts[-1][1]


class Driver:
    """The crash tests' mixed load against one live switch until ``stopping`` (the fault
    tests and the soak: nothing is killed, so every request must be answered); with
    ``echoes``, each
    connection also sends an 0800 echo test (DE70 301) every ``ECHO_PAUSE`` seconds, each of
    which must be answered 0810 00 with its STAN (counted in ``echoes``)."""

    def __init__(
        self,
        port: int,
        ctx: ssl.SSLContext,
        seed_value: int,
        *,
        pins: bool = False,
        echoes: bool = False,
    ) -> None:
        self.port, self.ctx = port, ctx
        self.load = Load(random.Random(seed_value), pins=pins)
        self.stats = RoundStats(0)
        self.phases = Phases([(0.0, "before")])
        self.stopping = False
        self.progress = trio.Event()
        self.with_echoes = echoes
        self.echoes = 0

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(DRIVER_CONNECTIONS):
                nursery.start_soon(self._connection)

    async def _connection(self) -> None:
        async with Client.connect("127.0.0.1", self.port, self.ctx, connect_timeout=5.0) as c:
            async with trio.open_nursery() as nursery:
                for _ in range(SLOTS_PER_CONNECTION):
                    nursery.start_soon(self._slot, c)
                if self.with_echoes:
                    nursery.start_soon(self._echoes, c)

    async def _echoes(self, client: Client) -> None:
        while not self.stopping:
            stan = self.load.new_stan()
            with trio.fail_after(PHASE_TIMEOUT):
                answer = await client.request(echo(stan))
            assert isinstance(answer, NetworkResponse), answer
            assert (answer.response_code, answer.stan, answer.code) == ("00", stan, "301")
            self.echoes += 1
            await trio.sleep(ECHO_PAUSE)

    async def _slot(self, client: Client) -> None:
        while not self.stopping:
            request, new = self.load.next_request()
            try:
                response = await self.load.send(client, request, new=new, stats=self.stats)
            except CONNECTION_LOST:
                response = None
            assert response is not None, "a request went unanswered on a live switch"
            self.progress.set()
            self.progress = trio.Event()

    def answered(self, phase: str, code: str) -> int:
        return sum(
            1
            for x in self.load.exchanges
            if x.response is not None
            and x.response.response_code == code
            and self.phases.of(x) == phase
        )

    async def wait_for(self, phase: str, code: str, count: int = PER_PHASE) -> None:
        """Until ``count`` requests sent in ``phase`` were answered ``code``."""
        with trio.fail_after(PHASE_TIMEOUT):
            while self.answered(phase, code) < count:
                await self.progress.wait()
