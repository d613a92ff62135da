"""Visa card verification values: CVV (magnetic stripe), CVV2 (service code 000), iCVV (999).

What lives here: the CVV computation over a ``BlockCipher``: PAN || expiry (YYMM) || service
code, zero-padded to two 8-byte blocks; the first encrypted under CVK-A alone, XORed with the
second, encrypted under CVK-A||CVK-B; the result decimalized to three digits.

What does not: keys, input validation (``hsm.api`` helpers, called by the backends).
"""

from __future__ import annotations

from hsm.algorithms.primitive import DES_BLOCK, BlockCipher, K, TdesKey, decimalize, xor

#: Digits of a CVV.
CVV_DIGITS = 3
#: Hex digits of the two input blocks.
_INPUT_DIGITS = 32
#: Service codes that turn the CVV into a CVV2 and an iCVV.
CVV2_SERVICE_CODE = "000"
ICVV_SERVICE_CODE = "999"


def cvv(cipher: BlockCipher[K], cvk: TdesKey[K], pan: str, expiry: str, service_code: str) -> str:
    """Compute a CVV.

    Args:
        cipher: the primitive.
        cvk: CVK-A||CVK-B with CVK-A as ``left``.
        pan: the PAN (up to 19 digits).
        expiry: YYMM.
        service_code: 3 digits.
    """
    data = bytes.fromhex((pan + expiry + service_code).ljust(_INPUT_DIGITS, "0"))
    first, second = data[:DES_BLOCK], data[DES_BLOCK:]
    step = xor(cipher.encrypt_block(cvk.left, first), second)
    result = cipher.encrypt_block(cvk.full, step)
    return decimalize(result.hex(), CVV_DIGITS)
