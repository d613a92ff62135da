"""TR-31 key blocks opened under a key-block protection key that stays in the HSM.

What lives here: ``open_key_block``, which opens a TR-31 (ANSI X9.143) key block of version B
(TDES key-block protection key) or D (AES) when the KBPK is a key handle of a
``BlockCipher``: the two key-derivation steps that need the KBPK (the CMAC subkey, from the
encryption of a zero block, and the CMAC of each derivation block, a single-block
encryption) are run through the cipher, so the KBPK itself is never in host memory; the rest
(header parsing, CBC decryption, MAC check, length field) is ``psec.tr31``'s, which is given
the derived block-encryption and block-authentication keys only. ``TR31_KEY_USAGES`` and
``TR31_ALGORITHMS`` are the header values accepted for our key usages and algorithms.

What does not: importing the opened key (``hsm.backend``), opening a block with a clear
KBPK (``switch.cli.hsm``, development and test), wrapping. Versions A and C derive their keys
by XOR-ing the KBPK with a constant (the variant method), which cannot be done through an
encrypt-only handle: they are refused here.

The opened key value is returned in a ``bytearray`` the caller wipes; the derived keys are
in host memory for the duration of the call (a payment HSM keeps both inside).
"""

from __future__ import annotations

import warnings
from typing import Any, Final

import psec.tr31
from cryptography.utils import CryptographyDeprecationWarning

from hsm.algorithms.primitive import AES_BLOCK, DES_BLOCK, BlockCipher, K, xor

__all__ = ["TR31_ALGORITHMS", "TR31_KEY_USAGES", "KeyBlockRefused", "open_key_block"]

#: TR-31 key usage (header bytes 5-6) accepted for each of our key usages (hsm.api.KeyUsage
#: values): P0 PIN encryption, K0/K1 key encryption / key-block protection, and so on.
TR31_KEY_USAGES: Final[dict[str, frozenset[str]]] = {
    "zpk": frozenset({"P0"}),
    "pvk": frozenset({"V0", "V1", "V2"}),
    "cvk": frozenset({"C0"}),
    "imk-ac": frozenset({"E0"}),
    "kek": frozenset({"K0", "K1"}),
    "data": frozenset({"D0"}),
    "hmac": frozenset({"M7"}),
}
#: TR-31 algorithm (header byte 7) and key length -> hsm.api.KeyAlgorithm value.
TR31_ALGORITHMS: Final[dict[tuple[str, int], str]] = {
    ("T", 16): "tdes-2key",
    ("T", 24): "tdes-3key",
    ("A", 16): "aes-128",
    ("A", 24): "aes-192",
    ("A", 32): "aes-256",
}
#: CMAC subkey constants R_b (NIST SP 800-38B) of 64- and 128-bit block ciphers.
_RB: Final = {DES_BLOCK: 0x1B, AES_BLOCK: 0x87}


class KeyBlockRefused(ValueError):
    """The block cannot be opened: malformed, another version, wrong KBPK or a bad MAC.

    The message names the rule, never a key or block byte.
    """


def _double(block: bytes) -> bytes:
    """Multiplication by x in GF(2^n): one CMAC subkey step (NIST SP 800-38B 6.1)."""
    n = len(block)
    value = int.from_bytes(block, "big") << 1
    if value >> (8 * n):
        value ^= _RB[n]
    return (value & ((1 << (8 * n)) - 1)).to_bytes(n, "big")


class _HandleKeyBlock(psec.tr31.KeyBlock):
    """psec's key block with the two KBPK-keyed derivations run through a cipher handle.

    ``kbpk`` holds a zero placeholder of the KBPK's length, which psec checks; it is never
    used as a key: only versions B and D are let through, and their derivations are these.
    """

    def __init__(self, cipher: BlockCipher[K], kbpk: K, kbpk_len: int, block: str) -> None:
        super().__init__(bytes(kbpk_len), block)
        self._cipher: BlockCipher[Any] = cipher
        self._handle: Any = kbpk

    def _encrypt(self, data: bytes) -> bytes:
        return self._cipher.encrypt_block(self._handle, data)

    def _derive(self, kd: bytearray, size: int, calls: int, subkey: int) -> tuple[bytes, bytes]:
        k1 = _double(self._encrypt(bytes(size)))
        k = k1 if subkey == 1 else _double(k1)
        kbek, kbak = bytearray(), bytearray()
        for i in range(1, calls + 1):
            kd[0] = i
            kd[1:3] = b"\x00\x00"
            kbek += self._encrypt(xor(kd, k))
            kd[1:3] = b"\x00\x01"
            kbak += self._encrypt(xor(kd, k))
        n = len(self.kbpk)
        return bytes(kbek[:n]), bytes(kbak[:n])

    def _b_derive(self) -> tuple[bytes, bytes]:
        # X9.143 / TR-31:2018 5.3.2.1: counter, usage (0000 encryption, 0001 MAC),
        # separator, algorithm (0000 2TDEA, 0001 3TDEA), length in bits; CMAC with K1.
        three = len(self.kbpk) == 24
        kd = bytearray(b"\x01\x00\x00\x00\x00" + (b"\x01\x00\xc0" if three else b"\x00\x00\x80"))
        return self._derive(kd, DES_BLOCK, 3 if three else 2, 1)

    def _d_derive(self) -> tuple[bytes, bytes]:
        # Same derivation data for AES (0002/0003/0004, 0080/00C0/0100), padded to a block
        # (80 00..): CMAC with K2.
        n = len(self.kbpk)
        algo, bits = {16: (b"\x00\x02", b"\x00\x80"), 24: (b"\x00\x03", b"\x00\xc0")}.get(
            n, (b"\x00\x04", b"\x01\x00")
        )
        kd = bytearray(b"\x01\x00\x00\x00" + algo + bits + b"\x80" + bytes(7))
        return self._derive(kd, AES_BLOCK, 1 if n == 16 else 2, 2)


def open_key_block(
    cipher: BlockCipher[K], kbpk: K, kbpk_len: int, aes: bool, block: str
) -> tuple[psec.tr31.Header, bytearray]:
    """Open ``block`` under the KBPK handle ``kbpk``; the header and the key it carries.

    Args:
        cipher: the backend's block primitive.
        kbpk: the key-block protection key (a KEK of the HSM).
        kbpk_len: its length in bytes (16 or 24 for TDES; 16, 24 or 32 for AES).
        aes: whether it is an AES key (version D) rather than TDES (version B).
        block: the key block text.

    Raises:
        KeyBlockRefused: not a well-formed block of the KBPK's version, or its MAC does
            not verify under the KBPK.
    """
    if not block.isascii() or not block:
        raise KeyBlockRefused("key block must be ASCII text")
    version = "D" if aes else "B"
    if block[0] != version:
        raise KeyBlockRefused(f"key block version {block[0]!r} refused; this KBPK opens {version}")
    try:
        with warnings.catch_warnings():
            # psec still uses the two-key TripleDES that cryptography deprecates.
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            kb = _HandleKeyBlock(cipher, kbpk, kbpk_len, block)
            value = bytearray(kb.unwrap(block))
    except (psec.tr31.HeaderError, psec.tr31.KeyBlockError) as exc:
        raise KeyBlockRefused(_rule(exc)) from None
    return kb.header, value


def _rule(exc: Exception) -> str:
    """psec's message without the data it quotes (key data, MAC): the rule alone."""
    text = str(exc)
    for stop in (" Key data: '", " MAC: '", ": '"):
        text = text.split(stop, 1)[0]
    return text.strip() or type(exc).__name__
