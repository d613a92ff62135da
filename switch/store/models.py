"""Typed records of the durable store: what the pipeline reads and what it asks to make durable.

What lives here: the frozen dataclasses at the store boundary (``Account``, ``Card``,
``SpendControls``), the journal keys (``DuplicateKey``, ``OriginalKey``) with the one place
where acquirer ids and MTI classes are normalised, the intents the pipeline hands to the
writer (``AuthIntent``, ``ReversalIntent``) and their results (``AuthOutcome``,
``ReversalOutcome``), and ``StoreError``.

What does not: deciding anything (the pipeline and ``decisions.py``), SQL (``sqlite.py``), the
Protocol a backend implements (``api.py``).

Card data: nothing here holds a clear PAN, a PIN or PIN block, a CVV, track data or a
cryptogram. A card carries a keyed fingerprint of its PAN (for lookup), the PAN sealed by the
card-data vault (repr hidden), and the first six and last four digits. Amounts are integers in
minor units of the account currency.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from switch.decisions import Profile, Reason

#: How a card's PIN is verified: Visa PVV or an IBM 3624 offset (both held as a value that
#: only the HSM can relate to a PIN).
PinMethod = Literal["pvv", "ibm3624"]
#: What an authorization does to money: a hold on available funds (0100), an immediate debit
#: of ledger and available (0200), their advice forms applied whatever the funds
#: (0120/0121, 0220/0221), the advice of a request the network declined (recorded, no money
#: moves), or a decline recorded without money movement.
AuthKind = Literal["hold", "debit", "advice_hold", "advice_debit", "advice_decline", "decline"]
#: The pipeline's PIN verification result for this request; ``None`` when no PIN was checked.
PinCheck = Literal["ok", "bad"]
#: Which operation a ``StoreError`` came from: an integrity rule (unique fingerprint,
#: unknown account), a request that breaks the contract (currency mismatch), the store being
#: closed, or the database failing (I/O, corruption, commit failure).
StoreErrorKind = Literal["integrity", "invalid", "closed", "unavailable"]


class StoreError(Exception):
    """An operation of the store failed (not a decline: declines are outcomes).

    The message never carries card data; ``kind`` says which class of failure it was.
    """

    def __init__(self, kind: StoreErrorKind, message: str) -> None:
        self.kind: StoreErrorKind = kind
        super().__init__(f"store {kind}: {message}")


class CardStatus(enum.StrEnum):
    """Lifecycle status of a card; only ``ACTIVE`` cards can be approved."""

    ACTIVE = "active"
    BLOCKED = "blocked"
    LOST = "lost"
    STOLEN = "stolen"
    CLOSED = "closed"


def normalise_acquirer_id(acquirer_id: str) -> str:
    """The one normal form of an acquiring institution id (DE32, DE90 positions 21-31).

    DE90 carries the acquirer id right-justified and zero-filled in 11 digits while DE32 is
    LLVAR, so leading zeros are stripped; an all-zero or empty id becomes ``"0"``.

    >>> normalise_acquirer_id("00000012345")
    '12345'
    >>> normalise_acquirer_id("000")
    '0'
    """
    return acquirer_id.strip().lstrip("0") or "0"


def mti_class(mti: str) -> str:
    """The MTI class of a duplicate key: version, class and function, without the origin digit.

    An 0101 repeat has the class of its 0100 (``"010"``), so a repeat of a request already seen
    is found as its duplicate; 0400/0401 share ``"040"`` and 0420/0421 share ``"042"``.

    >>> mti_class("0101")
    '010'
    >>> mti_class("010")
    '010'
    """
    if len(mti) == 4:
        return mti[:3]
    if len(mti) == 3:
        return mti
    raise ValueError(f"not an MTI or MTI class: {mti!r}")


def mask_fields(first6: str, last4: str, length: int = 16) -> str:
    """A masked PAN from its kept digits, e.g. ``412345******2345``."""
    return first6 + "*" * max(length - 10, 0) + last4


@dataclass(frozen=True, slots=True)
class Account:
    """A funds account in one currency; balances in minor units.

    ``ledger_balance`` is the posted balance; ``available_balance`` is ledger minus active
    holds (plus any credit line the provisioning gives it). Advices may make it negative.
    """

    id: str
    #: ISO 4217 numeric currency code, e.g. "978".
    currency: str
    ledger_balance: int
    available_balance: int


@dataclass(frozen=True, slots=True)
class SpendControls:
    """Spend rules of a card; ``None`` means no limit of that kind.

    The count and amount limits are velocity limits over the calendar day (``daily_*``) and
    month (``monthly_*``) of the transaction, enforced atomically by the store's writer.
    """

    per_txn_max: int | None = None
    daily_amount: int | None = None
    daily_count: int | None = None
    monthly_amount: int | None = None
    monthly_count: int | None = None
    #: Merchant category codes (DE18, 4 digits) that are declined.
    blocked_mccs: frozenset[str] = frozenset()
    #: Countries declined: ISO 3166 numeric (DE19) and/or alpha-2/alpha-3 (DE43 position 38-40).
    blocked_countries: frozenset[str] = frozenset()

    @property
    def has_velocity(self) -> bool:
        """Whether any daily/monthly count or amount limit is set."""
        return any(
            v is not None
            for v in (self.daily_amount, self.daily_count, self.monthly_amount, self.monthly_count)
        )


@dataclass(frozen=True, slots=True)
class Card:
    """A card as provisioned, with no clear card data.

    Key fields (``cvk``, ``pvk``, ``imk_ac``) are labels of keys inside the HSM, never key
    values. ``pin_verification_value`` is the PVV (method ``pvv``) or the IBM 3624 offset
    (method ``ibm3624``): neither reveals the PIN without the PIN verification key.
    """

    id: str
    account_id: str
    pan_fingerprint: bytes = field(repr=False)
    pan_ciphertext: bytes = field(repr=False)
    first6: str
    last4: str
    #: Number of digits of the PAN, so the masked form has the right width.
    pan_length: int
    #: YYMM.
    expiry: str
    status: CardStatus
    service_code: str
    #: PAN sequence number (DE23 / EMV 5F34), two digits.
    pan_sequence: str = "00"
    cvk: str | None = None
    pvk: str | None = None
    imk_ac: str | None = None
    #: EMV cryptogram version number, e.g. "10" or "18" (Visa).
    emv_cvn: str | None = None
    pin_method: PinMethod | None = None
    #: PIN verification key index (PVV method), one digit.
    pvki: str | None = None
    pin_verification_value: str | None = field(default=None, repr=False)
    #: IBM 3624 decimalisation table (16 decimal digits).
    ibm_dec_table: str | None = None
    #: IBM 3624 validation data (1-16 hex digits, or "N" for the last five digits of the
    #: account number); the PIN check length is the offset's length.
    ibm_validation_data: str | None = field(default=None, repr=False)
    pin_tries: int = 0
    #: Consecutive wrong PINs after which every PIN-checked request is declined 75.
    pin_try_limit: int = 3
    #: Highest EMV application transaction counter accepted (a counter, not card data), and
    #: the counters below it already seen within the window (bit i: ``last_atc - 1 - i``).
    last_atc: int | None = None
    atc_seen: int = 0
    controls: SpendControls = field(default_factory=SpendControls)

    @property
    def masked_pan(self) -> str:
        """First six and last four digits, the rest masked."""
        return mask_fields(self.first6, self.last4, self.pan_length)


#: Card attributes an operator or a provisioning file may change, by name (the controls'
#: limits included); identity (PAN fingerprint and ciphertext, account) and the decision
#: counters are not among them (``pin_tries`` only through a reset to zero).
CARD_UPDATABLE = frozenset(
    {
        "status", "expiry", "service_code", "pan_sequence", "cvk", "pvk", "imk_ac", "emv_cvn",
        "pin_method", "pvki", "pin_verification_value", "ibm_dec_table",
        "ibm_validation_data", "pin_try_limit",
        "per_txn_max", "daily_amount", "daily_count", "monthly_amount", "monthly_count",
        "blocked_mccs", "blocked_countries",
    }
)  # fmt: skip
#: Fields of SpendControls among them.
CONTROL_FIELDS = frozenset(
    {"per_txn_max", "daily_amount", "daily_count", "monthly_amount", "monthly_count",
     "blocked_mccs", "blocked_countries"}
)  # fmt: skip
#: Attributes whose values a change record never shows (only that they changed).
CARD_SECRET_FIELDS = frozenset({"pin_verification_value", "ibm_validation_data"})


def apply_card_changes(card: Card, changes: Mapping[str, object]) -> Card:
    """``card`` with ``changes`` (attribute name -> new value) applied; ``pin_tries`` may be
    given only as 0 (a reset).

    Raises:
        StoreError: ``invalid`` for an attribute that cannot be changed.
    """
    unknown = set(changes) - CARD_UPDATABLE - {"pin_tries"}
    if unknown:
        raise StoreError("invalid", f"card attributes cannot be changed: {sorted(unknown)}")
    if changes.get("pin_tries", 0) != 0:
        raise StoreError("invalid", "pin_tries can only be reset to 0")
    controls = {k: v for k, v in changes.items() if k in CONTROL_FIELDS}
    plain = {k: v for k, v in changes.items() if k not in CONTROL_FIELDS}
    if "status" in plain:
        plain["status"] = CardStatus(str(plain["status"]))
    return replace(card, **plain, controls=replace(card.controls, **controls))  # type: ignore[arg-type]


def card_diff(old: Card, new: Card) -> dict[str, list[object]]:
    """What changed between two versions of a card: name -> [old, new], secrets hidden."""
    diff: dict[str, list[object]] = {}
    for name in sorted(CARD_UPDATABLE | {"pin_tries"}):
        source_old = old.controls if name in CONTROL_FIELDS else old
        source_new = new.controls if name in CONTROL_FIELDS else new
        before, after = getattr(source_old, name), getattr(source_new, name)
        if before == after:
            continue
        if name in CARD_SECRET_FIELDS:
            diff[name] = ["(hidden)", "(changed)"]
        elif isinstance(before, frozenset) or isinstance(after, frozenset):
            diff[name] = [sorted(before or ()), sorted(after or ())]
        else:
            diff[name] = [str(before) if isinstance(before, enum.Enum) else before,
                          str(after) if isinstance(after, enum.Enum) else after]  # fmt: skip
    return diff


@dataclass(frozen=True, slots=True)
class CardChange:
    """One journaled change of a card: who, when, what (masked; secrets only named)."""

    card_id: str
    masked_pan: str
    actor: str
    at: str
    #: attribute -> [old, new]; empty when the change changed nothing.
    changed: Mapping[str, list[object]]


@dataclass(frozen=True, slots=True)
class DuplicateKey:
    """What makes a request a repeat of one already answered; unique in the journal.

    Fields: network (listener profile), acquirer id (DE32), transmission date-time (DE7,
    MMDDhhmmss), STAN (DE11), RRN (DE37), terminal id (DE41) and MTI class (``mti_class``).
    The acquirer id is normalised and a full MTI reduced to its class on construction.
    """

    network: str
    acquirer_id: str
    transmission_time: str
    stan: str
    rrn: str
    terminal_id: str
    mti_class: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "acquirer_id", normalise_acquirer_id(self.acquirer_id))
        object.__setattr__(self, "mti_class", mti_class(self.mti_class))


@dataclass(frozen=True, slots=True)
class JournalRef:
    """Which journal row holds a request's answer: its duplicate key and content digest, as
    it was journaled (unique: the one row of the key, or the row of a key reused with other
    content). The connection gets it in the ``Decision`` and names the row with it when the
    answer cannot be delivered."""

    dup_key: DuplicateKey
    digest: str


#: The value of ``journal.delivery`` for an answer that was not handed to the transport.
UNDELIVERED = "undelivered"


@dataclass(frozen=True, slots=True)
class DeliveryMark:
    """An answer that could not be delivered: its journal row, why (a short fixed kind:
    ``write_failed``, ``deadline``, ``abandoned``, ``encode_failed``) and when (ISO 8601 UTC)."""

    ref: JournalRef
    reason: str
    at: str


@dataclass(frozen=True, slots=True)
class OriginalKey:
    """The duplicate key of the original that a reversal, an advice or a completion names.

    Derived the same way as ``DuplicateKey``: network, acquirer id, transmission date-time,
    STAN and MTI class of the original (from DE90 for a reversal or a completion, from the
    advice's own fields otherwise), and its DE37/DE41 where the network profile matches on
    them; ``None`` there means "not compared". The acquirer id is normalised and the MTI
    reduced to its class on construction.
    """

    network: str
    acquirer_id: str
    transmission_time: str
    stan: str
    mti_class: str
    rrn: str | None = None
    terminal_id: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "acquirer_id", normalise_acquirer_id(self.acquirer_id))
        object.__setattr__(self, "mti_class", mti_class(self.mti_class))

    def as_key(self, like: DuplicateKey) -> DuplicateKey:
        """This key as a duplicate key, taking DE37/DE41 from ``like`` where not compared."""
        return DuplicateKey(
            self.network, self.acquirer_id, self.transmission_time, self.stan,
            like.rrn if self.rrn is None else self.rrn,
            like.terminal_id if self.terminal_id is None else self.terminal_id,
            self.mti_class,
        )  # fmt: skip

    def matches(self, key: DuplicateKey) -> bool:
        """Whether ``key`` (an original's own key) is the one this names.

        >>> k = DuplicateKey("visa", "123", "1201120000", "000001", "R1", "T1", "0100")
        >>> OriginalKey("visa", "000123", "1201120000", "000001", "0100").matches(k)
        True
        >>> OriginalKey("visa", "123", "1201120000", "000001", "0100", rrn="R2").matches(k)
        False
        """
        return (
            (key.network, key.acquirer_id, key.transmission_time, key.stan, key.mti_class)
            == (self.network, self.acquirer_id, self.transmission_time, self.stan, self.mti_class)
            and self.rrn in (None, key.rrn)
            and self.terminal_id in (None, key.terminal_id)
        )


@dataclass(frozen=True, slots=True)
class AuthIntent:
    """An authorization the pipeline has decided as far as it can, for the writer to make
    durable together with its money movement, PIN-try, ATC and velocity effects.

    A duplicate key already journaled with the same ``digest`` replays its stored outcome;
    the same key with another digest is a duplicate transmission (declined, no money).
    Otherwise the rules of ``switch.store.rules.plan_auth`` decide, in one transaction with
    the journal row. The journal records the ``Reason`` and the DE39 ``profile`` gives it.
    """

    dup_key: DuplicateKey
    #: What defines the request (MTI class, processing code, amount, currency, PAN
    #: fingerprint), hashed: a repeat has the same, a reuse of the key for another request not.
    digest: str
    mti: str
    card_id: str | None
    account_id: str | None
    masked_pan: str
    #: Amount in minor units of ``currency``, which must be the account's currency.
    amount: int
    currency: str
    kind: AuthKind
    #: The network profile whose table turns the decided Reason into the DE39 journaled.
    profile: Profile
    #: Why the pipeline declined, when ``kind`` is ``decline`` or ``advice_decline``.
    decline_reason: Reason | None = None
    #: DE38 to send when approved, 6 characters, generated by the pipeline.
    approval_code: str = "000000"
    pin_check: PinCheck | None = None
    #: The application transaction counter of a verified cryptogram (9F36), and how far
    #: below the highest one accepted an unseen counter may still be (out-of-order arrival).
    atc: int | None = None
    atc_window: int = 0
    #: Limits the writer enforces against the card's day/month counters; ``None`` skips.
    velocity: SpendControls | None = None
    #: Calendar day (YYYYMMDD) and month (YYYYMM) of the transaction in the issuer's zone.
    velocity_day: str = ""
    velocity_month: str = ""
    #: For an advice or completion: the authorization it repeats or completes.
    original: OriginalKey | None = None
    #: A completion for less than its pre-authorization keeps the rest held (profile rule).
    keep_rest_on_partial_completion: bool = False
    #: When the hold this request may take expires (ISO 8601 UTC); released by the sweeper
    #: if no reversal or completion came first. Empty: never (a debit).
    hold_expires_at: str = ""
    #: The network answered in our place (advice of a stand-in decision), or the issuer
    #: stand-in policy approved it without the HSM (``stand_in_daily`` then set).
    stand_in: bool = False
    #: For an approval by the issuer stand-in policy: the card's allowance of stand-in
    #: approvals on ``velocity_day`` (minor units); beyond it the commit declines with
    #: ``decline_reason``. The backend counts the approvals in the velocity table under the
    #: period ``"S" + velocity_day`` (a reversal does not give the allowance back).
    stand_in_daily: int | None = None


#: Velocity period prefix of a card's daily stand-in approvals (``AuthIntent.stand_in_daily``).
STAND_IN_PERIOD = "S"


@dataclass(frozen=True, slots=True)
class HoldView:
    """A money row as operators see it (masked PAN, no card data)."""

    id: int
    journal_id: int
    account_id: str
    card_id: str | None
    masked_pan: str
    kind: str
    amount: int
    remaining: int
    created_at: str
    expires_at: str | None
    #: When it was released without a reversal (expired or by an operator), if it was.
    released_at: str | None
    released_by: str | None


@dataclass(frozen=True, slots=True)
class JournalQuery:
    """What ``Store.search_journal`` looks for; every given field must match."""

    stan: str | None = None
    rrn: str | None = None
    #: A masked PAN (first six, last four: ``412345******2345``), or just ``412345`` /
    #: ``2345`` parts of one.
    masked_pan: str | None = None
    card_id: str | None = None
    #: ISO 8601 UTC bounds of ``created_at`` (inclusive since, exclusive until).
    since: str | None = None
    until: str | None = None
    #: Only the decisions taken in stand-in (approved or answered without the HSM or store):
    #: what reconciliation reviews once the dependency is back.
    stand_in: bool | None = None
    #: Only the rows whose answer was marked undelivered (``Store.mark_delivery``): what
    #: reconciliation reviews, since the acquirer may not know the decision.
    undelivered: bool = False
    limit: int = 100


def masked_parts(text: str) -> tuple[str, str]:
    """The leading and trailing digits a masked-PAN query names.

    >>> masked_parts("412345******2345"), masked_parts("412345"), masked_parts("2345")
    (('412345', '2345'), ('412345', ''), ('', '2345'))
    """
    if "*" in text:
        return text.split("*", 1)[0], text.rsplit("*", 1)[1]
    return ("", text) if len(text) == 4 else (text, "")


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One journal row as operators see it (masked PAN, no card data)."""

    id: int
    created_at: str
    network: str
    mti: str
    kind: str
    stan: str
    rrn: str
    terminal_id: str
    masked_pan: str
    card_id: str | None
    account_id: str | None
    amount: int
    currency: str
    reason: str
    response_code: str
    approval_code: str | None
    stand_in: bool
    released_amount: int | None
    #: ``None``: the answer was handed to the transport; ``"undelivered"`` otherwise, with
    #: how (``delivery_reason``: an undelivered kind of ``switch.metrics``) and when.
    delivery: str | None = None
    delivery_reason: str | None = None
    delivery_at: str | None = None


@dataclass(frozen=True, slots=True)
class HoldRelease:
    """A hold given back without a reversal: expired, or released by an operator."""

    hold_id: int
    account_id: str
    masked_pan: str
    amount: int
    by: str
    at: str


#: Reasons under which an authorization's amount is (or was) authorized: the ARPC says
#: "approved" and DE38 is sent.
APPROVING_REASONS = frozenset({Reason.APPROVED, Reason.ADVICE_APPLIED, Reason.COMPLETION_APPLIED})


@dataclass(frozen=True, slots=True)
class AuthOutcome:
    """The durable answer to an ``AuthIntent``, or the replay of a stored one."""

    reason: Reason
    #: DE39 journaled with it (the answer to send, the same on every replay).
    response_code: str
    approval_code: str | None
    #: Available balance after the decision (DE54), ``None`` without an account.
    available_balance: int | None
    currency: str
    #: True when this is the stored answer of an earlier identical request.
    replayed: bool
    hold_id: int | None
    #: Money this commit moved: reserved (hold) or debited; 0 on a replay or decline.
    held: int = 0
    debited: int = 0

    @property
    def approved(self) -> bool:
        """Whether the amount was (or, on a replay, had been) authorized."""
        return self.reason in APPROVING_REASONS


@dataclass(frozen=True, slots=True)
class ReversalIntent:
    """A reversal (0400/0401/0420/0421) of the original named by ``original_key`` (DE90).

    ``replacement_amount`` is the DE95 actual amount of a partial reversal (the amount that
    stays authorized); ``None`` reverses fully. The original must be of the same card (when
    the reversal carries a PAN) and currency (when it carries one).
    """

    dup_key: DuplicateKey
    digest: str
    original_key: OriginalKey
    #: The card of the reversal's PAN; ``None`` with ``pan_present`` when no card has it.
    card_id: str | None
    pan_present: bool
    mti: str
    amount: int
    replacement_amount: int | None
    currency: str
    masked_pan: str
    #: The network profile whose table turns the Reason into the DE39 journaled.
    profile: Profile
    stand_in: bool = False


@dataclass(frozen=True, slots=True)
class ReversalOutcome:
    """The durable answer to a reversal: always acknowledged."""

    #: ``REVERSAL_MATCHED`` or ``REVERSAL_UNMATCHED``.
    reason: Reason
    response_code: str
    #: Whether the original was found.
    matched: bool
    #: What this reversal gave back (hold released or debit credited), 0 on a repeat.
    released_amount: int
    available_balance: int | None
    replayed: bool


#: What ``find_outcome`` returns for a stored request.
StoredOutcome = AuthOutcome | ReversalOutcome


@dataclass(frozen=True, slots=True)
class AuthLookup:
    """What ``Store.lookup_auth`` read for an authorization, before any HSM work."""

    #: The stored answer of this request (a repeat), else None; then the card and account
    #: are not read (None).
    stored: StoredOutcome | None
    #: The card whose PAN fingerprint was given, or None.
    card: Card | None
    #: The card's account, or None (no card, or an account that does not exist).
    account: Account | None
