"""The block-cipher primitive the algorithms are written against, and helpers over it.

What lives here: ``BlockCipher`` (ECB encrypt/decrypt of whole blocks, TDES key derivation by
encryption, release of transient keys), ``TdesKey`` (a double-length key with its left half
as a single-DES key, which ISO 9797-1 MAC algorithm 3 and the CVV need), padding methods 1
and 2 of ISO/IEC 9797-1, the retail MAC, XOR, key check values and decimalization.

What does not: any concrete cipher (the backends provide them), payment algorithms.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

#: DES/TDES block size in bytes.
DES_BLOCK = 8
#: AES block size in bytes.
AES_BLOCK = 16
#: Bytes of a key check value (6 hex digits).
KCV_BYTES = 3

K = TypeVar("K")


class BlockCipher(Protocol[K]):
    """ECB block operations and in-HSM derivation over key handles of type ``K``.

    A backend implements it over clear keys (software) or token objects (PKCS#11). The block
    size follows the key: 8 bytes for TDES keys, 16 for AES keys.
    """

    def encrypt_block(self, key: K, data: bytes) -> bytes:
        """ECB-encrypt ``data`` (a whole number of blocks) under ``key``."""
        ...

    def decrypt_block(self, key: K, data: bytes) -> bytes:
        """ECB-decrypt ``data`` (a whole number of blocks) under ``key``."""
        ...

    def derive_tdes(self, key: K, data: bytes) -> K:
        """Return a transient double-length TDES key whose value is ``encrypt_block(key, data)``.

        ``data`` is 16 bytes. In a token this is CKM_DES3_ECB_ENCRYPT_DATA: the value stays
        inside. The caller releases the key with ``release``.
        """
        ...

    def release(self, key: K) -> None:
        """Destroy a transient key obtained from ``derive_tdes``."""
        ...


@dataclass(frozen=True)
class TdesKey(Generic[K]):
    """A double-length TDES key KL||KR and its left half KL as a single-DES key (KL||KL)."""

    full: K
    left: K

    def __repr__(self) -> str:
        return "TdesKey(<handles>)"


def xor(a: bytes | bytearray, b: bytes | bytearray) -> bytes:
    """Bytewise XOR of two equal-length strings."""
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def pad_method_1(data: bytes) -> bytes:
    """ISO/IEC 9797-1 padding method 1: zeros to a multiple of 8 (empty data: one block)."""
    if not data:
        return bytes(DES_BLOCK)
    return data + bytes(-len(data) % DES_BLOCK)


def pad_method_2(data: bytes) -> bytes:
    """ISO/IEC 9797-1 padding method 2: 0x80 then zeros to a multiple of 8."""
    data = data + b"\x80"
    return data + bytes(-len(data) % DES_BLOCK)


def blocks(data: bytes, size: int = DES_BLOCK) -> list[bytes]:
    """Split ``data`` into ``size``-byte blocks (its length must be a multiple of ``size``)."""
    if len(data) % size:
        raise ValueError("data is not a whole number of blocks")
    return [data[i : i + size] for i in range(0, len(data), size)]


def retail_mac(cipher: BlockCipher[K], key: TdesKey[K], padded: bytes) -> bytes:
    """ISO/IEC 9797-1 MAC algorithm 3 (retail MAC) over already padded data; 8 bytes.

    CBC under KL for every block, then the last chaining value is decrypted under KR and
    encrypted under KL, which is one TDES encryption of the last CBC input under KL||KR.
    """
    parts = blocks(padded)
    chain = bytes(DES_BLOCK)
    for part in parts[:-1]:
        chain = cipher.encrypt_block(key.left, xor(chain, part))
    return cipher.encrypt_block(key.full, xor(chain, parts[-1]))


def kcv(cipher: BlockCipher[K], key: K, block_size: int = DES_BLOCK) -> str:
    """Key check value by encrypting a zero block: first 3 bytes, upper-case hex."""
    return cipher.encrypt_block(key, bytes(block_size))[:KCV_BYTES].hex().upper()


def decimalize(hex_digits: Iterable[str], count: int) -> str:
    """Visa decimalization: the decimal digits left to right, then the letters A-F as 0-5.

    Used by the PVV and the CVV. Raises ``ValueError`` if fewer than ``count`` digits result.
    """
    digits = [h.upper() for h in hex_digits]
    out = [d for d in digits if d.isdigit()]
    if len(out) < count:
        out += [str(int(d, 16) - 10) for d in digits if not d.isdigit()]
    if len(out) < count:
        raise ValueError("not enough digits to decimalize")
    return "".join(out[:count])
