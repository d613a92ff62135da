"""A stateful model test: random sequences of requests against the pipeline and a store, each
step checked against a reference model written here.

What lives here: ``_Model`` (cards, accounts, holds, PIN-try counters, velocity counters,
unmatched reversals and the journal, as the commit rules describe them, in plain Python),
``_Harness`` (the pipeline over the software HSM with a failing wrapper, and a store: the
in-memory ``MemoryStore`` on trio's autojump clock, or SQLite in a temporary file on the real
clock, each kept open in a trio loop of its own thread between hypothesis steps), and the
``RuleBasedStateMachine`` whose rules send 0100/0200 (right, wrong and no PIN), duplicates,
0101/0121/0221/0401/0421 repeats, advices, completions (0220 with DE90), full, partial,
repeated, unmatched and other-card reversals, with HSM and store outages and cancellations.

After EVERY step: the answer is the model's; every answer sent matches its journal row (a
replay is the committed answer, approval code included); available = ledger - active holds
on every account and both equal the model's; each journal row has at most one money row and
each money row keeps 0 <= remaining <= amount, as in the model (so nothing is released twice
and a reversal never releases more than remains); PIN-try counters equal the model's and
never go back except by a right PIN; a stand-in (91) leaves no journal row and no hold.

Size: ``CARDSWITCH_MODEL_EXAMPLES`` examples per backend (default: a CI-sized run),
``CARDSWITCH_MODEL_STEPS`` steps each. A failure prints the minimal step sequence and a
``@reproduce_failure`` blob; ``pytest --hypothesis-seed=N`` replays a whole run.

What does not live here: the commit rules themselves (switch/store/rules.py), unit tests of
single decisions (test_pipeline.py, test_commit_rules.py).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import threading
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from hsm.api import Hsm
from hsm.carddata import HsmVault
from hsm.errors import HsmUnavailable
from switch.acquirer import build_auth, build_reversal, encipher_pin
from switch.config import Config, PipelineConfig, StoreConfig
from switch.handler import Decision
from switch.pipeline import Pipeline
from switch.provision import CardRow, import_cards
from switch.store.api import Store
from switch.store.memory import MemoryStore
from switch.store.models import (
    Account,
    AuthIntent,
    AuthOutcome,
    Card,
    CardStatus,
    DuplicateKey,
    ReversalIntent,
    ReversalOutcome,
    StoredOutcome,
    StoreError,
)
from switch.store.sqlite import open_sqlite_store
from switch.testing import (
    ENCRYPTION_KEY,
    FINGERPRINT_KEY,
    PINNED_NOW,
    context_for,
    software_engine,
)
from switch.wire.messages import AuthRequest, OriginalData, ReversalRequest

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[1]
DEMO_ZPK = "0123456789ABCDEFFEDCBA9876543210"
#: Examples per backend and steps per example; the defaults keep the default suite short.
EXAMPLES = int(os.environ.get("CARDSWITCH_MODEL_EXAMPLES", "25"))
STEPS = int(os.environ.get("CARDSWITCH_MODEL_STEPS", "30"))
#: DE7 of every request (the pinned clock's day) and the acquirer and terminal they come from.
WHEN = "1201120000"
ACQUIRER = "12345678"
#: The pipeline's budget (PipelineConfig default) and the stand-in DE39 (issuer_unavailable).
BUDGET = 2.0
STAND_IN = "91"
PIN_TRY_LIMIT = 3
#: Amounts around the demo balances and limits: 0 (account verification), the small
#: account's 1.00 and one cent over it, the approval card's 5,000.00 per-transaction maximum
#: and one cent over it.
AMOUNTS = (0, 1, 60, 100, 101, 2500, 150_000, 499_999, 500_000, 500_001)
UNKNOWN_PAN = "4999999999999999"
#: How often each (MTI, path, DE39) and each money event was reached in this run
#: (printed with CARDSWITCH_MODEL_STATS=1 and pytest -s).
PATHS: Counter[str] = Counter()


@dataclass
class MCard:
    """A demo card as the model sees it."""

    pan: str
    account: str
    pin: str | None
    blocked: bool = False
    per_txn_max: int | None = None
    daily_amount: int | None = None
    daily_count: int | None = None
    currency: str = "978"
    id: str = ""  # the store's card id, found by fingerprint at start


def _demo_cards() -> tuple[list[CardRow], dict[str, MCard]]:
    raw = json.loads((REPO / "config" / "demo" / "cards.json").read_text())["cards"]
    rows = [CardRow.from_mapping(r, f"row {i}") for i, r in enumerate(raw)]
    by_pan = {r["pan"]: r for r in raw}
    model = {}
    for pan in ("4123456789012345", "1122334455667718", "4666655554444111", "4333322221111222"):
        r = by_pan[pan]
        model[pan] = MCard(
            pan=pan,
            account=r["account"],
            pin=r.get("pin") if r.get("pvk") else None,
            blocked=r["status"] == "blocked",
            per_txn_max=r.get("per_txn_max"),
            daily_amount=r.get("daily_amount"),
            daily_count=r.get("daily_count"),
            currency=r["currency"],
        )
    return rows, model


ROWS, _CARDS = _demo_cards()
PANS = (*_CARDS, UNKNOWN_PAN)
BALANCES = {r.account: r.balance for r in ROWS}

# -- the reference model ------------------------------------------------------------------------

Key = tuple[str, str, str, str, str, str]  # acquirer, DE7, STAN, RRN, terminal, MTI class


def _class(mti: str) -> str:
    return mti[:3]


def _key(req: AuthRequest | ReversalRequest) -> Key:
    return (
        req.acquirer_id or "",
        req.transmission_time,
        req.stan,
        req.rrn or "",
        req.terminal_id or "",
        _class(req.mti),
    )


def _auth_digest(req: AuthRequest) -> tuple[object, ...]:
    return ("auth", _class(req.mti), req.processing_code, req.amount, req.currency, req.pan)


def _reversal_digest(rev: ReversalRequest) -> tuple[object, ...]:
    o = rev.original
    return (
        "rev",
        _class(rev.mti),
        rev.amount,
        rev.replacement_amount or 0,
        rev.currency,
        rev.pan,
        o.mti,
        o.stan,
        o.transmission_time,
        o.acquirer_id,
    )


def _original_key(o: OriginalData, named_by: AuthRequest | ReversalRequest) -> Key:
    """The key an original named through DE90 has (DE37/DE41 of the naming request: the
    profiles here match on them)."""
    return (
        o.acquirer_id,
        o.transmission_time,
        o.stan,
        named_by.rrn or "",
        named_by.terminal_id or "",
        _class(o.mti),
    )


#: The class an advice without DE90 names: its own key in the request's class.
_ADVISED = {"012": "010", "022": "020"}


@dataclass
class MHold:
    account: str
    card_id: str
    kind: Literal["hold", "debit"]
    amount: int
    remaining: int
    completed: bool = False


@dataclass
class MRow:
    """One journal row: what it is, the answer it keeps, the money row it has."""

    key: Key
    digest: tuple[object, ...]
    kind: Literal["auth", "reversal", "duplicate"]
    card_id: str | None
    currency: str
    code: str
    approval: str | None = None
    hold: MHold | None = None


@dataclass
class MUnmatched:
    original: Key
    card_id: str | None
    currency: str
    resolved: bool = False


@dataclass
class Expect:
    """What the model expects of one request.

    ``path``: ``replay`` (a stored answer, nothing changes), ``stand_in`` (91 before the store
    took anything) or ``commit`` (the store decides; ``apply`` records it in the model).
    """

    path: Literal["replay", "stand_in", "commit"]
    code: str
    row: MRow | None = None
    apply: Callable[[str | None], object] | None = None
    #: The card whose PIN was verified right (its counter may go back), if any.
    right_pin_card: str | None = None


@dataclass
class _Model:
    cards: dict[str, MCard]
    ledger: dict[str, int]
    pin_tries: dict[str, int] = field(default_factory=dict)
    #: Velocity counters of the pinned day: card id -> [amount, count].
    day: dict[str, list[int]] = field(default_factory=dict)
    rows: list[MRow] = field(default_factory=list)
    unmatched: list[MUnmatched] = field(default_factory=list)
    hsm_down: bool = False
    store_down: bool = False

    def available(self, account: str) -> int:
        return self.ledger[account] - sum(
            r.hold.remaining
            for r in self.rows
            if r.hold is not None and r.hold.account == account and r.hold.kind == "hold"
        )

    def _stored(self, key: Key, digest: tuple[object, ...]) -> MRow | None:
        return next((r for r in self.rows if r.key == key and r.digest == digest), None)

    def _taken(self, key: Key) -> bool:
        return any(r.key == key for r in self.rows)

    def _original(self, key: Key) -> MRow | None:
        return next((r for r in self.rows if r.kind == "auth" and r.key == key), None)

    def _unmatched_for(self, key: Key, card_id: str | None, currency: str) -> MUnmatched | None:
        for u in self.unmatched:
            if (
                not u.resolved
                and u.original == key
                and u.card_id in (None, card_id)
                and u.currency in ("", currency)
            ):
                return u
        return None

    def _bump(self, card_id: str, amount: int, count: int) -> None:
        old = self.day.setdefault(card_id, [0, 0])
        old[0] = max(0, old[0] + amount)
        old[1] = max(0, old[1] + count)

    def _row(  # noqa: PLR0917
        self,
        key: Key,
        digest: tuple[object, ...],
        kind: Any,
        card_id: str | None,
        currency: str,
        code: str,
    ) -> Callable[[str | None], MRow]:
        def add(approval: str | None) -> MRow:
            row = MRow(key, digest, kind, card_id, currency, code, approval)
            self.rows.append(row)
            return row

        return add

    # -- authorizations ------------------------------------------------------------------------

    def expect_auth(self, req: AuthRequest, pin: Literal["right", "wrong"] | None) -> Expect:
        key, digest = _key(req), _auth_digest(req)
        if self.store_down:  # the duplicate lookup fails first
            return Expect("stand_in", STAND_IN)
        stored = self._stored(key, digest)
        if stored is not None:
            return Expect("replay", stored.code, row=stored)
        advice = req.mti[1:3] in ("12", "22")
        financial = req.mti[1] == "2"
        card = self.cards.get(req.pan)
        conflict = self._taken(key)
        new_row = self._row(key, digest, "auth", None, req.currency, "")
        intent_card: MCard | None = None
        decline: str | None = None  # the DE39 of the pipeline's own decline
        pin_check: Literal["ok", "bad"] | None = None
        if not advice and financial and req.amount == 0:
            decline = "13"
        elif card is None or card.currency != req.currency:
            decline = "00" if advice else ("14" if card is None else "57")
        elif advice:
            intent_card = card
            if req.response_code not in (None, "00"):
                decline = "00"  # the advice of a decline: recorded, nothing moves
        else:
            intent_card = card
            if card.blocked:
                decline = "62"
            else:
                if pin is not None:
                    if self.pin_tries[card.id] >= PIN_TRY_LIMIT or card.pin is None:
                        pin_check = "bad"
                    elif self.hsm_down:
                        return Expect("stand_in", STAND_IN)
                    else:
                        pin_check = "ok" if pin == "right" else "bad"
                if card.per_txn_max is not None and req.amount > card.per_txn_max:
                    decline = "61"
        if conflict:
            add = self._row(key, digest, "duplicate", None, req.currency, "94")
            return Expect("commit", "94", apply=add)
        card_id = intent_card.id if intent_card else None
        unmatched = self._unmatched_for(key, card_id, req.currency)
        if unmatched is None and advice:
            named = (
                _original_key(req.original, req)
                if req.original is not None
                else (*key[:5], _ADVISED[key[5]])
            )
            unmatched = self._unmatched_for(named, card_id, req.currency)

        def finish(
            code: str,
            hold: MHold | None = None,
            extra: Callable[[], None] | None = None,
            tries: int | None = None,
            ok_pin: bool = False,
        ) -> Expect:
            def apply(approval: str | None) -> None:
                row = new_row(approval)
                row.card_id, row.code, row.hold = card_id, code, hold
                if tries is not None and card_id is not None:
                    PATHS["pin tries reset" if tries == 0 else "pin tries counted"] += 1
                    self.pin_tries[card_id] = tries
                if unmatched is not None:
                    unmatched.resolved = True
                    PATHS["unmatched reversal resolved"] += 1
                if extra is not None:
                    extra()

            return Expect("commit", code, apply=apply, right_pin_card=card_id if ok_pin else None)

        if unmatched is not None:
            return finish("00" if advice else "05")
        if advice and decline is not None:
            return finish(decline)
        assert intent_card is not None or decline is not None
        if advice:
            assert intent_card is not None
            return self._advice(req, intent_card, finish)
        tries: int | None = None
        ok_pin = False
        if intent_card is not None and pin_check is not None:
            current = self.pin_tries[intent_card.id]
            if current >= PIN_TRY_LIMIT:
                return finish("75")
            if pin_check == "bad":
                return finish("75" if current + 1 >= PIN_TRY_LIMIT else "55", tries=current + 1)
            ok_pin = True
            tries = 0 if current else None
        if decline is not None:
            return finish(decline, tries=tries, ok_pin=ok_pin)
        assert intent_card is not None
        c = intent_card
        counters = self.day.get(c.id, [0, 0])
        if c.daily_amount is not None and counters[0] + req.amount > c.daily_amount:
            return finish("61", tries=tries, ok_pin=ok_pin)
        if c.daily_count is not None and counters[1] + 1 > c.daily_count:
            return finish("65", tries=tries, ok_pin=ok_pin)
        if self.available(c.account) < req.amount:
            return finish("51", tries=tries, ok_pin=ok_pin)
        return self._apply_own(req, c, finish, tries=tries, ok_pin=ok_pin)

    def _apply_own(
        self, req: AuthRequest, c: MCard, finish: Callable[..., Expect], **kwargs: Any
    ) -> Expect:
        """An approval (or an advice applied by itself): a hold or a debit of the amount."""
        kind: Literal["hold", "debit"] = "debit" if req.mti[1] == "2" else "hold"
        hold = MHold(c.account, c.id, kind, req.amount, req.amount) if req.amount else None

        def extra() -> None:
            if kind == "debit":
                self.ledger[c.account] -= req.amount
            if req.amount:
                self._bump(c.id, req.amount, 1)

        return finish("00", hold=hold, extra=extra, **kwargs)

    def _advice(self, req: AuthRequest, c: MCard, finish: Callable[..., Expect]) -> Expect:
        key = _key(req)
        named = (
            _original_key(req.original, req)
            if req.original is not None
            else (*key[:5], _ADVISED[key[5]])
        )
        original = self._original(named)
        if (
            original is None
            or original.card_id != c.id
            or original.currency != req.currency
            or original.hold is None
        ):
            return self._apply_own(req, c, finish)
        h = original.hold
        if not (req.mti[1] == "2" and h.kind == "hold" and not h.completed and h.remaining):
            return finish("00")  # already applied: nothing moves twice
        release = h.remaining
        debit = MHold(c.account, c.id, "debit", req.amount, req.amount) if req.amount else None

        def extra() -> None:
            PATHS["completion released a hold"] += 1
            h.remaining, h.completed = 0, True
            self.ledger[c.account] -= req.amount
            self._bump(c.id, req.amount - release, 0)

        return finish("00", hold=debit, extra=extra)

    # -- reversals -----------------------------------------------------------------------------

    def expect_reversal(self, rev: ReversalRequest) -> Expect:
        key, digest = _key(rev), _reversal_digest(rev)
        if self.store_down:
            return Expect("stand_in", STAND_IN)
        stored = self._stored(key, digest)
        if stored is not None:
            return Expect("replay", stored.code, row=stored)
        currency = rev.currency or ""
        if self._taken(key):
            add = self._row(key, digest, "duplicate", None, currency, "94")
            return Expect("commit", "94", apply=add)
        card = self.cards.get(rev.pan or "")
        card_id = card.id if card else None
        add = self._row(key, digest, "reversal", card_id, currency, "00")
        okey = _original_key(rev.original, rev)
        original = self._original(okey)
        if original is None:

            def unmatched(approval: str | None) -> None:
                add(approval)
                self.unmatched.append(MUnmatched(okey, card_id, currency))

            return Expect("commit", "00", apply=unmatched)
        h = original.hold
        other = (bool(rev.pan) and card_id != original.card_id) or (
            bool(currency) and currency != original.currency
        )
        if other or h is None or h.completed:
            return Expect("commit", "00", apply=add)
        release = max(0, h.remaining - (rev.replacement_amount or 0))

        def matched(approval: str | None) -> None:
            add(approval)
            h.remaining -= release
            PATHS["reversal released" if release else "reversal released nothing"] += 1
            if release and h.remaining:
                PATHS["partial reversal"] += 1
            if h.kind == "debit":
                self.ledger[h.account] += release
            self._bump(h.card_id, -release, -1 if release and not h.remaining else 0)

        return Expect("commit", "00", apply=matched)


# -- the system under test ----------------------------------------------------------------------


class _FailingHsm:
    """The software HSM, whose commands raise ``HsmUnavailable`` while ``down``."""

    def __init__(self, hsm: Hsm) -> None:
        self._hsm = hsm
        self.down = False

    def __getattr__(self, name: str) -> Any:
        inner = getattr(self._hsm, name)
        if not callable(inner) or name.startswith("_"):
            return inner

        async def command(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise HsmUnavailable("token removed")
            return await inner(*args, **kwargs)

        return command


class _SwitchableStore:
    """A store that raises ``StoreError("unavailable")`` while ``unavailable`` (the SQLite
    counterpart of ``MemoryStore.unavailable``)."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.unavailable = False

    def _check(self) -> None:
        if self.unavailable:
            raise StoreError("unavailable", "the test set the store unavailable")

    async def get_card_by_fingerprint(self, fingerprint: bytes) -> Card | None:
        self._check()
        return await self._inner.get_card_by_fingerprint(fingerprint)  # type: ignore[no-any-return]

    async def get_card(self, card_id: str) -> Card | None:
        self._check()
        return await self._inner.get_card(card_id)  # type: ignore[no-any-return]

    async def get_account(self, account_id: str) -> Account | None:
        self._check()
        return await self._inner.get_account(account_id)  # type: ignore[no-any-return]

    async def lookup_auth(self, key: DuplicateKey, digest: str, fingerprint: bytes) -> Any:
        self._check()
        return await self._inner.lookup_auth(key, digest, fingerprint)

    async def find_outcome(self, key: DuplicateKey, digest: str) -> StoredOutcome | None:
        self._check()
        return await self._inner.find_outcome(key, digest)  # type: ignore[no-any-return]

    async def list_cards(self) -> list[Card]:
        self._check()
        return await self._inner.list_cards()  # type: ignore[no-any-return]

    async def active_holds_total(self, account_id: str) -> int:
        self._check()
        return await self._inner.active_holds_total(account_id)  # type: ignore[no-any-return]

    async def commit_auth(
        self, intent: AuthIntent, *, deadline: float | None = None
    ) -> AuthOutcome:
        self._check()
        return await self._inner.commit_auth(intent, deadline=deadline)  # type: ignore[no-any-return]

    async def commit_reversal(
        self, intent: ReversalIntent, *, deadline: float | None = None
    ) -> ReversalOutcome:
        self._check()
        return await self._inner.commit_reversal(intent, deadline=deadline)  # type: ignore[no-any-return]

    def __getattr__(self, name: str) -> Any:
        """The Store methods the model does not fail on purpose (operator reads and writes)."""
        return getattr(self._inner, name)

    async def put_account(self, account: Account) -> None:
        self._check()
        await self._inner.put_account(account)

    async def put_card(self, card: Card) -> None:
        self._check()
        await self._inner.put_card(card)

    async def set_card_status(self, card_id: str, status: CardStatus) -> bool:
        self._check()
        return await self._inner.set_card_status(card_id, status)  # type: ignore[no-any-return]


@dataclass(frozen=True)
class _JRow:
    """A journal row as the checks compare it."""

    key: Key
    category: str  # auth, reversal, duplicate
    code: str
    approval: str | None
    hold: tuple[str, int, int, bool] | None  # kind, amount, remaining, completed

    @property
    def answer(self) -> tuple[Key, str, str, str | None]:
        """The row without its money row (which later requests may change)."""
        return self.key, self.category, self.code, self.approval


@dataclass
class _Harness:
    pipeline: Pipeline
    hsm: _FailingHsm
    store: Any  # MemoryStore or _SwitchableStore
    card_ids: dict[str, str]
    config: Config
    #: What the store holds now: journal rows in order, accounts, PIN tries by card id.
    journal: Callable[[], list[_JRow]]
    accounts: Callable[[], dict[str, tuple[int, int]]]
    pin_tries: Callable[[], dict[str, int]]
    memory: MemoryStore | None = None


def _answers(rows: list[_JRow]) -> list[tuple[Key, str, str, str | None]]:
    return [r.answer for r in rows]


def _category(kind: str) -> str:
    return kind if kind in ("reversal", "duplicate") else "auth"


def _memory_probes(store: MemoryStore) -> dict[str, Callable[[], Any]]:
    def journal() -> list[_JRow]:
        out = []
        for row in store.journal:
            h = store.holds.get(row.id)
            # the in-memory hold row keeps no amount of its own: it is the request's amount
            hold = (
                None if h is None else (h.kind, row.amount, h.remaining, h.completed_by is not None)
            )
            approval = row.outcome.approval_code if isinstance(row.outcome, AuthOutcome) else None
            key = row.dup_key
            out.append(
                _JRow(
                    (
                        key.acquirer_id,
                        key.transmission_time,
                        key.stan,
                        key.rrn,
                        key.terminal_id,
                        key.mti_class,
                    ),
                    _category(row.kind),
                    row.outcome.response_code,
                    approval,
                    hold,
                )
            )
        return out

    def accounts() -> dict[str, tuple[int, int]]:
        return {a.id: (a.ledger_balance, a.available_balance) for a in store.accounts.values()}

    def pin_tries() -> dict[str, int]:
        return {c.id: c.pin_tries for c in store.cards.values()}

    return {"journal": journal, "accounts": accounts, "pin_tries": pin_tries}


def _sqlite_probes(path: Path) -> dict[str, Callable[[], Any]]:
    def query(sql: str) -> list[Any]:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return conn.execute(sql).fetchall()
        finally:
            conn.close()

    def journal() -> list[_JRow]:
        rows = query(
            "SELECT j.acquirer_id, j.transmission_time, j.stan, j.rrn, j.terminal_id, "
            "j.mti_class, j.kind, j.response_code, j.approval_code, h.kind, h.amount, "
            "h.remaining, h.completed_by FROM journal j LEFT JOIN holds h ON h.journal_id = j.id "
            "ORDER BY j.id"
        )
        return [
            _JRow(
                tuple(r[:6]),
                _category(r[6]),
                r[7],
                r[8],
                None if r[9] is None else (r[9], r[10], r[11], r[12] is not None),
            )
            for r in rows
        ]

    def accounts() -> dict[str, tuple[int, int]]:
        return {
            r[0]: (r[1], r[2])
            for r in query("SELECT id, ledger_balance, available_balance FROM accounts")
        }

    def pin_tries() -> dict[str, int]:
        return dict(query("SELECT id, pin_tries FROM cards"))

    return {"journal": journal, "accounts": accounts, "pin_tries": pin_tries}


Backend = Literal["memory", "sqlite"]


@asynccontextmanager
async def _harness(backend: Backend, workdir: Path) -> AsyncIterator[_Harness]:
    failing: list[_FailingHsm] = []

    def wrap(hsm: Hsm) -> Hsm:
        failing.append(_FailingHsm(hsm))
        return failing[0]

    # Breakers never open here: the model sees each dependency failure on its own request
    # (the breaker's own behaviour is tests/test_breaker.py's and test_stand_in_policy.py's).
    no_breakers = PipelineConfig(breaker_failures=1_000_000)
    engine = await software_engine(
        ROWS, hsm_wrapper=wrap, clock=lambda: PINNED_NOW, pipeline=no_breakers
    )
    vault = HsmVault(engine.hsm, FINGERPRINT_KEY, ENCRYPTION_KEY)
    if backend == "memory":
        ids = {pan: await _card_id(engine.store, vault, pan) for pan in _CARDS}
        probes = _memory_probes(engine.store)
        yield _Harness(
            engine.pipeline,
            failing[0],
            engine.store,
            ids,
            engine.config,
            probes["journal"],
            probes["accounts"],
            probes["pin_tries"],
            engine.store,
        )
        return
    path = workdir / "model.db"
    async with open_sqlite_store(StoreConfig(path=path)) as sq:
        report = await import_cards(sq, engine.hsm, vault, ROWS)
        assert report.ok, report.failures
        store = _SwitchableStore(sq)
        pipeline = Pipeline(
            engine.config,
            store=cast(Store, store),
            hsm=failing[0],
            vault=vault,
            clock=lambda: PINNED_NOW,
        )
        ids = {pan: await _card_id(sq, vault, pan) for pan in _CARDS}
        probes = _sqlite_probes(path)
        yield _Harness(
            pipeline,
            failing[0],
            store,
            ids,
            engine.config,
            probes["journal"],
            probes["accounts"],
            probes["pin_tries"],
        )


async def _card_id(store: Any, vault: HsmVault, pan: str) -> str:
    card = await store.get_card_by_fingerprint(await vault.fingerprint(pan))
    assert card is not None, pan
    return str(card.id)


class _Loop:
    """A trio loop in a thread of its own that keeps an async resource open between the
    synchronous steps of a hypothesis state machine."""

    def __init__(
        self, open_: Callable[[], AbstractAsyncContextManager[Any]], clock: trio.abc.Clock | None
    ) -> None:
        self._open = open_
        self._clock = clock
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.value: Any = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="model-trio")
        self._thread.start()
        if not self._ready.wait(60):
            raise RuntimeError("the trio loop of the model test did not start")
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            trio.run(self._main, clock=self._clock)
        except BaseException as exc:  # reported to the test thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with self._open() as value:
            self.value = value
            self._ready.set()
            await self._stop.wait()

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def close(self) -> None:
        if self._thread.is_alive():
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self._thread.join(30)


# -- the state machine ---------------------------------------------------------------------------

#: Seconds after which a request on the SQLite backend (real clock) is cancelled, for each
#: choice of the memory backend's (autojump clock) cancel times.
_SQLITE_CANCEL = {0.25: 0.0, 1.0: 0.0005, 2.5: 0.002, 10.0: 0.02}
PIN_CHOICES = st.sampled_from([None, "right", "wrong"])
_Answer = tuple[str, str | None] | None  # (DE39, DE38) of the answer sent; None: cancelled


class ModelMachine(RuleBasedStateMachine):
    backend: Backend = "memory"

    def __init__(self) -> None:
        super().__init__()
        self._dir = Path(tempfile.mkdtemp(prefix="cardswitch-model-"))
        clock = trio.testing.MockClock(autojump_threshold=0) if self.backend == "memory" else None
        self.loop = _Loop(lambda: _harness(self.backend, self._dir), clock)
        self.h: _Harness = self.loop.value
        cards = {pan: replace(c, id=self.h.card_ids[pan]) for pan, c in _CARDS.items()}
        self.model = _Model(cards, dict(BALANCES), pin_tries={c.id: 0 for c in cards.values()})
        #: Authorization-class requests sent (originals for repeats, advices, reversals).
        self.sent: list[AuthRequest] = []
        #: Originals not sent yet, whose reversal may come first.
        self.reserved: list[AuthRequest] = []
        self._stan = 0
        self._tries_before = self.h.pin_tries()

    def teardown(self) -> None:
        self.loop.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    # -- helpers -------------------------------------------------------------------------------

    def _next_stan(self) -> str:
        self._stan += 1
        return f"{self._stan:06d}"

    def _auth(self, pan: str, amount: int, mti: str, pin: str | None) -> AuthRequest:
        block = None
        if pin is not None:
            card = _CARDS.get(pan)
            digits = (card.pin or "1234") if card and pin == "right" else "0000"
            if card and card.pin == "0000":  # pragma: no cover - no demo card has it
                digits = "1111"
            block = encipher_pin(digits, pan, DEMO_ZPK)
        return build_auth(
            pan,
            amount,
            mti=mti,
            stan=self._next_stan(),
            when=WHEN,
            acquirer=ACQUIRER,
            pin_block=block,
        )

    async def _run(
        self, request: AuthRequest | ReversalRequest, cancel_after: float | None
    ) -> Decision | None:
        ctx = context_for(self.h.config)
        with trio.move_on_after(cancel_after if cancel_after is not None else 3600):
            if isinstance(request, AuthRequest):
                return await self.h.pipeline.authorize(request, ctx)
            return await self.h.pipeline.reverse(request, ctx)
        return None

    def _send(
        self,
        request: AuthRequest | ReversalRequest,
        pin: str | None = None,
        *,
        cancel_after: float | None = None,
        commit_delay: float = 0.0,
    ) -> _Answer:
        if isinstance(request, AuthRequest):
            expect = self.model.expect_auth(request, pin)  # type: ignore[arg-type]
        else:
            expect = self.model.expect_reversal(request)
        before = self.h.journal()
        if self.h.memory is not None:
            self.h.memory.commit_delay = commit_delay
        try:
            decision = self.loop.call(self._run, request, cancel_after)
        finally:
            if self.h.memory is not None:
                self.h.memory.commit_delay = 0.0
        after = self.h.journal()
        self._right_pin = expect.right_pin_card
        PATHS[f"{request.mti} {expect.path} {expect.code}"] += 1
        cancels = (
            self.h.memory is not None
            and expect.path == "commit"
            and cancel_after is not None
            and cancel_after < min(commit_delay, BUDGET)
        )
        if decision is None:  # cancelled: nothing sent
            PATHS["cancelled"] += 1
            if self.h.memory is not None:
                assert cancels, ("cancelled unexpectedly", expect.path, request)
                assert after == before, "a cancelled request left a journal row"
            elif len(after) > len(before):  # SQLite had started applying: committed, not sent
                assert expect.apply is not None and _answers(after[:-1]) == _answers(before)
                expect.apply(after[-1].approval)
            return None
        assert not cancels, ("answered although cancelled before its commit", request)
        answer = (
            decision.response.response_code,
            getattr(decision.response, "approval_code", None),
        )
        timed_out = (
            self.h.memory is not None
            and expect.path == "commit"
            and commit_delay > BUDGET
            and (cancel_after or 3600) > BUDGET
        )
        if timed_out:
            expect = Expect("stand_in", STAND_IN)
        assert answer[0] == expect.code, (expect.path, answer, expect.code, request)
        if expect.path == "stand_in":
            assert decision.stand_in is not None
            assert after == before, "a stand-in answer left a journal row or moved money"
        elif expect.path == "replay":
            assert decision.replayed and expect.row is not None
            assert answer == (expect.row.code, expect.row.approval), "replay differs"
            assert after == before, "a replay changed the journal"
        else:
            assert decision.stand_in is None and not decision.replayed
            assert len(after) == len(before) + 1
            assert _answers(after[:-1]) == _answers(before), "an earlier answer changed"
            row = after[-1]
            assert row.key == _key(request)
            assert (row.code, row.approval) == answer, "the answer sent is not its journal row"
            assert expect.apply is not None
            expect.apply(answer[1])
        return answer

    # -- rules ---------------------------------------------------------------------------------

    @rule(
        pan=st.sampled_from(PANS),
        amount=st.sampled_from(AMOUNTS),
        mti=st.sampled_from(["0100", "0200"]),
        pin=PIN_CHOICES,
    )
    def authorize(self, pan: str, amount: int, mti: str, pin: str | None) -> None:
        req = self._auth(pan, amount, mti, pin)
        self._send(req, pin)
        self.sent.append(req)

    @precondition(lambda self: self.sent)
    @rule(pick=st.integers(0, 1000))
    def duplicate_same(self, pick: int) -> None:
        """The same request again (same key, same content): its stored answer."""
        req = self.sent[pick % len(self.sent)]
        self._send(req, self._pin_of(req))

    @precondition(lambda self: self.sent)
    @rule(pick=st.integers(0, 1000), amount=st.sampled_from(AMOUNTS))
    def duplicate_other(self, pick: int, amount: int) -> None:
        """The key of a request already answered with another amount: 94, nothing moves."""
        req = self.sent[pick % len(self.sent)]
        self._send(replace(req, amount=amount), self._pin_of(req))

    @precondition(lambda self: self.sent)
    @rule(pick=st.integers(0, 1000))
    def repeat(self, pick: int) -> None:
        """0101/0121/0221: the repeat of an earlier request, answered as it was."""
        req = self.sent[pick % len(self.sent)]
        if req.mti[3] == "0" and req.mti != "0200":
            self._send(replace(req, mti=req.mti[:3] + "1"), self._pin_of(req))

    @precondition(lambda self: self.sent)
    @rule(pick=st.integers(0, 1000), declined=st.booleans(), same_amount=st.booleans())
    def advice_of_sent(self, pick: int, declined: bool, same_amount: bool) -> None:
        """0120/0220 of an authorization already sent (its own key in the advice class)."""
        req = self.sent[pick % len(self.sent)]
        if req.mti not in ("0100", "0200"):
            return
        advice = replace(
            req,
            mti="0120" if req.mti == "0100" else "0220",
            pin_block=None,
            response_code="05" if declined else None,
        )
        if not same_amount:
            advice = replace(advice, amount=req.amount + 1)
        self._send(advice)
        self.sent.append(advice)

    @rule(
        pan=st.sampled_from(PANS),
        amount=st.sampled_from(AMOUNTS),
        mti=st.sampled_from(["0120", "0220"]),
        declined=st.booleans(),
    )
    def advice_new(self, pan: str, amount: int, mti: str, declined: bool) -> None:
        req = replace(self._auth(pan, amount, mti, None), response_code="05" if declined else None)
        self._send(req)
        self.sent.append(req)

    @precondition(lambda self: self.sent)
    @rule(
        pick=st.integers(0, 1000),
        amount=st.sampled_from(AMOUNTS),
        other_card=st.one_of(st.none(), st.sampled_from(PANS)),
        same_rrn=st.booleans(),
    )
    def completion(self, pick: int, amount: int, other_card: str | None, same_rrn: bool) -> None:
        """0220 naming an earlier 0100 in DE90 (a pre-authorization to complete; any request
        when none was sent), mostly a recent one; with its RRN (found) or its own (another
        transaction)."""
        pool = [r for r in self.sent if r.mti == "0100"] or self.sent
        pre = pool[-1 - pick % len(pool)]
        req = self._auth(other_card or pre.pan, amount, "0220", None)
        req = replace(
            req,
            original=OriginalData(
                pre.mti, pre.stan, pre.transmission_time, pre.acquirer_id or "0", "0"
            ),
        )
        if same_rrn:
            req = replace(req, rrn=pre.rrn)
        self._send(req)
        self.sent.append(req)

    @rule(pan=st.sampled_from(PANS), amount=st.sampled_from(AMOUNTS), wrong=st.integers(1, 3))
    def pin_retry(self, pan: str, amount: int, wrong: int) -> None:
        """Wrong PINs, then the right one, on one card (the counter counts, locks, resets)."""
        for pin in ["wrong"] * wrong + ["right"]:
            req = self._auth(pan, amount, "0100", pin)
            self._send(req, pin)
            self.sent.append(req)
            self.store_matches_model()

    @precondition(lambda self: self.sent or self.reserved)
    @rule(
        pick=st.integers(0, 1000),
        reserved=st.booleans(),
        mti=st.sampled_from(["0400", "0420"]),
        keep=st.sampled_from([None, 0, 1, 50, 100, 2400, 150_000]),
        other_card=st.sampled_from([None, *PANS]),
        repeat=st.booleans(),
    )
    def reversal(  # noqa: PLR0917
        self,
        pick: int,
        reserved: bool,
        mti: str,
        keep: int | None,
        other_card: str | None,
        repeat: bool,
    ) -> None:
        """A full or partial (DE95) reversal, of a request sent or not sent yet (unmatched),
        possibly with another card's PAN; then maybe its 0401/0421 repeat."""
        pool = self.reserved if (reserved and self.reserved) or not self.sent else self.sent
        original = pool[pick % len(pool)]
        rev = build_reversal(
            original, mti=mti, replacement_amount=keep, stan=self._next_stan(), when=WHEN
        )
        if other_card is not None:
            rev = replace(rev, pan=other_card)
        self._send(rev)
        if repeat:
            self._send(replace(rev, mti=mti[:3] + "1"))

    @rule(
        pan=st.sampled_from(PANS),
        amount=st.sampled_from(AMOUNTS),
        mti=st.sampled_from(["0100", "0200"]),
    )
    def reserve(self, pan: str, amount: int, mti: str) -> None:
        """An original the network will send later (its reversal may overtake it)."""
        self.reserved.append(self._auth(pan, amount, mti, None))

    @precondition(lambda self: self.reserved)
    @rule(pick=st.integers(0, 1000), advice=st.booleans())
    def send_reserved(self, pick: int, advice: bool) -> None:
        req = self.reserved.pop(pick % len(self.reserved))
        if advice:
            req = replace(req, mti="0120" if req.mti == "0100" else "0220")
        self._send(req)
        self.sent.append(req)

    @rule(down=st.booleans())
    def hsm_outage(self, down: bool) -> None:
        self.h.hsm.down = self.model.hsm_down = down

    @rule(down=st.booleans())
    def store_outage(self, down: bool) -> None:
        self.h.store.unavailable = self.model.store_down = down

    @rule(
        pan=st.sampled_from(PANS),
        amount=st.sampled_from(AMOUNTS),
        mti=st.sampled_from(["0100", "0200", "0120"]),
        pin=PIN_CHOICES,
        delay=st.sampled_from([0.5, 3.0]),
        cancel_after=st.sampled_from([0.25, 1.0, 2.5, 10.0]),
        pick=st.integers(0, 1000),
        reversal=st.booleans(),
    )
    def cancelled(  # noqa: PLR0917
        self,
        pan: str,
        amount: int,
        mti: str,
        pin: str | None,
        delay: float,
        cancel_after: float,
        pick: int,
        reversal: bool,
    ) -> None:
        """A request under a cancel scope while the store is slow (memory: autojump clock;
        SQLite: cancelled at its first checkpoint)."""
        request: AuthRequest | ReversalRequest
        if reversal and self.sent:
            request = build_reversal(
                self.sent[pick % len(self.sent)], stan=self._next_stan(), when=WHEN
            )
        else:
            request = self._auth(pan, amount, mti, None if mti == "0120" else pin)
        if self.backend == "sqlite":  # real clock: at once, or a few ms, wherever that falls
            delay, cancel_after = 0.0, _SQLITE_CANCEL[cancel_after]
        used = None if isinstance(request, ReversalRequest) or mti == "0120" else pin
        answer = self._send(request, used, cancel_after=cancel_after, commit_delay=delay)
        if isinstance(request, AuthRequest) and (answer is not None or self.backend == "sqlite"):
            self.sent.append(request)

    # -- after every step ----------------------------------------------------------------------

    _right_pin: str | None = None

    def _pin_of(self, req: AuthRequest) -> str | None:
        if req.pin_block is None:
            return None
        card = _CARDS.get(req.pan)
        right = (
            card is not None
            and card.pin is not None
            and (req.pin_block == encipher_pin(card.pin, req.pan, DEMO_ZPK))
        )
        return "right" if right else "wrong"

    @invariant()
    def store_matches_model(self) -> None:
        if not hasattr(self, "h"):
            return
        m = self.model
        accounts = self.h.accounts()
        for account, ledger in m.ledger.items():
            got_ledger, got_available = accounts[account]
            assert got_ledger == ledger, (account, got_ledger, ledger)
            assert got_available == m.available(account), (account, got_available)
        journal = self.h.journal()
        assert len(journal) == len(m.rows), (len(journal), len(m.rows))
        for got, want in zip(journal, m.rows, strict=True):
            hold = (
                None
                if want.hold is None
                else (want.hold.kind, want.hold.amount, want.hold.remaining, want.hold.completed)
            )
            assert (got.key, got.category, got.code, got.approval, got.hold) == (
                want.key,
                want.kind,
                want.code,
                want.approval,
                hold,
            ), (got, want)
            if got.hold is not None:
                assert 0 <= got.hold[2] <= got.hold[1]
        money_keys = [j.key for j in journal if j.hold is not None]
        assert len(money_keys) == len(set(money_keys)), "two money rows for one duplicate key"
        tries = self.h.pin_tries()
        for card_id, count in tries.items():
            if card_id in m.pin_tries:
                assert count == m.pin_tries[card_id], (card_id, count)
            if count < self._tries_before.get(card_id, 0):
                assert self._right_pin == card_id, "a PIN-try counter went back without a right PIN"
        self._tries_before = tries
        self._right_pin = None

    @invariant()
    def available_is_ledger_minus_holds(self) -> None:
        if not hasattr(self, "h"):
            return
        for account, (ledger, available) in self.h.accounts().items():
            holds = (
                self.loop.call(self.h.store.active_holds_total, account)
                if not (self.model.store_down)
                else None
            )
            if holds is not None:
                assert available == ledger - holds, account


class SqliteModelMachine(ModelMachine):
    backend: Backend = "sqlite"


def _settings() -> settings:
    return settings(
        max_examples=EXAMPLES,
        stateful_step_count=STEPS,
        deadline=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


@pytest.mark.parametrize("machine", [ModelMachine, SqliteModelMachine], ids=["memory", "sqlite"])
def test_model(machine: type[ModelMachine]) -> None:
    PATHS.clear()
    run_state_machine_as_test(machine, settings=_settings())
    if os.environ.get("CARDSWITCH_MODEL_STATS"):  # what the run reached: pytest -s shows it
        print(machine.backend, sorted(PATHS.items()))
