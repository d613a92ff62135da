"""Card and account provisioning: what ``cardswitch cards ...`` and ``accounts ...`` drive.

What lives here: ``CardRow`` (one card as an operator describes it, from JSON or CSV),
``load_rows`` (file -> rows, validated), ``import_cards`` (rows -> accounts and cards in the
store: PAN fingerprinted and sealed by the card-data vault, PIN turned into a PVV or an IBM
3624 offset by the HSM and then dropped), ``DemoKey``/``load_keys`` (the demo key list), and
the operations behind ``cards import``, ``cards list`` and ``accounts show`` on a configured
switch (``import_with_config``, ``list_cards``, ``find_account``).

What does not: the command line (``switch.cli.provision``), the store (``switch.store``),
card cryptography (``hsm``), ``dev-setup`` (``switch.devsetup`` calls ``load_rows`` and
``import_cards``), authorization.

Card data: the clear PAN and PIN of a row exist only in memory while it is imported (Python
strings cannot be wiped); the store receives the fingerprint, the sealed PAN, the first six and
last four digits and the PIN reference value. ``repr()`` of a row masks the PAN and hides the
PIN; error messages name the row and field, never the value.

Accounts: a row names its account, currency and opening balance. A new account is created
with ledger = available = balance; an existing account keeps its balances (importing is not
a posting), and a row whose currency differs from the existing account's is rejected.
A row whose PAN is already provisioned updates that card (same id, PIN try counter kept).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from hsm.api import IbmOffsetGeneration, PvvGeneration
from hsm.pan import (
    PAN_MAX_DIGITS,
    PAN_MIN_DIGITS,
    PIN_MAX_DIGITS,
    PIN_MIN_DIGITS,
    is_pan,
    mask_pan,
)
from switch.config import Config
from switch.store import (
    Account,
    Card,
    CardStatus,
    PinMethod,
    SpendControls,
    Store,
    StoreError,
    open_store,
)
from switch.store.models import CARD_UPDATABLE, CONTROL_FIELDS, CardChange

#: PAN and PIN length bounds (ISO/IEC 7812-1, ISO 9564-1), owned by the card-data module.
PAN_MIN, PAN_MAX = PAN_MIN_DIGITS, PAN_MAX_DIGITS
PIN_MIN, PIN_MAX = PIN_MIN_DIGITS, PIN_MAX_DIGITS
#: Default consecutive wrong PINs before the card answers 75.
DEFAULT_PIN_TRY_LIMIT = 3
#: Separators accepted inside the MCC / country list cells of a CSV file.
_LIST_SEPARATORS = (";", " ", "|")
#: Integer-valued row fields (CSV cells are strings).
_INT_FIELDS = frozenset(
    {
        "balance",
        "pin_try_limit",
        "per_txn_max",
        "daily_amount",
        "daily_count",
        "monthly_amount",
        "monthly_count",
    }
)
#: Row fields that annotate a row for people and are ignored.
_COMMENT_FIELDS = frozenset({"about", "comment", "note"})


class ProvisionError(ValueError):
    """A row or file that cannot be provisioned; the message names the row and field only."""


class PinReferenceHsm(Protocol):
    """The two HSM commands provisioning needs (``hsm.api.PaymentHsm`` provides them)."""

    async def generate_pvv(self, req: PvvGeneration) -> str: ...

    async def generate_ibm_offset(self, req: IbmOffsetGeneration) -> str: ...


class PanVault(Protocol):
    """What provisioning needs of ``hsm.carddata.CardVault``."""

    async def fingerprint(self, pan: str) -> bytes: ...

    async def seal(self, pan: str, context: Mapping[str, str]) -> bytes: ...


@dataclass(frozen=True, slots=True)
class CardRow:
    """One card to provision, as read from a file (validated by ``CardRow.from_mapping``).

    ``pin`` is optional; with it, ``pvk`` (label) and either ``pvki`` (PVV method, the
    default) or ``ibm_dec_table`` and ``ibm_validation_data`` (``pin_method="ibm3624"``) are
    required. Amounts are minor units of ``currency``.
    """

    pan: str = field(repr=False)
    expiry: str
    service_code: str
    account: str
    currency: str
    balance: int = 0
    status: CardStatus = CardStatus.ACTIVE
    pan_sequence: str = "00"
    pin: str | None = field(default=None, repr=False)
    pin_method: PinMethod | None = None
    pvki: str | None = None
    pvk: str | None = None
    cvk: str | None = None
    imk_ac: str | None = None
    emv_cvn: str | None = None
    ibm_dec_table: str | None = None
    ibm_validation_data: str | None = None
    pin_try_limit: int = DEFAULT_PIN_TRY_LIMIT
    controls: SpendControls = field(default_factory=SpendControls)
    #: The fields the source row named (an update of an existing card changes only these).
    present: frozenset[str] = field(default=frozenset(), compare=False)

    def __repr__(self) -> str:
        return (
            f"CardRow(pan={mask_pan(self.pan)!r}, expiry={self.expiry!r}, "
            f"account={self.account!r}, status={self.status.value!r}, "
            f"pin={'<set>' if self.pin else None})"
        )

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], where: str) -> CardRow:
        """Validate one row (a JSON object or a CSV record).

        Args:
            raw: field name -> value; empty strings count as absent.
            where: "file:row" for error messages.

        Raises:
            ProvisionError: unknown field, missing or malformed value.
        """
        known = {f.name for f in dataclasses.fields(cls)} - {"controls"}
        known |= {f.name for f in dataclasses.fields(SpendControls)}
        values: dict[str, Any] = {}
        for key, value in raw.items():
            name = key.strip().lower().replace("-", "_")
            if name in _COMMENT_FIELDS:
                continue
            if name not in known:
                raise ProvisionError(f"{where}: unknown field {key!r}")
            if value is None or (isinstance(value, str) and not value.strip()):
                continue
            values[name] = _coerce(name, value, where)
        for required in ("pan", "expiry", "service_code", "account", "currency"):
            if required not in values:
                raise ProvisionError(f"{where}: {required} is required")
        controls = SpendControls(
            per_txn_max=values.pop("per_txn_max", None),
            daily_amount=values.pop("daily_amount", None),
            daily_count=values.pop("daily_count", None),
            monthly_amount=values.pop("monthly_amount", None),
            monthly_count=values.pop("monthly_count", None),
            blocked_mccs=values.pop("blocked_mccs", frozenset()),
            blocked_countries=values.pop("blocked_countries", frozenset()),
        )
        if "status" in values:
            try:
                values["status"] = CardStatus(values["status"].lower())
            except ValueError:
                choices = ", ".join(s.value for s in CardStatus)
                raise ProvisionError(f"{where}: status must be one of {choices}") from None
        named = frozenset(values) | {
            n for n in ("per_txn_max", "daily_amount", "daily_count", "monthly_amount",
                        "monthly_count", "blocked_mccs", "blocked_countries")
            if any(k.strip().lower().replace("-", "_") == n for k in raw)
        }  # fmt: skip
        row = cls(controls=controls, present=named, **values)
        row._check(where)
        return row

    def _check(self, where: str) -> None:
        _digits(where, "pan", self.pan, PAN_MIN, PAN_MAX)
        _digits(where, "expiry", self.expiry, 4)
        if not 1 <= int(self.expiry[2:]) <= 12:
            raise ProvisionError(f"{where}: expiry must be YYMM")
        _digits(where, "service_code", self.service_code, 3)
        _digits(where, "currency", self.currency, 3)
        _digits(where, "pan_sequence", self.pan_sequence, 2)
        if self.pin_try_limit < 1:
            raise ProvisionError(f"{where}: pin_try_limit must be at least 1")
        if self.pin_method not in (None, "pvv", "ibm3624"):
            raise ProvisionError(f"{where}: pin_method must be pvv or ibm3624")
        if self.pin is None:
            return
        _digits(where, "pin", self.pin, PIN_MIN, PIN_MAX)
        if not self.pvk:
            raise ProvisionError(f"{where}: a PIN needs the pvk key label")
        if self.method == "pvv":
            _digits(where, "pvki", self.pvki or "", 1)
        elif not self.ibm_dec_table or not self.ibm_validation_data:
            raise ProvisionError(f"{where}: ibm3624 needs ibm_dec_table and ibm_validation_data")
        elif _carries_pan(self.ibm_validation_data, self.pan):
            # It is stored in clear with the card: PAN digits there would defeat the sealing.
            raise ProvisionError(
                f"{where}: ibm validation data must not carry the PAN (use N for its digits)"
            )

    @property
    def method(self) -> PinMethod | None:
        """The PIN method in effect: as given, else ``pvv`` when a PIN is given."""
        if self.pin_method is not None:
            return self.pin_method
        return "pvv" if self.pin is not None else None


def _carries_pan(validation_data: str, pan: str) -> bool:
    """Whether ``validation_data`` holds a run of the PAN long enough to be a PAN (12 digits)."""
    digits = validation_data.upper().rstrip("F")
    return any(pan[i : i + PAN_MIN] in digits for i in range(len(pan) - PAN_MIN + 1))


def _digits(where: str, name: str, value: str, low: int, high: int | None = None) -> None:
    high = low if high is None else high
    if not (value.isascii() and value.isdigit() and low <= len(value) <= high):
        span = str(low) if low == high else f"{low} to {high}"
        raise ProvisionError(f"{where}: {name} must be {span} digits")


def _coerce(name: str, value: Any, where: str) -> Any:
    if name in ("blocked_mccs", "blocked_countries"):
        items: Iterable[Any]
        if isinstance(value, str):
            text = value
            for sep in _LIST_SEPARATORS:
                text = text.replace(sep, ",")
            items = text.split(",")
        elif isinstance(value, list):
            items = value
        else:
            raise ProvisionError(f"{where}: {name} must be a list")
        return frozenset(str(i).strip().upper() for i in items if str(i).strip())
    if name in _INT_FIELDS:
        if isinstance(value, bool):
            raise ProvisionError(f"{where}: {name} must be an integer")
        if isinstance(value, int):
            return value
        try:
            return int(str(value).strip())
        except ValueError:
            raise ProvisionError(f"{where}: {name} must be an integer") from None
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise ProvisionError(f"{where}: {name} must be a string")
    return value.strip()


def load_rows(path: Path | str) -> list[CardRow]:
    """Read card rows from a JSON file (a list of objects, or ``{"cards": [...]}``) or a CSV
    file with a header line (chosen by the ``.csv`` suffix).

    Raises:
        ProvisionError: unreadable file, bad JSON/CSV, or an invalid row (first one found).
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ProvisionError(f"{path}: cannot read: {exc.strerror}") from None
    records: list[Mapping[str, Any]]
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(text.splitlines())
        records = list(reader)
        first_line = 2  # after the header
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ProvisionError(f"{path}: not valid JSON (line {exc.lineno})") from None
        if isinstance(data, dict):
            data = data.get("cards")
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise ProvisionError(f"{path}: expected a list of card objects")
        records = data
        first_line = 1
    return [CardRow.from_mapping(r, f"{path}:{i}") for i, r in enumerate(records, first_line)]


@dataclass(frozen=True, slots=True)
class RowFailure:
    """A row that was not imported: its position, masked PAN and the reason."""

    index: int
    masked_pan: str
    reason: str


@dataclass(frozen=True, slots=True)
class ImportReport:
    """What ``import_cards`` did."""

    cards_created: int = 0
    cards_updated: int = 0
    accounts_created: int = 0
    failures: tuple[RowFailure, ...] = ()
    #: Ids of the cards written, in row order (failed rows excluded).
    card_ids: tuple[str, ...] = ()
    #: For each existing card updated: its masked PAN and the attributes that changed.
    changes: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def ok(self) -> bool:
        return not self.failures


async def import_cards(
    store: Store,
    hsm: PinReferenceHsm | None,
    vault: PanVault,
    rows: Sequence[CardRow],
    *,
    replace_existing: bool = False,
    actor: str = "cards import",
) -> ImportReport:
    """Provision ``rows``: accounts first seen are created, cards created or updated.

    A card that exists already is updated in the attributes its row names and only those
    (journaled as a card change); with ``replace_existing`` it is replaced by the row whole
    (attributes the row leaves out take their defaults). The decision counters (PIN tries,
    chip counter) are never reset by an import. A failing row (HSM error, store error,
    currency clash) is reported and skipped; the other rows are still imported.

    Args:
        store: the open store.
        hsm: computes PVVs and IBM offsets; may be ``None`` when no row carries a PIN.
        vault: fingerprints and seals PANs (``hsm.carddata.open_vault``).
        rows: validated rows (``load_rows``).
    """
    created = updated = accounts = 0
    failures: list[RowFailure] = []
    ids: list[str] = []
    changes: list[tuple[str, tuple[str, ...]]] = []
    for index, row in enumerate(rows):
        try:
            card, is_new, new_account, changed = await _import_one(
                store, hsm, vault, row, replace_existing=replace_existing, actor=actor
            )
        except (ProvisionError, StoreError) as exc:
            failures.append(RowFailure(index, mask_pan(row.pan), str(exc)))
            continue
        except Exception as exc:  # HSM/vault failures: keep going, report the kind only
            reason = f"{type(exc).__name__}: {exc}"
            failures.append(RowFailure(index, mask_pan(row.pan), _scrub(reason, row)))
            continue
        created += is_new
        updated += not is_new
        accounts += new_account
        ids.append(card.id)
        if changed is not None:
            changes.append((card.masked_pan, changed))
    return ImportReport(created, updated, accounts, tuple(failures), tuple(ids), tuple(changes))


def _scrub(text: str, row: CardRow) -> str:
    text = text.replace(row.pan, mask_pan(row.pan))
    if row.pin:
        text = text.replace(row.pin, "****")
    return text


async def _import_one(
    store: Store,
    hsm: PinReferenceHsm | None,
    vault: PanVault,
    row: CardRow,
    *,
    replace_existing: bool,
    actor: str,
) -> tuple[Card, bool, bool, tuple[str, ...] | None]:
    account = await store.get_account(row.account)
    new_account = account is None
    if account is None:
        account = Account(row.account, row.currency, row.balance, row.balance)
    elif account.currency != row.currency:
        raise ProvisionError(f"account {row.account} exists in currency {account.currency}")
    reference: str | None = None
    if row.pin is not None:
        if hsm is None:
            raise ProvisionError("a PIN needs the HSM")
        assert row.pvk is not None  # checked by CardRow
        if row.method == "ibm3624":
            assert row.ibm_dec_table is not None and row.ibm_validation_data is not None
            reference = await hsm.generate_ibm_offset(
                IbmOffsetGeneration(
                    row.pvk, row.pan, row.pin, row.ibm_dec_table, row.ibm_validation_data
                )
            )
        else:
            assert row.pvki is not None
            reference = await hsm.generate_pvv(PvvGeneration(row.pvk, row.pan, row.pvki, row.pin))
    fingerprint = await vault.fingerprint(row.pan)
    existing = await store.get_card_by_fingerprint(fingerprint)
    card_id = existing.id if existing is not None else str(uuid.uuid4())
    sealed = await vault.seal(row.pan, {"card_id": card_id})
    card = Card(
        id=card_id,
        account_id=row.account,
        pan_fingerprint=fingerprint,
        pan_ciphertext=sealed,
        first6=row.pan[:6],
        last4=row.pan[-4:],
        pan_length=len(row.pan),
        expiry=row.expiry,
        status=row.status,
        service_code=row.service_code,
        pan_sequence=row.pan_sequence,
        cvk=row.cvk,
        pvk=row.pvk,
        imk_ac=row.imk_ac,
        emv_cvn=row.emv_cvn,
        pin_method=row.method,
        pvki=row.pvki if row.method == "pvv" else None,
        pin_verification_value=reference,
        ibm_dec_table=row.ibm_dec_table,
        ibm_validation_data=row.ibm_validation_data,
        pin_tries=existing.pin_tries if existing is not None else 0,
        pin_try_limit=row.pin_try_limit,
        controls=row.controls,
    )
    if existing is not None and row.pin is None:
        # Re-import without a PIN keeps the PIN reference already provisioned.
        card = dataclasses.replace(
            card,
            pin_method=existing.pin_method,
            pvki=existing.pvki,
            pin_verification_value=existing.pin_verification_value,
        )
    if existing is not None and not replace_existing:
        if existing.account_id != row.account:
            raise ProvisionError(
                f"the card is on account {existing.account_id}, the row says {row.account}: "
                "moving a card needs --replace"
            )
        named = _updatable_named(row)
        new = card
        values = {
            name: getattr(new.controls if name in CONTROL_FIELDS else new, name) for name in named
        }
        change = await store.update_card(existing.id, values, actor=actor)
        assert change is not None  # found by its fingerprint just above
        updated_card = await store.get_card(existing.id)
        assert updated_card is not None
        return updated_card, False, False, tuple(change.changed)
    if new_account:
        await store.put_account(account)
    await store.put_card(card)
    return card, existing is None, new_account, None


#: Row fields that are not card attributes, and the attributes a PIN in a row sets.
_ROW_ONLY = frozenset({"pan", "account", "currency", "balance", "pin"})
_PIN_ATTRIBUTES = ("pin_method", "pvki", "pin_verification_value")


def _updatable_named(row: CardRow) -> frozenset[str]:
    """The card attributes an update from ``row`` changes: those it names (a PIN names the
    PIN reference, its method and PVKI)."""
    named = set(row.present - _ROW_ONLY)
    if "pin" in row.present:
        named.update(_PIN_ATTRIBUTES)
    return frozenset(n for n in named if n in CARD_UPDATABLE)


# -- demo keys ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DemoKey:
    """A public test key of the demo data set, to import into a development HSM only."""

    label: str
    #: ``hsm.api.KeyUsage`` value, e.g. "cvk", "pvk", "imk-ac", "zpk".
    usage: str
    clear_hex: str = field(repr=False)
    #: ``hsm.api.KeyAlgorithm`` value, when the length does not decide it.
    algorithm: str | None = None
    source: str = ""


def load_keys(path: Path | str) -> list[DemoKey]:
    """Read a demo key list (``config/demo/keys.json``: ``{"keys": [{label, usage, clear,
    algorithm?, source?}, ...]}``).

    Raises:
        ProvisionError: unreadable or malformed file.
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        keys = data["keys"]
        return [
            DemoKey(
                label=str(k["label"]),
                usage=str(k["usage"]),
                clear_hex=str(k["clear"]),
                algorithm=k.get("algorithm"),
                source=str(k.get("source", "")),
            )
            for k in keys
        ]
    except OSError as exc:
        raise ProvisionError(f"{path}: cannot read: {exc.strerror}") from None
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
        raise ProvisionError(f"{path}: malformed key list ({type(exc).__name__})") from None


# -- on a configured switch -----------------------------------------------------------------


async def import_with_config(
    cfg: Config, rows: Sequence[CardRow], *, replace_existing: bool = False, actor: str
) -> ImportReport:
    """Import ``rows`` into the configured store through the configured HSM and vault."""
    # Imported here: the HSM backends load PKCS#11 libraries, which `cards list` never needs.
    from hsm.carddata import open_vault  # noqa: PLC0415
    from hsm.token import open_hsm  # noqa: PLC0415

    hsm = open_hsm(cfg.hsm)
    try:
        vault = open_vault(cfg.card_data, hsm)
        async with open_store(cfg.store) as store:
            return await import_cards(
                store, hsm, vault, rows, replace_existing=replace_existing, actor=actor
            )
    finally:
        await hsm.aclose()


async def list_cards(cfg: Config) -> list[Card]:
    """Every card of the configured store (masked PANs only)."""
    async with open_store(cfg.store) as store:
        return await store.list_cards()


@dataclass(frozen=True)
class AccountView:
    """An account with the total of its active holds and its cards."""

    account: Account
    active_holds: int
    cards: tuple[Card, ...]


async def find_account(cfg: Config, account_id: str) -> AccountView | None:
    """The account ``account_id`` of the configured store, or None when there is none."""
    async with open_store(cfg.store) as store:
        account = await store.get_account(account_id)
        if account is None:
            return None
        holds = await store.active_holds_total(account_id)
        cards = tuple(c for c in await store.list_cards() if c.account_id == account_id)
        return AccountView(account, holds, cards)


# -- card maintenance --------------------------------------------------------------------------


@dataclass(frozen=True)
class CardView:
    """A card (masked), its account's balances and its journaled changes."""

    card: Card
    account: Account | None
    changes: tuple[CardChange, ...]


async def _resolve_card(cfg: Config, store: Store, ref: str) -> Card | None:
    """The card named by ``ref``: its id, or its PAN (fingerprinted through the HSM)."""
    card = await store.get_card(ref)
    if card is not None or not is_pan(ref):
        return card
    from hsm.carddata import open_vault  # noqa: PLC0415 - only a PAN reference needs the HSM
    from hsm.token import open_hsm  # noqa: PLC0415

    hsm = open_hsm(cfg.hsm)
    try:
        fingerprint = await open_vault(cfg.card_data, hsm).fingerprint(ref)
    finally:
        await hsm.aclose()
    return await store.get_card_by_fingerprint(fingerprint)


async def change_card(
    cfg: Config, ref: str, changes: Mapping[str, object], *, actor: str
) -> CardChange:
    """Change only the named attributes of the card ``ref`` (id or PAN), journaled.

    Raises:
        ProvisionError: no such card, or an attribute that cannot be changed.
    """
    async with open_store(cfg.store) as store:
        card = await _resolve_card(cfg, store, ref)
        if card is None:
            raise ProvisionError(f"no card {mask_pan(ref) if is_pan(ref) else ref!r}")
        try:
            change = await store.update_card(card.id, changes, actor=actor)
        except StoreError as exc:
            raise ProvisionError(str(exc)) from None
        assert change is not None
        return change


async def show_card(cfg: Config, ref: str) -> CardView | None:
    """The card ``ref`` (id or PAN) with its account and change history, or None."""
    async with open_store(cfg.store) as store:
        card = await _resolve_card(cfg, store, ref)
        if card is None:
            return None
        account = await store.get_account(card.account_id)
        return CardView(card, account, tuple(await store.card_changes(card.id)))
