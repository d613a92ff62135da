"""Card data at rest: the ``CardVault`` the store and the pipeline use for PANs.

What lives here: the ``CardVault`` protocol (keyed fingerprint for lookups, seal/unseal of the
PAN bound to the card record), ``HsmVault`` (HMAC-SHA-256 and AES-GCM inside the HSM through
``hsm.api.CardDataCrypto``), ``KmsVault`` re-exported from ``hsm.kms`` (envelope encryption on
AWS KMS),
``open_vault`` choosing one from the configuration, and ``ensure_card_data_keys`` creating
the HSM keys the configuration names (``cardswitch hsm init`` and the dev setup call it).

What does not: the cryptography itself (the HSM backends and KMS do it), the card store, KMS
key creation (an operator's job).

Errors, for both vaults: ``hsm.errors.InvalidInput`` for a malformed PAN or context,
``hsm.errors.DecryptionFailed`` when a blob does not open (wrong context, tampered, other
key), ``HsmUnavailable``/``HsmTimeout``/``KeyNotFound`` and other ``HsmError`` for failures
(``HsmVault.unseal`` raises ``KeyNotFound`` when the key named in the blob was deleted). No
message or repr carries the PAN.

``HsmVault`` blob format, version 1::

    0x11 | u8 len(key label) | key label (ASCII) | nonce (12) | ciphertext | tag (16)

The key label is kept so that a blob still opens after the configured encryption key is
rotated to a new label. The AES-GCM associated data is the header (version, label) followed by
the canonical JSON of the context (with ``purpose=pan``), so a blob opens only for the card
record it was sealed for.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol, runtime_checkable

from hsm.api import (
    GCM_NONCE_BYTES,
    GCM_TAG_BYTES,
    CardDataCrypto,
    Decryption,
    Encryption,
    Fingerprint,
    KeyAdmin,
    KeyGeneration,
    KeyUsage,
    check_label,
)
from hsm.config import CardDataConfig
from hsm.errors import DecryptionFailed, InvalidInput, KeyUsageError
from hsm.kms import KmsVault, canonical_context, pan_bytes, pan_context

__all__ = ["CardVault", "HsmVault", "KmsVault", "ensure_card_data_keys", "open_vault"]

#: First byte of an ``HsmVault`` version-1 blob; distinct from the KMS blob's 0x01 so that a
#: blob given to the wrong vault fails with a clear message.
HSM_BLOB_VERSION_1 = 0x11
#: Bytes the HSM adds around the ciphertext: 12-byte nonce and 16-byte GCM tag.
_HSM_OVERHEAD = GCM_NONCE_BYTES + GCM_TAG_BYTES


@runtime_checkable
class CardVault(Protocol):
    """Where PANs are turned into lookup fingerprints and sealed blobs, and back."""

    async def fingerprint(self, pan: str) -> bytes:
        """Keyed fingerprint (HMAC-SHA-256, 32 bytes): the same PAN always gives the same value."""
        ...

    async def seal(self, pan: str, context: Mapping[str, str]) -> bytes:
        """Encrypt ``pan`` bound to ``context`` (e.g. ``{"card_id": ...}``); returns the blob."""
        ...

    async def unseal(self, blob: bytes, context: Mapping[str, str]) -> str:
        """Return the PAN sealed in ``blob``; ``DecryptionFailed`` unless ``context`` matches."""
        ...


class HsmVault:
    """PAN fingerprint and encryption with keys that stay in the HSM.

    Args:
        hsm: the HSM command interface.
        fingerprint_key_label: label of an ``hmac`` key.
        encryption_key_label: label of a ``data`` (AES) key used by ``seal``.
    """

    def __init__(
        self, hsm: CardDataCrypto, fingerprint_key_label: str, encryption_key_label: str
    ) -> None:
        check_label(fingerprint_key_label)
        check_label(encryption_key_label)
        self._hsm = hsm
        self._fingerprint_key = fingerprint_key_label
        self._encryption_key = encryption_key_label

    def __repr__(self) -> str:
        return (
            f"HsmVault(fingerprint_key={self._fingerprint_key!r}, "
            f"encryption_key={self._encryption_key!r})"
        )

    async def fingerprint(self, pan: str) -> bytes:
        return await self._hsm.fingerprint(Fingerprint(self._fingerprint_key, pan_bytes(pan)))

    async def seal(self, pan: str, context: Mapping[str, str]) -> bytes:
        plain = pan_bytes(pan)
        header = _hsm_header(self._encryption_key)
        aad = header + canonical_context(pan_context(context))
        return header + await self._hsm.encrypt(Encryption(self._encryption_key, plain, aad))

    async def unseal(self, blob: bytes, context: Mapping[str, str]) -> str:
        ctx = canonical_context(pan_context(context))
        if len(blob) < 2 or blob[0] != HSM_BLOB_VERSION_1:
            raise DecryptionFailed("not an HSM-sealed PAN blob (unknown version)")
        end = 2 + blob[1]
        if blob[1] == 0 or len(blob) < end + _HSM_OVERHEAD:
            raise DecryptionFailed("HSM-sealed PAN blob is truncated")
        try:
            label = blob[2:end].decode("ascii")
            check_label(label)
        except (UnicodeDecodeError, InvalidInput):
            raise DecryptionFailed("HSM-sealed PAN blob has a malformed key label") from None
        plain = await self._hsm.decrypt(Decryption(label, blob[end:], blob[:end] + ctx))
        try:
            return pan_bytes(plain.decode("ascii")).decode("ascii")
        except (UnicodeDecodeError, InvalidInput):
            raise DecryptionFailed("sealed blob does not hold a PAN") from None


def _hsm_header(label: str) -> bytes:
    raw = label.encode("ascii")
    return bytes([HSM_BLOB_VERSION_1, len(raw)]) + raw


def open_vault(cfg: CardDataConfig, hsm: CardDataCrypto | None) -> CardVault:
    """The vault ``cfg.backend`` names.

    Args:
        cfg: the card-data section of the configuration.
        hsm: the open HSM; required for backend ``hsm``, unused for ``kms``.

    Raises:
        ValueError: backend ``hsm`` without an HSM.
    """
    if cfg.backend == "kms":
        return KmsVault.from_config(cfg)
    if hsm is None:
        raise ValueError("card_data.backend 'hsm' needs an open HSM")
    return HsmVault(hsm, cfg.fingerprint_key, cfg.encryption_key)


async def ensure_card_data_keys(hsm: KeyAdmin, cfg: CardDataConfig) -> list[str]:
    """Generate the card-data keys named in ``cfg`` that the HSM lacks; idempotent.

    For backend ``hsm``: an ``hmac`` key (fingerprint) and a ``data`` AES key (PAN
    encryption), generated inside the HSM. For backend ``kms`` nothing is created (the keys
    live in KMS).

    Returns:
        One human-readable line per key (label, usage, algorithm, KCV, generated/present).

    Raises:
        KeyUsageError: a key with that label exists with another usage.
    """
    if cfg.backend != "hsm":
        return [f"card data backend {cfg.backend!r}: no card-data keys in the HSM"]
    present = {info.label: info for info in await hsm.list_keys()}
    lines = []
    for label, usage in (
        (cfg.fingerprint_key, KeyUsage.HMAC),
        (cfg.encryption_key, KeyUsage.DATA),
    ):
        info = present.get(label)
        if info is None:
            info = await hsm.generate_key(KeyGeneration(label, usage))
            action = "generated"
        elif info.usage is not usage:
            raise KeyUsageError(label, str(usage), str(info.usage))
        else:
            action = "present"
        lines.append(f"key {label!r} ({info.usage}, {info.algorithm}) KCV {info.kcv}: {action}")
    return lines
