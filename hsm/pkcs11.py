"""PKCS#11 backend of the HSM interface: SoftHSM2 (the default) or any PKCS#11 token.

What lives here: ``Pkcs11Hsm`` (the ``Hsm`` on one logged-in session: the token's primitives,
key store and locking under ``hsm.backend.CommandHsm``), ``Pkcs11Cipher`` (the block
primitive the commands run over, with EMV key derivation inside the token) and the token
object conventions.

What does not: the commands' validation and composition (``hsm.backend``), creating the
SoftHSM token or its configuration (``hsm.token``), the payment algorithms
(``hsm.algorithms``), KMS (``hsm.kms``), metrics (the switch polls ``session_status``).

Losing the token and getting it back: when a call fails with an error that says the session or
the token is gone (``_SESSION_LOST``: CKR_SESSION_HANDLE_INVALID, CKR_TOKEN_NOT_PRESENT,
CKR_DEVICE_REMOVED, CKR_DEVICE_ERROR, CKR_USER_NOT_LOGGED_IN, a stale object handle, or SoftHSM's
CKR_GENERAL_ERROR once its token directory went away), the shared session is dropped and the
command fails with ``HsmUnavailable``. From then on every command fails at once, without
touching the token, while a worker thread (``trio.lowlevel.start_thread_soon``: the event loop
never waits for it) tries to get the session back: ``C_Finalize`` and ``C_Initialize`` (SoftHSM
2.6 keeps reporting CKR_GENERAL_ERROR on a token that came back until it is re-initialised),
find the token, open a session, log in with the same user PIN (kept in memory for that), and
the key index is rebuilt on the next command. An attempt is started by a command (or the
readiness probe) once its delay has passed: ``RECONNECT_INITIAL`` after the loss, doubled after
each failed attempt up to ``RECONNECT_MAX``. A key index reload that misses a key is checked
against the slot list (SoftHSM lists no objects, without error, while its token directory is
missing), so an absent token is ``HsmUnavailable``, not ``KeyNotFound``. ``session_status``
reports whether the session is up and how many times it was reopened.

Keys in the token:
    * Secret key objects, ``CKA_TOKEN``, ``CKA_PRIVATE``, ``CKA_SENSITIVE`` true and
      ``CKA_EXTRACTABLE`` false, so their values can be neither read nor wrapped out. The
      capabilities follow the usage (a ZPK encrypts and decrypts, an IMK only derives, an HMAC
      key only signs...). A key check value is computed in the token when the key is created
      (the capability it needs is granted for that one operation, then revoked).
    * ``CKA_LABEL`` is the key's label; ``CKA_ID`` carries ``cardswitch:1:USAGE:ALG:KCV:PART``
      where PART is ``key`` or, for a CVK, ``left`` for the companion object holding its left
      half as a single-DES key (CVK-A||CVK-A), which the CVV's single-DES step needs (SoftHSM
      has no usable single-DES ECB).
    * EMV ICC master keys and session keys are derived with CKM_DES3_ECB_ENCRYPT_DATA as
      session objects (sensitive, non-extractable) and destroyed after the command.

Session copies: SoftHSM's file object store re-reads a token object's file (open, lock, read,
close) on every operation that uses it. So each indexed key is copied once into a session
object (``C_CopyObject`` with ``CKA_TOKEN`` false: same label, CKA_ID and protections, still
sensitive and non-extractable) and commands run on the copy; the token object is what
attributes are read from and what is destroyed. Measured on the demo token (one task, 2-core
x86_64): an HMAC or a TDES block 26-33 us on the token object, 13-14 us on the copy; in the
whole switch (``python -m benchmarks.layers``, 8 in flight) 84 -> 54 us per TDES block and
114 -> 97 us per HMAC. A copy outlives its token object, so every ``KEY_RECHECK`` seconds the
next command first reads CKA_ID of each token object behind a copy (``_recheck``): a token gone
or a key deleted by another process is then lost as a stale handle is, at most
``KEY_RECHECK`` late (the readiness probe reads the token object at once); a recheck of the
demo token's nine objects takes about 0.4 ms, under 0.2 % of the loop. Copies are
destroyed with their key, on a reload that no longer finds the token object, and on close
(the session may live on for another user); a reconnect starts from none (they died with the
session). A token that refuses the copy (``CKA_COPYABLE`` false) is used directly.

Concurrency: SoftHSM 2.6 is not thread-safe across sessions in one process, so the process has
one logged-in session and every PKCS#11 call holds one process-wide lock. With ``offload=True``
commands run in a worker thread (``trio.to_thread.run_sync`` with a ``CapacityLimiter(1)``), so
that the event loop is never blocked by the token and a command stuck in the token can be
abandoned on timeout; ``offload=False`` runs them inline. Measured (benchmarks/hsm_bench.py, one
task, 2-core x86_64): the hop adds ~50 us per command (CVV verify 114 us median vs 61 inline,
CVN 18 ARQC+ARPC 720 vs 562), and inline blocks the event loop for the whole command (p99 of an
inline ARQC reached 3.3 ms) and cannot be abandoned. The token serialises commands and the
binding does not run them in parallel with Python work, so under load the hop is pure cost: the
whole switch does 1018 auth/s inline against 752 with the hop (benchmarks/load.py, 8 in flight,
one core). SoftHSM therefore runs inline by default: ``hsm.config.DEFAULT_OFFLOAD`` is the one
default, of the configuration and of this class alike; offload a network-attached token, where a
stuck command must be abandonable.

Clear PIN in host memory: a general-purpose PKCS#11 token has no PIN commands, so verifying a
PIN decrypts the PIN block into this process. The PIN and clear PIN blocks are kept in
``bytearray`` buffers and wiped after use (best effort: CPython may keep transient copies).
A payment HSM backend implementing ``hsm.api.Hsm`` keeps the PIN inside; the interface never
returns it. Likewise a token key with DERIVE or ENCRYPT lets the session holder compute
encryptions under it (SoftHSM does not constrain derived key templates): the token protects
key values, the user PIN protects the token.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import hmac
import os
import secrets
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pkcs11
import pkcs11.exceptions as p11e
import trio
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass
from pkcs11.constants import DEFAULT
from pkcs11.mechanisms import GCMParams

from hsm.algorithms.pinblock import RandomBytes
from hsm.algorithms.primitive import AES_BLOCK, DES_BLOCK, KCV_BYTES
from hsm.api import AES_ALGORITHMS, GCM_TAG_BYTES, KEY_LENGTHS, KeyAlgorithm, KeyInfo, KeyUsage
from hsm.backend import CommandHsm, StoredKey
from hsm.config import DEFAULT_OFFLOAD
from hsm.errors import (
    DecryptionFailed,
    HsmConfigError,
    HsmError,
    HsmTimeout,
    HsmUnavailable,
    KeyNotFound,
)

T = TypeVar("T")

#: Every PKCS#11 call of this process holds this lock (SoftHSM 2.6 is not thread-safe
#: across sessions); one session per process is opened through it.
_PROCESS_LOCK = threading.Lock()
#: PKCS#11 module loaded by this process -> the SOFTHSM2_CONF it was initialised with
#: (SoftHSM reads its configuration in C_Initialize).
LOADED_MODULES: dict[str, str | None] = {}
#: The one logged-in session per (module, token label) of this process, shared by every
#: ``Pkcs11Hsm`` opened on that token (a second login would fail: the process is logged in).
_SESSIONS: dict[tuple[str, str], _SharedSession] = {}
#: Guards the reconnect bookkeeping of ``_SharedSession`` (never held across a PKCS#11 call, so
#: the event loop can take it while a reconnect attempt holds ``_PROCESS_LOCK``).
_STATE_LOCK = threading.Lock()
#: Seconds from the loss of a session to the first reconnect attempt; each failed attempt
#: doubles the delay, up to ``RECONNECT_MAX`` seconds.
RECONNECT_INITIAL = 0.5
RECONNECT_MAX = 10.0
#: PKCS#11 errors meaning the session or the token is gone rather than the command being wrong
#: (see the module docstring). A stale object handle is one of them: SoftHSM reports it for
#: every token object once its token directory has gone; a key deleted by another process gives
#: it too (seen by ``_recheck``), and then the reconnect rebuilds the index without the key
#: (``KeyNotFound`` from then on).
_SESSION_LOST: tuple[type[p11e.PKCS11Error], ...] = (
    p11e.SessionHandleInvalid,
    p11e.SessionClosed,
    p11e.TokenNotPresent,
    p11e.TokenNotRecognised,
    p11e.DeviceRemoved,
    p11e.DeviceError,
    p11e.UserNotLoggedIn,
    p11e.ObjectHandleInvalid,
    p11e.KeyHandleInvalid,
    p11e.GeneralError,
)
#: Seconds between the reads that tell a session copy's token object is still there (see
#: "Session copies" in the module docstring): how long a key deleted by another process, or a
#: token gone, can still be used through its copy.
KEY_RECHECK = 0.25
#: Environment variable SoftHSM2 reads its configuration file name from.
_SOFTHSM_CONF_ENV = "SOFTHSM2_CONF"
#: Prefix and version of the CKA_ID convention described in the module docstring.
_ID_PREFIX = "cardswitch:1"
_PART_KEY = "key"
_PART_LEFT = "left"
#: AES-GCM tag length in bits, as CK_GCM_PARAMS takes it.
GCM_TAG_BITS = GCM_TAG_BYTES * 8
#: Length of generated HMAC keys (256 bits).
HMAC_GENERATED_BYTES = 32
#: CK_KEY_DERIVATION_STRING_DATA {CK_BYTE_PTR pData; CK_ULONG ulLen} in native layout.
_DERIVATION_STRING = "@PL"

#: PKCS#11 key type of each algorithm.
_KEY_TYPES: dict[KeyAlgorithm, KeyType] = {
    KeyAlgorithm.TDES_2KEY: KeyType.DES2,
    KeyAlgorithm.TDES_3KEY: KeyType.DES3,
    KeyAlgorithm.AES_128: KeyType.AES,
    KeyAlgorithm.AES_192: KeyType.AES,
    KeyAlgorithm.AES_256: KeyType.AES,
    KeyAlgorithm.HMAC_SHA256: KeyType.GENERIC_SECRET,
}
#: Capabilities of each usage (attributes set true; all others false).
_CAPABILITIES: dict[KeyUsage, tuple[Attribute, ...]] = {
    KeyUsage.ZPK: (Attribute.ENCRYPT, Attribute.DECRYPT),
    KeyUsage.PVK: (Attribute.ENCRYPT,),
    KeyUsage.CVK: (Attribute.ENCRYPT,),
    KeyUsage.IMK_AC: (Attribute.DERIVE,),
    KeyUsage.KEK: (Attribute.WRAP, Attribute.UNWRAP, Attribute.ENCRYPT, Attribute.DECRYPT),
    KeyUsage.HMAC: (Attribute.SIGN, Attribute.VERIFY),
    KeyUsage.DATA: (Attribute.ENCRYPT, Attribute.DECRYPT),
}
_ALL_CAPABILITIES = (
    Attribute.ENCRYPT,
    Attribute.DECRYPT,
    Attribute.WRAP,
    Attribute.UNWRAP,
    Attribute.SIGN,
    Attribute.VERIFY,
    Attribute.DERIVE,
)


@dataclass(frozen=True)
class SessionStatus:
    """Whether the token session is up, and how often it was reopened after a loss."""

    up: bool
    #: Successful reconnects since the session was first opened.
    reconnects: int
    #: Why the session was last lost or the last attempt failed (empty: never lost).
    error: str = ""


def reconnect_delay(previous: float | None) -> float:
    """Seconds before the next reconnect attempt: ``RECONNECT_INITIAL`` after the loss
    (``previous`` None), then double the previous delay, at most ``RECONNECT_MAX``."""
    if previous is None:
        return RECONNECT_INITIAL
    return min(previous * 2, RECONNECT_MAX)


@dataclass(eq=False)
class _SharedSession:
    """A logged-in session (None while lost), what is needed to open it again, its users and
    the reconnect bookkeeping (``_STATE_LOCK``)."""

    module: str
    token_label: str
    pin: str = field(repr=False)
    session: Any = field(repr=False)
    users: int = 0
    #: Incremented each time the session is dropped or replaced: older key handles are stale.
    generation: int = 0
    reconnecting: bool = False
    next_attempt: float = 0.0
    delay: float | None = None
    reconnects: int = 0
    error: str = ""

    @property
    def pin_digest(self) -> bytes:
        return _pin_digest(self.pin)

    def status(self) -> SessionStatus:
        return SessionStatus(self.session is not None, self.reconnects, self.error)

    def lose(self, why: str) -> None:
        """Drop the session after ``why`` (called with ``_PROCESS_LOCK`` held)."""
        if self.session is None:
            return
        self.session = None
        self.generation += 1
        with _STATE_LOCK:
            self.delay = reconnect_delay(None)
            self.next_attempt = time.monotonic() + self.delay
            self.error = why

    def kick(self) -> None:
        """Start a reconnect attempt in a worker thread if none runs and its delay passed."""
        with _STATE_LOCK:
            if self.reconnecting or self.session is not None:
                return
            if time.monotonic() < self.next_attempt:
                return
            self.reconnecting = True
        trio.lowlevel.start_thread_soon(self.reconnect, _ignore_outcome, name="hsm-reconnect")

    def reconnect(self) -> None:
        """One attempt: re-initialise the library, find the token, open a session, log in."""
        try:
            with _PROCESS_LOCK:
                if self.session is not None or _SESSIONS.get(self.key) is not self:
                    return  # reopened meanwhile, or closed by its last user
                try:
                    if os.environ.get(_SOFTHSM_CONF_ENV) != LOADED_MODULES.get(self.module):
                        raise RuntimeError("SOFTHSM2_CONF changed since the library was loaded")
                    lib = pkcs11.lib(self.module)
                    lib.reinitialize()  # closes every session of the module in this process
                    for other in _SESSIONS.values():
                        if other is not self and other.module == self.module:
                            other.lose("library re-initialised to reopen another token")
                            with _STATE_LOCK:
                                other.next_attempt = time.monotonic()
                    token = lib.get_token(token_label=self.token_label)
                    session = token.open(rw=True, user_pin=self.pin)
                except Exception as exc:  # any failure is one failed attempt, retried later
                    with _STATE_LOCK:
                        self.delay = reconnect_delay(self.delay)
                        self.next_attempt = time.monotonic() + self.delay
                        self.error = f"reconnect failed: {type(exc).__name__}"
                    return
                self.session = session
                self.generation += 1
                with _STATE_LOCK:
                    self.reconnects += 1
                    self.delay = None
        finally:
            with _STATE_LOCK:
                self.reconnecting = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.module, self.token_label)


def _ignore_outcome(_: object) -> None:
    """``start_thread_soon``'s deliver callback: ``reconnect`` records its own outcome."""


def _pin_digest(pin: str) -> bytes:
    return hashlib.sha256(pin.encode("utf-8")).digest()


@dataclass(frozen=True, eq=False)
class TokenKey:
    """A secret key object of the session and whether it is AES (else TDES).

    ``obj`` is what commands run on: for an indexed key, its session copy when the token
    allowed one (see "Session copies" in the module docstring), with the token object in
    ``token_obj``; for a key derived for one command, the derived session object itself.
    """

    obj: Any
    aes: bool = False
    token_obj: Any = None

    @property
    def stored(self) -> Any:
        """The object in the token: read its attributes, destroy it, through this."""
        return self.obj if self.token_obj is None else self.token_obj

    def __repr__(self) -> str:
        return f"TokenKey(aes={self.aes})"


class Pkcs11Cipher:
    """ECB block operations and in-token derivation (``BlockCipher[TokenKey]``).

    Called with ``_PROCESS_LOCK`` held.
    """

    def encrypt_block(self, key: TokenKey, data: bytes) -> bytes:
        mech = Mechanism.AES_ECB if key.aes else Mechanism.DES3_ECB
        return bytes(key.obj.encrypt(bytes(data), mechanism=mech))

    def decrypt_block(self, key: TokenKey, data: bytes) -> bytes:
        mech = Mechanism.AES_ECB if key.aes else Mechanism.DES3_ECB
        return bytes(key.obj.decrypt(bytes(data), mechanism=mech))

    def derive_tdes(self, key: TokenKey, data: bytes) -> TokenKey:
        return TokenKey(derive_des2(key.obj, data, token=False))

    def release(self, key: TokenKey) -> None:
        key.obj.destroy()


def derive_des2(
    base: Any, data: bytes, *, token: bool, extra: dict[Attribute, Any] | None = None
) -> Any:
    """CKM_DES3_ECB_ENCRYPT_DATA: a DES2 key whose value is TDES-ECB(base, data), in the token.

    The mechanism parameter is passed raw as a CK_KEY_DERIVATION_STRING_DATA; the buffer it
    points to lives until the call returns.
    """
    buf = ctypes.create_string_buffer(bytes(data), len(data))
    param = struct.pack(_DERIVATION_STRING, ctypes.addressof(buf), len(data))
    template: dict[Attribute, Any] = {
        Attribute.VALUE_LEN: DEFAULT,  # fixed by the DES2 key type; SoftHSM rejects it
        Attribute.ID: DEFAULT,
        Attribute.LABEL: DEFAULT,
        Attribute.TOKEN: token,
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.ENCRYPT: True,
        Attribute.DERIVE: True,
        Attribute.DECRYPT: False,
        Attribute.SIGN: False,
        Attribute.VERIFY: False,
        Attribute.WRAP: False,
        Attribute.UNWRAP: False,
    }
    template.update(extra or {})
    try:
        return base.derive_key(
            KeyType.DES2,
            128,
            mechanism=Mechanism.DES3_ECB_ENCRYPT_DATA,
            mechanism_param=param,
            template=template,
        )
    finally:
        ctypes.memset(buf, 0, len(data))


def _library(module: str) -> Any:
    """The process's library object, re-initialised if ``SOFTHSM2_CONF`` changed since.

    Called with ``_PROCESS_LOCK`` held. Re-initialising (C_Finalize, C_Initialize) closes every
    session of the process, so it is refused while a ``Pkcs11Hsm`` is open.
    """
    conf = os.environ.get(_SOFTHSM_CONF_ENV)
    lib = pkcs11.lib(module)
    if module in LOADED_MODULES and LOADED_MODULES[module] != conf:
        if _SESSIONS:
            raise HsmUnavailable(
                "PKCS#11 library already in use with another SOFTHSM2_CONF in this process"
            )
        lib.reinitialize()
    LOADED_MODULES[module] = conf
    return lib


def _object_id(usage: KeyUsage, algorithm: KeyAlgorithm, kcv: str, part: str) -> bytes:
    return f"{_ID_PREFIX}:{usage}:{algorithm}:{kcv}:{part}".encode("ascii")


def _parse_id(raw: bytes) -> tuple[KeyUsage, KeyAlgorithm, str, str] | None:
    try:
        prefix, version, usage, algorithm, kcv, part = raw.decode("ascii").split(":")
        if f"{prefix}:{version}" != _ID_PREFIX:
            return None
        return KeyUsage(usage), KeyAlgorithm(algorithm), kcv, part
    except ValueError:
        return None


def _token_kcv(obj: Any, algorithm: KeyAlgorithm) -> str:
    if algorithm is KeyAlgorithm.HMAC_SHA256:
        digest = obj.sign(bytes(AES_BLOCK), mechanism=Mechanism.SHA256_HMAC)
    elif algorithm in AES_ALGORITHMS:
        digest = obj.sign(bytes(AES_BLOCK), mechanism=Mechanism.AES_CMAC)
    else:
        digest = obj.encrypt(bytes(DES_BLOCK), mechanism=Mechanism.DES3_ECB)
    return bytes(digest[:KCV_BYTES]).hex().upper()


def _kcv_capability(algorithm: KeyAlgorithm) -> Attribute:
    if algorithm is KeyAlgorithm.HMAC_SHA256 or algorithm in AES_ALGORITHMS:
        return Attribute.SIGN
    return Attribute.ENCRYPT


class Pkcs11Hsm(CommandHsm[TokenKey]):
    """``Hsm`` on one logged-in PKCS#11 session (see the module docstring)."""

    def __init__(
        self,
        shared: _SharedSession,
        *,
        timeout: float,
        offload: bool = DEFAULT_OFFLOAD,
        rng: RandomBytes = secrets.token_bytes,
    ) -> None:
        """Use ``open`` rather than this constructor."""
        self._shared = shared
        self._session = shared.session
        self._generation = shared.generation
        self._timeout = timeout
        self._offload = offload
        self._limiter = trio.CapacityLimiter(1)
        super().__init__(Pkcs11Cipher(), rng)
        self._keys: dict[str, StoredKey[TokenKey]] = {}
        #: Session copy of each indexed token object, by the token object's handle.
        self._copies: dict[int, Any] = {}
        self._recheck_at = 0.0
        self._closed = False
        with _PROCESS_LOCK:
            self._load_keys()

    @classmethod
    def open(
        cls,
        module: Path | str,
        token_label: str,
        user_pin: str,
        *,
        timeout: float = 1.0,
        offload: bool = DEFAULT_OFFLOAD,
    ) -> Pkcs11Hsm:
        """Load the PKCS#11 module, find the token, log in, index the keys.

        Raises:
            HsmUnavailable: module missing or unloadable, no such token, login refused.
        """
        if not Path(module).exists():
            raise HsmUnavailable(f"PKCS#11 module {module} not found")
        key = (str(module), token_label)
        with _PROCESS_LOCK:
            shared = _SESSIONS.get(key)
            if shared is None:
                try:
                    lib = _library(str(module))
                    token = lib.get_token(token_label=token_label)
                    session = token.open(rw=True, user_pin=user_pin)
                except p11e.NoSuchToken:
                    raise HsmConfigError(
                        "hsm.token_label", f"no token labelled {token_label!r}"
                    ) from None
                except p11e.PinIncorrect:
                    raise HsmUnavailable(f"login to token {token_label!r} refused") from None
                except (p11e.PKCS11Error, RuntimeError, OSError) as exc:
                    name = type(exc).__name__
                    raise HsmUnavailable(f"PKCS#11 token unusable: {name}") from None
                shared = _SESSIONS[key] = _SharedSession(
                    str(module), token_label, user_pin, session
                )
            elif not hmac.compare_digest(shared.pin_digest, _pin_digest(user_pin)):
                raise HsmUnavailable(f"login to token {token_label!r} refused")
            elif shared.session is None:
                shared.kick()
                raise HsmUnavailable(f"token {token_label!r} session lost, reconnecting")
            shared.users += 1
        try:
            return cls(shared, timeout=timeout, offload=offload)
        except BaseException:
            with _PROCESS_LOCK:
                _release(shared)
            raise

    def __repr__(self) -> str:
        return f"Pkcs11Hsm(keys={len(self._keys)}, offload={self._offload})"

    @property
    def session_status(self) -> SessionStatus:
        """Whether the session is up (False while lost and being reopened), and how many
        times it was reopened; read from any thread without waiting for the token."""
        return self._shared.status()

    # ------------------------------------------------------------------ plumbing
    def _load_keys(self) -> None:
        keys: dict[str, dict[str, Any]] = {}
        infos: dict[str, KeyInfo] = {}
        # Token objects only: the session copies carry the same label and CKA_ID.
        wanted = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.TOKEN: True}
        for obj in self._session.get_objects(wanted):
            parsed = _parse_id(bytes(obj[Attribute.ID]))
            if parsed is None:
                continue
            usage, algorithm, kcv, part = parsed
            label = str(obj[Attribute.LABEL])
            keys.setdefault(label, {})[part] = obj
            if part == _PART_KEY:
                infos[label] = KeyInfo(label, usage, algorithm, kcv)
        if not infos.keys() >= self._keys.keys():
            self._check_token()  # keys gone: deleted, or the whole token (see the docstring)
        if self._generation != self._shared.generation:
            self._copies = {}  # gone with the session they were made in; handles meaningless
        unused, self._copies = self._copies, {}
        self._keys = {}
        for label, info in infos.items():
            self._index(info, keys[label][_PART_KEY], keys[label].get(_PART_LEFT), unused)
        for copy in unused.values():  # their token objects are no longer in the token
            copy.destroy()

    def _check_token(self) -> None:
        """Raise ``TokenNotPresent`` unless the slot list still shows the token."""
        lib = pkcs11.lib(self._shared.module)
        labels = {slot.get_token().label for slot in lib.get_slots(token_present=True)}
        if self._shared.token_label not in labels:
            raise p11e.TokenNotPresent()

    def _index(
        self, info: KeyInfo, obj: Any, left: Any | None, reuse: dict[int, Any] | None = None
    ) -> None:
        aes = info.algorithm in AES_ALGORITHMS
        half = self._session_copy(left, False, reuse) if left is not None else None
        self._keys[info.label] = StoredKey(info, self._session_copy(obj, aes, reuse), half)

    def _session_copy(self, obj: Any, aes: bool, reuse: dict[int, Any] | None) -> TokenKey:
        """``obj`` with the session copy commands will use (the one already made for it,
        from ``reuse``, if any), or alone if the token refuses to copy it."""
        copy = reuse.pop(obj.handle, None) if reuse is not None else None
        if copy is None:
            try:
                copy = obj.copy({Attribute.TOKEN: False})
            except _SESSION_LOST:
                raise
            except p11e.PKCS11Error:  # CKA_COPYABLE false, or no C_CopyObject: use the object
                return TokenKey(obj, aes)
        self._copies[obj.handle] = copy
        return TokenKey(copy, aes, obj)

    def _recheck(self) -> None:
        """Read CKA_ID of every token object behind a session copy: a token gone, or a key
        deleted by another process, raises here as a stale handle (``_SESSION_LOST``)."""
        self._recheck_at = time.monotonic() + KEY_RECHECK
        for stored in self._keys.values():
            for key in (stored.handle, stored.left):
                if key is not None and key.token_obj is not None:
                    key.token_obj[Attribute.ID]

    def _lookup(self, label: str) -> StoredKey[TokenKey]:
        """The key of ``label``; the index is reloaded once on a miss, so keys created by
        another ``Pkcs11Hsm`` or process (``cardswitch keys import``) are found. Called with
        ``_PROCESS_LOCK`` held."""
        stored = self._keys.get(label)
        if stored is None:
            self._load_keys()
            stored = self._keys.get(label)
            if stored is None:
                self._check_token()
        if stored is None:
            raise KeyNotFound(label)
        return stored

    def _key_check_value(self, label: str) -> str:
        """The indexed check value, after reading the key's CKA_ID from the token, so that
        a readiness probe sees a token that went away."""
        stored = self._lookup(label)
        stored.handle.stored[Attribute.ID]
        return stored.info.kcv

    def _locked(self, fn: Callable[..., T], *args: Any) -> T:
        with _PROCESS_LOCK:
            if self._closed:
                raise HsmUnavailable("HSM session closed")
            shared = self._shared
            if shared.session is None:
                shared.kick()
                raise HsmUnavailable(f"HSM session lost ({shared.error}), reconnecting")
            try:
                if self._generation != shared.generation:  # reopened: older handles are stale
                    self._session = shared.session
                    self._load_keys()
                    self._generation = shared.generation
                if self._copies and time.monotonic() >= self._recheck_at:
                    self._recheck()
                return fn(*args)
            except HsmError:
                raise
            except _SESSION_LOST as exc:
                shared.lose(f"{type(exc).__name__}")
                raise HsmUnavailable(f"PKCS#11 session lost: {type(exc).__name__}") from None
            except p11e.PKCS11Error as exc:
                raise HsmUnavailable(f"PKCS#11 error {type(exc).__name__}") from None

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        shared = self._shared
        if shared.session is None and not self._closed:
            # Fail fast while the session is being reopened: no lock, no thread hop.
            shared.kick()
            await trio.lowlevel.checkpoint()
            raise HsmUnavailable(f"HSM session lost ({shared.error}), reconnecting")
        if not self._offload:
            # Inline: one synchronous call on the loop, which nothing else can enter while it
            # runs (no lock needed) and no deadline can interrupt (no cancel scope either).
            return self._locked(fn, *args)
        try:
            with trio.fail_after(self._timeout):
                return await trio.to_thread.run_sync(
                    functools.partial(self._locked, fn, *args),
                    limiter=self._limiter,
                    abandon_on_cancel=True,
                )
        except trio.TooSlowError:
            raise HsmTimeout(f"HSM command exceeded {self._timeout}s") from None

    # ------------------------------------------------------------------ card-data primitives
    def _hmac_sha256(self, key: TokenKey, data: bytes) -> bytes:
        return bytes(key.obj.sign(data, mechanism=Mechanism.SHA256_HMAC))

    def _gcm_seal(self, key: TokenKey, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        params = GCMParams(nonce, aad, GCM_TAG_BITS)
        body = key.obj.encrypt(plaintext, mechanism=Mechanism.AES_GCM, mechanism_param=params)
        return bytes(body)

    def _gcm_open(self, key: TokenKey, nonce: bytes, body: bytes, aad: bytes) -> bytes:
        params = GCMParams(nonce, aad, GCM_TAG_BITS)
        try:
            return bytes(key.obj.decrypt(body, mechanism=Mechanism.AES_GCM, mechanism_param=params))
        except (p11e.EncryptedDataInvalid, p11e.GeneralError, p11e.FunctionFailed):
            # SoftHSM reports a failed GCM tag check as CKR_GENERAL_ERROR.
            raise DecryptionFailed("authentication failed") from None

    # ------------------------------------------------------------------ key management
    def _template(
        self, label: str, usage: KeyUsage, algorithm: KeyAlgorithm, part: str, kcv: str
    ) -> dict[Attribute, Any]:
        granted = set(_CAPABILITIES[usage])
        template: dict[Attribute, Any] = {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: _KEY_TYPES[algorithm],
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.LABEL: label,
            Attribute.ID: _object_id(usage, algorithm, kcv, part),
        }
        for cap in _ALL_CAPABILITIES:
            template[cap] = cap in granted
        # Granted for the key check value, revoked right after if the usage lacks it.
        template[_kcv_capability(algorithm)] = True
        return template

    def _finish(self, obj: Any, usage: KeyUsage, algorithm: KeyAlgorithm) -> str:
        """Compute the KCV in the token, revoke the KCV capability if not a usage one, and
        record the KCV in CKA_ID."""
        kcv = _token_kcv(obj, algorithm)
        cap = _kcv_capability(algorithm)
        if cap not in _CAPABILITIES[usage]:
            obj[cap] = False
        obj[Attribute.ID] = _object_id(usage, algorithm, kcv, _PART_KEY)
        return kcv

    def _import(
        self, label: str, usage: KeyUsage, value: bytes, algorithm: KeyAlgorithm
    ) -> KeyInfo:
        created: list[Any] = []
        try:
            template = self._template(label, usage, algorithm, _PART_KEY, "")
            template[Attribute.VALUE] = bytes(value)
            obj = self._session.create_object(template)
            created.append(obj)
            kcv = self._finish(obj, usage, algorithm)
            left = None
            if usage is KeyUsage.CVK:
                left_tpl = self._template(label, usage, algorithm, _PART_LEFT, kcv)
                left_tpl[Attribute.VALUE] = bytes(value[:DES_BLOCK]) * 2
                left = self._session.create_object(left_tpl)
                created.append(left)
        except BaseException:
            for obj in created:
                obj.destroy()
            raise
        info = KeyInfo(label, usage, algorithm, kcv)
        self._index(info, obj, left)
        return info

    def _generate(self, label: str, usage: KeyUsage, algorithm: KeyAlgorithm) -> KeyInfo:
        template = self._template(label, usage, algorithm, _PART_KEY, "")
        created: list[Any] = []
        try:
            left = None
            if usage is KeyUsage.CVK:
                # Derive the key and its left half from a random transient base so that both
                # objects hold consistent values none of which ever leaves the token.
                base = self._session.generate_key(
                    KeyType.DES2,
                    128,
                    store=False,
                    template={
                        Attribute.DERIVE: True,
                        Attribute.SENSITIVE: True,
                        Attribute.EXTRACTABLE: False,
                    },
                )
                try:
                    halves = self._rng(DES_BLOCK), self._rng(DES_BLOCK)
                    extra: dict[Attribute, Any] = {
                        a: v
                        for a, v in template.items()
                        if a not in (Attribute.CLASS, Attribute.KEY_TYPE)
                    }
                    obj = derive_des2(base, halves[0] + halves[1], token=True, extra=extra)
                    created.append(obj)
                    left_extra: dict[Attribute, Any] = dict(extra)
                    left_extra[Attribute.ID] = _object_id(usage, algorithm, "", _PART_LEFT)
                    left = derive_des2(base, halves[0] * 2, token=True, extra=left_extra)
                    created.append(left)
                finally:
                    base.destroy()
            else:
                obj = self._generate_plain(template, algorithm)
                created.append(obj)
            kcv = self._finish(obj, usage, algorithm)
            if left is not None:
                left[Attribute.ID] = _object_id(usage, algorithm, kcv, _PART_LEFT)
        except BaseException:
            for o in created:
                o.destroy()
            raise
        info = KeyInfo(label, usage, algorithm, kcv)
        self._index(info, obj, left)
        return info

    def _generate_plain(self, template: dict[Attribute, Any], algorithm: KeyAlgorithm) -> Any:
        tpl = {a: v for a, v in template.items() if a not in (Attribute.CLASS, Attribute.KEY_TYPE)}
        if algorithm is KeyAlgorithm.HMAC_SHA256:
            mech, key_type, bits = (
                Mechanism.GENERIC_SECRET_KEY_GEN,
                KeyType.GENERIC_SECRET,
                HMAC_GENERATED_BYTES * 8,
            )
        elif algorithm in AES_ALGORITHMS:
            mech, key_type, bits = Mechanism.AES_KEY_GEN, KeyType.AES, KEY_LENGTHS[algorithm] * 8
        elif algorithm is KeyAlgorithm.TDES_3KEY:
            mech, key_type, bits = Mechanism.DES3_KEY_GEN, KeyType.DES3, 192
        else:
            mech, key_type, bits = Mechanism.DES2_KEY_GEN, KeyType.DES2, 128
        return self._session.generate_key(key_type, bits, store=True, mechanism=mech, template=tpl)

    def _create_key(
        self, label: str, usage: KeyUsage, algorithm: KeyAlgorithm, value: bytes | None
    ) -> KeyInfo:
        if value is None:
            return self._generate(label, usage, algorithm)
        return self._import(label, usage, value, algorithm)

    def _key_infos(self) -> list[KeyInfo]:
        self._load_keys()
        return [stored.info for stored in self._keys.values()]

    def _destroy_key(self, stored: StoredKey[TokenKey]) -> None:
        for key in (stored.handle, stored.left):
            if key is None:
                continue
            key.stored.destroy()  # the token object first: the copy alone is harmless
            if key.token_obj is not None:
                self._copies.pop(key.token_obj.handle, None)
                key.obj.destroy()
        del self._keys[stored.info.label]

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._keys = {}
            shared = self._shared
            if shared.session is not None and self._generation == shared.generation:
                for copy in self._copies.values():  # the session may live on for others
                    with contextlib.suppress(p11e.PKCS11Error):
                        copy.destroy()
            self._copies = {}
            _release(shared)

    async def aclose(self) -> None:
        with _PROCESS_LOCK:
            self._close()
        await trio.lowlevel.checkpoint()


def _release(shared: _SharedSession) -> None:
    """One user less of ``shared``; the last one closes the session (``_PROCESS_LOCK`` held)."""
    shared.users -= 1
    if shared.users > 0:
        return
    if _SESSIONS.get(shared.key) is shared:
        del _SESSIONS[shared.key]
    session, shared.session = shared.session, None
    if session is not None:
        with contextlib.suppress(p11e.PKCS11Error):
            session.close()
