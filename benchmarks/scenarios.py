"""The request mix of a load phase: a scenario file, the messages of each scenario, and the
frames the generator sends, each with its own STAN and RRN.

What lives here:

- ``load_mix(path)``: a mix file (TOML or JSON) into a ``MixSpec``: scenarios with a kind
  (``track2``, ``cvv2``, ``pin``, ``chip``, ``reversal``, ``echo``), a weight, a card, an
  amount and an optional ``max_per_run``; errors name the file and the entry.
- ``CARD_VECTORS``: the demo cards of ``config/demo/cards.json`` with the published values
  the requests carry (Visa CVV table, psec and pyemv vectors; the PIN of the PVV card).
- ``Template``: one scenario's request encoded once; the STAN (DE11), the RRN (DE37) and, in
  a reversal, the STAN of the original inside DE90 are *slots* found by encoding the message
  twice with different values and diffing, and checked by decoding a patched frame. Sending
  then costs a few byte copies instead of an encode, which keeps the generator's own CPU per
  message low (it is reported).
- ``Mix``: draws scenarios by weight from a seeded RNG and hands out ``Request`` values with
  a run-unique sequence number (STAN = seq mod 999 999 + 1, RRN = seq on 12 digits).

The chip scenario is pyemv's Visa CVN 10 vector (as ``tests/e2e_fixtures.cvn10_request``):
its cryptogram covers a fixed ATC, amount and date, and the switch refuses a replayed ATC,
so by default it is sent once per run (``max_per_run = 1``) and approves; with a larger
``max_per_run`` every further one measures the decline path of a replayed cryptogram.
A reversal reverses the oldest track-2 purchase the mix has sent and not yet reversed (or,
before any, one never sent: an unknown original, acknowledged).

What does not: sockets and timing (generator.py); the switch's own builders are used as they
are (``switch.acquirer``), so a request here is what an acquirer would send.
"""

from __future__ import annotations

import json
import random
import tomllib
import warnings
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import psec.cvv

from switch.acquirer import build_auth, build_reversal, encipher_pin, transmission_time
from switch.provision import load_keys
from switch.wire import codec, emv
from switch.wire.messages import AuthRequest, Message, NetworkRequest, Track2
from switch.wire.spec import SpecChoice

Kind = Literal["track2", "cvv2", "pin", "chip", "reversal", "echo"]
KINDS: tuple[Kind, ...] = get_args(Kind)

#: The repository root and its demo data.
REPO = Path(__file__).resolve().parents[1]
DEMO_KEYS = REPO / "config" / "demo" / "keys.json"
DEMO_CARDS = REPO / "config" / "demo" / "cards.json"
#: Mix files shipped with the harness.
MIX_DIR = Path(__file__).resolve().parent / "mixes"
#: Largest STAN (DE11 is six digits).
MAX_STAN = 999_999
#: Default amount of a purchase, minor units.
DEFAULT_AMOUNT = 100
#: DE22 of each card-present kind: magnetic stripe read in full (track-2 CVV, not iCVV),
#: manual key entry (CVV2), chip read (ARQC).
POS_ENTRY = {"track2": "901", "pin": "901", "cvv2": "012", "chip": "051"}
#: Label of the zone PIN key of the bench listener and of the CVV key (demo keys).
ZPK_LABEL = "demo-zpk"
CVK_LABEL = "demo-cvk"
#: DE70 of an echo test.
ECHO_CODE = "301"
#: Service code under which a CVV2 is computed (as the switch verifies it).
CVV2_SERVICE_CODE = "000"


@dataclass(frozen=True)
class CardVector:
    """A demo card and the published values a request for it carries."""

    expiry: str
    service_code: str
    #: The card's CVV for (expiry, service code) under demo-cvk, as published.
    cvv: str
    #: The PIN on file (None: the card has no PIN).
    pin: str | None = None


#: Demo cards (config/demo/cards.json) with their published CVVs: the Visa CVV test table
#: (CVKA 0123456789ABCDEF, CVKB FEDCBA9876543210) and the psec docstring (1234567890123456).
CARD_VECTORS: dict[str, CardVector] = {
    "4123456789012345": CardVector("8701", "101", "561", pin="1234"),
    "4999988887777000": CardVector("9105", "111", "245", pin="1234"),
    "4666655554444111": CardVector("9206", "120", "664"),
    "4333322221111222": CardVector("9307", "141", "382"),
    "1234567890123456": CardVector("9912", "220", "170"),
}
#: The card of every kind unless the mix names another: the CVV/PVV vector card.
DEFAULT_PAN = "4123456789012345"

#: pyemv's Visa CVN 10 vector: DE55 tags, ARQC, and the ISO fields the cryptogram covers.
CVN10_PAN = "1234567890123456"
CVN10_TAGS: tuple[tuple[int, str], ...] = (
    (0x9F02, "000000004000"),
    (0x9F03, "000000000000"),
    (0x9F1A, "0124"),
    (0x95, "8000048000"),
    (0x5F2A, "0124"),
    (0x9A, "191105"),
    (0x9C, "01"),
    (0x9F37, "52BF4585"),
    (0x82, "1800"),
    (0x9F36, "001C"),
    (0x9F10, "06010A03A06010"),
)
CVN10_ARQC = "29CCA15AE665FA2E"
CVN10_AMOUNT = 4000
CVN10_FIELDS: dict[str, str] = {
    "currency": "124",
    "country": "124",
    "processing_code": "010000",
    "when": "1105120000",
}


class MixError(ValueError):
    """A mix file that cannot be used; the message names the file and the entry."""


@dataclass(frozen=True)
class ScenarioSpec:
    """One entry of a mix file."""

    kind: Kind
    weight: float = 1.0
    #: Its name in reports (default: the kind).
    name: str = ""
    pan: str = DEFAULT_PAN
    amount: int = DEFAULT_AMOUNT
    #: Requests of this scenario per run at most (None: no limit).
    max_per_run: int | None = None

    @property
    def label(self) -> str:
        return self.name or self.kind


@dataclass(frozen=True)
class MixSpec:
    name: str
    scenarios: tuple[ScenarioSpec, ...]


_ENTRY_KEYS = {"kind", "weight", "name", "pan", "amount", "max_per_run"}


def parse_mix(raw: Mapping[str, Any], source: str = "<mix>") -> MixSpec:
    """A mix from its parsed form: ``{"name": ..., "scenario": [{"kind": ...}, ...]}``.

    ``scenarios`` is accepted for ``scenario`` (JSON files tend to use the plural).

    Raises:
        MixError: a missing or unknown key, an unknown kind, a weight or limit that is not
            positive, a card without published values, or duplicate names.
    """
    entries = raw.get("scenario", raw.get("scenarios"))
    if not isinstance(entries, list) or not entries:
        raise MixError(f"{source}: no [[scenario]] entries")
    unknown_top = set(raw) - {"name", "scenario", "scenarios", "about"}
    if unknown_top:
        raise MixError(f"{source}: unknown keys {sorted(unknown_top)}")
    out = []
    for i, entry in enumerate(entries):
        where = f"{source}: scenario {i + 1}"
        if not isinstance(entry, Mapping):
            raise MixError(f"{where}: not a table")
        extra = set(entry) - _ENTRY_KEYS
        if extra:
            raise MixError(f"{where}: unknown keys {sorted(extra)}")
        kind = entry.get("kind")
        if kind not in KINDS:
            raise MixError(f"{where}: kind must be one of {', '.join(KINDS)}, not {kind!r}")
        chip = kind == "chip"
        pan = str(entry.get("pan", CVN10_PAN if chip else DEFAULT_PAN))
        if chip and pan != CVN10_PAN:
            raise MixError(f"{where}: the chip vector is for card {CVN10_PAN[:6]}...")
        if kind != "echo" and pan not in CARD_VECTORS:
            raise MixError(f"{where}: card {pan[:6]}... has no published values here")
        if kind == "pin" and CARD_VECTORS[pan].pin is None:
            raise MixError(f"{where}: card {pan[:6]}... has no PIN")
        weight = entry.get("weight", 1.0)
        limit = entry.get("max_per_run", 1 if chip else None)
        amount = entry.get("amount", CVN10_AMOUNT if chip else DEFAULT_AMOUNT)
        if isinstance(weight, bool) or not isinstance(weight, int | float) or not weight > 0:
            raise MixError(f"{where}: weight must be a positive number")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise MixError(f"{where}: max_per_run must be a positive integer")
        if not isinstance(amount, int) or isinstance(amount, bool) or amount < 1:
            raise MixError(f"{where}: amount must be a positive integer (minor units)")
        if chip and amount != CVN10_AMOUNT:
            raise MixError(f"{where}: the chip vector's cryptogram covers {CVN10_AMOUNT}")
        name = str(entry.get("name", ""))
        out.append(ScenarioSpec(kind, float(weight), name, pan, amount, limit))
    labels = [s.label for s in out]
    if len(set(labels)) != len(labels):
        raise MixError(f"{source}: scenario names must be unique (give each a name)")
    return MixSpec(str(raw.get("name", Path(source).stem)), tuple(out))


def load_mix(path: Path | str) -> MixSpec:
    """Read a mix file: ``.toml`` or ``.json``; a bare name is a file of ``benchmarks/mixes``.

    Raises:
        MixError: unreadable, not TOML/JSON, or not a valid mix (see ``parse_mix``).
    """
    p = Path(path)
    if not p.suffix and not p.exists():
        p = MIX_DIR / f"{p}.toml"
    try:
        text = p.read_text()
    except OSError as exc:
        raise MixError(f"{p}: cannot read: {exc.strerror}") from None
    try:
        raw = json.loads(text) if p.suffix == ".json" else tomllib.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        raise MixError(f"{p}: not valid {p.suffix.lstrip('.') or 'TOML'}: {exc}") from None
    if not isinstance(raw, dict):
        raise MixError(f"{p}: not a table")
    return parse_mix(raw, str(p))


# -- templates ------------------------------------------------------------------------------


def stan_of(seq: int) -> str:
    """DE11 of request ``seq``: 1 to 999 999, wrapping."""
    return f"{seq % MAX_STAN + 1:06d}"


def rrn_of(seq: int) -> str:
    """DE37 of request ``seq``: the sequence number on 12 digits (unique in a run)."""
    return f"{seq % 10**12:012d}"


@dataclass(frozen=True)
class Slot:
    """Where a numeric field of fixed length sits in an encoded frame, and its encoding."""

    offset: int
    length: int
    #: ``"bcd"`` (two digits per byte) or a text codec (``"ascii"``, ``"cp500"``).
    encoding: str

    def encode(self, digits: str) -> bytes:
        raw = bytes.fromhex(digits) if self.encoding == "bcd" else digits.encode(self.encoding)
        if len(raw) != self.length:
            raise ValueError(f"{len(digits)} digits do not fill a {self.length}-byte slot")
        return raw


#: Values of one slot a Template varies: the name and the digit count.
_SLOT_DIGITS = {"stan": 6, "rrn": 12, "original_stan": 6}


def _find_slot(base: bytes, varied: bytes, digits: int) -> Slot:
    diff = [i for i, (a, b) in enumerate(zip(base, varied, strict=True)) if a != b]
    if not diff:
        raise ValueError("slot not found: the field is not in the frame")
    start, end = diff[0], diff[-1] + 1
    chunk = varied[start:end]
    for encoding in ("ascii", "cp500"):
        if chunk == ("9" * digits).encode(encoding):
            return Slot(start, end - start, encoding)
    if chunk == bytes.fromhex("9" * digits):
        return Slot(start, end - start, "bcd")
    raise ValueError("slot not found: the field is not a plain numeric")


class Template:
    """One request shape encoded once, with its STAN/RRN slots to patch per request."""

    def __init__(self, build: Callable[[Mapping[str, str]], Message], spec: SpecChoice) -> None:
        """``build(values)`` makes the message for slot values (keys of ``_SLOT_DIGITS``
        it uses; a missing key is not a slot of this message)."""
        zeros = {k: "0" * n for k, n in _SLOT_DIGITS.items()}
        self.spec = spec
        self.message = build(zeros)
        self.frame = codec.encode(self.message, spec)
        self.slots: dict[str, Slot] = {}
        for name, n in _SLOT_DIGITS.items():
            varied = codec.encode(build({**zeros, name: "9" * n}), spec)
            if varied != self.frame:
                self.slots[name] = _find_slot(self.frame, varied, n)
        if "stan" not in self.slots:
            raise ValueError("a request template needs a STAN slot")
        self._check()

    def render(self, values: Mapping[str, str]) -> bytes:
        """The frame body with ``values`` (digits) in their slots."""
        out = bytearray(self.frame)
        for name, slot in self.slots.items():
            out[slot.offset : slot.offset + slot.length] = slot.encode(values[name])
        return bytes(out)

    def _check(self) -> None:
        """Patch the slots and decode: each must read back where the field says it is."""
        probe = {"stan": "123456", "rrn": "123456789012", "original_stan": "654321"}
        msg = codec.decode(self.render(probe), self.spec)
        if getattr(msg, "stan", None) != probe["stan"]:
            raise ValueError("the STAN slot does not decode as DE11")
        if "rrn" in self.slots and getattr(msg, "rrn", None) != probe["rrn"]:
            raise ValueError("the RRN slot does not decode as DE37")
        original = getattr(msg, "original", None)
        if "original_stan" in self.slots and getattr(original, "stan", None) != "654321":
            raise ValueError("the original-STAN slot does not decode inside DE90")


def _track2(pan: str) -> Track2:
    card = CARD_VECTORS[pan]
    # Visa layout: PVKI (1) and PVV (4; the switch checks the PVV it stores) before the CVV.
    return Track2(pan, card.expiry, card.service_code, "1" + "0000" + card.cvv)


def _demo_key(label: str) -> str:
    return next(k.clear_hex for k in load_keys(DEMO_KEYS) if k.label == label)


def cvv2_of(pan: str) -> str:
    """The CVV2 of a demo card (service code 000), computed by psec under demo-cvk.

    No vector publishes a CVV2 for these cards; psec (an independent implementation, the
    one the published CVV values of ``CARD_VECTORS`` are checked with) computes it.
    """
    card = CARD_VECTORS[pan]
    with warnings.catch_warnings():
        # psec uses the two-key TripleDES of cryptography's deprecated location.
        warnings.simplefilter("ignore")
        value: str = psec.cvv.generate_cvv(
            bytes.fromhex(_demo_key(CVK_LABEL)), pan, card.expiry, CVV2_SERVICE_CODE
        )
    return value


def cvn10_de55() -> bytes:
    """The DE55 of pyemv's CVN 10 vector with its ARQC."""
    items = [(tag, bytes.fromhex(value)) for tag, value in CVN10_TAGS]
    return emv.build([*items, (0x9F26, bytes.fromhex(CVN10_ARQC))])


def _builder(s: ScenarioSpec, when: str) -> Callable[[Mapping[str, str]], Message]:
    """The message of scenario ``s`` for given slot values."""
    pan = s.pan

    def purchase(v: Mapping[str, str], **extra: Any) -> AuthRequest:
        return build_auth(pan, s.amount, stan=v["stan"], rrn=v["rrn"], when=when, **extra)

    if s.kind == "echo":
        return lambda v: NetworkRequest(
            mti="0800", transmission_time=when, stan=v["stan"], code=ECHO_CODE
        )
    if s.kind in ("track2", "reversal"):
        track = _track2(pan)

        def track2(v: Mapping[str, str]) -> Message:
            return purchase(v, track2=track, pos_entry_mode=POS_ENTRY["track2"])

        if s.kind == "track2":
            return track2

        def reversal(v: Mapping[str, str]) -> Message:
            original = track2({"stan": v["original_stan"], "rrn": v["rrn"]})
            assert isinstance(original, AuthRequest)
            return build_reversal(original, stan=v["stan"], when=when)

        return reversal
    if s.kind == "cvv2":
        expiry, cvv2 = CARD_VECTORS[pan].expiry, cvv2_of(pan)
        return lambda v: purchase(v, expiry=expiry, cvv2=cvv2, pos_entry_mode=POS_ENTRY["cvv2"])
    if s.kind == "pin":
        pin = CARD_VECTORS[pan].pin
        assert pin is not None
        block = encipher_pin(pin, pan, _demo_key(ZPK_LABEL), 0)
        track = _track2(pan)
        return lambda v: purchase(v, track2=track, pin_block=block, pos_entry_mode=POS_ENTRY["pin"])
    # chip: the vector's own DE7 (its date is in the cryptogram data).
    de55 = cvn10_de55()
    f = CVN10_FIELDS
    return lambda v: build_auth(
        pan,
        s.amount,
        stan=v["stan"],
        rrn=v["rrn"],
        when=f["when"],
        emv=de55,
        pos_entry_mode=POS_ENTRY["chip"],
        currency=f["currency"],
        country=f["country"],
        processing_code=f["processing_code"],
    )


@dataclass(frozen=True)
class Request:
    """One request to send: its scenario, its STAN (the key the answer is matched by) and
    the frame body (without the length header)."""

    scenario: str
    stan: str
    body: bytes


class Mix:
    """Draws the requests of a run from a ``MixSpec``; one instance per target and run.

    Args:
        spec: the scenarios and weights.
        wire: the target's wire spec.
        seed: seed of the scenario draw.
        when: DE7 of every request but the chip vector's (default: now).
        first_seq: the sequence number of the first request.
    """

    def __init__(
        self,
        spec: MixSpec,
        wire: SpecChoice = "ascii",
        *,
        seed: int = 0,
        when: str | None = None,
        first_seq: int = 1,
    ) -> None:
        stamp = when or transmission_time()
        self.spec = spec
        self._rng = random.Random(seed)
        self._seq = first_seq
        self._templates = {s.label: Template(_builder(s, stamp), wire) for s in spec.scenarios}
        self._kinds = {s.label: s.kind for s in spec.scenarios}
        self._left = {s.label: s.max_per_run for s in spec.scenarios}
        self._labels = [s.label for s in spec.scenarios]
        self._weights = [s.weight for s in spec.scenarios]
        self._unreversed: deque[int] = deque(maxlen=100_000)
        #: Requests handed out, by scenario.
        self.counts: dict[str, int] = dict.fromkeys(self._labels, 0)

    @property
    def exhausted(self) -> bool:
        return not self._labels

    def next(self) -> Request:
        """The next request.

        Raises:
            RuntimeError: every scenario has reached its ``max_per_run``.
        """
        if not self._labels:
            raise RuntimeError("every scenario of the mix reached its max_per_run")
        label = (
            self._labels[0]
            if len(self._labels) == 1
            else self._rng.choices(self._labels, self._weights)[0]
        )
        seq = self._seq
        self._seq += 1
        values = {"stan": stan_of(seq), "rrn": rrn_of(seq)}
        kind = self._kinds[label]
        if kind == "track2":
            self._unreversed.append(seq)
        elif kind == "reversal":
            # The oldest purchase not yet reversed, else one never sent (unknown original).
            original = self._unreversed.popleft() if self._unreversed else seq
            values = {**values, "original_stan": stan_of(original), "rrn": rrn_of(original)}
        self.counts[label] += 1
        left = self._left[label]
        if left is not None:
            self._left[label] = left - 1
            if left == 1:
                i = self._labels.index(label)
                del self._labels[i], self._weights[i]
        return Request(label, values["stan"], self._templates[label].render(values))
