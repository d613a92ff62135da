"""pyiso8583 specifications of the wire encodings the switch speaks, as plain data.

What lives here: :class:`WireSpec`, one listener's encoding (a layout, the size of its PIN
block and its :class:`~switch.wire.messages.SubLayouts`), :class:`Layout`, a pyiso8583 spec
compiled from a network profile (``switch.wire.profile``) as hashable data,
:func:`wire_spec`, which derives a built-in one from a kind and a PIN block format, and
:func:`spec_for` / :func:`shared_spec`, returning the pyiso8583 spec dictionary of either.
The built-in kinds (the shipped profiles ``iso87-ascii``, ``iso87-binary`` and ``iso87-bcd``
compile to exactly these; tests/test_profile.py holds them to it):

- ``"ascii"``: ISO 8583:1987 all-ASCII with hex-ASCII bitmaps: pyiso8583's ``default_ascii``
  as it is, binary elements as hex text too (DE52 16 characters, DE55 LLLVAR up to 510 hex
  characters), as tshark's dissector and iso8583sim's ascii-hex format read them.
- ``"binary"``: binary bitmaps, ASCII fields, raw binary DE52/DE55: pyiso8583's ``default``
  as it is (the layout of jPOS's ASCII packagers with binary bitmaps and of the npm
  ``iso_8583`` package).
- ``"bcd"``: binary bitmaps, BCD MTI, numeric (``n``) elements as packed BCD (fixed ones
  left-padded with 0, variable ones counted in digits and right-padded with F), BCD length
  prefixes (1 byte for LL, 2 for LLL), text elements in ASCII, DE52/DE55 raw binary, DE55 up
  to 999 bytes: the shape of jPOS's ``ISO87BPackager``.

DE52 is fixed length in every kind: 8 bytes for the TDES PIN block formats of ISO 9564-1
(0, 1, 2, 3), 16 bytes for format 4 (AES), so a listener whose PIN block format is 4 speaks a
variant of its kind (``wire_spec(kind, pin_block_format=4)``); where DE52 is hex text it takes
twice as many characters (32 for format 4). A block of the other size is a format error of
DE52, as any wrong fixed length is.

The dictionaries are keyed by field number because that is pyiso8583's format; what a field
means is messages.py's business.

What does not: framing (framing.py), conversion to typed messages (messages.py, codec.py).
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from iso8583.specs import default as _pyiso_binary
from iso8583.specs import default_ascii as _pyiso_ascii

from switch.wire.messages import DEFAULT_SUBLAYOUTS, SubLayouts

#: Message encodings (see the module docstring); ``switch.config`` types its setting with it.
SpecKind = Literal["ascii", "binary", "bcd"]

__all__ = [
    "PIN_BLOCK_SIZES",
    "SPEC_KINDS",
    "Layout",
    "SpecChoice",
    "SpecKind",
    "WireSpec",
    "pin_block_bytes",
    "shared_spec",
    "spec_for",
    "wire_spec",
]

#: The spec kinds this module knows, in the order of SpecKind.
SPEC_KINDS: Final[tuple[SpecKind, ...]] = ("ascii", "binary", "bcd")

#: Largest DE55 in bytes; ISO allows 255 but contactless ICC data with proprietary tags
#: (e.g. the Mastercard sample in the corpus) is longer.
_ICC_MAX: Final = 999
#: PIN block size in bytes (DE52, b64) of ISO 9564-1 formats 0 to 3 (one TDES block).
_TDES_PIN_BLOCK_BYTES: Final = 8
#: PIN block size in bytes of ISO 9564-1 format 4 (one AES block).
_AES_PIN_BLOCK_BYTES: Final = 16
#: The ISO 9564-1 format whose block is an AES block.
_AES_PIN_BLOCK_FORMAT: Final = 4
#: ISO 9564-1 PIN block formats (0 to 4) a DE52 size is known for.
_PIN_BLOCK_FORMATS: Final = range(5)
#: The DE52 sizes a spec can have.
PIN_BLOCK_SIZES: Final = (_TDES_PIN_BLOCK_BYTES, _AES_PIN_BLOCK_BYTES)

#: ISO 8583:1987 elements of format ``n`` with a fixed length (in digits).
_FIXED_NUMERIC: Final = frozenset(
    [str(i) for i in range(3, 28)] + ["53"] + [str(i) for i in range(66, 91)]
)
#: ISO 8583:1987 variable-length elements of format ``n`` or ``z`` (digits, track separator).
_VAR_NUMERIC: Final = frozenset({"2", "32", "33", "35", "36", "99", "100"})
#: Width of a BCD length prefix in bytes, by the ASCII prefix width (LL -> 1, LLL -> 2).
_BCD_LEN_BYTES: Final = {2: 1, 3: 2}

Spec = dict[str, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Layout:
    """A pyiso8583 spec as hashable data: what a network profile compiles to.

    Equal layouts have the same name and content (``digest``, a hash of the content, keeps
    hashing cheap on the hot path).

    >>> a = Layout.of("x", {"t": {"data_enc": "ascii"}})
    >>> a == Layout.of("x", {"t": {"data_enc": "ascii"}}), a.spec()["t"]["data_enc"]
    (True, 'ascii')
    """

    name: str
    digest: str
    items: tuple[tuple[str, tuple[tuple[str, Any], ...]], ...] = field(compare=False, repr=False)

    @classmethod
    def of(cls, name: str, spec: Mapping[str, Mapping[str, Any]]) -> Layout:
        """The layout of a pyiso8583 spec dictionary."""
        items = tuple((key, tuple(sorted(item.items()))) for key, item in spec.items())
        digest = hashlib.sha256(json.dumps(items, sort_keys=True).encode()).hexdigest()[:16]
        return cls(name, digest, items)

    def spec(self) -> Spec:
        """A fresh pyiso8583 spec dictionary of this layout."""
        return {key: dict(item) for key, item in self.items}


@dataclass(frozen=True, slots=True)
class WireSpec:
    """The encoding of one listener's messages: its layout, DE52 size and sub-layouts.

    Hashable, so the codec caches per value. ``WireSpec("ascii")`` is the plain ``"ascii"``;
    a network profile's has its compiled ``layout`` (``kind`` is then the profile's name).

    >>> w = WireSpec("binary", pin_block_bytes=16)
    >>> w.kind, w.pin_block_bytes, w.layout
    ('binary', 16, None)

    Raises:
        ValueError: an unknown kind without a layout, or a PIN block size other than 8 or 16.
    """

    kind: str = "ascii"
    pin_block_bytes: int = _TDES_PIN_BLOCK_BYTES
    layout: Layout | None = None
    sub: SubLayouts = DEFAULT_SUBLAYOUTS

    def __post_init__(self) -> None:
        if self.layout is None and self.kind not in SPEC_KINDS:
            raise ValueError(f"unknown spec kind {self.kind!r}")
        if self.pin_block_bytes not in PIN_BLOCK_SIZES:
            raise ValueError(f"PIN block size must be one of {PIN_BLOCK_SIZES} bytes")


#: What the codec, the session and the client accept as a spec: a kind (8-byte DE52), the
#: name of a network profile (its layout and sub-layouts, 8-byte DE52) or a ``WireSpec``.
SpecChoice = SpecKind | str | WireSpec


def sub_layouts(spec: SpecChoice) -> SubLayouts:
    """The sub-layouts of ``spec`` (a kind has the default ones).

    Raises:
        ValueError: ``spec`` is neither a kind nor a profile's name.
    """
    return _resolve(spec).sub


def pin_block_bytes(pin_block_format: int) -> int:
    """The DE52 size of an ISO 9564-1 PIN block format: 16 for format 4 (AES), else 8.

    >>> pin_block_bytes(0), pin_block_bytes(4)
    (8, 16)

    Raises:
        ValueError: not an ISO 9564-1 format (0 to 4).
    """
    if pin_block_format not in _PIN_BLOCK_FORMATS:
        raise ValueError(f"unknown ISO 9564-1 PIN block format {pin_block_format!r}")
    if pin_block_format == _AES_PIN_BLOCK_FORMAT:
        return _AES_PIN_BLOCK_BYTES
    return _TDES_PIN_BLOCK_BYTES


def wire_spec(kind: SpecKind | str, *, pin_block_format: int = 0) -> WireSpec:
    """The spec of a listener of spec ``kind`` whose PIN blocks are of ``pin_block_format``.

    >>> wire_spec("bcd", pin_block_format=4).pin_block_bytes
    16

    Raises:
        ValueError: an unknown kind or PIN block format.
    """
    base = _resolve(kind)
    return WireSpec(base.kind, pin_block_bytes(pin_block_format), base.layout, base.sub)


def size_pin_block(spec: Spec, pin_bytes: int) -> Spec:
    """Set DE52 of ``spec`` (in place) to ``pin_bytes`` bytes: raw, or twice as many hex
    characters where it travels as text. Returns ``spec``."""
    item = spec["52"]
    item["max_len"] = pin_bytes if item["data_enc"] == "b" else 2 * pin_bytes
    return spec


def _ascii(pin_bytes: int) -> Spec:
    return size_pin_block(copy.deepcopy(_pyiso_ascii), pin_bytes)


def _binary(pin_bytes: int) -> Spec:
    return size_pin_block(copy.deepcopy(_pyiso_binary), pin_bytes)


def _bcd(pin_bytes: int) -> Spec:
    spec = _binary(pin_bytes)
    spec["55"].update(max_len=_ICC_MAX)
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
_CACHE: Final[dict[tuple[str, Layout | None, int], Spec]] = {}


def _resolve(spec: SpecChoice | str) -> WireSpec:
    if isinstance(spec, WireSpec):
        return spec
    found = _BY_NAME.get(spec)
    if found is None and spec in SPEC_KINDS:
        found = _BY_NAME[spec] = WireSpec(spec)  # frozen: one per kind serves every call
    if found is None:
        # A network profile's name: its own layout and sub-layouts (8-byte DE52).
        from switch.wire.profile import ProfileError, load_profile  # noqa: PLC0415 - cycle

        try:
            found = _BY_NAME[spec] = load_profile(spec).wire_spec()
        except ProfileError:
            raise ValueError(f"unknown spec kind or network profile {spec!r}") from None
    return found


_BY_NAME: Final[dict[str, WireSpec]] = {}


def spec_for(spec: SpecChoice, *, pin_block_format: int | None = None) -> Spec:
    """Return the pyiso8583 spec of ``spec`` (a fresh deep copy: callers may modify it).

    Args:
        spec: a spec kind or a ``WireSpec``.
        pin_block_format: with a kind, the ISO 9564-1 format that sizes DE52 (default: 8
            bytes); not allowed with a ``WireSpec``, which has its size.

    >>> spec_for("ascii")["p"]["data_enc"], spec_for("binary")["p"]["data_enc"]
    ('ascii', 'b')
    >>> spec_for("bcd")["4"]["len_count"]
    'nibbles'
    >>> spec_for("ascii")["52"]["max_len"], spec_for("ascii", pin_block_format=4)["52"]["max_len"]
    (16, 32)
    >>> spec_for("binary", pin_block_format=4)["52"]["max_len"]
    16

    Raises:
        ValueError: ``spec`` is not a known spec kind, or the format is not known, or both a
            ``WireSpec`` and a format are given.
    """
    if pin_block_format is not None:
        if isinstance(spec, WireSpec):
            raise ValueError("a WireSpec has its PIN block size; pass the kind with a format")
        spec = wire_spec(spec, pin_block_format=pin_block_format)
    return copy.deepcopy(shared_spec(spec))


def shared_spec(spec: SpecChoice) -> Spec:
    """Like :func:`spec_for` but the cached instance, for read-only use on the hot path.

    Raises:
        ValueError: ``spec`` is not a known spec kind.
    """
    ws = _resolve(spec)
    key = (ws.kind, ws.layout, ws.pin_block_bytes)
    found = _CACHE.get(key)
    if found is None:
        if ws.layout is not None:
            found = size_pin_block(ws.layout.spec(), ws.pin_block_bytes)
        else:
            found = _BUILDERS[ws.kind](ws.pin_block_bytes)
        _CACHE[key] = found
    return found
