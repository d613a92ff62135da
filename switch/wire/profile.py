"""Network profiles as data: the loader of ``config/networks/*.toml`` and their compiler.

What lives here: :func:`load_profile`, which reads a profile by name (following its
``extends`` chain and the DE39 table it names), checks every key and returns a
:class:`NetworkProfile`: the field layout compiled to a pyiso8583 spec
(:class:`~switch.wire.spec.Layout`), the framing (:class:`~switch.wire.framing.Framing`),
where card-security values live and how DE48/DE126 are laid out
(:class:`~switch.wire.messages.SubLayouts`), the DE39 table as reason identifiers to codes,
the budget and the reserved ``[keepalive]`` keys; :func:`compile_layout`, the compiler of a
field table and its encodings; :func:`known_profiles`; :class:`ProfileError`, naming the
file and the key at fault in one line. ``config/networks/README.md`` documents the format.

What does not: what a reason is and the check that every one has a code
(``switch.decisions`` builds its ``Profile`` from :attr:`NetworkProfile.de39`), the listener
keys that choose a profile (``switch.config``), what a data element means (messages.py).

Sans-IO in the sense of the wire layer: no sockets, no trio, no switch imports outside
``switch.wire``; the only I/O is reading the profile files themselves.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, get_args

from switch.wire.framing import ENVELOPE_KINDS, HEADER_KINDS, Framing
from switch.wire.messages import SubLayouts
from switch.wire.spec import Layout, WireSpec, pin_block_bytes

__all__ = [
    "DEFAULT_DIRECTORY",
    "Keepalive",
    "NetworkProfile",
    "ProfileError",
    "compile_layout",
    "known_profiles",
    "load_profile",
    "profile_directory",
]

#: The profiles shipped with the switch: ``config/networks`` of the working directory when it
#: exists (the repository root for ``make run``, the image's work directory in the
#: container), else the one beside the source tree (tests that run elsewhere).
DEFAULT_DIRECTORY: Final = Path("config/networks")
_SOURCE_DIRECTORY: Final = Path(__file__).resolve().parents[2] / "config" / "networks"
#: Longest ``extends`` chain followed (a loop is reported, not followed forever).
_MAX_DEPTH: Final = 8

MtiEncoding = Literal["ascii", "ebcdic", "bcd"]
BitmapEncoding = Literal["hex", "ebcdic-hex", "binary"]
NumericEncoding = Literal["ascii", "ebcdic", "bcd"]
TextEncoding = Literal["ascii", "ebcdic"]
BinaryEncoding = Literal["raw", "hex"]
PrefixEncoding = Literal["ascii", "ebcdic", "bcd", "binary"]
#: A field's own data encoding (overrides the class default of its type).
DataEncoding = Literal["ascii", "ebcdic", "bcd", "raw", "hex"]
ZeroLengthPolicy = Literal["answer", "ignore", "close"]

#: Python codec of each text encoding (EBCDIC: code page 500, international).
_CODEC: Final = {"ascii": "ascii", "ebcdic": "cp500"}
#: Data element types of ISO 8583 and the class whose encoding they take.
_TYPE_CLASS: Final = {
    "n": "numeric",
    "z": "numeric",
    "b": "binary",
    "a": "text",
    "an": "text",
    "ans": "text",
    "as": "text",
    "ns": "text",
    "anp": "text",
    "x+n": "text",
}
#: Bytes of a binary or BCD length prefix, by the number of digits of the ISO one.
_PREFIX_BYTES: Final = {2: 1, 3: 2, 4: 2}
#: Data elements behind a tertiary bitmap, and how they are read when a profile allows one.
_TERTIARY: Final = range(129, 193)
_TERTIARY_FIELD: Final = {"type": "ans", "max": 999, "prefix": 3}
#: Top-level keys of a profile file.
_TOP_KEYS: Final = frozenset(
    {
        "extends",
        "abstract",
        "description",
        "follows",
        "leaves_out",
        "de39_table",
        "budget",
        "original_match_rrn_terminal",
        "encoding",
        "fields",
        "framing",
        "security",
        "subfields",
        "de39",
        "keepalive",
    }
)
_FIELD_KEYS: Final = frozenset(
    {"type", "len", "max", "prefix", "data", "prefix_encoding", "left_pad", "right_pad", "name"}
)
_ENCODING_DEFAULTS: Final[dict[str, Any]] = {
    "mti": "ascii",
    "bitmap": "hex",
    "numeric": "ascii",
    "text": "ascii",
    "binary": "hex",
    "prefix": "ascii",
    "tertiary_bitmap": False,
}
_ENCODING_CHOICES: Final[dict[str, tuple[Any, ...]]] = {
    "mti": get_args(MtiEncoding),
    "bitmap": get_args(BitmapEncoding),
    "numeric": get_args(NumericEncoding),
    "text": get_args(TextEncoding),
    "binary": get_args(BinaryEncoding),
    "prefix": get_args(PrefixEncoding),
    "tertiary_bitmap": (True, False),
}


class ProfileError(ValueError):
    """A profile that cannot be used; ``str()`` is one line naming the file and the key."""

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source = source
        self.key = key
        self.message = message
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")


@dataclass(frozen=True, slots=True)
class Keepalive:
    """The ``[keepalive]`` section, reserved for link keep-alive (not acted on here).

    Attributes:
        zero_length_frames: what a zero-length frame (a keep-alive of some networks) gets:
            ``"answer"`` (one back), ``"ignore"`` or ``"close"`` (a framing error, today's
            behaviour).
        idle_echo_after: seconds of silence after which the switch sends an 0800 echo test;
            0 never.
        echo_timeout: seconds an echo test may go unanswered before the link is closed.
    """

    zero_length_frames: ZeroLengthPolicy = "close"
    idle_echo_after: float = 0.0
    echo_timeout: float = 30.0


@dataclass(frozen=True)
class NetworkProfile:
    """One network profile, loaded and checked.

    Attributes:
        name: the file's stem (what ``listener.network`` says).
        source: the file it was read from (for error messages).
        layout: the compiled field layout (DE52 of 8 bytes; see :meth:`wire_spec`).
        framing: length header and envelope.
        sub: where card-security values live, DE48 and DE126 layouts.
        de39: reason identifier (``switch.decisions.Reason`` values) to response code,
            with the file that gave each row, for errors.
        budget: seconds to answer, overriding ``pipeline.budget``; None keeps it.
    """

    name: str
    source: str
    description: str
    layout: Layout
    framing: Framing
    sub: SubLayouts
    de39: Mapping[str, str]
    de39_sources: Mapping[str, str] = field(repr=False)
    budget: float | None = None
    original_match_rrn_terminal: bool = True
    keepalive: Keepalive = Keepalive()
    follows: str = ""
    leaves_out: str = ""

    def wire_spec(self, pin_block_format: int = 0) -> WireSpec:
        """The wire spec of a listener of this profile whose PIN blocks are of that format.

        Raises:
            ValueError: not an ISO 9564-1 PIN block format.
        """
        return WireSpec(self.name, pin_block_bytes(pin_block_format), self.layout, self.sub)


def profile_directory(directory: Path | str | None = None) -> Path:
    """The directory profiles are read from (see :data:`DEFAULT_DIRECTORY`)."""
    if directory is not None:
        return Path(directory)
    if DEFAULT_DIRECTORY.is_dir():
        return DEFAULT_DIRECTORY
    return _SOURCE_DIRECTORY


def known_profiles(directory: Path | str | None = None) -> tuple[str, ...]:
    """The names of the profiles a listener may name (abstract ones left out), sorted."""
    names = []
    for path in sorted(profile_directory(directory).glob("*.toml"), key=lambda p: p.stem):
        try:
            raw = _read(path)
        except ProfileError:
            continue
        if not raw.get("abstract", False):
            names.append(path.stem)
    return tuple(names)


_LOADED: dict[tuple[Path, str], NetworkProfile] = {}


def load_profile(name: str, directory: Path | str | None = None) -> NetworkProfile:
    """Read, check and compile the profile ``name`` (``<directory>/<name>.toml``).

    Loaded once per process and directory; an edited file needs a restart.

    Raises:
        ProfileError: no such profile (the source is the file that was looked for), an
            abstract one, a loop in ``extends``, or a key with a wrong value (named with its
            file and dotted key).
    """
    base = profile_directory(directory).resolve()
    key = (base, name)
    found = _LOADED.get(key)
    if found is None:
        found = _LOADED[key] = _load(base, name)
    return found


def _path(base: Path, name: str, source: str, key: str) -> Path:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ProfileError(source, key, f"not a profile name: {name!r}")
    path = base / f"{name}.toml"
    if not path.is_file() and key:
        # extends / de39_table of a profile kept elsewhere may name a shipped one.
        shipped = profile_directory() / f"{name}.toml"
        if shipped.is_file():
            return shipped
    if not path.is_file():
        known = ", ".join(known_profiles(base)) or "none"
        raise ProfileError(source, key, f"no network profile {name!r} ({path}); known: {known}")
    return path


def _read(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise ProfileError(str(path), "", f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(str(path), "", f"not valid TOML: {exc}") from None


def _chain(base: Path, name: str, source: str, key: str) -> list[tuple[Path, dict[str, Any]]]:
    """The files of ``name``'s extends chain, the root first."""
    chain: list[tuple[Path, dict[str, Any]]] = []
    seen: set[str] = set()
    while True:
        if name in seen or len(chain) >= _MAX_DEPTH:
            raise ProfileError(source, key, f"extends loops back to {name!r}")
        seen.add(name)
        path = _path(base, name, source, key)
        raw = _read(path)
        for top in raw:
            if top not in _TOP_KEYS:
                raise ProfileError(str(path), top, "unknown key")
        chain.append((path, raw))
        parent = raw.get("extends")
        if parent is None:
            return chain[::-1]
        if not isinstance(parent, str):
            raise ProfileError(str(path), "extends", "expected a profile name")
        source, key, name = str(path), "extends", parent


def _merge(into: dict[str, Any], update: Mapping[str, Any]) -> None:
    """Merge ``update`` into ``into``: tables key by key, anything else replaced."""
    for k, v in update.items():
        if isinstance(v, Mapping) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = _copy(v)


def _copy(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _copy(v) for k, v in value.items()}
    return value


def _load(base: Path, name: str) -> NetworkProfile:
    requested = str(base / f"{name}.toml")
    chain = _chain(base, name, requested, "")
    path, own = chain[-1]
    source = str(path)
    if own.get("abstract", False) is True:
        raise ProfileError(source, "abstract", "an abstract profile cannot serve a listener")
    merged: dict[str, Any] = {}
    #: The file that last set each key, for errors about merged values.
    origin: dict[str, str] = {}
    for file, raw in chain:
        own_keys = {k: v for k, v in raw.items() if k not in ("abstract", "extends")}
        _merge(merged, own_keys)
        for dotted in _dotted(own_keys):
            origin[dotted] = str(file)
    de39, de39_sources = _de39(base, chain, merged, origin, source)
    layout = compile_layout(name, merged.get("fields", {}), merged.get("encoding", {}), origin)
    return NetworkProfile(
        name=name,
        source=source,
        description=_str(merged, "description", origin, source),
        layout=layout,
        framing=_framing(merged.get("framing", {}), origin, source),
        sub=_sub(merged, origin, source),
        de39=de39,
        de39_sources=de39_sources,
        budget=_budget(merged, origin, source),
        original_match_rrn_terminal=_bool(
            merged, "original_match_rrn_terminal", True, origin, source
        ),
        keepalive=_keepalive(merged.get("keepalive", {}), origin, source),
        follows=_str(merged, "follows", origin, source),
        leaves_out=_str(merged, "leaves_out", origin, source),
    )


def _dotted(raw: Mapping[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k, v in raw.items():
        key = f"{prefix}{k}"
        out.append(key)
        if isinstance(v, Mapping):
            out += _dotted(v, key + ".")
    return out


def _where(origin: Mapping[str, str], key: str, default: str) -> str:
    """The file that set ``key`` (or its nearest parent table)."""
    while key:
        if key in origin:
            return origin[key]
        key = key.rpartition(".")[0]
    return default


def _fail(origin: Mapping[str, str], key: str, default: str, message: str) -> ProfileError:
    return ProfileError(_where(origin, key, default), key, message)


def _str(raw: Mapping[str, Any], key: str, origin: Mapping[str, str], source: str) -> str:
    value = raw.get(key, "")
    if not isinstance(value, str):
        raise _fail(origin, key, source, "expected a string")
    return value


def _bool(
    raw: Mapping[str, Any], key: str, default: bool, origin: Mapping[str, str], source: str
) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise _fail(origin, key, source, "expected true or false")
    return value


def _number(value: Any, key: str, origin: Mapping[str, str], source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise _fail(origin, key, source, "expected a number")
    return float(value)


def _choice(
    value: Any, choices: tuple[Any, ...], key: str, origin: Mapping[str, str], source: str
) -> Any:
    if value not in choices or isinstance(value, bool) is not isinstance(choices[0], bool):
        allowed = ", ".join(repr(c) for c in choices)
        raise _fail(origin, key, source, f"must be one of {allowed}, got {value!r}")
    return value


def _table(raw: Any, key: str, origin: Mapping[str, str], source: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise _fail(origin, key, source, "expected a table")
    return raw


def _known_keys(
    raw: Mapping[str, Any], allowed: Any, key: str, origin: Mapping[str, str], source: str
) -> None:
    for k in raw:
        if k not in allowed:
            raise _fail(origin, f"{key}.{k}", source, "unknown key")


def _budget(raw: Mapping[str, Any], origin: Mapping[str, str], source: str) -> float | None:
    if "budget" not in raw:
        return None
    value = _number(raw["budget"], "budget", origin, source)
    if value <= 0:
        raise _fail(origin, "budget", source, "must be positive")
    return value


def _de39(
    base: Path,
    chain: list[tuple[Path, dict[str, Any]]],
    merged: Mapping[str, Any],
    origin: Mapping[str, str],
    source: str,
) -> tuple[dict[str, str], dict[str, str]]:
    """The DE39 table: the named table (``de39_table``) if any, then this chain's rows."""
    table: dict[str, str] = {}
    sources: dict[str, str] = {}
    named = merged.get("de39_table")
    if named is not None:
        where = _where(origin, "de39_table", source)
        if not isinstance(named, str):
            raise ProfileError(where, "de39_table", "expected a profile name")
        other = _load_table(base, named, where)
        table.update(other.de39)
        sources.update(other.de39_sources)
    for file, raw in chain:
        rows = _table(raw.get("de39", {}), "de39", origin, str(file))
        if named is not None and file != chain[-1][0]:
            continue  # the named table replaces what this profile's parents said
        for reason, code in rows.items():
            if not isinstance(code, str) or len(code) != 2 or not code.isalnum():
                raise ProfileError(
                    str(file), f"de39.{reason}", "a response code is 2 letters or digits"
                )
            table[reason] = code
            sources[reason] = str(file)
    return table, sources


def _load_table(base: Path, name: str, where: str) -> NetworkProfile:
    if not (base / f"{name}.toml").is_file():
        base = profile_directory()  # a profile kept elsewhere may name a shipped table
    try:
        return load_profile(name, base)
    except ProfileError as exc:
        raise ProfileError(where, "de39_table", f"{exc}") from None


def _framing(raw: Any, origin: Mapping[str, str], source: str) -> Framing:
    raw = _table(raw, "framing", origin, source)
    _known_keys(
        raw, ("length", "includes_itself", "envelope", "envelope_size"), "framing", origin, source
    )
    header = _choice(raw.get("length", "binary2"), HEADER_KINDS, "framing.length", origin, source)
    envelope = _choice(
        raw.get("envelope", "none"), ENVELOPE_KINDS, "framing.envelope", origin, source
    )
    size = raw.get("envelope_size", 0)
    if isinstance(size, bool) or not isinstance(size, int):
        raise _fail(origin, "framing.envelope_size", source, "expected an integer")
    try:
        return Framing(header, _bool(raw, "includes_itself", False, origin, source), envelope, size)
    except ValueError as exc:
        raise _fail(origin, "framing.envelope_size", source, str(exc)) from None


def _sub(merged: Mapping[str, Any], origin: Mapping[str, str], source: str) -> SubLayouts:
    security = _table(merged.get("security", {}), "security", origin, source)
    _known_keys(security, ("cvv2",), "security", origin, source)
    subfields = _table(merged.get("subfields", {}), "subfields", origin, source)
    _known_keys(subfields, ("48", "126"), "subfields", origin, source)
    de48 = _table(subfields.get("48", {}), "subfields.48", origin, source)
    _known_keys(de48, ("layout",), "subfields.48", origin, source)
    de126 = _table(subfields.get("126", {}), "subfields.126", origin, source)
    _known_keys(de126, ("layout", "lengths"), "subfields.126", origin, source)
    defaults = SubLayouts()
    lengths = defaults.de126_lengths
    if "lengths" in de126:
        table = _table(de126["lengths"], "subfields.126.lengths", origin, source)
        items = []
        for k, v in table.items():
            key = f"subfields.126.lengths.{k}"
            if not k.isdigit() or not 1 <= int(k) <= 64:
                raise _fail(origin, key, source, "a subfield is numbered 1 to 64")
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise _fail(origin, key, source, "a length is a positive integer")
            items.append((int(k), v))
        lengths = tuple(sorted(items))
    return SubLayouts(
        cvv2=_choice(
            security.get("cvv2", defaults.cvv2),
            ("de48.se92", "de126.10", "none"),
            "security.cvv2",
            origin,
            source,
        ),
        de48=_choice(
            de48.get("layout", defaults.de48),
            ("subelements", "text"),
            "subfields.48.layout",
            origin,
            source,
        ),
        de126=_choice(
            de126.get("layout", defaults.de126),
            ("visa", "text"),
            "subfields.126.layout",
            origin,
            source,
        ),
        de126_lengths=lengths,
    )


def _keepalive(raw: Any, origin: Mapping[str, str], source: str) -> Keepalive:
    raw = _table(raw, "keepalive", origin, source)
    _known_keys(
        raw, ("zero_length_frames", "idle_echo_after", "echo_timeout"), "keepalive", origin, source
    )
    default = Keepalive()
    policy = _choice(
        raw.get("zero_length_frames", default.zero_length_frames),
        get_args(ZeroLengthPolicy),
        "keepalive.zero_length_frames",
        origin,
        source,
    )
    after = _number(
        raw.get("idle_echo_after", default.idle_echo_after),
        "keepalive.idle_echo_after",
        origin,
        source,
    )
    timeout = _number(
        raw.get("echo_timeout", default.echo_timeout), "keepalive.echo_timeout", origin, source
    )
    if after < 0 or timeout <= 0:
        raise _fail(origin, "keepalive", source, "idle_echo_after >= 0 and echo_timeout > 0")
    return Keepalive(policy, after, timeout)


# --- the compiler ---------------------------------------------------------------------------


def compile_layout(
    name: str,
    fields: Any,
    encoding: Any,
    origin: Mapping[str, str] | None = None,
    source: str = "<profile>",
) -> Layout:
    """Compile a field table and its encodings into a pyiso8583 spec (as a :class:`Layout`).

    Args:
        name: the profile's name (the layout's).
        fields: data element number (text) to its table: ``type``, ``len`` (fixed) or
            ``max`` and ``prefix`` (2 or 3 digits), and optionally its own ``data`` and
            ``prefix_encoding`` and pyiso8583 ``left_pad``/``right_pad``.
        encoding: the ``[encoding]`` table: ``mti``, ``bitmap``, ``numeric``, ``text``,
            ``binary``, ``prefix``, ``tertiary_bitmap``.
        origin: dotted key to the file that set it, for errors.
        source: the file named when ``origin`` does not know a key.

    >>> base = {"2": {"type": "n", "max": 19, "prefix": 2}, "52": {"type": "b", "len": 8}}
    >>> spec = compile_layout("x", base, {"numeric": "bcd", "prefix": "bcd"}).spec()
    >>> spec["2"]["data_enc"], spec["2"]["len_enc"], spec["2"]["len_type"], spec["52"]["max_len"]
    ('b', 'bcd', 1, 16)

    Raises:
        ProfileError: an unknown key or value, naming its file and dotted key.
    """
    origin = origin or {}
    enc_raw = _table(encoding, "encoding", origin, source)
    _known_keys(enc_raw, _ENCODING_DEFAULTS, "encoding", origin, source)
    enc = {**_ENCODING_DEFAULTS, **enc_raw}
    for k, choices in _ENCODING_CHOICES.items():
        _choice(enc[k], choices, f"encoding.{k}", origin, source)
    table: dict[str, Any] = dict(_table(fields, "fields", origin, source))
    if enc["tertiary_bitmap"]:
        for element in _TERTIARY:
            table.setdefault(str(element), dict(_TERTIARY_FIELD))
    spec: dict[str, dict[str, Any]] = {
        "h": {
            "data_enc": "ascii",
            "len_enc": "ascii",
            "len_type": 0,
            "max_len": 0,
            "desc": "Message Header",
        },
        "t": {
            "data_enc": "b" if enc["mti"] == "bcd" else _CODEC[enc["mti"]],
            "len_enc": "ascii",
            "len_type": 0,
            "max_len": 4,
            "desc": "Message Type",
        },
    }
    bitmap = {"hex": ("ascii", 16), "ebcdic-hex": ("cp500", 16), "binary": ("b", 8)}
    data_enc, width = bitmap[enc["bitmap"]]
    for bitmap_key, desc in (("p", "Bitmap, Primary"), ("1", "Bitmap, Secondary")):
        spec[bitmap_key] = {
            "data_enc": data_enc,
            "len_enc": "ascii",
            "len_type": 0,
            "max_len": width,
            "desc": desc,
        }
    for number in sorted(table, key=_number_key(origin, source)):
        dotted = f"fields.{number}"
        item = _table(table[number], dotted, origin, source)
        spec[number] = _compile_field(item, enc, dotted, origin, source)
    return Layout.of(name, spec)


def _number_key(origin: Mapping[str, str], source: str) -> Callable[[str], int]:
    def key(number: str) -> int:
        if not number.isdigit() or not 2 <= int(number) <= 192:
            raise _fail(origin, f"fields.{number}", source, "a data element is numbered 2 to 192")
        return int(number)

    return key


def _compile_field(
    item: Mapping[str, Any],
    enc: Mapping[str, Any],
    key: str,
    origin: Mapping[str, str],
    source: str,
) -> dict[str, Any]:
    _known_keys(item, _FIELD_KEYS, key, origin, source)
    kind = _choice(item.get("type"), tuple(_TYPE_CLASS), f"{key}.type", origin, source)
    cls = _TYPE_CLASS[kind]
    fixed, var = item.get("len"), item.get("max")
    if (fixed is None) == (var is None):
        raise _fail(origin, key, source, "give either len (fixed) or max and prefix (variable)")
    length = fixed if fixed is not None else var
    if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= 9999:
        raise _fail(
            origin,
            f"{key}.{'len' if fixed is not None else 'max'}",
            source,
            "a length is an integer from 1 to 9999",
        )
    digits = 0
    if var is not None:
        digits = _choice(item.get("prefix"), (2, 3, 4), f"{key}.prefix", origin, source)
    elif "prefix" in item:
        raise _fail(origin, f"{key}.prefix", source, "a fixed-length element has no prefix")
    default_data = {
        "numeric": enc["numeric"],
        "text": enc["text"],
        "binary": enc["binary"],
    }[cls]
    data = _choice(
        item.get("data", default_data), get_args(DataEncoding), f"{key}.data", origin, source
    )
    out: dict[str, Any] = {}
    if data == "bcd":
        out.update(data_enc="b", len_count="nibbles", max_len=length)
        if fixed is not None:
            out["left_pad"] = "0"
        else:
            out["right_pad"] = "F"
    elif data == "raw":
        out.update(data_enc="b", max_len=length)
    elif data == "hex":
        # binary as hex text, in the profile's text encoding: two characters a byte.
        out.update(data_enc=_CODEC[enc["text"]], max_len=2 * length)
    else:
        out.update(data_enc=_CODEC[data], max_len=length)
    prefix = _choice(
        item.get("prefix_encoding", enc["prefix"]),
        get_args(PrefixEncoding),
        f"{key}.prefix_encoding",
        origin,
        source,
    )
    if digits == 0:
        out.update(len_enc="ascii", len_type=0)
    elif prefix in ("bcd", "binary"):
        out.update(len_enc="bcd" if prefix == "bcd" else "b", len_type=_PREFIX_BYTES[digits])
    else:
        out.update(len_enc=_CODEC[prefix], len_type=digits)
    for pad in ("left_pad", "right_pad"):
        if pad in item:
            value = item[pad]
            if not isinstance(value, str) or len(value) != 1:
                raise _fail(origin, f"{key}.{pad}", source, "a pad is one character")
            out.pop("left_pad", None)
            out.pop("right_pad", None)
            out[pad] = value
    out["desc"] = item.get("name", "")
    return out
