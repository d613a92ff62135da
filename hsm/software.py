"""Software reference backend of the HSM interface, on ``cryptography``.

What lives here: ``SoftwareHsm``, an in-memory ``Hsm`` whose keys are clear bytes in the
process (the primitives under ``hsm.backend.CommandHsm``, which holds the commands), and
``SoftwareCipher``, the block primitive the commands run over. It exists
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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.cmac import CMAC

from hsm.algorithms.pinblock import RandomBytes
from hsm.algorithms.primitive import AES_BLOCK, DES_BLOCK, KCV_BYTES
from hsm.api import AES_ALGORITHMS, KEY_LENGTHS, KeyAlgorithm, KeyInfo, KeyUsage
from hsm.backend import CommandHsm, StoredKey
from hsm.errors import DecryptionFailed, KeyNotFound

T = TypeVar("T")

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


class SoftwareHsm(CommandHsm[SoftKey]):
    """In-memory ``Hsm`` on ``cryptography`` (tests and development only)."""

    def __init__(self, rng: RandomBytes = secrets.token_bytes) -> None:
        super().__init__(SoftwareCipher(), rng)
        self._keys: dict[str, StoredKey[SoftKey]] = {}

    def __repr__(self) -> str:
        return f"SoftwareHsm(keys={len(self._keys)})"

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        # Commands take microseconds in process: run inline, but stay a checkpoint.
        await trio.lowlevel.checkpoint()
        return fn(*args)

    def _lookup(self, label: str) -> StoredKey[SoftKey]:
        try:
            return self._keys[label]
        except KeyError:
            raise KeyNotFound(label) from None

    def _hmac_sha256(self, key: SoftKey, data: bytes) -> bytes:
        return hmac.new(key.value, data, hashlib.sha256).digest()

    def _gcm_seal(self, key: SoftKey, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return AESGCM(key.value).encrypt(nonce, plaintext, aad)

    def _gcm_open(self, key: SoftKey, nonce: bytes, body: bytes, aad: bytes) -> bytes:
        try:
            return AESGCM(key.value).decrypt(nonce, body, aad)
        except InvalidTag:
            raise DecryptionFailed("authentication failed") from None

    def _create_key(
        self, label: str, usage: KeyUsage, algorithm: KeyAlgorithm, value: bytes | None
    ) -> KeyInfo:
        if value is None:
            value = secrets.token_bytes(KEY_LENGTHS.get(algorithm, HMAC_GENERATED_BYTES))
        info = KeyInfo(label, usage, algorithm, software_kcv(algorithm, value))
        aes = algorithm in AES_ALGORITHMS
        left = SoftKey(value[:DES_BLOCK] * 2) if usage is KeyUsage.CVK else None
        self._keys[label] = StoredKey(info, SoftKey(bytes(value), aes), left)
        return info

    def _key_infos(self) -> list[KeyInfo]:
        return [stored.info for stored in self._keys.values()]

    def _destroy_key(self, stored: StoredKey[SoftKey]) -> None:
        del self._keys[stored.info.label]

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        self._keys.clear()


__all__ = ["SoftKey", "SoftwareCipher", "SoftwareHsm", "software_kcv"]
