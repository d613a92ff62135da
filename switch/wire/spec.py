"""pyiso8583 specifications of the wire encodings the switch speaks, as plain data.

What lives here: :func:`spec_for`, returning the pyiso8583 spec dictionary of a
:data:`SpecKind`:

- ``"ascii"``: ISO 8583:1987 all-ASCII with hex-ASCII bitmaps, pyiso8583's ``default_ascii``
  except that the two binary data elements travel as raw bytes: DE52 (PIN block, 8 bytes) and
  DE55 (EMV BER-TLV, LLLVAR with an ASCII byte count). Raw DE55 is what pyiso8583's own
  documentation example shows (corpus entry ``pyiso8583_doc_4``); it round-trips BER-TLV
  bytes unchanged. A peer that puts text into DE55 is read as the bytes of that text.
- ``"binary"``: binary bitmaps, ASCII fields, raw binary DE52/DE55: pyiso8583's ``default``
  (the layout of jPOS's ASCII packagers with binary bitmaps and of the npm ``iso_8583``
  package), with DE55 allowed up to 999 bytes.
- ``"bcd"``: binary bitmaps, BCD MTI, numeric (``n``) elements as packed BCD (fixed ones
  left-padded with 0, variable ones counted in digits and right-padded with F), BCD length
  prefixes (1 byte for LL, 2 for LLL), text elements in ASCII, DE52/DE55 raw binary: the
  shape of jPOS's ``ISO87BPackager``.

The dictionaries are keyed by field number because that is pyiso8583's format; what a field
means is messages.py's business.

What does not: framing (framing.py), conversion to typed messages (messages.py, codec.py).
"""

from __future__ import annotations

import copy
from typing import Any, Final, Literal

from iso8583.specs import default as _pyiso_binary
from iso8583.specs import default_ascii as _pyiso_ascii

#: Message encodings (see the module docstring); ``switch.config`` types its setting with it.
SpecKind = Literal["ascii", "binary", "bcd"]

__all__ = ["SPEC_KINDS", "SpecKind", "spec_for"]

#: The spec kinds this module knows, in the order of SpecKind.
SPEC_KINDS: Final[tuple[SpecKind, ...]] = ("ascii", "binary", "bcd")

#: Largest DE55 in bytes; ISO allows 255 but contactless ICC data with proprietary tags
#: (e.g. the Mastercard sample in the corpus) is longer.
_ICC_MAX: Final = 999
#: PIN block size in bytes (DE52, b64).
_PIN_BLOCK_BYTES: Final = 8

#: ISO 8583:1987 elements of format ``n`` with a fixed length (in digits).
_FIXED_NUMERIC: Final = frozenset(
    [str(i) for i in range(3, 28)] + ["53"] + [str(i) for i in range(66, 91)]
)
#: ISO 8583:1987 variable-length elements of format ``n`` or ``z`` (digits, track separator).
_VAR_NUMERIC: Final = frozenset({"2", "32", "33", "35", "36", "99", "100"})
#: Width of a BCD length prefix in bytes, by the ASCII prefix width (LL -> 1, LLL -> 2).
_BCD_LEN_BYTES: Final = {2: 1, 3: 2}

Spec = dict[str, dict[str, Any]]


def _ascii() -> Spec:
    spec: Spec = copy.deepcopy(_pyiso_ascii)
    spec["52"].update(data_enc="b", max_len=_PIN_BLOCK_BYTES)
    spec["55"].update(data_enc="b", len_enc="ascii", len_type=3, max_len=_ICC_MAX)
    return spec


def _binary() -> Spec:
    spec: Spec = copy.deepcopy(_pyiso_binary)
    spec["55"].update(max_len=_ICC_MAX)
    return spec


def _bcd() -> Spec:
    spec = _binary()
    spec["t"].update(data_enc="b")
    for key, item in spec.items():
        if key in _FIXED_NUMERIC:
            item.update(data_enc="b", len_count="nibbles", left_pad="0")
        elif key in _VAR_NUMERIC:
            item.update(data_enc="b", len_count="nibbles", right_pad="F")
        if item["len_type"] in _BCD_LEN_BYTES:
            item.update(len_enc="bcd", len_type=_BCD_LEN_BYTES[item["len_type"]])
    return spec


_BUILDERS: Final = {"ascii": _ascii, "binary": _binary, "bcd": _bcd}
_CACHE: Final[dict[str, Spec]] = {}


def spec_for(kind: SpecKind) -> Spec:
    """Return the pyiso8583 spec of ``kind`` (a fresh deep copy: callers may modify it).

    >>> spec_for("ascii")["p"]["data_enc"], spec_for("binary")["p"]["data_enc"]
    ('ascii', 'b')
    >>> spec_for("bcd")["4"]["len_count"]
    'nibbles'

    Raises:
        ValueError: ``kind`` is not a known spec kind.
    """
    return copy.deepcopy(shared_spec(kind))


def shared_spec(kind: SpecKind) -> Spec:
    """Like :func:`spec_for` but the cached instance, for read-only use on the hot path.

    Raises:
        ValueError: ``kind`` is not a known spec kind.
    """
    spec = _CACHE.get(kind)
    if spec is None:
        builder = _BUILDERS.get(kind)
        if builder is None:
            raise ValueError(f"unknown spec kind {kind!r}")
        spec = _CACHE[kind] = builder()
    return spec
