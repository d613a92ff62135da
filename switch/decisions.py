"""Why a request is declined, and which response code each network wants for it.

What lives here: the ``Reason`` enum (every outcome the pipeline can reach), the response-code
table of each network profile (one place, so that "CVV2 mismatch is N7 for Visa, 82 elsewhere"
is a row, not an ``if``), and the pure spend rules that need no store (per-transaction maximum,
blocked merchant categories and countries). Velocity (daily and monthly totals) needs the
counters and is enforced atomically by the store at commit.

What does not: the steps that find the reasons (pipeline.py), message encoding (wire/).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

from switch.store.models import SpendControls


class Reason(enum.Enum):
    """Every outcome of the pipeline; the value is a stable identifier used in logs."""

    APPROVED = "approved"
    FORMAT_ERROR = "format_error"
    INVALID_TRANSACTION = "invalid_transaction"
    INVALID_AMOUNT = "invalid_amount"
    UNKNOWN_CARD = "unknown_card"
    LOST_CARD = "lost_card"
    STOLEN_CARD = "stolen_card"
    CARD_BLOCKED = "card_blocked"
    CARD_CLOSED = "card_closed"
    EXPIRED_CARD = "expired_card"
    WRONG_PIN = "wrong_pin"
    PIN_TRIES_EXCEEDED = "pin_tries_exceeded"
    CVV_MISMATCH = "cvv_mismatch"
    ICVV_MISMATCH = "icvv_mismatch"
    CVV2_MISMATCH = "cvv2_mismatch"
    ARQC_FAILED = "arqc_failed"
    EXCEEDS_TRANSACTION_LIMIT = "exceeds_transaction_limit"
    EXCEEDS_AMOUNT_VELOCITY = "exceeds_amount_velocity"
    EXCEEDS_COUNT_VELOCITY = "exceeds_count_velocity"
    BLOCKED_MERCHANT_CATEGORY = "blocked_merchant_category"
    BLOCKED_COUNTRY = "blocked_country"
    CURRENCY_NOT_SUPPORTED = "currency_not_supported"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    ORIGINAL_ALREADY_REVERSED = "original_already_reversed"
    #: An advice of a request the network declined in our place: recorded, no money moves.
    ADVICE_OF_DECLINE = "advice_of_decline"
    SECURITY_UNAVAILABLE = "security_unavailable"
    ISSUER_UNAVAILABLE = "issuer_unavailable"
    SYSTEM_ERROR = "system_error"


#: ISO 8583:1987 DE39 codes shared by the networks we profile.
_BASE: dict[Reason, str] = {
    Reason.APPROVED: "00",
    Reason.FORMAT_ERROR: "30",
    Reason.INVALID_TRANSACTION: "12",
    Reason.INVALID_AMOUNT: "13",
    Reason.UNKNOWN_CARD: "14",
    Reason.LOST_CARD: "41",
    Reason.STOLEN_CARD: "43",
    Reason.CARD_BLOCKED: "62",
    Reason.CARD_CLOSED: "57",
    Reason.EXPIRED_CARD: "54",
    Reason.WRONG_PIN: "55",
    Reason.PIN_TRIES_EXCEEDED: "75",
    Reason.CVV_MISMATCH: "82",
    Reason.ICVV_MISMATCH: "82",
    Reason.CVV2_MISMATCH: "82",
    Reason.ARQC_FAILED: "05",
    Reason.EXCEEDS_TRANSACTION_LIMIT: "61",
    Reason.EXCEEDS_AMOUNT_VELOCITY: "61",
    Reason.EXCEEDS_COUNT_VELOCITY: "65",
    Reason.BLOCKED_MERCHANT_CATEGORY: "57",
    Reason.BLOCKED_COUNTRY: "57",
    Reason.CURRENCY_NOT_SUPPORTED: "57",
    Reason.INSUFFICIENT_FUNDS: "51",
    Reason.ORIGINAL_ALREADY_REVERSED: "05",
    Reason.ADVICE_OF_DECLINE: "00",
    Reason.SECURITY_UNAVAILABLE: "91",
    Reason.ISSUER_UNAVAILABLE: "91",
    Reason.SYSTEM_ERROR: "96",
}

#: Per-network departures from the base table.
_OVERRIDES: dict[str, dict[Reason, str]] = {
    # Visa: CVV2 failure is N7; a failed cryptogram (negative CAM) is 82.
    "visa": {Reason.CVV2_MISMATCH: "N7", Reason.ARQC_FAILED: "82"},
    # Mastercard: CVC 2 and chip failures are declines with 05 and a DE48 advice code.
    "mastercard": {Reason.CVV2_MISMATCH: "05"},
}


class Profile:
    """The response-code table of one network."""

    def __init__(self, name: str, table: Mapping[Reason, str]) -> None:
        missing = set(Reason) - set(table)
        if missing:
            raise ValueError(f"profile {name}: no code for {sorted(r.value for r in missing)}")
        self.name = name
        self.table = MappingProxyType(dict(table))
        self._by_code: dict[str, Reason] = {}
        for reason, code in table.items():
            self._by_code.setdefault(code, reason)

    def code(self, reason: Reason) -> str:
        """DE39 for ``reason`` under this network."""
        return self.table[reason]

    def reason_for(self, code: str) -> Reason:
        """The first reason mapped to ``code`` (for replayed answers and store outcomes)."""
        return self._by_code.get(code, Reason.SYSTEM_ERROR)


def profile(network: str) -> Profile:
    """The profile of ``network``; unknown networks get the ISO base table."""
    return Profile(network, {**_BASE, **_OVERRIDES.get(network, {})})


def check_controls(
    controls: SpendControls, amount: int, mcc: str | None, countries: tuple[str, ...]
) -> Reason | None:
    """The spend rules that need no counters: per-transaction maximum, MCC and country blocks.

    >>> c = SpendControls(per_txn_max=5000, blocked_mccs=frozenset({"7995"}))
    >>> check_controls(c, 6000, "5411", ())
    <Reason.EXCEEDS_TRANSACTION_LIMIT: 'exceeds_transaction_limit'>
    >>> check_controls(c, 100, "7995", ()) is Reason.BLOCKED_MERCHANT_CATEGORY
    True
    >>> check_controls(c, 100, "5411", ("840", "US")) is None
    True
    """
    if controls.per_txn_max is not None and amount > controls.per_txn_max:
        return Reason.EXCEEDS_TRANSACTION_LIMIT
    if mcc is not None and mcc in controls.blocked_mccs:
        return Reason.BLOCKED_MERCHANT_CATEGORY
    if any(c in controls.blocked_countries for c in countries if c):
        return Reason.BLOCKED_COUNTRY
    return None
