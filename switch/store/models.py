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
from dataclasses import dataclass, field
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
    controls: SpendControls = field(default_factory=SpendControls)

    @property
    def masked_pan(self) -> str:
        """First six and last four digits, the rest masked."""
        return mask_fields(self.first6, self.last4, self.pan_length)


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
class OriginalKey:
    """How a reversal finds its original: the original's network, acquirer id, STAN and
    transmission date-time, as the original carried them in DE32/DE11/DE7 and as a reversal
    carries them in DE90. The acquirer id is normalised on construction."""

    network: str
    acquirer_id: str
    stan: str
    transmission_time: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "acquirer_id", normalise_acquirer_id(self.acquirer_id))


@dataclass(frozen=True, slots=True)
class AuthIntent:
    """An authorization the pipeline has decided as far as it can, for the writer to make
    durable together with its money movement, PIN-try and velocity effects.

    A duplicate key already journaled replays its stored outcome; otherwise the rules of
    ``switch.store.rules.plan_auth`` decide, in one transaction with the journal row. The
    journal records the ``Reason`` and the DE39 that ``profile`` gives it.
    """

    dup_key: DuplicateKey
    #: This request's own key, by which a later reversal (DE90) finds it.
    original_key: OriginalKey
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
    #: Why the pipeline declined, when ``kind == "decline"``.
    decline_reason: Reason | None = None
    #: DE38 to send when approved, 6 characters, generated by the pipeline.
    approval_code: str = "000000"
    pin_check: PinCheck | None = None
    #: Limits the writer enforces against the card's day/month counters; ``None`` skips.
    velocity: SpendControls | None = None
    #: Calendar day (YYYYMMDD) and month (YYYYMM) of the transaction in the issuer's zone.
    velocity_day: str = ""
    velocity_month: str = ""
    #: The network answered in our place (advice of a stand-in decision).
    stand_in: bool = False


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
        return self.reason in (Reason.APPROVED, Reason.ADVICE_APPLIED)


@dataclass(frozen=True, slots=True)
class ReversalIntent:
    """A reversal (0400/0401/0420/0421) of the original named by ``original_key`` (DE90).

    ``replacement_amount`` is the DE95 actual amount of a partial reversal (the amount that
    stays authorized); ``None`` reverses fully.
    """

    dup_key: DuplicateKey
    original_key: OriginalKey
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
