"""Declarative mapping between typed message dataclasses and pyiso8583 field dictionaries.

What lives here: :func:`de`, the dataclass field specifier by which a message field names its
data element (key, :class:`Kind`, whether mandatory, whether its answer echoes it); the
:func:`message` class decorator, which makes the frozen dataclass and precomputes, once at
import, the plan that :func:`read`, :func:`write`, :func:`salvage` and :func:`echo` walk; the
kinds every element shares (:func:`digits`, :func:`text`, :data:`BINARY`) and the errors
(:class:`Invalid` raised by a kind, :class:`FieldError` raised to callers).

What does not: which data element is which, the MTIs, the sub-layouts of DE43/DE48/DE54/DE90/
DE95 and the card-data repr (all in messages.py, the only module with ISO field numbers);
bytes, bitmaps and length prefixes (spec.py, codec.py).

Hot path: a plan is a few tuples of (key, attribute, function); reading a message is one loop
over them with no per-message introspection.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from operator import attrgetter
from typing import Any, Final, Generic, Literal, TypeVar, dataclass_transform

from hsm.pan import is_digits

__all__ = [
    "BINARY",
    "FieldError",
    "Invalid",
    "Kind",
    "de",
    "digits",
    "echo",
    "echo_names",
    "element_of",
    "is_printable",
    "message",
    "read",
    "salvage",
    "text",
    "write",
]

T = TypeVar("T")
U = TypeVar("U")

#: Reason of a mandatory element that is absent.
MISSING_REASON: Final = "mandatory field missing"
#: Key of the :class:`Element` in a dataclass field's metadata.
_ELEMENT: Final = "de"

Mask = Literal["none", "pan", "hide"]


class FieldError(ValueError):
    """A field is missing or malformed. ``field`` is the field number (or ``"mti"``).

    The message holds the field number and a fixed reason, never the field's value.
    """

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"field {field}: {reason}")
        self.field = field
        self.reason = reason


class Invalid(ValueError):
    """Raised by a kind's parser: the text is malformed. The mapper adds the field number."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def is_printable(value: str) -> bool:
    """Whether every character of ``value`` is printable ASCII (space to tilde)."""
    return value.isascii() and value.isprintable()


def _same(value: str) -> str:
    return value


@dataclass(frozen=True, slots=True)
class Kind(Generic[T]):
    """How the text of one data element is checked and converted, both ways.

    Attributes:
        parse: wire text to value; raises :class:`Invalid` with a fixed reason.
        format: value to wire text; None leaves the element out.
        mask: how the value shows in a message repr: as is, as a masked PAN, or hidden.
        spread: attribute names when one element fills several attributes; ``parse`` then
            returns, and ``format`` takes, a tuple of their values in this order.
    """

    parse: Callable[[str], T]
    format: Callable[[T], str | None]
    mask: Mask = "none"
    spread: tuple[str, ...] = ()

    def where(self, valid: Callable[[T], bool], reason: str) -> Kind[T]:
        """This kind, with values for which ``valid`` is false rejected with ``reason``."""
        parse = self.parse

        def checked(value: str) -> T:
            out = parse(value)
            if not valid(out):
                raise Invalid(reason)
            return out

        return dataclasses.replace(self, parse=checked)

    def then(self, convert: Callable[[T], U], format: Callable[[U], str | None]) -> Kind[U]:
        """A kind that parses like this one, then applies ``convert``; ``format`` reverses it."""
        parse = self.parse

        def converted(value: str) -> U:
            return convert(parse(value))

        return Kind(converted, format, self.mask, self.spread)

    def masked(self, mask: Mask) -> Kind[T]:
        """This kind with another repr mask."""
        return dataclasses.replace(self, mask=mask)

    def spread_over(self, *names: str) -> Kind[T]:
        """This kind (of tuple values) filling the attributes ``names`` of one message."""
        return dataclasses.replace(self, spread=names)


def digits(length: int | None = None, *, max_len: int = 0) -> Kind[str]:
    """Decimal digits: exactly ``length`` of them, or up to ``max_len`` (empty allowed)."""
    wrong_length = f"expected {length} digits"
    too_long = f"longer than {max_len} digits"

    def parse(value: str) -> str:
        if length is not None and len(value) != length:
            raise Invalid(wrong_length)
        if max_len and len(value) > max_len:
            raise Invalid(too_long)
        if value and not is_digits(value):
            raise Invalid("not numeric")
        return value

    return Kind(parse, _same)


def text(length: int | None = None) -> Kind[str]:
    """Printable ASCII text, of exactly ``length`` characters when given."""
    wrong_length = f"expected {length} characters"

    def parse(value: str) -> str:
        if length is not None and len(value) != length:
            raise Invalid(wrong_length)
        if not is_printable(value):
            raise Invalid("not printable text")
        return value

    return Kind(parse, _same)


def _from_hex(value: str) -> bytes:
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise Invalid("not binary data") from None


def _to_hex(value: bytes) -> str:
    return value.hex().upper()


#: Binary data (pyiso8583 gives it as hex text); hidden in reprs (PIN blocks, EMV data).
BINARY: Final[Kind[bytes]] = Kind(_from_hex, _to_hex, mask="hide")


@dataclass(frozen=True, slots=True)
class Element:
    """The data element a message field carries (the metadata :func:`de` records).

    Attributes:
        key: the pyiso8583 key (the field number as text).
        kind: how its text is checked and converted.
        required: absent on the wire is an error (the dataclass field has no default).
        echo: the answer to this message repeats the value (see :func:`echo`).
        fallback: for an absent element, computes the value from the attributes read so
            far (those declared before it); None from it is the ``missing`` error.
        missing: the reason of the error when a required element is absent.
    """

    key: str
    kind: Kind[Any]
    required: bool
    echo: bool
    fallback: Callable[[Mapping[str, Any]], Any] | None
    missing: str


def de(
    number: int,
    kind: Kind[Any],
    *,
    default: Any = dataclasses.MISSING,
    echo: bool = False,
    secret: bool = False,
    fallback: Callable[[Mapping[str, Any]], Any] | None = None,
    missing: str = MISSING_REASON,
) -> Any:
    """Declare a message field carrying data element ``number`` (a :func:`message` field).

    Args:
        number: the ISO 8583 data element.
        kind: how its text is parsed, validated and formatted.
        default: the value when the element is absent; without one the element is mandatory.
        echo: the answer to the message repeats this field.
        secret: never shown in a repr (whatever the kind's mask).
        fallback, missing: see :class:`Element`.

    Returns:
        A :func:`dataclasses.field` with the :class:`Element` in its metadata (and ``"pan"``
        set for a PAN, which the messages' repr masks).
    """
    element = Element(str(number), kind, default is dataclasses.MISSING, echo, fallback, missing)
    metadata = {_ELEMENT: element, "pan": kind.mask == "pan"}
    shown = not secret and kind.mask != "hide"
    if default is dataclasses.MISSING:
        return dataclasses.field(repr=shown, metadata=metadata)
    return dataclasses.field(default=default, repr=shown, metadata=metadata)


def element_of(f: dataclasses.Field[Any]) -> Element | None:
    """The data element a dataclass field declares, or None for a field without one."""
    return f.metadata.get(_ELEMENT)


# One step of a read: key, attribute, parser, required, attributes of a spread kind, and
# the fallback of an absent element (None: the dataclass default) with its reason.
_Fallback = Callable[[Mapping[str, Any]], Any]
_Read = tuple[str, str, Callable[[str], Any], bool, tuple[str, ...], _Fallback | None, str]
# One step of a write: key, attribute getter, formatter (None: the value is the text).
_Write = tuple[str, Callable[[Any], Any], Callable[[Any], str | None] | None]


@dataclass(frozen=True, slots=True)
class _Plan:
    reads: tuple[_Read, ...]
    writes: tuple[_Write, ...]
    echo: tuple[str, ...]
    lenient: bool


#: Plan of each message class, built by :func:`message` at import.
_PLANS: Final[dict[type, _Plan]] = {}
#: The request class each response class answers.
_ANSWERS: Final[dict[type, type]] = {}


def _plan_of(cls: type, lenient: bool) -> _Plan:
    reads: list[_Read] = []
    writes: list[_Write] = []
    spread_done: set[str] = set()
    all_fields = dataclasses.fields(cls)
    for f in all_fields:
        el = element_of(f)
        if el is None:
            continue
        if el.kind.spread:
            names = el.kind.spread
            group = {g.name for g in all_fields if (e := element_of(g)) and e.key == el.key}
            if group != set(names):
                raise TypeError(f"{cls.__name__}: DE{el.key} spreads over {names}, not {group}")
            if el.key not in spread_done:
                spread_done.add(el.key)
                reads.append((el.key, f.name, el.kind.parse, False, names, None, ""))
                writes.append((el.key, attrgetter(*names), el.kind.format))
            continue
        step = (el.key, f.name, el.kind.parse, el.required, (), el.fallback, el.missing)
        reads.append(step)
        fmt = None if el.kind.format is _same else el.kind.format
        writes.append((el.key, attrgetter(f.name), fmt))
    keys = [step[0] for step in reads]
    if len(keys) != len(set(keys)):
        raise TypeError(f"{cls.__name__}: one data element declared by two fields")
    echoed = tuple(f.name for f in all_fields if (el := element_of(f)) and el.echo)
    return _Plan(tuple(reads), tuple(writes), echoed, lenient)


def _check_answers(cls: type, request: type) -> None:
    """Every element the request echoes is a field of its answer, with the same key."""
    keys = {f.name: el.key for f in dataclasses.fields(cls) if (el := element_of(f))}
    req_keys = {f.name: el.key for f in dataclasses.fields(request) if (el := element_of(f))}
    for name in _PLANS[request].echo:
        if keys.get(name) != req_keys[name]:
            raise TypeError(f"{cls.__name__} does not carry {request.__name__}.{name}")


@dataclass_transform(frozen_default=True, kw_only_default=True, field_specifiers=(de,))
def message(*, answers: type | None = None, lenient: bool = False) -> Callable[[type[T]], type[T]]:
    """Make a frozen, slotted, keyword-only dataclass of a message and plan its mapping.

    Args:
        answers: the request class this message answers: each field that request declares
            with ``echo=True`` must be a field here too, and :func:`echo` copies it.
        lenient: :func:`read` keeps a malformed or absent element as its default instead
            of raising (a message read only to answer or drop it).

    Raises:
        TypeError: at import, a plan that cannot work (an echoed element the answer lacks,
            a spread kind over other attributes than those of its element, one element
            declared by two fields without a spread kind).
    """

    def wrap(cls: type[T]) -> type[T]:
        made = dataclasses.dataclass(frozen=True, slots=True, kw_only=True)(cls)
        _PLANS[made] = _plan_of(made, lenient)
        if answers is not None:
            _check_answers(made, answers)
            _ANSWERS[made] = answers
        return made

    return wrap


def read(cls: type[T], fields: Mapping[str, str], **given: Any) -> T:
    """The message ``cls`` of a field dictionary; ``given`` fills the fields without element.

    Raises:
        FieldError: a mandatory element is absent or an element is malformed: the first
            in the order of the dataclass fields.
    """
    plan = _PLANS[cls]
    if plan.lenient:
        return cls(**salvage(cls, fields), **given)
    values: dict[str, Any] = given
    key = ""
    try:
        for key, name, parse, required, spread, fallback, missing in plan.reads:
            raw = fields.get(key)
            if raw is None:
                if fallback is not None:
                    values[name] = fallback(values)
                    if values[name] is None:
                        raise FieldError(key, missing)
                elif required:
                    raise FieldError(key, missing)
                continue
            if spread:
                values.update(zip(spread, parse(raw), strict=True))
            else:
                values[name] = parse(raw)
    except Invalid as exc:
        raise FieldError(key, exc.reason) from None
    return cls(**values)


def salvage(cls: type, fields: Mapping[str, Any]) -> dict[str, Any]:
    """The attributes of ``cls`` that can be read from ``fields``, skipping any element
    that is absent, not text or malformed. Never raises for bad content."""
    out: dict[str, Any] = {}
    for key, name, parse, _required, spread, _fallback, _missing in _PLANS[cls].reads:
        raw = fields.get(key)
        if not isinstance(raw, str):
            continue
        try:
            value = parse(raw)
        except Invalid:
            continue
        if spread:
            out.update(zip(spread, value, strict=True))
        else:
            out[name] = value
    return out


def write(msg: Any, out: dict[str, str]) -> dict[str, str]:
    """Add the elements of ``msg`` to ``out`` (absent when None or formatted to None).

    Raises:
        TypeError: ``msg`` is not a :func:`message` class.
        ValueError: from a kind's format, a value that cannot be laid out.
    """
    plan = _PLANS.get(type(msg))
    if plan is None:
        raise TypeError(f"not a wire message: {type(msg).__name__}")
    for key, get, fmt in plan.writes:
        value = get(msg)
        if value is None:
            continue
        if fmt is not None:
            value = fmt(value)
            if value is None:
                continue
        out[key] = value
    return out


def echo(request: Any) -> dict[str, Any]:
    """The attributes of ``request`` that its answer repeats (declared ``echo=True``)."""
    return {name: getattr(request, name) for name in _PLANS[type(request)].echo}


def echo_names(response: type) -> frozenset[str]:
    """The attributes a response class takes from its request (see :func:`message`)."""
    return frozenset(_PLANS[_ANSWERS[response]].echo)
