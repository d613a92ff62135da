"""PIN verification algorithms: Visa PVV and IBM 3624 natural PIN with offset.

What lives here: PVV generation (transformed security parameter under the PVK, decimalized),
IBM 3624 offset generation and the PIN it implies, validation-data expansion, and constant-time
comparison helpers for the backends.

What does not: PIN blocks (``pinblock``), keys.

Clear PINs come in as ``bytearray`` ASCII digits (see ``pinblock.wipe``); buffers built from
them here are wiped before returning.
"""

from __future__ import annotations

import hmac

from hsm.algorithms.pinblock import wipe
from hsm.algorithms.primitive import BlockCipher, K, decimalize
from hsm.errors import InvalidInput

#: Digits of a PVV and digits of the PIN it covers (the four leftmost).
PVV_DIGITS = 4
#: PAN digits in the transformed security parameter (11 rightmost, without check digit).
_TSP_PAN_DIGITS = 11
#: Hex digits of IBM 3624 validation data; shorter data is right-padded with the pad digit.
_VALIDATION_DIGITS = 16
_VALIDATION_PAD = "F"
#: Account-number placeholder in validation data, replaced by five account digits.
_ACCOUNT_PLACEHOLDER = "N"
_PLACEHOLDER_DIGITS = 5
#: Digits of the account number (12 rightmost PAN digits without check digit).
_ACCOUNT_DIGITS = 12


def pvv(cipher: BlockCipher[K], pvk: K, pan: str, pvki: str, pin: bytearray) -> str:
    """Visa PVV: TDES under the PVK of PAN(11) || PVKI || PIN(4 leftmost), decimalized.

    Args:
        cipher: the primitive.
        pvk: the PIN verification key (double-length TDES).
        pan: the PAN (at least 12 digits).
        pvki: one digit.
        pin: ASCII digits of the PIN (at least 4).
    """
    tsp = bytearray(pan[:-1][-_TSP_PAN_DIGITS:].encode("ascii") + pvki.encode("ascii"))
    tsp += pin[:PVV_DIGITS]
    packed = bytearray(bytes.fromhex(tsp.decode("ascii")))
    wipe(tsp)
    try:
        encrypted = cipher.encrypt_block(pvk, bytes(packed))
    finally:
        wipe(packed)
    return decimalize(encrypted.hex(), PVV_DIGITS)


def expand_validation_data(validation_data: str, pan: str) -> bytes:
    """Expand ``N`` to five account digits, right-pad with ``F`` to 16 hex digits, pack.

    Raises:
        InvalidInput: not 1 to 16 hex digits (after expansion), or more than one ``N``.
    """
    data = validation_data.upper()
    if data.count(_ACCOUNT_PLACEHOLDER) > 1:
        raise InvalidInput("validation_data", "at most one N placeholder")
    if _ACCOUNT_PLACEHOLDER in data:
        account = pan[:-1][-_ACCOUNT_DIGITS:]
        data = data.replace(_ACCOUNT_PLACEHOLDER, account[-_PLACEHOLDER_DIGITS:])
    if not 1 <= len(data) <= _VALIDATION_DIGITS or any(c not in "0123456789ABCDEF" for c in data):
        raise InvalidInput("validation_data", "must be 1 to 16 hex digits")
    return bytes.fromhex(data.ljust(_VALIDATION_DIGITS, _VALIDATION_PAD))


def _natural_pin(
    cipher: BlockCipher[K], pvk: K, dec_table: str, validation: bytes, length: int
) -> list[int]:
    """The IBM 3624 intermediate (natural) PIN: encrypted validation data, decimalized."""
    encrypted = cipher.encrypt_block(pvk, validation).hex().upper()
    return [int(dec_table[int(h, 16)]) for h in encrypted[:length]]


def ibm3624_offset(
    cipher: BlockCipher[K], pvk: K, dec_table: str, validation: bytes, pin: bytearray
) -> str:
    """IBM 3624 offset of ``pin``: (PIN - natural PIN) mod 10 digit by digit."""
    natural = _natural_pin(cipher, pvk, dec_table, validation, len(pin))
    return "".join(str((p - 0x30 - n) % 10) for p, n in zip(pin, natural, strict=True))


def ibm3624_check(
    cipher: BlockCipher[K],
    pvk: K,
    *,
    dec_table: str,
    validation: bytes,
    offset: str,
    pin: bytearray,
) -> bool:
    """Whether ``pin`` matches the offset: its leftmost ``len(offset)`` digits equal
    (natural PIN + offset) mod 10 (the offset's length is the PIN check length).
    """
    if len(pin) < len(offset):
        return False
    natural = _natural_pin(cipher, pvk, dec_table, validation, len(offset))
    expected = bytearray((n + int(o)) % 10 + 0x30 for n, o in zip(natural, offset, strict=True))
    try:
        return hmac.compare_digest(bytes(expected), bytes(pin[: len(offset)]))
    finally:
        wipe(expected)


def ibm3624_pin(
    cipher: BlockCipher[K], pvk: K, dec_table: str, validation: bytes, offset: str
) -> str:
    """The PIN an offset designates (natural PIN + offset mod 10); for tests and vectors."""
    natural = _natural_pin(cipher, pvk, dec_table, validation, len(offset))
    return "".join(str((n + int(o)) % 10) for n, o in zip(natural, offset, strict=True))
