"""The command logic every HSM backend shares, written once over the backend's primitives.

What lives here: ``CommandHsm``, the base class of the software and PKCS#11 backends. It
implements every command of ``hsm.api.Hsm``: input validation, key lookup and usage checks,
and the composition of ``hsm.algorithms`` over the backend's ``BlockCipher``; card-data
commands over the backend's HMAC and AES-GCM; key administration over its key store. A
backend provides only its primitives (the hooks below) and how a command runs (``_run``:
a checkpoint in process, or a lock, a thread and a deadline for a token). ``StoredKey`` is how
a backend holds a key.

What does not: the primitives themselves (``hsm.software``, ``hsm.pkcs11``), the payment
algorithms (``hsm.algorithms``), the command interface and its values (``hsm.api``).
"""

from __future__ import annotations

import abc
import hmac
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from hsm.algorithms import cvv as cvv_alg
from hsm.algorithms import emv, pin, pinblock, tr31
from hsm.algorithms.pinblock import RandomBytes, wipe
from hsm.algorithms.primitive import DES_BLOCK, KCV_BYTES, BlockCipher, K, TdesKey, kcv
from hsm.api import (
    AES_ALGORITHMS,
    GCM_NONCE_BYTES,
    GCM_TAG_BYTES,
    KEY_LENGTHS,
    TDES_ALGORITHMS,
    ArpcGeneration,
    ArqcGeneration,
    ArqcResult,
    ArqcVerification,
    CvvGeneration,
    CvvVerification,
    Decryption,
    EmvCard,
    EmvKeyCheck,
    EmvKeyCheckValues,
    Encryption,
    Fingerprint,
    IbmOffsetGeneration,
    KeyAlgorithm,
    KeyGeneration,
    KeyImport,
    KeyInfo,
    KeyUsage,
    PinBlockFormat,
    PinTranslation,
    PinVerification,
    PvvGeneration,
    PvvReference,
    VerifyReason,
    VerifyResult,
    WrappedKeyFormat,
    WrappedKeyImport,
    check_bytes,
    check_digits,
    check_hex,
    check_label,
    check_pan,
    resolve_algorithm,
)
from hsm.errors import InvalidInput, KeyCheckFailed, KeyExists, KeyNotFound, KeyUsageError

T = TypeVar("T")

#: Lengths of the inputs checked here.
PVKI_DIGITS = 1
EXPIRY_DIGITS = 4
SERVICE_CODE_DIGITS = 3
DEC_TABLE_DIGITS = 16
OFFSET_MIN, OFFSET_MAX = 4, 12
#: Hex digits of a key check value.
KCV_HEX_DIGITS = 2 * KCV_BYTES


@dataclass(frozen=True)
class StoredKey(Generic[K]):
    """A key as a backend holds it: public information and handles.

    ``left`` is the key's left half as a single-DES key (KL||KL), kept for CVKs, whose CVV
    needs a single-DES step; ``None`` for other keys.
    """

    info: KeyInfo
    handle: K
    left: K | None = None

    def __repr__(self) -> str:
        return f"StoredKey({self.info!r})"


class CommandHsm(abc.ABC, Generic[K]):
    """Every ``Hsm`` command, over the primitives a backend provides (key handles of type ``K``).

    Each public coroutine validates what needs no key, then runs the synchronous command
    through ``_run``, so that key lookup and every primitive call happen wherever and under
    whatever lock the backend runs them.
    """

    def __init__(self, cipher: BlockCipher[K], rng: RandomBytes = secrets.token_bytes) -> None:
        """Args:
        cipher: the backend's block primitive.
        rng: random bytes for PIN block fill and AES-GCM nonces.
        """
        self._cipher = cipher
        self._rng = rng

    # ------------------------------------------------------------------ what a backend provides
    @abc.abstractmethod
    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run the synchronous command ``fn(*args)`` and return its result."""

    @abc.abstractmethod
    def _lookup(self, label: str) -> StoredKey[K]:
        """The stored key of ``label``; raises ``KeyNotFound``."""

    @abc.abstractmethod
    def _hmac_sha256(self, key: K, data: bytes) -> bytes:
        """HMAC-SHA-256 of ``data`` under an HMAC key."""

    @abc.abstractmethod
    def _gcm_seal(self, key: K, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        """AES-GCM: ciphertext || 16-byte tag."""

    @abc.abstractmethod
    def _gcm_open(self, key: K, nonce: bytes, body: bytes, aad: bytes) -> bytes:
        """Inverse of ``_gcm_seal``; raises ``DecryptionFailed`` when the tag does not verify."""

    @abc.abstractmethod
    def _create_key(
        self, label: str, usage: KeyUsage, algorithm: KeyAlgorithm, value: bytes | None
    ) -> KeyInfo:
        """Store ``value`` as a new key, or generate one inside when ``value`` is None.

        The label is known to be free and the algorithm to fit the usage (and the value).
        """

    @abc.abstractmethod
    def _key_infos(self) -> list[KeyInfo]:
        """Every key of the backend, current (a token re-reads its objects)."""

    @abc.abstractmethod
    def _destroy_key(self, stored: StoredKey[K]) -> None:
        """Destroy a key (and its left half) and forget it."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Release the backend; idempotent."""

    # ------------------------------------------------------------------ payment commands
    async def verify_pin(self, req: PinVerification) -> VerifyResult:
        return await self._run(self._verify_pin, req)

    async def translate_pin(self, req: PinTranslation) -> bytes:
        return await self._run(self._translate_pin, req)

    async def generate_pvv(self, req: PvvGeneration) -> str:
        return await self._run(self._generate_pvv, req)

    async def generate_ibm_offset(self, req: IbmOffsetGeneration) -> str:
        return await self._run(self._generate_ibm_offset, req)

    async def generate_cvv(self, req: CvvGeneration) -> str:
        return await self._run(self._generate_cvv, req)

    async def verify_cvv(self, req: CvvVerification) -> VerifyResult:
        return await self._run(self._verify_cvv, req)

    async def verify_arqc(self, req: ArqcVerification) -> ArqcResult:
        return await self._run(self._verify_arqc, req)

    async def generate_arqc(self, req: ArqcGeneration) -> bytes:
        return await self._run(self._generate_arqc, req)

    async def generate_arpc(self, req: ArpcGeneration) -> bytes:
        return await self._run(self._generate_arpc, req)

    async def emv_key_check_values(self, req: EmvKeyCheck) -> EmvKeyCheckValues:
        return await self._run(self._emv_key_check_values, req)

    # ------------------------------------------------------------------ card data
    async def fingerprint(self, req: Fingerprint) -> bytes:
        return await self._run(self._fingerprint, req)

    async def encrypt(self, req: Encryption) -> bytes:
        return await self._run(self._encrypt, req)

    async def decrypt(self, req: Decryption) -> bytes:
        return await self._run(self._decrypt, req)

    def _fingerprint(self, req: Fingerprint) -> bytes:
        return self._hmac_sha256(self._key(req.key, KeyUsage.HMAC).handle, bytes(req.data))

    def _encrypt(self, req: Encryption) -> bytes:
        key = self._key(req.key, KeyUsage.DATA).handle
        nonce = self._rng(GCM_NONCE_BYTES)
        return nonce + self._gcm_seal(key, nonce, bytes(req.plaintext), bytes(req.aad))

    def _decrypt(self, req: Decryption) -> bytes:
        key = self._key(req.key, KeyUsage.DATA).handle
        blob = bytes(req.blob)
        if len(blob) < GCM_NONCE_BYTES + GCM_TAG_BYTES:
            raise InvalidInput("blob", "shorter than nonce and tag")
        nonce, body = blob[:GCM_NONCE_BYTES], blob[GCM_NONCE_BYTES:]
        return self._gcm_open(key, nonce, body, bytes(req.aad))

    # ------------------------------------------------------------------ key management
    async def import_key(self, req: KeyImport) -> KeyInfo:
        check_label(req.label)
        usage = KeyUsage(req.usage)
        algorithm = resolve_algorithm(usage, req.algorithm, len(req.value))
        return await self._run(self._new_key, req.label, usage, algorithm, bytes(req.value))

    async def import_wrapped_key(self, req: WrappedKeyImport) -> KeyInfo:
        check_label(req.label)
        usage = KeyUsage(req.usage)
        fmt = WrappedKeyFormat(req.format)
        if req.kcv is not None:
            check_hex("kcv", req.kcv, KCV_HEX_DIGITS)
        return await self._run(self._import_wrapped, req, usage, fmt)

    async def generate_key(self, req: KeyGeneration) -> KeyInfo:
        check_label(req.label)
        usage = KeyUsage(req.usage)
        algorithm = resolve_algorithm(usage, req.algorithm, None)
        return await self._run(self._new_key, req.label, usage, algorithm, None)

    async def list_keys(self) -> list[KeyInfo]:
        return await self._run(self._list_keys)

    async def key_check_value(self, label: str) -> str:
        return await self._run(self._key_check_value, label)

    async def delete_key(self, label: str) -> None:
        await self._run(self._delete_key, label)

    def _new_key(
        self, label: str, usage: KeyUsage, algorithm: KeyAlgorithm, value: bytes | None
    ) -> KeyInfo:
        try:
            self._lookup(label)
        except KeyNotFound:
            return self._create_key(label, usage, algorithm, value)
        raise KeyExists(label)

    def _import_wrapped(
        self, req: WrappedKeyImport, usage: KeyUsage, fmt: WrappedKeyFormat
    ) -> KeyInfo:
        """Open the key under the KEK, store it, check its KCV (destroyed on a mismatch).

        The clear value passes through host memory (a ``bytearray`` wiped after the import):
        SoftHSM's ``C_UnwrapKey`` takes no TDES mechanism and knows no TR-31.
        """
        try:
            self._lookup(req.label)
        except KeyNotFound:
            pass
        else:
            raise KeyExists(req.label)
        kek = self._key(req.kek, KeyUsage.KEK)
        aes = kek.info.algorithm in AES_ALGORITHMS
        if fmt is WrappedKeyFormat.ECB:
            size = 16 if aes else DES_BLOCK
            check_hex("wrapped", req.wrapped, 2 * size, 64)
            data = bytes.fromhex(req.wrapped)
            if len(data) % size:
                raise InvalidInput("wrapped", f"must be whole {size}-byte blocks")
            value = bytearray(self._cipher.decrypt_block(kek.handle, data))
            header = None
        else:
            length = KEY_LENGTHS[kek.info.algorithm]
            try:
                header, value = tr31.open_key_block(
                    self._cipher, kek.handle, length, aes, req.wrapped
                )
            except tr31.KeyBlockRefused as exc:
                raise InvalidInput("wrapped", str(exc)) from None
        try:
            algorithm = req.algorithm
            if header is not None:
                algorithm = self._tr31_algorithm(header, usage, len(value), algorithm)
            algorithm = resolve_algorithm(usage, algorithm, len(value))
            info = self._create_key(req.label, usage, algorithm, bytes(value))
        finally:
            wipe(value)
        if req.kcv is not None and not hmac.compare_digest(info.kcv, req.kcv.upper()):
            self._destroy_key(self._lookup(req.label))
            raise KeyCheckFailed(req.label)
        return info

    @staticmethod
    def _tr31_algorithm(
        header: Any, usage: KeyUsage, length: int, wanted: KeyAlgorithm | None
    ) -> KeyAlgorithm:
        """The algorithm a TR-31 header says, checked against the usage asked for."""
        if header.key_usage not in tr31.TR31_KEY_USAGES[usage.value]:
            raise InvalidInput("wrapped", f"key block usage {header.key_usage} is not {usage}")
        name = tr31.TR31_ALGORITHMS.get((header.algorithm, length))
        if name is None:
            raise InvalidInput("wrapped", f"key block algorithm {header.algorithm} refused")
        algorithm = KeyAlgorithm(name)
        if wanted is not None and wanted is not algorithm:
            raise InvalidInput("wrapped", f"key block holds {algorithm}, not {wanted}")
        return algorithm

    def _list_keys(self) -> list[KeyInfo]:
        return sorted(self._key_infos(), key=lambda info: info.label)

    def _key_check_value(self, label: str) -> str:
        return self._lookup(label).info.kcv

    def _delete_key(self, label: str) -> None:
        self._destroy_key(self._lookup(label))

    # ------------------------------------------------------------------ keys
    def _key(self, label: str, usage: KeyUsage) -> StoredKey[K]:
        """Look a key up and check its usage.

        Raises:
            KeyNotFound: no such label.
            KeyUsageError: the key's usage differs.
        """
        stored = self._lookup(label)
        if stored.info.usage is not usage:
            raise KeyUsageError(label, str(usage), str(stored.info.usage))
        return stored

    def _tdes_pair(self, label: str, usage: KeyUsage) -> TdesKey[K]:
        stored = self._key(label, usage)
        if stored.left is None:
            raise KeyUsageError(label, "a double-length key with its left half", "another key")
        return TdesKey(stored.handle, stored.left)

    def _zpk(self, label: str, fmt: PinBlockFormat) -> K:
        stored = self._key(label, KeyUsage.ZPK)
        needed = AES_ALGORITHMS if fmt is PinBlockFormat.ISO_4 else TDES_ALGORITHMS
        if stored.info.algorithm not in needed:
            family = "an AES" if fmt is PinBlockFormat.ISO_4 else "a TDES"
            raise KeyUsageError(label, f"{family} zpk for format {int(fmt)}", "another algorithm")
        return stored.handle

    # ------------------------------------------------------------------ PIN
    def _check_pan_for(self, fmt: PinBlockFormat, pan: str) -> None:
        if fmt is not PinBlockFormat.ISO_1 or pan:
            check_pan(pan)

    def _decrypt_pin(self, zpk: str, fmt: PinBlockFormat, block: bytes, pan: str) -> bytearray:
        fmt = PinBlockFormat(fmt)
        self._check_pan_for(fmt, pan)
        check_bytes("pin_block", block, 16 if fmt is PinBlockFormat.ISO_4 else DES_BLOCK)
        return pinblock.decrypt(self._cipher, self._zpk(zpk, fmt), fmt, bytes(block), pan)

    def _verify_pin(self, req: PinVerification) -> VerifyResult:
        ref = req.reference
        check_pan(req.pan)
        if isinstance(ref, PvvReference):
            check_digits("pvki", ref.pvki, PVKI_DIGITS)
            check_digits("pvv", ref.pvv, pin.PVV_DIGITS)
            pvk = self._key(ref.pvk, KeyUsage.PVK).handle
        else:
            self._check_ibm(ref.dec_table, ref.offset)
            validation = pin.expand_validation_data(ref.validation_data, req.pan)
            pvk = self._key(ref.pvk, KeyUsage.PVK).handle
        try:
            clear = self._decrypt_pin(req.zpk, req.format, req.pin_block, req.pan)
        except pinblock.PinBlockError:
            return VerifyResult.failure(VerifyReason.PIN_BLOCK_INVALID)
        try:
            if isinstance(ref, PvvReference):
                computed = pin.pvv(self._cipher, pvk, req.pan, ref.pvki, clear)
                ok = hmac.compare_digest(computed.encode(), ref.pvv.encode())
            else:
                ok = pin.ibm3624_check(
                    self._cipher,
                    pvk,
                    dec_table=ref.dec_table,
                    validation=validation,
                    offset=ref.offset,
                    pin=clear,
                )
        finally:
            wipe(clear)
        return VerifyResult.success() if ok else VerifyResult.failure()

    def _translate_pin(self, req: PinTranslation) -> bytes:
        dest_fmt = PinBlockFormat(req.destination_format)
        self._check_pan_for(dest_fmt, req.pan)
        dest = self._zpk(req.destination_zpk, dest_fmt)
        clear = self._decrypt_pin(req.source_zpk, req.source_format, req.pin_block, req.pan)
        try:
            return pinblock.encrypt(self._cipher, dest, dest_fmt, clear, req.pan, rng=self._rng)
        finally:
            wipe(clear)

    @staticmethod
    def _check_ibm(dec_table: str, offset: str) -> None:
        check_digits("dec_table", dec_table, DEC_TABLE_DIGITS)
        check_digits("offset", offset, OFFSET_MIN, OFFSET_MAX)

    def _generate_pvv(self, req: PvvGeneration) -> str:
        check_pan(req.pan)
        check_digits("pvki", req.pvki, PVKI_DIGITS)
        clear = pinblock.pin_from_str(req.pin)
        try:
            pvk = self._key(req.pvk, KeyUsage.PVK).handle
            return pin.pvv(self._cipher, pvk, req.pan, req.pvki, clear)
        finally:
            wipe(clear)

    def _generate_ibm_offset(self, req: IbmOffsetGeneration) -> str:
        check_pan(req.pan)
        check_digits("dec_table", req.dec_table, DEC_TABLE_DIGITS)
        validation = pin.expand_validation_data(req.validation_data, req.pan)
        clear = pinblock.pin_from_str(req.pin)
        try:
            key = self._key(req.pvk, KeyUsage.PVK).handle
            return pin.ibm3624_offset(self._cipher, key, req.dec_table, validation, clear)
        finally:
            wipe(clear)

    # ------------------------------------------------------------------ CVV
    def _cvv(self, cvk: str, pan: str, expiry: str, service_code: str) -> str:
        check_pan(pan)
        check_digits("expiry", expiry, EXPIRY_DIGITS)
        check_digits("service_code", service_code, SERVICE_CODE_DIGITS)
        key = self._tdes_pair(cvk, KeyUsage.CVK)
        return cvv_alg.cvv(self._cipher, key, pan, expiry, service_code)

    def _generate_cvv(self, req: CvvGeneration) -> str:
        return self._cvv(req.cvk, req.pan, req.expiry, req.service_code)

    def _verify_cvv(self, req: CvvVerification) -> VerifyResult:
        check_digits("cvv", req.cvv, cvv_alg.CVV_DIGITS)
        computed = self._cvv(req.cvk, req.pan, req.expiry, req.service_code)
        ok = hmac.compare_digest(computed.encode(), req.cvv.encode())
        return VerifyResult.success() if ok else VerifyResult.failure()

    # ------------------------------------------------------------------ EMV
    def _imk(self, card: EmvCard) -> K:
        return self._key(card.imk, KeyUsage.IMK_AC).handle

    def _verify_arqc(self, req: ArqcVerification) -> ArqcResult:
        card = req.card
        check_bytes("arqc", req.arqc, emv.AC_BYTES)
        if req.arpc is not None:
            emv.check_arpc_request(card.cvn, req.arpc)
        imk = self._imk(card)
        with emv.card_keys(
            self._cipher, imk, card.cvn, pan=card.pan, psn=card.psn, atc=req.atc, un=req.un
        ) as keys:
            computed = emv.application_cryptogram(
                self._cipher, keys, card.cvn, bytes(req.transaction_data)
            )
            if not hmac.compare_digest(computed, bytes(req.arqc)):
                return ArqcResult(False, VerifyReason.MISMATCH)
            if req.arpc is None:
                return ArqcResult(True)
            return ArqcResult(
                True, arpc=emv.arpc(self._cipher, keys, card.cvn, bytes(req.arqc), req.arpc)
            )

    def _generate_arqc(self, req: ArqcGeneration) -> bytes:
        card = req.card
        imk = self._imk(card)
        with emv.card_keys(
            self._cipher, imk, card.cvn, pan=card.pan, psn=card.psn, atc=req.atc, un=req.un
        ) as keys:
            return emv.application_cryptogram(
                self._cipher, keys, card.cvn, bytes(req.transaction_data)
            )

    def _generate_arpc(self, req: ArpcGeneration) -> bytes:
        card = req.card
        check_bytes("arqc", req.arqc, emv.AC_BYTES)
        emv.check_arpc_request(card.cvn, req.arpc)
        imk = self._imk(card)
        with emv.card_keys(
            self._cipher, imk, card.cvn, pan=card.pan, psn=card.psn, atc=req.atc, un=req.un
        ) as keys:
            return emv.arpc(self._cipher, keys, card.cvn, bytes(req.arqc), req.arpc)

    def _emv_key_check_values(self, req: EmvKeyCheck) -> EmvKeyCheckValues:
        card = req.card
        imk = self._imk(card)
        with emv.card_keys(
            self._cipher, imk, card.cvn, pan=card.pan, psn=card.psn, atc=req.atc, un=req.un
        ) as keys:
            return EmvKeyCheckValues(
                icc_master_key=kcv(self._cipher, keys.icc.full),
                session_key=kcv(self._cipher, keys.ac.full),
            )


__all__ = ["CommandHsm", "StoredKey"]
