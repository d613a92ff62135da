"""Typed ISO 8583:1987 messages and their mapping to field dictionaries.

What lives here: the frozen dataclasses the rest of the switch works with (``AuthRequest``,
``AuthResponse``, ``ReversalRequest``, ``ReversalResponse``, ``NetworkRequest``,
``NetworkResponse``, ``UnsupportedMessage``, ``ErrorResponse`` and their parts ``Track2``,
``MerchantLocation``, ``AdditionalAmount``, ``OriginalData``), MTI helpers, the field-content
validation done on decode, and :func:`from_fields` / :func:`to_fields`, which convert between
those dataclasses and pyiso8583-style dictionaries (``{"t": MTI, "2": PAN, ...}``; binary
fields as upper-case hex). This is the only module of the code base that knows ISO field
numbers.

What does not: bytes, bitmaps and length prefixes (spec.py, codec.py), framing (framing.py),
BER-TLV inside DE55 (emv.py), and any decision about a message (pipeline, decisions.py).

Card data: PAN-carrying fields are masked in ``repr`` (first six, last four); PIN block, CVV2,
track 2, DE48 subelements and EMV data never appear in a ``repr``. Validation errors name the
field and a fixed reason, never the value.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypedDict

from hsm.pan import mask_pan

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

# --- ISO 8583:1987 data elements used by the switch (keys of pyiso8583 dictionaries) -------
_MTI: Final = "t"  # message type indicator
_PAN: Final = "2"  # primary account number, LLVAR n..19
_PROC: Final = "3"  # processing code, n6
_AMOUNT: Final = "4"  # amount, transaction, n12 (minor units)
_TRANSMISSION: Final = "7"  # transmission date and time, MMDDhhmmss
_STAN: Final = "11"  # systems trace audit number, n6
_LOCAL_TIME: Final = "12"  # time, local transaction, hhmmss
_LOCAL_DATE: Final = "13"  # date, local transaction, MMDD
_EXPIRY: Final = "14"  # date, expiration, YYMM
_MCC: Final = "18"  # merchant type, n4
_ACQ_COUNTRY: Final = "19"  # acquiring institution country code, n3
_POS_ENTRY: Final = "22"  # point of service entry mode, n3
_PAN_SEQ: Final = "23"  # card sequence number, n3
_ACQUIRER: Final = "32"  # acquiring institution identification code, LLVAR n..11
_FORWARDER: Final = "33"  # forwarding institution identification code, LLVAR n..11
_TRACK2: Final = "35"  # track 2 data, LLVAR z..37
_RRN: Final = "37"  # retrieval reference number, an12
_APPROVAL: Final = "38"  # authorization identification response, an6
_RESPONSE: Final = "39"  # response code, an2
_TERMINAL: Final = "41"  # card acceptor terminal identification, ans8
_MERCHANT: Final = "42"  # card acceptor identification code, ans15
_MERCHANT_NAME: Final = "43"  # card acceptor name/location, ans40
_ADDITIONAL: Final = "48"  # additional data - private, LLLVAR
_CURRENCY: Final = "49"  # currency code, transaction, n3
_PIN_BLOCK: Final = "52"  # personal identification number data, b64
_SECURITY: Final = "53"  # security related control information, n16
_ADD_AMOUNTS: Final = "54"  # additional amounts, LLLVAR an..120
_ICC: Final = "55"  # ICC system related data (EMV BER-TLV), LLLVAR b
_NETWORK_CODE: Final = "70"  # network management information code, n3
_ORIGINAL: Final = "90"  # original data elements, n42
_REPLACEMENT: Final = "95"  # replacement amounts, an42

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

#: Shortest and longest PAN (ISO/IEC 7812).
_PAN_MIN, _PAN_MAX = 12, 19
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


class FieldError(ValueError):
    """A field is missing or malformed. ``field`` is the field number (or ``"mti"``).

    The message holds the field number and a fixed reason, never the field's value.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"field {field}: {reason}")
        self.field = field
        self.reason = reason


# --- MTI helpers ----------------------------------------------------------------------------


def _check_mti(mti: str) -> None:
    if len(mti) != 4 or not _is_digits(mti):
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


# --- messages -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthRequest:
    """0100/0101 authorization, 0200/0201 financial, 0120/0121/0220/0221 advices.

    ``pan`` is DE2, or the PAN of track 2 when DE2 is absent. ``cvv2`` comes from DE48
    subelement 92; ``additional_data`` holds all DE48 subelements (id, value).
    """

    mti: str
    pan: str = field(metadata=_PAN_META)
    processing_code: str
    amount: int
    transmission_time: str
    stan: str
    currency: str
    local_time: str | None = None
    local_date: str | None = None
    expiry: str | None = None
    mcc: str | None = None
    acquirer_country: str | None = None
    pos_entry_mode: str | None = None
    pan_sequence: str | None = None
    acquirer_id: str | None = None
    forwarding_id: str | None = None
    track2: Track2 | None = field(default=None, repr=False)
    rrn: str | None = None
    terminal_id: str | None = None
    merchant_id: str | None = None
    merchant_location: MerchantLocation | None = None
    category_code: str | None = None
    cvv2: str | None = field(default=None, repr=False)
    additional_data: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    pin_block: bytes | None = field(default=None, repr=False)
    security_control: str | None = None
    emv: bytes | None = field(default=None, repr=False)
    #: DE39 of an advice (0120/0220): the answer the network gave in the issuer's place.
    response_code: str | None = None

    __repr__ = _safe_repr


class _Echo(TypedDict):
    """What a response repeats of its request besides MTI and STAN: DE2, 3, 4, 7, 12, 13, 32,
    37, 41, 42 and 49 (each optional in a response)."""

    transmission_time: str | None
    pan: str | None
    processing_code: str | None
    amount: int | None
    local_time: str | None
    local_date: str | None
    acquirer_id: str | None
    rrn: str | None
    terminal_id: str | None
    merchant_id: str | None
    currency: str | None


def _echo_of(req: AuthRequest | ReversalRequest) -> _Echo:
    """The fields of ``req`` its answer repeats."""
    return _Echo(
        transmission_time=req.transmission_time,
        pan=req.pan,
        processing_code=req.processing_code,
        amount=req.amount,
        local_time=req.local_time,
        local_date=req.local_date,
        acquirer_id=req.acquirer_id,
        rrn=req.rrn,
        terminal_id=req.terminal_id,
        merchant_id=req.merchant_id,
        currency=req.currency,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthResponse:
    """0110, 0130, 0210, 0230: the answer to an :class:`AuthRequest`."""

    mti: str
    stan: str
    response_code: str
    transmission_time: str | None = None
    pan: str | None = field(default=None, metadata=_PAN_META)
    processing_code: str | None = None
    amount: int | None = None
    local_time: str | None = None
    local_date: str | None = None
    acquirer_id: str | None = None
    rrn: str | None = None
    terminal_id: str | None = None
    merchant_id: str | None = None
    currency: str | None = None
    approval_code: str | None = None
    additional_amounts: tuple[AdditionalAmount, ...] = ()
    emv: bytes | None = field(default=None, repr=False)

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
        """Build the answer to ``req``, echoing DE2, 3, 4, 7, 11, 12, 13, 32, 37, 41, 42, 49.

        Raises:
            ValueError: ``req.mti`` is not a request class.
        """
        return cls(
            mti=response_mti(req.mti),
            stan=req.stan,
            response_code=response_code,
            **_echo_of(req),
            approval_code=approval_code,
            additional_amounts=() if available_balance is None else (available_balance,),
            emv=emv,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ReversalRequest:
    """0400/0401 reversal, 0420/0421 reversal advice.

    ``replacement_amount`` is the actual amount of DE95 (a partial reversal); None when DE95
    is absent. A zero replacement amount, like None, means a full reversal.
    """

    mti: str
    stan: str
    transmission_time: str
    amount: int
    original: OriginalData
    pan: str | None = field(default=None, metadata=_PAN_META)
    processing_code: str | None = None
    currency: str | None = None
    local_time: str | None = None
    local_date: str | None = None
    acquirer_id: str | None = None
    forwarding_id: str | None = None
    rrn: str | None = None
    terminal_id: str | None = None
    merchant_id: str | None = None
    response_code: str | None = None
    replacement_amount: int | None = None
    emv: bytes | None = field(default=None, repr=False)

    __repr__ = _safe_repr

    @property
    def is_full(self) -> bool:
        """Whether the whole original amount is reversed (no or zero DE95 amount)."""
        return not self.replacement_amount


@dataclass(frozen=True, slots=True, kw_only=True)
class ReversalResponse:
    """0410, 0430: the answer to a :class:`ReversalRequest`."""

    mti: str
    stan: str
    response_code: str
    transmission_time: str | None = None
    pan: str | None = field(default=None, metadata=_PAN_META)
    processing_code: str | None = None
    amount: int | None = None
    local_time: str | None = None
    local_date: str | None = None
    acquirer_id: str | None = None
    rrn: str | None = None
    terminal_id: str | None = None
    merchant_id: str | None = None
    currency: str | None = None
    original: OriginalData | None = None

    __repr__ = _safe_repr

    @classmethod
    def answer(cls, req: ReversalRequest, response_code: str = "00") -> ReversalResponse:
        """Build the answer to ``req`` (0400/0401 -> 0410, 0420/0421 -> 0430), echoing it."""
        return cls(
            mti=response_mti(req.mti),
            stan=req.stan,
            response_code=response_code,
            **_echo_of(req),
            original=req.original,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class NetworkRequest:
    """0800 network management: DE70 001 sign-on, 002 sign-off, 301 echo, 101/161 key change.

    ``key_data`` is DE48 (a key under a key-encrypting key on a key change): never shown.
    """

    mti: str
    transmission_time: str
    stan: str
    code: str
    security_control: str | None = None
    key_data: str | None = field(default=None, repr=False)

    __repr__ = _safe_repr


@dataclass(frozen=True, slots=True, kw_only=True)
class NetworkResponse:
    """0810: the answer to a :class:`NetworkRequest`, echoing DE7, DE11 and DE70."""

    mti: str
    transmission_time: str
    stan: str
    code: str
    response_code: str

    @classmethod
    def answer(cls, req: NetworkRequest, response_code: str = "00") -> NetworkResponse:
        """Build the 0810 answering ``req``."""
        return cls(
            mti=response_mti(req.mti),
            transmission_time=req.transmission_time,
            stan=req.stan,
            code=req.code,
            response_code=response_code,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorResponse:
    """A minimal answer to a request the switch cannot serve as such (DE39 12 or 30).

    Carries the MTI of the answer, DE11 and, when they were recoverable, DE7, DE32, DE37,
    DE41 and DE70. Decoding its bytes gives back the typed response of its MTI, not this class.
    """

    mti: str
    stan: str
    response_code: str
    transmission_time: str | None = None
    acquirer_id: str | None = None
    rrn: str | None = None
    terminal_id: str | None = None
    network_code: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class UnsupportedMessage:
    """A well-formed message whose MTI the switch does not serve.

    Only the fields needed to answer (or drop) it are kept; each is None when absent or
    malformed.
    """

    mti: str
    stan: str | None = None
    transmission_time: str | None = None
    acquirer_id: str | None = None
    rrn: str | None = None
    terminal_id: str | None = None

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
        return ErrorResponse(
            mti=response_mti(self.mti),
            stan=self.stan,
            response_code=response_code,
            transmission_time=self.transmission_time,
            acquirer_id=self.acquirer_id,
            rrn=self.rrn,
            terminal_id=self.terminal_id,
        )


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


# --- validation helpers ---------------------------------------------------------------------


def _is_digits(value: str) -> bool:
    # str.isdigit() accepts superscripts and other scripts' digits: compare with ASCII.
    return bool(value) and all("0" <= c <= "9" for c in value)


def _is_printable(value: str) -> bool:
    return all(" " <= c <= "~" for c in value)


def _valid_mmdd(value: str) -> bool:
    month, day = int(value[:2]), int(value[2:4])
    return 1 <= month <= 12 and 1 <= day <= _MONTH_DAYS[month - 1]


def _valid_hhmmss(value: str) -> bool:
    return int(value[:2]) < 24 and int(value[2:4]) < 60 and int(value[4:6]) < 60


class _Reader:
    """Typed access to a field dictionary; every getter validates and raises FieldError."""

    def __init__(self, fields: Mapping[str, str]) -> None:
        self._f = fields

    def has(self, key: str) -> bool:
        return key in self._f

    def raw(self, key: str, *, required: bool = False) -> str | None:
        value = self._f.get(key)
        if value is None and required:
            raise FieldError(key, "mandatory field missing")
        return value

    def digits(
        self, key: str, length: int | None = None, *, required: bool = False, max_len: int = 0
    ) -> str | None:
        value = self.raw(key, required=required)
        if value is None:
            return None
        if length is not None and len(value) != length:
            raise FieldError(key, f"expected {length} digits")
        if max_len and len(value) > max_len:
            raise FieldError(key, f"longer than {max_len} digits")
        if value and not _is_digits(value):
            raise FieldError(key, "not numeric")
        return value

    def req_digits(self, key: str, length: int) -> str:
        value = self.digits(key, length, required=True)
        assert value is not None
        return value

    def text(self, key: str, length: int | None = None, *, required: bool = False) -> str | None:
        value = self.raw(key, required=required)
        if value is None:
            return None
        if length is not None and len(value) != length:
            raise FieldError(key, f"expected {length} characters")
        if not _is_printable(value):
            raise FieldError(key, "not printable text")
        return value

    def transmission_time(self, *, required: bool = True) -> str | None:
        value = self.digits(_TRANSMISSION, 10, required=required)
        if value is not None and not (_valid_mmdd(value[:4]) and _valid_hhmmss(value[4:])):
            raise FieldError(_TRANSMISSION, "not a valid MMDDhhmmss")
        return value

    def local_time(self) -> str | None:
        value = self.digits(_LOCAL_TIME, 6)
        if value is not None and not _valid_hhmmss(value):
            raise FieldError(_LOCAL_TIME, "not a valid hhmmss")
        return value

    def local_date(self) -> str | None:
        value = self.digits(_LOCAL_DATE, 4)
        if value is not None and not _valid_mmdd(value):
            raise FieldError(_LOCAL_DATE, "not a valid MMDD")
        return value

    def expiry(self) -> str | None:
        value = self.digits(_EXPIRY, 4)
        if value is not None and not 1 <= int(value[2:]) <= 12:
            raise FieldError(_EXPIRY, "not a valid YYMM")
        return value

    def pan(self, *, required: bool = False) -> str | None:
        value = self.digits(_PAN, required=required)
        if value is not None and not _PAN_MIN <= len(value) <= _PAN_MAX:
            raise FieldError(_PAN, "PAN must be 12 to 19 digits")
        return value

    def amount(self, *, required: bool = False) -> int | None:
        value = self.digits(_AMOUNT, 12, required=required)
        return None if value is None else int(value)

    def currency(self, *, required: bool = False) -> str | None:
        value = self.digits(_CURRENCY, 3, required=required)
        if value is not None and value not in ISO4217_NUMERIC:
            raise FieldError(_CURRENCY, "not an ISO 4217 numeric currency code")
        return value

    def institution(self, key: str) -> str | None:
        return self.digits(key, max_len=11)

    def emv(self) -> bytes | None:
        value = self.raw(_ICC)
        return None if value is None else _hex_bytes(_ICC, value)


def _hex_bytes(key: str, value: str) -> bytes:
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise FieldError(key, "not binary data") from None


def _parse_track2(value: str) -> Track2:
    sep = next((i for i, c in enumerate(value) if c in "=D"), -1)
    pan, rest = value[:sep], value[sep + 1 :]
    if sep < 0 or not _PAN_MIN <= len(pan) <= _PAN_MAX or not _is_digits(pan):
        raise FieldError(_TRACK2, "track 2 PAN malformed")
    if len(rest) < 7 or not _is_digits(rest):
        raise FieldError(_TRACK2, "track 2 expiry/service code malformed")
    if not 1 <= int(rest[2:4]) <= 12:
        raise FieldError(_TRACK2, "track 2 expiry not a valid YYMM")
    return Track2(pan=pan, expiry=rest[:4], service_code=rest[4:7], discretionary=rest[7:])


def _parse_de48(value: str) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    """Mastercard-style DE48: optional category code (a non-digit) then id(2) len(2) data."""
    category = None
    pos = 0
    if value and not "0" <= value[0] <= "9":
        category, pos = value[0], 1
    items: list[tuple[str, str]] = []
    while pos < len(value):
        head = value[pos : pos + 4]
        if len(head) != 4 or not _is_digits(head):
            raise FieldError(_ADDITIONAL, "subelement header malformed")
        length = int(head[2:])
        data = value[pos + 4 : pos + 4 + length]
        if len(data) != length:
            raise FieldError(_ADDITIONAL, "subelement shorter than its length")
        items.append((head[:2], data))
        pos += 4 + length
    return category, tuple(items)


def _build_de48(category: str | None, items: tuple[tuple[str, str], ...]) -> str:
    return (category or "") + "".join(f"{se}{len(data):02d}{data}" for se, data in items)


def _parse_de43(value: str) -> MerchantLocation:
    if len(value) != _DE43_WIDTH or not _is_printable(value):
        raise FieldError(_MERCHANT_NAME, "expected 40 printable characters")
    cut = _DE43_NAME + _DE43_CITY
    return MerchantLocation(
        name=value[:_DE43_NAME].rstrip(), city=value[_DE43_NAME:cut].rstrip(), country=value[cut:]
    )


def _parse_de54(value: str) -> tuple[AdditionalAmount, ...]:
    if not value or len(value) % _ADD_AMOUNT_WIDTH or len(value) // _ADD_AMOUNT_WIDTH > 6:
        raise FieldError(_ADD_AMOUNTS, "length is not a multiple of 20 up to 120")
    items = []
    for pos in range(0, len(value), _ADD_AMOUNT_WIDTH):
        chunk = value[pos : pos + _ADD_AMOUNT_WIDTH]
        head, sign, amount = chunk[:7], chunk[7], chunk[8:]
        if not _is_digits(head) or sign not in "CD" or not _is_digits(amount):
            raise FieldError(_ADD_AMOUNTS, "additional amount malformed")
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


def _parse_de90(value: str) -> OriginalData:
    if len(value) != _DE90_WIDTH or not _is_digits(value):
        raise FieldError(_ORIGINAL, "expected 42 digits")
    return OriginalData(
        mti=value[:4],
        stan=value[4:10],
        transmission_time=value[10:20],
        acquirer_id=value[20:31],
        forwarding_id=value[31:42],
    )


def _parse_de95(value: str) -> int:
    if len(value) != _DE90_WIDTH or not _is_digits(value[:12]) or not _is_printable(value):
        raise FieldError(_REPLACEMENT, "replacement amount malformed")
    return int(value[:12])


# --- dictionary -> dataclass ---------------------------------------------------------------


def _read_auth_request(mti: str, r: _Reader) -> AuthRequest:
    track2_text = r.raw(_TRACK2)
    track2 = None if track2_text is None else _parse_track2(track2_text)
    pan = r.pan()
    if pan is None:
        if track2 is None:
            raise FieldError(_PAN, "mandatory field missing (no DE2 and no track 2)")
        pan = track2.pan
    de48 = r.text(_ADDITIONAL)
    category, items = (None, ()) if de48 is None else _parse_de48(de48)
    cvv2 = next((data for se, data in items if se == _DE48_CVV2_SE), None)
    pin = r.raw(_PIN_BLOCK)
    de43 = r.raw(_MERCHANT_NAME)
    amount = r.amount(required=True)
    currency = r.currency(required=True)
    transmission = r.transmission_time()
    assert amount is not None and currency is not None and transmission is not None
    return AuthRequest(
        mti=mti,
        pan=pan,
        processing_code=r.req_digits(_PROC, 6),
        amount=amount,
        transmission_time=transmission,
        stan=r.req_digits(_STAN, 6),
        currency=currency,
        local_time=r.local_time(),
        local_date=r.local_date(),
        expiry=r.expiry(),
        mcc=r.digits(_MCC, 4),
        acquirer_country=r.digits(_ACQ_COUNTRY, 3),
        pos_entry_mode=r.digits(_POS_ENTRY, 3),
        pan_sequence=r.digits(_PAN_SEQ, 3),
        acquirer_id=r.institution(_ACQUIRER),
        forwarding_id=r.institution(_FORWARDER),
        track2=track2,
        rrn=r.text(_RRN, 12),
        terminal_id=r.text(_TERMINAL, 8),
        merchant_id=r.text(_MERCHANT, 15),
        merchant_location=None if de43 is None else _parse_de43(de43),
        category_code=category,
        cvv2=cvv2,
        additional_data=items,
        pin_block=None if pin is None else _hex_bytes(_PIN_BLOCK, pin),
        security_control=r.digits(_SECURITY, 16),
        emv=r.emv(),
        response_code=_response_code(r),
    )


def _read_auth_response(mti: str, r: _Reader) -> AuthResponse:
    de54 = r.text(_ADD_AMOUNTS)
    return AuthResponse(
        mti=mti,
        stan=r.req_digits(_STAN, 6),
        response_code=_response_code(r, required=True) or "",
        **_read_echo(r),
        approval_code=r.text(_APPROVAL, 6),
        additional_amounts=() if de54 is None else _parse_de54(de54),
        emv=r.emv(),
    )


def _read_echo(r: _Reader) -> _Echo:
    """The echoed fields of a response, each optional (see :func:`_echo_of`)."""
    return _Echo(
        transmission_time=r.transmission_time(required=False),
        pan=r.pan(),
        processing_code=r.digits(_PROC, 6),
        amount=r.amount(),
        local_time=r.local_time(),
        local_date=r.local_date(),
        acquirer_id=r.institution(_ACQUIRER),
        rrn=r.text(_RRN, 12),
        terminal_id=r.text(_TERMINAL, 8),
        merchant_id=r.text(_MERCHANT, 15),
        currency=r.currency(),
    )


def _response_code(r: _Reader, *, required: bool = False) -> str | None:
    value = r.text(_RESPONSE, 2, required=required)
    if value is not None and not value.isalnum():
        raise FieldError(_RESPONSE, "response code must be alphanumeric")
    return value


def _read_reversal_request(mti: str, r: _Reader) -> ReversalRequest:
    de95 = r.raw(_REPLACEMENT)
    amount = r.amount(required=True)
    transmission = r.transmission_time()
    assert amount is not None and transmission is not None
    return ReversalRequest(
        mti=mti,
        stan=r.req_digits(_STAN, 6),
        transmission_time=transmission,
        amount=amount,
        original=_parse_de90(r.raw(_ORIGINAL, required=True) or ""),
        pan=r.pan(),
        processing_code=r.digits(_PROC, 6),
        currency=r.currency(),
        local_time=r.local_time(),
        local_date=r.local_date(),
        acquirer_id=r.institution(_ACQUIRER),
        forwarding_id=r.institution(_FORWARDER),
        rrn=r.text(_RRN, 12),
        terminal_id=r.text(_TERMINAL, 8),
        merchant_id=r.text(_MERCHANT, 15),
        response_code=_response_code(r),
        replacement_amount=None if de95 is None else _parse_de95(de95),
        emv=r.emv(),
    )


def _read_reversal_response(mti: str, r: _Reader) -> ReversalResponse:
    de90 = r.raw(_ORIGINAL)
    return ReversalResponse(
        mti=mti,
        stan=r.req_digits(_STAN, 6),
        response_code=_response_code(r, required=True) or "",
        **_read_echo(r),
        original=None if de90 is None else _parse_de90(de90),
    )


def _read_network_request(mti: str, r: _Reader) -> NetworkRequest:
    transmission = r.transmission_time()
    assert transmission is not None
    return NetworkRequest(
        mti=mti,
        transmission_time=transmission,
        stan=r.req_digits(_STAN, 6),
        code=r.req_digits(_NETWORK_CODE, 3),
        security_control=r.digits(_SECURITY, 16),
        key_data=r.text(_ADDITIONAL),
    )


def _read_network_response(mti: str, r: _Reader) -> NetworkResponse:
    transmission = r.transmission_time()
    assert transmission is not None
    return NetworkResponse(
        mti=mti,
        transmission_time=transmission,
        stan=r.req_digits(_STAN, 6),
        code=r.req_digits(_NETWORK_CODE, 3),
        response_code=_response_code(r, required=True) or "",
    )


def recover_context(fields: Mapping[str, str]) -> dict[str, str]:
    """Pick the fields needed to answer a message from a possibly partial dictionary.

    Returns the keys ``mti``, ``stan``, ``transmission_time``, ``acquirer_id``, ``rrn``,
    ``terminal_id`` and ``network_code`` for those that are present and well formed;
    nothing else (never a PAN).
    """
    out: dict[str, str] = {}
    candidates: tuple[tuple[str, str, Callable[[str], bool]], ...] = (
        ("mti", _MTI, lambda v: len(v) == 4 and _is_digits(v)),
        ("stan", _STAN, lambda v: len(v) == 6 and _is_digits(v)),
        (
            "transmission_time",
            _TRANSMISSION,
            lambda v: (
                len(v) == 10 and _is_digits(v) and _valid_mmdd(v[:4]) and _valid_hhmmss(v[4:])
            ),
        ),
        ("acquirer_id", _ACQUIRER, lambda v: len(v) <= 11 and (not v or _is_digits(v))),
        ("rrn", _RRN, lambda v: len(v) == 12 and _is_printable(v)),
        ("terminal_id", _TERMINAL, lambda v: len(v) == 8 and _is_printable(v)),
        ("network_code", _NETWORK_CODE, lambda v: len(v) == 3 and _is_digits(v)),
    )
    for name, key, ok in candidates:
        value = fields.get(key)
        if isinstance(value, str) and ok(value):
            out[name] = value
    return out


def from_fields(fields: Mapping[str, str]) -> Message:
    """Build the typed message of a decoded field dictionary, validating field contents.

    Args:
        fields: pyiso8583-style dictionary: ``"t"`` the MTI, ``"2"``... the fields, binary
            fields as hex.

    Returns:
        The typed message; :class:`UnsupportedMessage` for an MTI the switch does not serve.

    Raises:
        FieldError: a missing mandatory field or a malformed field content.
    """
    mti = fields.get(_MTI, "")
    if len(mti) != 4 or not _is_digits(mti):
        raise FieldError(MTI_FIELD, "MTI must be four digits")
    r = _Reader(fields)
    if mti in AUTH_REQUEST_MTIS:
        return _read_auth_request(mti, r)
    if mti in AUTH_RESPONSE_MTIS:
        return _read_auth_response(mti, r)
    if mti in REVERSAL_REQUEST_MTIS:
        return _read_reversal_request(mti, r)
    if mti in REVERSAL_RESPONSE_MTIS:
        return _read_reversal_response(mti, r)
    if mti in NETWORK_REQUEST_MTIS:
        return _read_network_request(mti, r)
    if mti in NETWORK_RESPONSE_MTIS:
        return _read_network_response(mti, r)
    ctx = recover_context(fields)
    return UnsupportedMessage(
        mti=mti,
        stan=ctx.get("stan"),
        transmission_time=ctx.get("transmission_time"),
        acquirer_id=ctx.get("acquirer_id"),
        rrn=ctx.get("rrn"),
        terminal_id=ctx.get("terminal_id"),
    )


# --- dataclass -> dictionary ---------------------------------------------------------------


def _put(out: dict[str, str], key: str, value: str | None) -> None:
    if value is not None:
        out[key] = value


def _amount_text(value: int | None) -> str | None:
    if value is None:
        return None
    if not 0 <= value <= _AMOUNT_MAX:
        raise ValueError("amount out of range for 12 digits")
    return f"{value:012d}"


def _hex(value: bytes | None) -> str | None:
    return None if value is None else value.hex().upper()


def _echo(out: dict[str, str], msg: Any) -> None:
    """Fields shared by requests and responses of the auth and reversal families."""
    _put(out, _PAN, msg.pan)
    _put(out, _PROC, msg.processing_code)
    _put(out, _AMOUNT, _amount_text(msg.amount))
    _put(out, _TRANSMISSION, msg.transmission_time)
    _put(out, _STAN, msg.stan)
    _put(out, _LOCAL_TIME, msg.local_time)
    _put(out, _LOCAL_DATE, msg.local_date)
    _put(out, _ACQUIRER, msg.acquirer_id)
    _put(out, _RRN, msg.rrn)
    _put(out, _TERMINAL, msg.terminal_id)
    _put(out, _MERCHANT, msg.merchant_id)
    _put(out, _CURRENCY, msg.currency)


def to_fields(msg: Message) -> dict[str, str]:
    """The pyiso8583-style field dictionary of ``msg`` (the inverse of :func:`from_fields`).

    Fields are not validated here beyond what is needed to lay them out; encode errors from
    the spec (wrong lengths) surface in the codec.

    Raises:
        TypeError: ``msg`` is not a message dataclass.
        ValueError: a value that cannot be laid out (e.g. a negative amount).
    """
    if not isinstance(msg, _MESSAGE_TYPES):
        raise TypeError(f"not a wire message: {type(msg).__name__}")
    out: dict[str, str] = {_MTI: msg.mti}
    if isinstance(msg, AuthRequest):
        _echo(out, msg)
        if msg.track2 is not None:
            out[_TRACK2] = msg.track2.to_text()
        _put(out, _EXPIRY, msg.expiry)
        _put(out, _MCC, msg.mcc)
        _put(out, _ACQ_COUNTRY, msg.acquirer_country)
        _put(out, _POS_ENTRY, msg.pos_entry_mode)
        _put(out, _PAN_SEQ, msg.pan_sequence)
        _put(out, _FORWARDER, msg.forwarding_id)
        if msg.merchant_location is not None:
            out[_MERCHANT_NAME] = msg.merchant_location.to_text()
        items = msg.additional_data
        if msg.cvv2 is not None and not any(se == _DE48_CVV2_SE for se, _ in items):
            items = (*items, (_DE48_CVV2_SE, msg.cvv2))
        if items or msg.category_code is not None:
            out[_ADDITIONAL] = _build_de48(msg.category_code, items)
        _put(out, _PIN_BLOCK, _hex(msg.pin_block))
        _put(out, _SECURITY, msg.security_control)
        _put(out, _ICC, _hex(msg.emv))
        _put(out, _RESPONSE, msg.response_code)
    elif isinstance(msg, AuthResponse):
        _echo(out, msg)
        _put(out, _APPROVAL, msg.approval_code)
        out[_RESPONSE] = msg.response_code
        if msg.additional_amounts:
            out[_ADD_AMOUNTS] = "".join(a.to_text() for a in msg.additional_amounts)
        _put(out, _ICC, _hex(msg.emv))
    elif isinstance(msg, ReversalRequest):
        _echo(out, msg)
        _put(out, _FORWARDER, msg.forwarding_id)
        _put(out, _RESPONSE, msg.response_code)
        out[_ORIGINAL] = msg.original.to_text()
        if msg.replacement_amount is not None:
            out[_REPLACEMENT] = f"{_amount_text(msg.replacement_amount)}{'0' * 12}" + (
                "C00000000" * 2
            )
        _put(out, _ICC, _hex(msg.emv))
    elif isinstance(msg, ReversalResponse):
        _echo(out, msg)
        out[_RESPONSE] = msg.response_code
        if msg.original is not None:
            out[_ORIGINAL] = msg.original.to_text()
    elif isinstance(msg, NetworkRequest | NetworkResponse):
        out[_TRANSMISSION] = msg.transmission_time
        out[_STAN] = msg.stan
        out[_NETWORK_CODE] = msg.code
        if isinstance(msg, NetworkResponse):
            out[_RESPONSE] = msg.response_code
        else:
            _put(out, _SECURITY, msg.security_control)
            _put(out, _ADDITIONAL, msg.key_data)
    else:
        _put(out, _TRANSMISSION, msg.transmission_time)
        _put(out, _STAN, msg.stan)
        _put(out, _ACQUIRER, msg.acquirer_id)
        _put(out, _RRN, msg.rrn)
        _put(out, _TERMINAL, msg.terminal_id)
        if isinstance(msg, ErrorResponse):
            out[_RESPONSE] = msg.response_code
            _put(out, _NETWORK_CODE, msg.network_code)
    return out
