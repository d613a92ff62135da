"""Card data rules with no dependencies: PAN and PIN length bounds, digit checks, masking.

What lives here: the bounds of a PAN (ISO/IEC 7812-1) and of a PIN (ISO 9564-1), the ASCII
digit test every layer uses, ``mask_pan`` (first six, last four) and ``scrub`` (masks anything
PAN-shaped in free text such as an exception message). It imports only the standard library,
so the sans-IO wire layer, the HSM layer and the log setup can all sit on it.

What does not: logging configuration and the structlog processor that applies these rules to
every event (``switch.log``), validation that raises a layer's own error type (``hsm.api``
raises ``InvalidInput``; the wire layer reports a field error).
"""

from __future__ import annotations

import re

#: Shortest and longest PAN accepted (ISO/IEC 7812-1: up to 19 digits; 12 is the shortest
#: length the PIN block formats and card schemes use).
PAN_MIN_DIGITS = 12
PAN_MAX_DIGITS = 19
#: PIN length bounds of ISO 9564-1 (4 to 12 digits).
PIN_MIN_DIGITS = 4
PIN_MAX_DIGITS = 12
#: PANs shorter than this are masked entirely: six plus four shown digits would leave fewer
#: than three hidden.
_MASK_MIN_DIGITS = 13

#: Digit runs a card number can be (13 to 19 digits), possibly inside longer text such as
#: track 2 ("4761...D2512..."). Lookarounds stop us from cutting a longer number in the middle.
#: Twelve-digit runs are left alone: they are amounts and RRNs far more often than PANs.
#: No pattern below but ``_BYTES_RE`` matches fewer characters than a 13-digit PAN
#: (``_PAN_RE``: 6 + 3 + 4); ``_TRACK2_RE`` and ``_HEX_RE`` need more.
_SHORTEST_MATCH = 13
_PAN_RE = re.compile(r"(?<!\d)(\d{6})(\d{3,9})(\d{4})(?!\d)")
#: Track-2-equivalent data: PAN, separator '=' or 'D', then expiry/service code/discretionary.
_TRACK2_RE = re.compile(r"(?<![0-9A-F])\d{12,19}[=D]\d{4,}[0-9A-F?]*", re.IGNORECASE)
#: Long hex runs (PIN blocks, cryptograms, keys) that could appear in a raw-bytes repr.
_HEX_RE = re.compile(r"(?<![0-9A-Fa-f])[0-9A-Fa-f]{16,}(?![0-9A-Fa-f])")
#: Python bytes reprs of raw message data (b'...'): replaced wholesale.
_BYTES_RE = re.compile(r"""b(['"])(?:\\.|(?!\1).)*\1""")
#: What each pattern above needs at the least: 12 digits in a row (``_PAN_RE`` needs 13,
#: ``_TRACK2_RE`` 12), 16 hex digits in a row (``_HEX_RE``), or a bytes literal's opening.
#: Text without any is returned by ``scrub`` after this one search instead of four passes.
_ANY_RISK_RE = re.compile(r"""\d{12}|[0-9A-Fa-f]{16}|b['"]""")


def is_digits(value: str) -> bool:
    """True when ``value`` is one or more ASCII digits.

    ``str.isdigit`` alone accepts superscripts and other scripts' digits.

    >>> is_digits("0123"), is_digits(""), is_digits("12a"), is_digits("\u00b2")
    (True, False, False, False)
    """
    return bool(value) and value.isascii() and value.isdigit()


def is_pan(value: str) -> bool:
    """True when ``value`` is a PAN by shape: ``PAN_MIN_DIGITS`` to ``PAN_MAX_DIGITS`` digits.

    >>> is_pan("400012341234"), is_pan("40001234123")
    (True, False)
    """
    return PAN_MIN_DIGITS <= len(value) <= PAN_MAX_DIGITS and is_digits(value)


def mask_pan(pan: str) -> str:
    """Mask a PAN to its first six and last four digits (a 16-digit PAN keeps 10 of them
    visible: ``411111******1111``); a value too short to keep any is all asterisks.

    >>> mask_pan("123")
    '***'
    """
    if len(pan) < _MASK_MIN_DIGITS:
        return "*" * len(pan)
    return pan[:6] + "*" * (len(pan) - 10) + pan[-4:]


def scrub(text: str) -> str:
    """Mask PAN-shaped digit runs and remove track data, raw bytes and long hex from ``text``
    (tests/test_log.py shows each); text without any is returned as it is.

    >>> scrub("bad field 11 at 4")
    'bad field 11 at 4'
    """
    if len(text) < _SHORTEST_MATCH and "b'" not in text and 'b"' not in text:
        return text  # too short for a PAN, track or long hex, and no bytes literal: as is
    if _ANY_RISK_RE.search(text) is None:
        return text  # nothing any pattern could match
    text = _BYTES_RE.sub("b'<redacted>'", text)
    text = _TRACK2_RE.sub("<track-redacted>", text)
    text = _PAN_RE.sub(lambda m: m.group(1) + "*" * len(m.group(2)) + m.group(3), text)
    return _HEX_RE.sub("<hex-redacted>", text)


__all__ = [
    "PAN_MAX_DIGITS",
    "PAN_MIN_DIGITS",
    "PIN_MAX_DIGITS",
    "PIN_MIN_DIGITS",
    "is_digits",
    "is_pan",
    "mask_pan",
    "scrub",
]
