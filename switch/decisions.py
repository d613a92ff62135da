"""Why a request is declined, and which response code each network wants for it.

What lives here: the ``Reason`` enum (every outcome the pipeline can reach), the ``Profile``
of each network, whose response-code table (one place, so that "CVV2 mismatch is N7 for Visa,
82 elsewhere" is a row, not an ``if``) is read from the network profile files
(``config/networks/*.toml``, loaded by ``switch.wire.profile``; the ISO table is ``base.toml``,
which the others extend) and checked here: every Reason has a code, no stand-in reason
approves. Also the pure spend rules that need no store (per-transaction maximum,
blocked merchant categories and countries). Velocity (daily and monthly totals) needs the
counters and is enforced atomically by the store at commit.

What does not: the steps that find the reasons (pipeline.py), message encoding (wire/).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from switch.wire.profile import (
    NetworkProfile,
    ProfileError,
    known_profiles,
    load_profile,
    profile_directory,
)

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


#: Reasons a stand-in policy may answer with: declines that let the network stand in. An
#: approving stand-in would answer 00 with nothing journaled, so it is not among them.
STAND_IN_REASONS = frozenset(
    {Reason.ISSUER_UNAVAILABLE, Reason.SECURITY_UNAVAILABLE, Reason.SYSTEM_ERROR}
)


class UnknownNetwork(ValueError):
    """A listener names a network without a usable profile; ``str()`` names the file and key."""

    def __init__(self, message: str, *, source: str = "", key: str = "") -> None:
        super().__init__(message)
        self.source = source
        self.key = key


class Profile:
    """The response-code table of one network (the only place a Reason becomes DE39), its
    rules for naming an original, its budget and its wire (the network profile file)."""

    def __init__(
        self,
        name: str,
        table: Mapping[Reason, str],
        *,
        original_match_rrn_terminal: bool = True,
        budget: float | None = None,
        wire: NetworkProfile | None = None,
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
        #: Seconds to answer a request of this network; None: ``pipeline.budget``.
        self.budget = budget
        #: The network profile it was built from (layout, framing, sub-layouts), if any.
        self.wire = wire

    def __repr__(self) -> str:
        return f"Profile({self.name!r})"

    def budget_or(self, default: float) -> float:
        """Seconds to answer a request of this network: its own budget, else ``default``
        (``pipeline.budget``). The one place the two are resolved: the connection's
        admission and the pipeline's deadline count the same budget."""
        return default if self.budget is None else self.budget

    def code(self, reason: Reason) -> str:
        """DE39 for ``reason`` under this network.

        >>> profile("visa").code(Reason.CVV2_MISMATCH), profile("iso").code(Reason.CVV2_MISMATCH)
        ('N7', '82')
        """
        return self.table[reason]

    @classmethod
    def from_network(cls, wire: NetworkProfile) -> Profile:
        """The profile of a loaded network profile file: its DE39 table checked here.

        Raises:
            UnknownNetwork: a DE39 row names no reason, a reason has no code, or a stand-in
                reason approves (naming the file and the key).
        """
        reasons = {r.value: r for r in Reason}
        table: dict[Reason, str] = {}
        for key, code in wire.de39.items():
            if key not in reasons:
                source = wire.de39_sources.get(key, wire.source)
                raise UnknownNetwork(f"{source}: de39.{key}: not a reason", source=source,
                                     key=f"de39.{key}")  # fmt: skip
            table[reasons[key]] = code
        missing = sorted(r.value for r in Reason if r not in table)
        if missing:
            raise UnknownNetwork(f"{wire.source}: de39: no code for {', '.join(missing)}",
                                 source=wire.source, key="de39")  # fmt: skip
        try:
            return cls(
                wire.name,
                table,
                original_match_rrn_terminal=wire.original_match_rrn_terminal,
                budget=wire.budget,
                wire=wire,
            )
        except ValueError as exc:
            raise UnknownNetwork(f"{wire.source}: de39: {exc}", source=wire.source,
                                 key="de39") from None  # fmt: skip


_PROFILES: dict[tuple[str, str], Profile] = {}


def profile(network: str, directory: Path | str | None = None) -> Profile:
    """The profile of ``network``: ``config/networks/<network>.toml`` (see switch.wire.profile).

    Raises:
        UnknownNetwork: no such profile, or its file is not valid (a configuration error
            naming the file and the key).
    """
    cache_key = (str(profile_directory(directory)), network)
    prof = _PROFILES.get(cache_key)
    if prof is None:
        try:
            wire = load_profile(network, directory)
        except ProfileError as exc:
            raise UnknownNetwork(str(exc), source=exc.source, key=exc.key) from None
        prof = _PROFILES[cache_key] = Profile.from_network(wire)
    return prof


def networks(directory: Path | str | None = None) -> tuple[str, ...]:
    """The network profiles a listener may name (``listener.network``)."""
    return known_profiles(directory)


#: The shipped network profiles (metrics bound their labels with it).
NETWORKS = networks()


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
