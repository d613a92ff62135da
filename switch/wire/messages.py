"""Typed ISO 8583:1987 messages and their mapping to field dictionaries.

What lives here: the frozen dataclasses the rest of the switch works with (``AuthRequest``,
``AuthResponse``, ``ReversalRequest``, ``ReversalResponse``, ``NetworkRequest``,
``NetworkResponse``, ``UnsupportedMessage``, ``ErrorResponse`` and their parts ``Track2``,
``MerchantLocation``, ``AdditionalAmount``, ``OriginalData``), MTI helpers, the kinds and
sub-layouts (DE43, DE48, DE54, DE90, DE95) of the data elements, and :func:`from_fields` /
:func:`to_fields`, which convert between those dataclasses and pyiso8583-style dictionaries
(``{"t": MTI, "2": PAN, ...}``; binary fields as upper-case hex). Each message field declares
its data element once, with :func:`switch.wire.mapping.de`; reading, validating, writing and
echoing are generated from those declarations. This is the only module of the code base that
knows ISO field numbers.

What does not: the generic mapper (mapping.py), bytes, bitmaps and length prefixes (spec.py,
codec.py), framing (framing.py), BER-TLV inside DE55 (emv.py), and any decision about a
message (pipeline, decisions.py).

Card data: PAN-carrying fields are masked in ``repr`` (first six, last four); PIN block, CVV2,
track 2, DE48 subelements and EMV data never appear in a ``repr``. Validation errors name the
field and a fixed reason, never the value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from hsm.pan import PAN_MAX_DIGITS, PAN_MIN_DIGITS, is_digits, mask_pan
from switch.wire.mapping import (
    BINARY,
    FieldError,
    Invalid,
    Kind,
    de,
    digits,
    echo,
    is_printable,
    message,
    read,
    salvage,
    text,
    write,
)

__all__ = [
    "AUTH_REQUEST_MTIS",
    "AUTH_RESPONSE_MTIS",
    "NETWORK_REQUEST_MTIS",
    "NETWORK_RESPONSE_MTIS",
    "REVERSAL_REQUEST_MTIS",
    "REVERSAL_RESPONSE_MTIS",
    "AdditionalAmount",
    "AuthRequest",
    "AuthResponse",
    "ErrorResponse",
    "FieldError",
    "MerchantLocation",
    "Message",
    "MessageClass",
    "NetworkRequest",
    "NetworkResponse",
    "OriginalData",
    "ReversalRequest",
    "ReversalResponse",
    "SubLayouts",
    "Track2",
    "UnsupportedMessage",
    "from_fields",
    "is_repeat",
    "is_request",
    "message_class",
    "recover_context",
    "response_mti",
    "to_fields",
]

#: pyiso8583 key of the message type indicator.
_MTI: Final = "t"

#: Name used for the MTI in errors (ISO calls it data element 0).
MTI_FIELD: Final = "mti"

#: MTIs decoded into :class:`AuthRequest` (authorization, financial, their advices and repeats).
AUTH_REQUEST_MTIS: Final = frozenset(
    {"0100", "0101", "0120", "0121", "0200", "0201", "0220", "0221"}
)
#: MTIs decoded into :class:`AuthResponse`.
AUTH_RESPONSE_MTIS: Final = frozenset({"0110", "0130", "0210", "0230"})
#: MTIs decoded into :class:`ReversalRequest`.
REVERSAL_REQUEST_MTIS: Final = frozenset({"0400", "0401", "0420", "0421"})
#: MTIs decoded into :class:`ReversalResponse`.
REVERSAL_RESPONSE_MTIS: Final = frozenset({"0410", "0430"})
#: MTIs decoded into :class:`NetworkRequest`.
NETWORK_REQUEST_MTIS: Final = frozenset({"0800"})
#: MTIs decoded into :class:`NetworkResponse`.
NETWORK_RESPONSE_MTIS: Final = frozenset({"0810"})

#: pyiso8583 keys of DE48 (additional data) and DE126 (Visa private use), read per profile.
_DE48, _DE126 = "48", "126"
#: DE48 subelement (Mastercard layout) carrying the CVC2/CVV2 value.
_DE48_CVV2_SE: Final = "92"
#: Width of one DE54 additional amount: account type 2, amount type 2, currency 3, sign 1, 12.
_ADD_AMOUNT_WIDTH: Final = 20
#: Most additional amounts DE54 carries (120 characters).
_ADD_AMOUNT_MAX: Final = 6
#: DE54 amount type of the available balance.
AVAILABLE_BALANCE_TYPE: Final = "02"
#: Width of the DE90 original data elements.
_DE90_WIDTH: Final = 42
#: Widths of the DE43 name/location parts (Visa/ISO layout): name 25, city 13, country 2.
_DE43_NAME, _DE43_CITY, _DE43_WIDTH = 25, 13, 40
#: Largest amount DE4 can carry (12 digits).
_AMOUNT_MAX: Final = 999_999_999_999

#: Active ISO 4217 numeric currency codes (funds, metals and test codes excluded).
_ISO4217_TEXT: Final = """
    008 012 032 036 044 048 050 051 052 060 064 068 072 084 090 096 104 108 116 124 132 136
    144 152 156 170 174 188 192 203 208 214 222 230 232 238 242 262 270 292 320 324 328 332
    340 344 348 352 356 360 364 368 376 388 392 398 400 404 408 410 414 417 418 422 426 430
    434 446 454 458 462 480 484 496 498 504 512 516 524 532 533 548 554 558 566 578 586 590
    598 600 604 608 634 643 646 654 682 690 694 702 704 706 710 728 748 752 756 760 764 776
    780 784 788 800 807 818 826 834 840 858 860 882 886 901 924 925 926 928 929 930 932 933
    934 936 938 941 943 944 946 949 950 951 952 953 967 968 969 971 972 973 975 976 977 978
    980 981 985 986
    """
ISO4217_NUMERIC: Final = frozenset(_ISO4217_TEXT.split())

#: Days in each month (February with 29 so that 0229 is accepted without a year).
_MONTH_DAYS: Final = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)

MessageClass = Literal["auth", "financial", "advice", "reversal", "network", "other"]


# --- MTI helpers ----------------------------------------------------------------------------


def _check_mti(mti: str) -> None:
    if len(mti) != 4 or not is_digits(mti):
        raise ValueError("an MTI is four decimal digits")


def message_class(mti: str) -> MessageClass:
    """Classify an MTI for duplicate keys, metrics and routing.

    >>> [message_class(m) for m in ("0100", "0210", "0120", "0421", "0800", "0600")]
    ['auth', 'financial', 'advice', 'reversal', 'network', 'other']

    Raises:
        ValueError: ``mti`` is not four digits.
    """
    _check_mti(mti)
    if mti[1] == "4":
        return "reversal"
    if mti[1] == "8":
        return "network"
    if mti[1] in "12":
        if mti[2] in "23":
            return "advice"
        return "auth" if mti[1] == "1" else "financial"
    return "other"


def is_financial(mti: str) -> bool:
    """Whether ``mti`` is of the financial class (02xx: funds move at once, not a hold).

    >>> is_financial("0200"), is_financial("0220"), is_financial("0100")
    (True, True, False)

    Raises:
        ValueError: ``mti`` is not four digits.
    """
    _check_mti(mti)
    return mti[1] == "2"


def is_advice(mti: str) -> bool:
    """Whether ``mti`` is an advice (function 2: 0120, 0220, 0420 and their repeats), which
    tells of something the network already did in the issuer's place.

    >>> is_advice("0120"), is_advice("0421"), is_advice("0400")
    (True, True, False)

    Raises:
        ValueError: ``mti`` is not four digits.
    """
    _check_mti(mti)
    return mti[2] == "2"


def is_repeat(mti: str) -> bool:
    """Whether ``mti`` is a repeat (last digit 1 or 3): ``is_repeat("0401") is True``.

    Raises:
        ValueError: ``mti`` is not four digits.
    """
    _check_mti(mti)
    return mti[3] in "13"


def is_request(mti: str) -> bool:
    """Whether ``mti`` expects an answer class (request, advice, notification: function 0/2/4).

    >>> is_request("0100"), is_request("0110"), is_request("0420"), is_request("0430")
    (True, False, True, False)

    Raises:
        ValueError: ``mti`` is not four digits.
    """
    _check_mti(mti)
    return mti[2] in "024"


def response_mti(mti: str) -> str:
    """The MTI answering ``mti``: function + 1, repeat bit cleared (0101 -> 0110, 0421 -> 0430).

    Raises:
        ValueError: ``mti`` is not four digits or is not a request class.
    """
    if not is_request(mti):
        raise ValueError("only a request-class MTI has a response MTI")
    return mti[:2] + str(int(mti[2]) + 1) + "0"


# --- safe repr ------------------------------------------------------------------------------

#: Field metadata marking a PAN: shown masked in repr.
_PAN_META: Final = {"pan": True}


def _safe_repr(obj: Any) -> str:
    parts = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("pan") and isinstance(value, str):
            parts.append(f"{f.name}={mask_pan(value)!r}")
        elif not f.repr:
            shown = "<redacted>" if value not in (None, (), b"") else repr(value)
            parts.append(f"{f.name}={shown}")
        else:
            parts.append(f"{f.name}={value!r}")
    return f"{type(obj).__name__}({', '.join(parts)})"


# --- parts ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Track2:
    """Track 2 equivalent data (DE35): PAN, expiry YYMM, service code, discretionary data."""

    pan: str = field(metadata=_PAN_META)
    expiry: str = field(default="", repr=False)
    service_code: str = ""
    discretionary: str = field(default="", repr=False)

    __repr__ = _safe_repr

    def to_text(self) -> str:
        """The ISO 7813 text with the ``D`` separator used on the wire."""
        return f"{self.pan}D{self.expiry}{self.service_code}{self.discretionary}"


@dataclass(frozen=True, slots=True)
class MerchantLocation:
    """DE43 card acceptor name/location (ISO/Visa layout: name 25, city 13, country 2)."""

    name: str
    city: str
    country: str

    def to_text(self) -> str:
        """The 40-character DE43 value."""
        return f"{self.name:<{_DE43_NAME}.{_DE43_NAME}}{self.city:<{_DE43_CITY}.{_DE43_CITY}}" + (
            f"{self.country:<2.2}"
        )


@dataclass(frozen=True, slots=True)
class AdditionalAmount:
    """One DE54 additional amount; ``amount`` is signed minor units (credit positive)."""

    account_type: str
    amount_type: str
    currency: str
    amount: int

    def __post_init__(self) -> None:
        if abs(self.amount) > _AMOUNT_MAX:
            raise ValueError("an additional amount carries at most 12 digits")

    @classmethod
    def fits(cls, amount: int) -> bool:
        """Whether ``amount`` can be carried in DE54 (12 digits and a sign)."""
        return abs(amount) <= _AMOUNT_MAX

    def to_text(self) -> str:
        """The 20-character DE54 entry."""
        sign = "C" if self.amount >= 0 else "D"
        return f"{self.account_type}{self.amount_type}{self.currency}{sign}{abs(self.amount):012d}"


@dataclass(frozen=True, slots=True)
class OriginalData:
    """DE90 original data elements of a reversal: the transaction it reverses."""

    mti: str
    stan: str
    transmission_time: str
    acquirer_id: str
    forwarding_id: str

    def to_text(self) -> str:
        """The 42-digit DE90 value (institution ids right-justified, zero-filled)."""
        return (
            f"{self.mti}{self.stan}{self.transmission_time}"
            f"{self.acquirer_id:0>11}{self.forwarding_id:0>11}"
        )


# --- data element kinds ---------------------------------------------------------------------


def _valid_mmdd(value: str) -> bool:
    month, day = int(value[:2]), int(value[2:4])
    return 1 <= month <= 12 and 1 <= day <= _MONTH_DAYS[month - 1]


def _valid_hhmmss(value: str) -> bool:
    return int(value[:2]) < 24 and int(value[2:4]) < 60 and int(value[4:6]) < 60


def _valid_transmission(value: str) -> bool:
    return _valid_mmdd(value[:4]) and _valid_hhmmss(value[4:])


def _valid_yymm(value: str) -> bool:
    return 1 <= int(value[2:]) <= 12


def _amount_text(value: int) -> str:
    if not 0 <= value <= _AMOUNT_MAX:
        raise ValueError("amount out of range for 12 digits")
    return f"{value:012d}"


def _parse_track2(value: str) -> Track2:
    sep = next((i for i, c in enumerate(value) if c in "=D"), -1)
    pan, rest = value[:sep], value[sep + 1 :]
    if sep < 0 or not PAN_MIN_DIGITS <= len(pan) <= PAN_MAX_DIGITS or not is_digits(pan):
        raise Invalid("track 2 PAN malformed")
    if len(rest) < 7 or not is_digits(rest):
        raise Invalid("track 2 expiry/service code malformed")
    if not 1 <= int(rest[2:4]) <= 12:
        raise Invalid("track 2 expiry not a valid YYMM")
    return Track2(pan=pan, expiry=rest[:4], service_code=rest[4:7], discretionary=rest[7:])


def _parse_de43(value: str) -> MerchantLocation:
    if len(value) != _DE43_WIDTH or not is_printable(value):
        raise Invalid("expected 40 printable characters")
    cut = _DE43_NAME + _DE43_CITY
    return MerchantLocation(
        name=value[:_DE43_NAME].rstrip(), city=value[_DE43_NAME:cut].rstrip(), country=value[cut:]
    )


_Subelements = tuple[tuple[str, str], ...]
#: DE48 of an authorization: (category code, CVV2, all subelements, free text), see
#: :func:`_parse_de48`.
_De48 = tuple[str | None, str | None, _Subelements, str | None]

#: Where a network profile puts the CVV2 of an authorization: DE48 subelement 92
#: (Mastercard's place), DE126 subfield 10 (Visa's CVV2 authorization request data), or
#: nowhere (the network does not send it).
Cvv2Place = Literal["de48.se92", "de126.10", "none"]
#: How DE48 of an authorization is read: Mastercard's layout (optional category code, then
#: subelements), anything else being kept as free text; or free text only.
De48Layout = Literal["subelements", "text"]
#: How DE126 is read: Visa's layout (a bitmap as 16 hex characters, then the subfields it
#: announces, each of a fixed length), anything else being ignored; or free text.
De126Layout = Literal["visa", "text"]
#: Visa DE126 subfield lengths (characters) after public descriptions of BASE I; a profile
#: gives its own. Subfield 10 (CVV2 authorization request data) is what the switch reads.
VISA_DE126_LENGTHS: Final = (
    (1, 25), (2, 57), (3, 57), (4, 18), (5, 8), (6, 17), (7, 17), (8, 20), (9, 20),
    (10, 6), (11, 2), (12, 24), (13, 1), (15, 1), (16, 33), (18, 12), (19, 1), (20, 1),
)  # fmt: skip
#: The DE126 subfield of the CVV2 and its presence indicator meaning "value present".
_DE126_CVV2, _CVV2_PRESENT = 10, "1"
#: Hex characters of the DE126 bitmap in a text layout (8 bytes).
_DE126_BITMAP = 16


@dataclass(frozen=True, slots=True)
class SubLayouts:
    """Where a network profile puts card-security values and how it lays out DE48 and DE126.

    The default is the switch's historical reading: CVV2 in DE48 subelement 92.

    >>> SubLayouts(cvv2="de126.10", de48="text", de126="visa").de126_lengths[9]
    (10, 6)
    """

    cvv2: Cvv2Place = "de48.se92"
    de48: De48Layout = "subelements"
    de126: De126Layout = "text"
    #: (subfield, length) of a ``visa`` DE126, in subfield order.
    de126_lengths: tuple[tuple[int, int], ...] = VISA_DE126_LENGTHS


#: The layouts of a spec that names none.
DEFAULT_SUBLAYOUTS: Final = SubLayouts()


def _parse_de48(value: str) -> _De48:
    """Mastercard-style DE48: optional category code (a non-digit) then id(2) len(2) data;
    subelement 92 is the CVV2. Printable text in another layout is kept as free text."""
    if not is_printable(value):
        raise Invalid("not printable text")
    category = None
    pos = 0
    if value and not "0" <= value[0] <= "9":
        category, pos = value[0], 1
    items: list[tuple[str, str]] = []
    while pos < len(value):
        head = value[pos : pos + 4]
        length = int(head[2:]) if len(head) == 4 and is_digits(head) else -1
        data = value[pos + 4 : pos + 4 + length]
        if length < 0 or len(data) != length:
            return None, None, (), value  # not subelements: free text
        items.append((head[:2], data))
        pos += 4 + length
    cvv2 = next((data for se, data in items if se == _DE48_CVV2_SE), None)
    return category, cvv2, tuple(items), None


def _format_de48(value: _De48) -> str | None:
    category, cvv2, items, free_text = value
    if free_text is not None and not items and category is None:
        return free_text
    if cvv2 is not None and not any(se == _DE48_CVV2_SE for se, _ in items):
        items = (*items, (_DE48_CVV2_SE, cvv2))
    if not items and category is None:
        return None
    return (category or "") + "".join(f"{se}{len(data):02d}{data}" for se, data in items)


def _de126_cvv2(value: str | None, lengths: tuple[tuple[int, int], ...]) -> str | None:
    """The CVV2 of a Visa-layout DE126 (subfield 10), or None when absent or not readable."""
    if value is None or len(value) < _DE126_BITMAP:
        return None
    try:
        bitmap = int(value[:_DE126_BITMAP], 16)
    except ValueError:
        return None
    pos = _DE126_BITMAP
    for subfield, length in lengths:
        if not bitmap >> (64 - subfield) & 1:
            continue
        data = value[pos : pos + length]
        if len(data) != length:
            return None
        if subfield == _DE126_CVV2:
            # presence indicator, response type, then the value right-justified in 4.
            cvv2 = data[2:].strip()
            return cvv2 if data[:1] == _CVV2_PRESENT and cvv2 else None
        pos += length
    return None


def _de126_with_cvv2(cvv2: str) -> str:
    """A Visa-layout DE126 carrying subfield 10 only: CVV2 present, normal response."""
    bitmap = 1 << (64 - _DE126_CVV2)
    return f"{bitmap:016X}{_CVV2_PRESENT}1{cvv2:>4.4}"


def _parse_de54(value: str) -> tuple[AdditionalAmount, ...]:
    count, rest = divmod(len(value), _ADD_AMOUNT_WIDTH)
    if not value or rest or count > _ADD_AMOUNT_MAX:
        raise Invalid("length is not a multiple of 20 up to 120")
    items = []
    for pos in range(0, len(value), _ADD_AMOUNT_WIDTH):
        chunk = value[pos : pos + _ADD_AMOUNT_WIDTH]
        head, sign, amount = chunk[:7], chunk[7], chunk[8:]
        if not is_digits(head) or sign not in "CD" or not is_digits(amount):
            raise Invalid("additional amount malformed")
        value_int = int(amount)
        items.append(
            AdditionalAmount(
                account_type=head[:2],
                amount_type=head[2:4],
                currency=head[4:7],
                amount=value_int if sign == "C" else -value_int,
            )
        )
    return tuple(items)


def _format_de54(value: tuple[AdditionalAmount, ...]) -> str | None:
    return "".join(a.to_text() for a in value) or None


def _parse_de90(value: str) -> OriginalData:
    if len(value) != _DE90_WIDTH or not is_digits(value):
        raise Invalid("expected 42 digits")
    return OriginalData(
        mti=value[:4],
        stan=value[4:10],
        transmission_time=value[10:20],
        acquirer_id=value[20:31],
        forwarding_id=value[31:42],
    )


def _parse_de95(value: str) -> int:
    if len(value) != _DE90_WIDTH or not is_digits(value[:12]) or not is_printable(value):
        raise Invalid("replacement amount malformed")
    return int(value[:12])


def _format_de95(value: int) -> str:
    """Actual amount, zero settlement amount, two zero credit fees (42 characters)."""
    return f"{_amount_text(value)}{'0' * 12}" + "C00000000" * 2


def _track2_pan(values: Mapping[str, Any]) -> str | None:
    track2: Track2 | None = values.get("track2")
    return None if track2 is None else track2.pan


_N3, _N4, _N6, _N16 = digits(3), digits(4), digits(6), digits(16)
#: A PAN: masked (first six, last four) in reprs.
_PAN: Final = (
    digits()
    .where(lambda v: PAN_MIN_DIGITS <= len(v) <= PAN_MAX_DIGITS, "PAN must be 12 to 19 digits")
    .masked("pan")
)
_AMOUNT: Final = digits(12).then(int, _amount_text)
_MMDDHHMMSS: Final = digits(10).where(_valid_transmission, "not a valid MMDDhhmmss")
_HHMMSS: Final = digits(6).where(_valid_hhmmss, "not a valid hhmmss")
_MMDD: Final = digits(4).where(_valid_mmdd, "not a valid MMDD")
_YYMM: Final = digits(4).where(_valid_yymm, "not a valid YYMM")
_CURRENCY: Final = digits(3).where(
    ISO4217_NUMERIC.__contains__, "not an ISO 4217 numeric currency code"
)
_INSTITUTION: Final = digits(max_len=11)
_RESPONSE_CODE: Final = text(2).where(str.isalnum, "response code must be alphanumeric")
_TRACK2: Final = Kind(_parse_track2, Track2.to_text, mask="hide")
_DE43: Final = Kind(_parse_de43, MerchantLocation.to_text)
_DE48_AUTH: Final = Kind(_parse_de48, _format_de48).spread_over(
    "category_code", "cvv2", "additional_data", "additional_text"
)
_DE54: Final = text().then(_parse_de54, _format_de54)
_DE90: Final = Kind(_parse_de90, OriginalData.to_text)
_DE95: Final = Kind(_parse_de95, _format_de95)

# --- messages -------------------------------------------------------------------------------
# Each field names its data element once (see switch.wire.mapping.de): a field without a
# default is mandatory on the wire; echo=True marks what the answer repeats. Fields are
# declared in the order they are validated, which decides the element a message with
# several faults is reported for (tests/test_wire_corpus.py pins some).


@message()
class AuthRequest:
    """0100/0101 authorization, 0200/0201 financial, 0120/0121/0220/0221 advices.

    ``pan`` is DE2, or the PAN of track 2 when DE2 is absent. ``cvv2`` comes from where
    the network profile puts it (:class:`SubLayouts`: DE48 subelement 92 by default, DE126
    subfield 10 for Visa); ``additional_data`` holds the DE48 subelements (id, value), and
    ``additional_text`` a DE48 that is not in that layout (free text).
    """

    mti: str
    track2: Track2 | None = de(35, _TRACK2, default=None)
    pan: str = de(
        2,
        _PAN,
        echo=True,
        fallback=_track2_pan,
        missing="mandatory field missing (no DE2 and no track 2)",
    )
    category_code: str | None = de(48, _DE48_AUTH, default=None)
    cvv2: str | None = de(48, _DE48_AUTH, secret=True, default=None)
    additional_data: _Subelements = de(48, _DE48_AUTH, secret=True, default=())
    additional_text: str | None = de(48, _DE48_AUTH, secret=True, default=None)
    amount: int = de(4, _AMOUNT, echo=True)
    currency: str = de(49, _CURRENCY, echo=True)
    transmission_time: str = de(7, _MMDDHHMMSS, echo=True)
    processing_code: str = de(3, _N6, echo=True)
    stan: str = de(11, _N6, echo=True)
    local_time: str | None = de(12, _HHMMSS, echo=True, default=None)
    local_date: str | None = de(13, _MMDD, echo=True, default=None)
    expiry: str | None = de(14, _YYMM, default=None)
    mcc: str | None = de(18, _N4, default=None)
    acquirer_country: str | None = de(19, _N3, default=None)
    pos_entry_mode: str | None = de(22, _N3, default=None)
    pan_sequence: str | None = de(23, _N3, default=None)
    acquirer_id: str | None = de(32, _INSTITUTION, echo=True, default=None)
    forwarding_id: str | None = de(33, _INSTITUTION, default=None)
    rrn: str | None = de(37, text(12), echo=True, default=None)
    terminal_id: str | None = de(41, text(8), echo=True, default=None)
    merchant_id: str | None = de(42, text(15), echo=True, default=None)
    merchant_location: MerchantLocation | None = de(43, _DE43, default=None)
    pin_block: bytes | None = de(52, BINARY, default=None)
    security_control: str | None = de(53, _N16, default=None)
    emv: bytes | None = de(55, BINARY, default=None)
    #: DE39 of an advice (0120/0220): the answer the network gave in the issuer's place.
    #: DE90 of a completion (0220 of a pre-authorization): the authorization it completes.
    original: OriginalData | None = de(90, _DE90, default=None)
    response_code: str | None = de(39, _RESPONSE_CODE, default=None)

    __repr__ = _safe_repr


@message(answers=AuthRequest)
class AuthResponse:
    """0110, 0130, 0210, 0230: the answer to an :class:`AuthRequest`."""

    mti: str
    stan: str = de(11, _N6)
    response_code: str = de(39, _RESPONSE_CODE)
    transmission_time: str | None = de(7, _MMDDHHMMSS, default=None)
    pan: str | None = de(2, _PAN, default=None)
    processing_code: str | None = de(3, _N6, default=None)
    amount: int | None = de(4, _AMOUNT, default=None)
    local_time: str | None = de(12, _HHMMSS, default=None)
    local_date: str | None = de(13, _MMDD, default=None)
    acquirer_id: str | None = de(32, _INSTITUTION, default=None)
    rrn: str | None = de(37, text(12), default=None)
    terminal_id: str | None = de(41, text(8), default=None)
    merchant_id: str | None = de(42, text(15), default=None)
    currency: str | None = de(49, _CURRENCY, default=None)
    approval_code: str | None = de(38, text(6), default=None)
    additional_amounts: tuple[AdditionalAmount, ...] = de(54, _DE54, default=())
    emv: bytes | None = de(55, BINARY, default=None)

    __repr__ = _safe_repr

    @property
    def available_balance(self) -> AdditionalAmount | None:
        """The DE54 entry of amount type 02 (available balance), if any."""
        for item in self.additional_amounts:
            if item.amount_type == AVAILABLE_BALANCE_TYPE:
                return item
        return None

    @classmethod
    def answer(
        cls,
        req: AuthRequest,
        response_code: str,
        *,
        approval_code: str | None = None,
        available_balance: AdditionalAmount | None = None,
        emv: bytes | None = None,
    ) -> AuthResponse:
        """Build the answer to ``req``, echoing what it declares (DE2, 3, 4, 7, 11, 12, 13,
        32, 37, 41, 42, 49).

        Raises:
            ValueError: ``req.mti`` is not a request class.
        """
        return cls(
            mti=response_mti(req.mti),
            response_code=response_code,
            **echo(req),
            approval_code=approval_code,
            additional_amounts=() if available_balance is None else (available_balance,),
            emv=emv,
        )


@message()
class ReversalRequest:
    """0400/0401 reversal, 0420/0421 reversal advice.

    ``replacement_amount`` is the actual amount of DE95 (a partial reversal); None when DE95
    is absent. A zero replacement amount, like None, means a full reversal.
    """

    mti: str
    amount: int = de(4, _AMOUNT, echo=True)
    transmission_time: str = de(7, _MMDDHHMMSS, echo=True)
    stan: str = de(11, _N6, echo=True)
    original: OriginalData = de(90, _DE90, echo=True)
    pan: str | None = de(2, _PAN, echo=True, default=None)
    processing_code: str | None = de(3, _N6, echo=True, default=None)
    currency: str | None = de(49, _CURRENCY, echo=True, default=None)
    local_time: str | None = de(12, _HHMMSS, echo=True, default=None)
    local_date: str | None = de(13, _MMDD, echo=True, default=None)
    acquirer_id: str | None = de(32, _INSTITUTION, echo=True, default=None)
    forwarding_id: str | None = de(33, _INSTITUTION, default=None)
    rrn: str | None = de(37, text(12), echo=True, default=None)
    terminal_id: str | None = de(41, text(8), echo=True, default=None)
    merchant_id: str | None = de(42, text(15), echo=True, default=None)
    response_code: str | None = de(39, _RESPONSE_CODE, default=None)
    replacement_amount: int | None = de(95, _DE95, default=None)
    emv: bytes | None = de(55, BINARY, default=None)

    __repr__ = _safe_repr

    @property
    def is_full(self) -> bool:
        """Whether the whole original amount is reversed (no or zero DE95 amount)."""
        return not self.replacement_amount


@message(answers=ReversalRequest)
class ReversalResponse:
    """0410, 0430: the answer to a :class:`ReversalRequest`."""

    mti: str
    stan: str = de(11, _N6)
    response_code: str = de(39, _RESPONSE_CODE)
    transmission_time: str | None = de(7, _MMDDHHMMSS, default=None)
    pan: str | None = de(2, _PAN, default=None)
    processing_code: str | None = de(3, _N6, default=None)
    amount: int | None = de(4, _AMOUNT, default=None)
    local_time: str | None = de(12, _HHMMSS, default=None)
    local_date: str | None = de(13, _MMDD, default=None)
    acquirer_id: str | None = de(32, _INSTITUTION, default=None)
    rrn: str | None = de(37, text(12), default=None)
    terminal_id: str | None = de(41, text(8), default=None)
    merchant_id: str | None = de(42, text(15), default=None)
    currency: str | None = de(49, _CURRENCY, default=None)
    original: OriginalData | None = de(90, _DE90, default=None)

    __repr__ = _safe_repr

    @classmethod
    def answer(cls, req: ReversalRequest, response_code: str = "00") -> ReversalResponse:
        """Build the answer to ``req`` (0400/0401 -> 0410, 0420/0421 -> 0430), echoing it."""
        return cls(mti=response_mti(req.mti), response_code=response_code, **echo(req))


@message()
class NetworkRequest:
    """0800 network management: DE70 001 sign-on, 002 sign-off, 301 echo, 101/161 key change.

    ``key_data`` is DE48 (a key under a key-encrypting key on a key change): never shown.
    """

    mti: str
    transmission_time: str = de(7, _MMDDHHMMSS, echo=True)
    stan: str = de(11, _N6, echo=True)
    code: str = de(70, _N3, echo=True)
    security_control: str | None = de(53, _N16, default=None)
    key_data: str | None = de(48, text(), secret=True, default=None)

    __repr__ = _safe_repr


@message(answers=NetworkRequest)
class NetworkResponse:
    """0810: the answer to a :class:`NetworkRequest`, echoing DE7, DE11 and DE70."""

    mti: str
    transmission_time: str = de(7, _MMDDHHMMSS)
    stan: str = de(11, _N6)
    code: str = de(70, _N3)
    response_code: str = de(39, _RESPONSE_CODE)

    @classmethod
    def answer(cls, req: NetworkRequest, response_code: str = "00") -> NetworkResponse:
        """Build the 0810 answering ``req``."""
        return cls(mti=response_mti(req.mti), response_code=response_code, **echo(req))


@message(lenient=True)
class UnsupportedMessage:
    """A well-formed message whose MTI the switch does not serve.

    Only the fields needed to answer (or drop) it are kept; each is None when absent or
    malformed.
    """

    mti: str
    stan: str | None = de(11, _N6, echo=True, default=None)
    transmission_time: str | None = de(7, _MMDDHHMMSS, echo=True, default=None)
    acquirer_id: str | None = de(32, _INSTITUTION, echo=True, default=None)
    rrn: str | None = de(37, text(12), echo=True, default=None)
    terminal_id: str | None = de(41, text(8), echo=True, default=None)
    #: DE70 of an 08xx the switch does not serve (0801, 0820, ...): every 08xx answer echoes it.
    network_code: str | None = de(70, _N3, echo=True, default=None)

    @property
    def is_request(self) -> bool:
        """Whether the MTI is a request class (to be answered, not dropped)."""
        return is_request(self.mti)

    def answer(self, response_code: str = "12") -> ErrorResponse | None:
        """The answer to send (12 = invalid transaction), or None to drop the message.

        None when the MTI is a response class or the STAN could not be read.
        """
        if not self.is_request or self.stan is None:
            return None
        return ErrorResponse(mti=response_mti(self.mti), response_code=response_code, **echo(self))


@message(answers=UnsupportedMessage)
class ErrorResponse:
    """A minimal answer to a request the switch cannot serve as such (DE39 12 or 30).

    Carries the MTI of the answer, DE11 and, when they were recoverable, DE7, DE32, DE37,
    DE41 and DE70. Decoding its bytes gives back the typed response of its MTI, not this class.
    """

    mti: str
    stan: str = de(11, _N6)
    response_code: str = de(39, _RESPONSE_CODE)
    transmission_time: str | None = de(7, _MMDDHHMMSS, default=None)
    acquirer_id: str | None = de(32, _INSTITUTION, default=None)
    rrn: str | None = de(37, text(12), default=None)
    terminal_id: str | None = de(41, text(8), default=None)
    network_code: str | None = de(70, _N3, default=None)


Message = (
    AuthRequest
    | AuthResponse
    | ReversalRequest
    | ReversalResponse
    | NetworkRequest
    | NetworkResponse
    | UnsupportedMessage
    | ErrorResponse
)

#: The classes :func:`to_fields` accepts.
_MESSAGE_TYPES: Final = (
    AuthRequest,
    AuthResponse,
    ReversalRequest,
    ReversalResponse,
    NetworkRequest,
    NetworkResponse,
    UnsupportedMessage,
    ErrorResponse,
)
#: The class :func:`from_fields` makes of each MTI the switch serves.
_CLASS_OF_MTI: Final[dict[str, type[Message]]] = {
    mti: cls
    for cls, mtis in (
        (AuthRequest, AUTH_REQUEST_MTIS),
        (AuthResponse, AUTH_RESPONSE_MTIS),
        (ReversalRequest, REVERSAL_REQUEST_MTIS),
        (ReversalResponse, REVERSAL_RESPONSE_MTIS),
        (NetworkRequest, NETWORK_REQUEST_MTIS),
        (NetworkResponse, NETWORK_RESPONSE_MTIS),
    )
    for mti in mtis
}


# --- field dictionaries ---------------------------------------------------------------------


def recover_context(fields: Mapping[str, str]) -> dict[str, str]:
    """Pick the fields needed to answer a message from a possibly partial dictionary.

    Returns the keys ``mti``, ``stan``, ``transmission_time``, ``acquirer_id``, ``rrn``,
    ``terminal_id`` and ``network_code`` for those that are present and well formed (the
    elements of an :class:`ErrorResponse` besides its own response code); nothing else
    (never a PAN).
    """
    out: dict[str, str] = {}
    mti = fields.get(_MTI)
    if isinstance(mti, str) and len(mti) == 4 and is_digits(mti):
        out["mti"] = mti
    out.update(salvage(ErrorResponse, fields))
    out.pop("response_code", None)
    return out


def from_fields(fields: Mapping[str, str], layouts: SubLayouts = DEFAULT_SUBLAYOUTS) -> Message:
    """Build the typed message of a decoded field dictionary, validating field contents.

    Args:
        fields: pyiso8583-style dictionary: ``"t"`` the MTI, ``"2"``... the fields, binary
            fields as hex.
        layouts: the network profile's sub-layouts (where the CVV2 is, how DE48 and DE126
            are read).

    Returns:
        The typed message; :class:`UnsupportedMessage` for an MTI the switch does not serve.

    Raises:
        FieldError: a missing mandatory field or a malformed field content.
    """
    mti = fields.get(_MTI, "")
    if len(mti) != 4 or not is_digits(mti):
        raise FieldError(MTI_FIELD, "MTI must be four digits")
    msg = read(_CLASS_OF_MTI.get(mti, UnsupportedMessage), fields, mti=mti)
    if isinstance(msg, AuthRequest) and layouts != DEFAULT_SUBLAYOUTS:
        msg = _apply_layouts(msg, fields, layouts)
    return msg


def _apply_layouts(msg: AuthRequest, fields: Mapping[str, str], lay: SubLayouts) -> AuthRequest:
    """Re-read DE48 and the CVV2 of ``msg`` as the profile lays them out."""
    changes: dict[str, Any] = {}
    if lay.de48 == "text" and _DE48 in fields:
        changes.update(category_code=None, additional_data=(), additional_text=fields[_DE48])
    if lay.cvv2 == "de126.10":
        changes["cvv2"] = _de126_cvv2(fields.get(_DE126), lay.de126_lengths)
    elif lay.cvv2 == "none" or lay.de48 == "text":
        changes["cvv2"] = None
    changed = {name: value for name, value in changes.items() if getattr(msg, name) != value}
    return dataclasses.replace(msg, **changed) if changed else msg


def to_fields(msg: Message, layouts: SubLayouts = DEFAULT_SUBLAYOUTS) -> dict[str, str]:
    """The pyiso8583-style field dictionary of ``msg`` (the inverse of :func:`from_fields`).

    ``layouts`` says where the CVV2 of an :class:`AuthRequest` goes (the acquirer side).

    Fields are not validated here beyond what is needed to lay them out; encode errors from
    the spec (wrong lengths) surface in the codec.

    Raises:
        TypeError: ``msg`` is not a message dataclass.
        ValueError: a value that cannot be laid out (e.g. a negative amount).
    """
    if not isinstance(msg, _MESSAGE_TYPES):
        raise TypeError(f"not a wire message: {type(msg).__name__}")
    out = write(msg, {_MTI: msg.mti})
    if isinstance(msg, AuthRequest) and layouts != DEFAULT_SUBLAYOUTS:
        cvv2_in_de48 = msg.cvv2 if layouts.cvv2 == "de48.se92" and layouts.de48 != "text" else None
        if layouts.de48 == "text":
            de48 = msg.additional_text
        else:
            de48 = _format_de48(
                (msg.category_code, cvv2_in_de48, msg.additional_data, msg.additional_text)
            )
        out.pop(_DE48, None)
        if de48 is not None:
            out[_DE48] = de48
        if layouts.cvv2 == "de126.10" and msg.cvv2 is not None:
            out[_DE126] = _de126_with_cvv2(msg.cvv2)
    return out
