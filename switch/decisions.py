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
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # models import Reason; the controls are only a type here
    from switch.store.models import SpendControls


class Reason(enum.Enum):
    """Every outcome the switch can reach; the value is a stable identifier used in logs.

    Each component (validation, the card checks, the HSM step, the spend rules, the store's
    commit rules, the server's protocol policy) returns one of these; only a network
    profile's table turns it into DE39.
    """

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
    #: The chip data the cryptogram covers (amount, currency, country, date, type) differs
    #: from the same values in the clear ISO fields.
    EMV_DATA_MISMATCH = "emv_data_mismatch"
    #: A cryptogram whose application transaction counter was already used (a replay).
    ATC_REPLAY = "atc_replay"
    #: Chip entry (DE22 05x/07x) without the chip data (DE55).
    CHIP_DATA_MISSING = "chip_data_missing"
    #: Magnetic-stripe entry (DE22 80x/90x) of a chip card (service code 2xx/6xx).
    CHIP_FALLBACK = "chip_fallback"
    #: The duplicate key of a request already answered, with other content (amount, card,
    #: currency, processing code): not a repeat, and nothing moves.
    DUPLICATE_TRANSMISSION = "duplicate_transmission"
    EXCEEDS_TRANSACTION_LIMIT = "exceeds_transaction_limit"
    EXCEEDS_AMOUNT_VELOCITY = "exceeds_amount_velocity"
    EXCEEDS_COUNT_VELOCITY = "exceeds_count_velocity"
    BLOCKED_MERCHANT_CATEGORY = "blocked_merchant_category"
    BLOCKED_COUNTRY = "blocked_country"
    CURRENCY_NOT_SUPPORTED = "currency_not_supported"
    INSUFFICIENT_FUNDS = "insufficient_funds"
    #: The original arrived after its reversal had been recorded.
    ORIGINAL_ALREADY_REVERSED = "original_already_reversed"
    #: An advice of a request the network approved in our place: applied.
    ADVICE_APPLIED = "advice_applied"
    #: An advice of a request the network declined in our place: recorded, no money moves.
    ADVICE_OF_DECLINE = "advice_of_decline"
    #: An advice whose original had already been reversed: acknowledged, no money moves.
    ADVICE_AFTER_REVERSAL = "advice_after_reversal"
    #: An advice of an authorization the switch had already approved: it changes nothing.
    ADVICE_ALREADY_APPLIED = "advice_already_applied"
    #: A completion of an approved pre-authorization: its hold is released and the
    #: completed amount debited, once.
    COMPLETION_APPLIED = "completion_applied"
    #: An advice for a card we do not know: acknowledged and kept, no money moves.
    ADVICE_UNKNOWN_CARD = "advice_unknown_card"
    #: An advice in a currency other than its account's: acknowledged and kept, no money moves.
    ADVICE_WRONG_CURRENCY = "advice_wrong_currency"
    #: A reversal that found its original (and released what remained of it).
    REVERSAL_MATCHED = "reversal_matched"
    #: A reversal whose original is unknown: acknowledged and kept.
    REVERSAL_UNMATCHED = "reversal_unmatched"
    #: A reversal naming an original of another card or currency: acknowledged and kept for
    #: audit, and it releases nothing.
    REVERSAL_MISMATCH = "reversal_mismatch"
    #: The HSM could not answer (stand-in cause).
    SECURITY_UNAVAILABLE = "security_unavailable"
    #: The issuer could not decide in time or a dependency failed (stand-in cause).
    ISSUER_UNAVAILABLE = "issuer_unavailable"
    #: A defect of the switch itself: the engine raised instead of deciding.
    SYSTEM_ERROR = "system_error"
    #: A key exchange (0800 DE70 101/161) whose key block does not open under the zone
    #: master key, or whose key does not have the check value sent: the old key stays.
    KEY_EXCHANGE_FAILED = "key_exchange_failed"
    #: A request on a listener the network signed off (0800 DE70 002), when the listener
    #: declines those (``after_sign_off = "decline"``).
    SIGNED_OFF = "signed_off"
    #: The switch could not start the request before its deadline (queue full, or too little
    #: of the budget left): answered at once, nothing decided or kept (stand-in cause
    #: "overload"). 91 lets the network stand in, as for any issuer that cannot answer.
    SYSTEM_OVERLOAD = "system_overload"


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
    Reason.EMV_DATA_MISMATCH: "05",
    Reason.ATC_REPLAY: "05",
    Reason.CHIP_DATA_MISSING: "05",
    Reason.CHIP_FALLBACK: "05",
    Reason.DUPLICATE_TRANSMISSION: "94",
    Reason.EXCEEDS_TRANSACTION_LIMIT: "61",
    Reason.EXCEEDS_AMOUNT_VELOCITY: "61",
    Reason.EXCEEDS_COUNT_VELOCITY: "65",
    Reason.BLOCKED_MERCHANT_CATEGORY: "57",
    Reason.BLOCKED_COUNTRY: "57",
    Reason.CURRENCY_NOT_SUPPORTED: "57",
    Reason.INSUFFICIENT_FUNDS: "51",
    Reason.ORIGINAL_ALREADY_REVERSED: "05",
    # Advices and reversals are acknowledged whatever they did to money.
    Reason.ADVICE_APPLIED: "00",
    Reason.ADVICE_OF_DECLINE: "00",
    Reason.ADVICE_AFTER_REVERSAL: "00",
    Reason.ADVICE_ALREADY_APPLIED: "00",
    Reason.COMPLETION_APPLIED: "00",
    Reason.ADVICE_UNKNOWN_CARD: "00",
    Reason.ADVICE_WRONG_CURRENCY: "00",
    Reason.REVERSAL_MATCHED: "00",
    Reason.REVERSAL_UNMATCHED: "00",
    Reason.REVERSAL_MISMATCH: "00",
    Reason.SECURITY_UNAVAILABLE: "91",
    Reason.ISSUER_UNAVAILABLE: "91",
    Reason.SYSTEM_ERROR: "96",
    # ISO 8583:1987 DE39 63 "security violation": the key offered cannot be taken.
    Reason.KEY_EXCHANGE_FAILED: "63",
    # ISO 8583:1987 DE39 91 "issuer or switch inoperative": the network stands in.
    Reason.SIGNED_OFF: "91",
    Reason.SYSTEM_OVERLOAD: "91",
}

#: Per-network departures from the base table.
_OVERRIDES: dict[str, dict[Reason, str]] = {
    "iso": {},
    # Visa: CVV2 failure is N7; a failed cryptogram (negative CAM) is 82, and so is a
    # cryptogram that does not cover this message or replays a used counter.
    "visa": {
        Reason.CVV2_MISMATCH: "N7",
        Reason.ARQC_FAILED: "82",
        Reason.EMV_DATA_MISMATCH: "82",
        Reason.ATC_REPLAY: "82",
    },
    # Mastercard: CVC 2 and chip failures are declines with 05 and a DE48 advice code.
    "mastercard": {Reason.CVV2_MISMATCH: "05"},
}

#: The network profiles a listener may name (``listener.network``).
NETWORKS = tuple(_OVERRIDES)

#: Reasons a stand-in policy may answer with: declines that let the network stand in. An
#: approving stand-in would answer 00 with nothing journaled, so it is not among them.
STAND_IN_REASONS = frozenset(
    {Reason.ISSUER_UNAVAILABLE, Reason.SECURITY_UNAVAILABLE, Reason.SYSTEM_ERROR}
)


class UnknownNetwork(ValueError):
    """A listener names a network without a profile."""


class Profile:
    """The response-code table of one network (the only place a Reason becomes DE39) and its
    rules for naming an original."""

    def __init__(
        self,
        name: str,
        table: Mapping[Reason, str],
        *,
        original_match_rrn_terminal: bool = True,
    ) -> None:
        missing = set(Reason) - set(table)
        if missing:
            raise ValueError(f"profile {name}: no code for {sorted(r.value for r in missing)}")
        approve = table[Reason.APPROVED]
        for reason in STAND_IN_REASONS | {Reason.SYSTEM_OVERLOAD}:
            if table[reason] == approve:
                raise ValueError(f"profile {name}: stand-in reason {reason.value} approves")
        self.name = name
        self.table = MappingProxyType(dict(table))
        #: Whether a reversal, advice or completion finds its original by its DE37 and DE41
        #: as well as by DE90 (the networks profiled here keep both through the lifecycle).
        self.original_match_rrn_terminal = original_match_rrn_terminal

    def __repr__(self) -> str:
        return f"Profile({self.name!r})"

    def code(self, reason: Reason) -> str:
        """DE39 for ``reason`` under this network.

        >>> profile("visa").code(Reason.CVV2_MISMATCH), profile("iso").code(Reason.CVV2_MISMATCH)
        ('N7', '82')
        """
        return self.table[reason]


_PROFILES: dict[str, Profile] = {}


def profile(network: str) -> Profile:
    """The profile of ``network``.

    Raises:
        UnknownNetwork: no profile has that name (a configuration error).
    """
    prof = _PROFILES.get(network)
    if prof is None:
        if network not in _OVERRIDES:
            raise UnknownNetwork(f"unknown network {network!r}; known: {', '.join(NETWORKS)}")
        prof = _PROFILES[network] = Profile(network, {**_BASE, **_OVERRIDES[network]})
    return prof


def check_controls(
    controls: SpendControls, amount: int, mcc: str | None, countries: tuple[str, ...]
) -> Reason | None:
    """The spend rules that need no counters: per-transaction maximum, MCC and country blocks.

    >>> from switch.store.models import SpendControls
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
