"""Software reference backend of the HSM interface, on ``cryptography``.

What lives here: ``SoftwareHsm``, an in-memory ``Hsm`` whose keys are clear bytes in the
process, and ``SoftwareCipher``, the block primitive the shared commands run over. It exists
for tests, development and as the baseline the PKCS#11 backend is benchmarked against.

What does not: persistence (keys live as long as the object), the default backend (the switch
uses ``hsm.pkcs11``; ``hsm.token.open_hsm`` only returns this one when the configuration asks
for ``backend = "software"``), the payment algorithms (``hsm.algorithms``).

Two-key TDES is passed to ``cryptography`` as K1||K2||K1 (it deprecates 16-byte keys).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.cmac import CMAC

from hsm.algorithms.commands import Commands, StoredKey
from hsm.algorithms.pinblock import RandomBytes
from hsm.algorithms.primitive import AES_BLOCK, DES_BLOCK, KCV_BYTES
from hsm.api import (
    AES_ALGORITHMS,
    KEY_LENGTHS,
    ArpcGeneration,
    ArqcGeneration,
    ArqcResult,
    ArqcVerification,
    EmvCard,
    EmvKeyCheckValues,
    KeyAlgorithm,
    KeyInfo,
    KeyUsage,
    PinTranslation,
    PinVerification,
    VerifyResult,
    check_label,
    resolve_algorithm,
)
from hsm.errors import DecryptionFailed, InvalidInput, KeyExists, KeyNotFound

#: AES-GCM nonce and tag lengths in bytes (NIST SP 800-38D recommended 96-bit nonce).
GCM_NONCE_BYTES = 12
GCM_TAG_BYTES = 16
#: Length of generated HMAC keys (256 bits).
HMAC_GENERATED_BYTES = 32
#: Length of a two-key TDES value.
_TDES_2KEY_BYTES = 16


@dataclass(frozen=True)
class SoftKey:
    """A clear key value and whether it is AES (otherwise TDES or HMAC)."""

    value: bytes = field(repr=False)
    aes: bool = False


def _tdes(value: bytes) -> TripleDES:
    if len(value) == _TDES_2KEY_BYTES:
        value = value + value[:DES_BLOCK]
    return TripleDES(value)


class SoftwareCipher:
    """ECB block operations on clear keys (``BlockCipher[SoftKey]``)."""

    def _cipher(self, key: SoftKey) -> Cipher[modes.ECB]:
        algo = algorithms.AES(key.value) if key.aes else _tdes(key.value)
        # ECB on single blocks is the primitive the payment algorithms are defined over.
        return Cipher(algo, modes.ECB())  # noqa: S305

    def encrypt_block(self, key: SoftKey, data: bytes) -> bytes:
        enc = self._cipher(key).encryptor()
        return enc.update(data) + enc.finalize()

    def decrypt_block(self, key: SoftKey, data: bytes) -> bytes:
        dec = self._cipher(key).decryptor()
        return dec.update(data) + dec.finalize()

    def derive_tdes(self, key: SoftKey, data: bytes) -> SoftKey:
        return SoftKey(self.encrypt_block(key, data))

    def release(self, key: SoftKey) -> None:
        """Nothing to destroy: the value is garbage-collected."""


def software_kcv(algorithm: KeyAlgorithm, value: bytes) -> str:
    """KCV as ``KeyInfo`` defines it, on a clear value."""
    if algorithm is KeyAlgorithm.HMAC_SHA256:
        digest = hmac.new(value, bytes(AES_BLOCK), hashlib.sha256).digest()
    elif algorithm in AES_ALGORITHMS:
        mac = CMAC(algorithms.AES(value))
        mac.update(bytes(AES_BLOCK))
        digest = mac.finalize()
    else:
        digest = SoftwareCipher().encrypt_block(SoftKey(value), bytes(DES_BLOCK))
    return digest[:KCV_BYTES].hex().upper()


class SoftwareHsm:
    """In-memory ``Hsm`` on ``cryptography`` (tests and development only)."""

    def __init__(self, rng: RandomBytes = secrets.token_bytes) -> None:
        self._keys: dict[str, StoredKey[SoftKey]] = {}
        self._rng = rng
        self._cipher = SoftwareCipher()
        self._commands = Commands(self._cipher, self._lookup, rng)

    def __repr__(self) -> str:
        return f"SoftwareHsm(keys={len(self._keys)})"

    def _lookup(self, label: str) -> StoredKey[SoftKey]:
        try:
            return self._keys[label]
        except KeyError:
            raise KeyNotFound(label) from None

    # ------------------------------------------------------------------ payment commands
    async def verify_pin(self, req: PinVerification) -> VerifyResult:
        await trio.lowlevel.checkpoint()
        return self._commands.verify_pin(req)

    async def translate_pin(self, req: PinTranslation) -> bytes:
        await trio.lowlevel.checkpoint()
        return self._commands.translate_pin(req)

    async def generate_pvv(self, pvk: str, pan: str, pvki: str, pin: str) -> str:
        await trio.lowlevel.checkpoint()
        return self._commands.generate_pvv(pvk, pan, pvki, pin)

    async def generate_ibm_offset(
        self, pvk: str, pan: str, pin: str, dec_table: str, validation_data: str
    ) -> str:
        await trio.lowlevel.checkpoint()
        return self._commands.generate_ibm_offset(pvk, pan, pin, dec_table, validation_data)

    async def generate_cvv(self, cvk: str, pan: str, expiry: str, service_code: str) -> str:
        await trio.lowlevel.checkpoint()
        return self._commands.generate_cvv(cvk, pan, expiry, service_code)

    async def verify_cvv(
        self, cvk: str, pan: str, expiry: str, service_code: str, cvv: str
    ) -> VerifyResult:
        await trio.lowlevel.checkpoint()
        return self._commands.verify_cvv(cvk, pan, expiry, service_code, cvv)

    async def verify_arqc(self, req: ArqcVerification) -> ArqcResult:
        await trio.lowlevel.checkpoint()
        return self._commands.verify_arqc(req)

    async def generate_arqc(self, req: ArqcGeneration) -> bytes:
        await trio.lowlevel.checkpoint()
        return self._commands.generate_arqc(req)

    async def generate_arpc(self, req: ArpcGeneration) -> bytes:
        await trio.lowlevel.checkpoint()
        return self._commands.generate_arpc(req)

    async def emv_key_check_values(
        self, card: EmvCard, atc: bytes, un: bytes = b""
    ) -> EmvKeyCheckValues:
        await trio.lowlevel.checkpoint()
        return self._commands.emv_key_check_values(card, atc, un)

    # ------------------------------------------------------------------ card data
    async def fingerprint(self, key: str, data: bytes) -> bytes:
        await trio.lowlevel.checkpoint()
        stored = self._commands.key(key, KeyUsage.HMAC)
        return hmac.new(stored.handle.value, data, hashlib.sha256).digest()

    async def encrypt(self, key: str, plaintext: bytes, aad: bytes) -> bytes:
        await trio.lowlevel.checkpoint()
        stored = self._commands.key(key, KeyUsage.DATA)
        nonce = self._rng(GCM_NONCE_BYTES)
        return nonce + AESGCM(stored.handle.value).encrypt(nonce, plaintext, aad)

    async def decrypt(self, key: str, blob: bytes, aad: bytes) -> bytes:
        await trio.lowlevel.checkpoint()
        stored = self._commands.key(key, KeyUsage.DATA)
        if len(blob) < GCM_NONCE_BYTES + GCM_TAG_BYTES:
            raise InvalidInput("blob", "shorter than nonce and tag")
        nonce, body = blob[:GCM_NONCE_BYTES], blob[GCM_NONCE_BYTES:]
        try:
            return AESGCM(stored.handle.value).decrypt(nonce, body, aad)
        except InvalidTag:
            raise DecryptionFailed("authentication failed") from None

    # ------------------------------------------------------------------ key management
    def _store(self, label: str, usage: KeyUsage, algorithm: KeyAlgorithm, value: bytes) -> KeyInfo:
        info = KeyInfo(label, usage, algorithm, software_kcv(algorithm, value))
        aes = algorithm in AES_ALGORITHMS
        left = SoftKey(value[:DES_BLOCK] * 2) if usage is KeyUsage.CVK else None
        self._keys[label] = StoredKey(info, SoftKey(bytes(value), aes), left)
        return info

    async def import_key(
        self,
        label: str,
        usage: KeyUsage,
        value: bytes,
        algorithm: KeyAlgorithm | None = None,
    ) -> KeyInfo:
        await trio.lowlevel.checkpoint()
        check_label(label)
        usage = KeyUsage(usage)
        algorithm = resolve_algorithm(usage, algorithm, len(value))
        if label in self._keys:
            raise KeyExists(label)
        return self._store(label, usage, algorithm, value)

    async def generate_key(
        self, label: str, usage: KeyUsage, algorithm: KeyAlgorithm | None = None
    ) -> KeyInfo:
        await trio.lowlevel.checkpoint()
        check_label(label)
        usage = KeyUsage(usage)
        algorithm = resolve_algorithm(usage, algorithm, None)
        if label in self._keys:
            raise KeyExists(label)
        length = KEY_LENGTHS.get(algorithm, HMAC_GENERATED_BYTES)
        return self._store(label, usage, algorithm, secrets.token_bytes(length))

    async def list_keys(self) -> list[KeyInfo]:
        await trio.lowlevel.checkpoint()
        return sorted((k.info for k in self._keys.values()), key=lambda i: i.label)

    async def key_check_value(self, label: str) -> str:
        await trio.lowlevel.checkpoint()
        return self._lookup(label).info.kcv

    async def delete_key(self, label: str) -> None:
        await trio.lowlevel.checkpoint()
        self._lookup(label)
        del self._keys[label]

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        self._keys.clear()


__all__ = ["SoftKey", "SoftwareCipher", "SoftwareHsm", "software_kcv"]
