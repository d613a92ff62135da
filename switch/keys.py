"""Per-listener session state of a card network: the working ZPK in force, and sign-on.

What lives here: ``ListenerSession``, the one mutable object per listener, owned by the
server (``ListenerSessions``, one per configured listener), shared by the listener's
connections and changed by the dispatcher on 0800 network management: the HSM label of the
zone PIN key in force and its generation, and whether the network is signed on. A connection
reads ``zpk`` when it reads a request (``RequestContext.zpk``), so a request keeps the key it
arrived under while a key change puts a new one in force. Also ``exchange_key``: a key
exchange's DE48 (``parse_key_data``) imported under the listener's zone master key as the
next generation ``<zpk>@<n>``, its check value compared with the one sent; and
``ListenerSessions.restore``, which finds the newest generation in the HSM at start-up.

DE48 of a key exchange (0800 DE70 161 new key / 101 key change), by ``ListenerConfig.key_block``:

- ``"raw"``: the hex of the new key encrypted in ECB mode under the ZMK (32 or 48 hex digits
  for a TDES key, 32/48/64 for AES) followed by its key check value, 6 hex digits;
- ``"tr31"``: a TR-31 key block (version B under a TDES ZMK, D under an AES one; its length
  is in its header), optionally followed by the 6-hex-digit check value.

What does not: the HSM command itself (``hsm.backend``: the key passes through host memory,
see there), the 0800/0810 messages (wire/messages.py), answering them (handler.py).

Sign-on state starts "signed on": a switch that restarts is not owed a new sign-on (the
network may not send one), and an explicit 0800 002 is what signs a listener off.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

import trio

from hsm.api import KeyAdmin, KeyAlgorithm, KeyUsage, WrappedKeyFormat, WrappedKeyImport
from hsm.errors import (
    HsmTimeout,
    HsmUnavailable,
    InvalidInput,
    KeyCheckFailed,
    KeyExists,
    KeyNotFound,
    KeyUsageError,
)
from switch.config import ListenerConfig
from switch.decisions import Reason
from switch.log import get_logger

__all__ = [
    "KeyChange",
    "ListenerSession",
    "ListenerSessions",
    "exchange_key",
    "parse_key_data",
    "zpk_label",
]

log = get_logger("switch.keys")

#: Hex digits of the key check value sent with a new key.
KCV_DIGITS: Final = 6
#: Hex digits of a key under the ZMK in the raw layout: TDES 2-key/3-key, AES-128/192/256.
_RAW_KEY_DIGITS: Final = frozenset({32, 48, 64})
#: Labels tried past the next generation when it is taken (a generation left by a failure).
_LABEL_TRIES: Final = 8
_HEX: Final = re.compile(r"[0-9A-Fa-f]*")


def zpk_label(base: str, generation: int) -> str:
    """The HSM label of generation ``generation`` of the listener ZPK ``base``.

    >>> zpk_label("demo-zpk", 0), zpk_label("demo-zpk", 3)
    ('demo-zpk', 'demo-zpk@3')
    """
    return base if generation == 0 else f"{base}@{generation}"


@dataclass
class ListenerSession:
    """The mutable state of one listener's session with its network (see the module doc)."""

    listener: ListenerConfig
    #: HSM label of the ZPK in force (``zpk_label(listener.zpk, generation)``).
    zpk: str = ""
    #: 0 for the configured key, then one more per accepted key exchange.
    generation: int = 0
    signed_on: bool = True
    #: Serialises key exchanges of this listener (two at once must not share a generation).
    lock: trio.Lock = field(default_factory=trio.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.zpk:
            self.zpk = zpk_label(self.listener.zpk, self.generation)


class ListenerSessions:
    """One ``ListenerSession`` per configured listener, by listener name."""

    def __init__(self, listeners: Iterable[ListenerConfig]) -> None:
        self._by_name = {lst.name: ListenerSession(lst) for lst in listeners}

    def __getitem__(self, name: str) -> ListenerSession:
        return self._by_name[name]

    def values(self) -> list[ListenerSession]:
        return list(self._by_name.values())

    async def restore(self, hsm: KeyAdmin) -> None:
        """Put in force, for each listener, the newest ZPK generation the HSM holds.

        A key exchange accepted before a restart is still the key the network uses.
        """
        infos = await hsm.list_keys()
        for session in self._by_name.values():
            base = session.listener.zpk
            pattern = re.compile(re.escape(base) + r"@([1-9][0-9]{0,8})")
            generations = [
                int(m.group(1))
                for info in infos
                if info.usage is KeyUsage.ZPK and (m := pattern.fullmatch(info.label))
            ]
            if generations:
                session.generation = max(generations)
                session.zpk = zpk_label(base, session.generation)
                log.info("zpk_restored", listener=session.listener.name, zpk=session.zpk)


@dataclass(frozen=True, slots=True)
class KeyData:
    """DE48 of a key exchange, split: the key under the ZMK and the check value sent."""

    format: WrappedKeyFormat
    wrapped: str
    kcv: str | None

    def __repr__(self) -> str:
        return f"KeyData(format={self.format.value!r}, kcv={self.kcv!r})"


def parse_key_data(text: str | None, layout: str) -> KeyData | str:
    """Split a key exchange's DE48 by the listener's ``key_block`` layout; a str says why not.

    >>> parse_key_data("00" * 16 + "ABC123", "raw")
    KeyData(format='ecb', kcv='ABC123')
    >>> parse_key_data("00" * 16, "raw")
    'DE48 must be the key under the ZMK (32, 48 or 64 hex digits) and a 6-digit KCV'
    """
    if not text:
        return "DE48 (the new key) is missing"
    if layout == "raw":
        key = text[:-KCV_DIGITS]
        if len(key) not in _RAW_KEY_DIGITS or not _HEX.fullmatch(text):
            return "DE48 must be the key under the ZMK (32, 48 or 64 hex digits) and a 6-digit KCV"
        return KeyData(WrappedKeyFormat.ECB, key.upper(), text[-KCV_DIGITS:].upper())
    length = text[1:5]
    if len(text) < 5 or not length.isdigit() or int(length) > len(text):
        return "DE48 must start with a TR-31 key block"
    block, rest = text[: int(length)], text[int(length) :]
    if rest and (len(rest) != KCV_DIGITS or not _HEX.fullmatch(rest)):
        return "what follows the TR-31 block in DE48 must be a 6-digit KCV"
    return KeyData(WrappedKeyFormat.TR31, block, rest.upper() or None)


@dataclass(frozen=True, slots=True)
class KeyChange:
    """The outcome of one key exchange: its reason, and the key put in force if accepted."""

    reason: Reason
    zpk: str | None = None
    kcv: str | None = None
    #: Why it was refused (a fixed text or an HSM error's, never key material).
    detail: str | None = None


async def exchange_key(session: ListenerSession, key_data: str | None, hsm: KeyAdmin) -> KeyChange:
    """Import the new ZPK of a key exchange and put it in force; the old one stays otherwise.

    Returns ``Reason.APPROVED`` with the new label, ``KEY_EXCHANGE_FAILED`` when the data,
    the block or the check value is refused (or the ZMK is missing), or
    ``SECURITY_UNAVAILABLE`` when the HSM cannot answer.
    """
    lst = session.listener
    parsed = parse_key_data(key_data, lst.key_block)
    if isinstance(parsed, str):
        return _refused(session, parsed)
    algorithm = _algorithm_hint(lst, parsed)
    async with session.lock:
        for step in range(1, _LABEL_TRIES + 1):
            generation = session.generation + step
            label = zpk_label(lst.zpk, generation)
            req = WrappedKeyImport(
                label, KeyUsage.ZPK, lst.zmk, parsed.format, parsed.wrapped, algorithm, parsed.kcv
            )
            try:
                info = await hsm.import_wrapped_key(req)
            except KeyExists:
                continue
            except (InvalidInput, KeyCheckFailed, KeyNotFound, KeyUsageError) as exc:
                return _refused(session, str(exc))
            except (HsmUnavailable, HsmTimeout) as exc:
                log.error("key_exchange_failed", listener=lst.name, error=str(exc))
                return KeyChange(Reason.SECURITY_UNAVAILABLE, detail=str(exc))
            old = session.zpk
            session.zpk, session.generation = info.label, generation
            log.info("key_exchange", listener=lst.name, zpk=info.label, kcv=info.kcv,
                     previous=old, generation=generation)  # fmt: skip
            return KeyChange(Reason.APPROVED, info.label, info.kcv)
    return _refused(session, f"no free label after {lst.zpk}@{session.generation}")


def _algorithm_hint(lst: ListenerConfig, data: KeyData) -> KeyAlgorithm | None:
    """The algorithm of a raw key of ambiguous length: AES for a format 4 listener."""
    if data.format is not WrappedKeyFormat.ECB or lst.pin_block_format != 4:
        return None
    return {32: KeyAlgorithm.AES_128, 48: KeyAlgorithm.AES_192}.get(
        len(data.wrapped), KeyAlgorithm.AES_256
    )


def _refused(session: ListenerSession, detail: str) -> KeyChange:
    log.warning("key_exchange_refused", listener=session.listener.name, detail=detail,
                zpk=session.zpk)  # fmt: skip
    return KeyChange(Reason.KEY_EXCHANGE_FAILED, detail=detail)
