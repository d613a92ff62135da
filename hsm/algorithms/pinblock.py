"""ISO 9564-1 PIN blocks: formats 0, 1 and 3 (TDES, 8 bytes) and format 4 (AES, 16 bytes).

What lives here: building and parsing clear PIN blocks, and enciphering/deciphering them over
a ``BlockCipher`` (format 4 is the two-pass AES construction of ISO 9564-1:2017).

What does not: keys, PIN verification (``pin``).

The clear PIN is handled as a ``bytearray`` of ASCII digits so that callers can wipe it
(``wipe``) when done; intermediate buffers built here are wiped before returning. This is best
effort: CPython may still leave transient copies in freed memory.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

from hsm.algorithms.primitive import AES_BLOCK, DES_BLOCK, BlockCipher, K, xor
from hsm.api import PinBlockFormat
from hsm.errors import InvalidInput
from hsm.pan import PAN_MAX_DIGITS, PIN_MAX_DIGITS, PIN_MIN_DIGITS, is_digits

#: Source of random bytes for fill digits; ``secrets.token_bytes`` unless a test injects one.
RandomBytes = Callable[[int], bytes]
#: Nibbles in an 8-byte block (formats 0, 1, 3) and in format 4's plain-text PIN field half.
_NIBBLES = 16
#: Fill nibble of format 0 (F) and of format 4's PIN field (A).
_FILL_F = 0xF
_FILL_A = 0xA
#: Digits of the account number in the PAN field of formats 0 and 3.
_ACCOUNT_DIGITS = 12


class PinBlockError(InvalidInput):
    """A deciphered PIN block is not well formed for its format (wrong key, format or data)."""

    def __init__(self, reason: str) -> None:
        super().__init__("pin_block", reason)


def wipe(buf: bytearray) -> None:
    """Overwrite a buffer holding a clear PIN or PIN block with zeros."""
    for i in range(len(buf)):
        buf[i] = 0


def pin_from_str(pin: str) -> bytearray:
    """Validate a clear PIN (4 to 12 digits) and return it as a wipeable buffer."""
    if not is_digits(pin) or not PIN_MIN_DIGITS <= len(pin) <= PIN_MAX_DIGITS:
        raise InvalidInput("pin", f"must be {PIN_MIN_DIGITS} to {PIN_MAX_DIGITS} digits")
    return bytearray(pin.encode("ascii"))


def _pack(nibbles: bytearray) -> bytearray:
    out = bytearray((nibbles[i] << 4) | nibbles[i + 1] for i in range(0, len(nibbles), 2))
    wipe(nibbles)
    return out


def _unpack(data: bytes | bytearray) -> bytearray:
    out = bytearray()
    for b in data:
        out.append(b >> 4)
        out.append(b & 0xF)
    return out


def _random_nibbles(count: int, low: int, rng: RandomBytes) -> bytearray:
    """``count`` uniform random nibbles in ``low``..15 (rejection sampling on bytes)."""
    span = 16 - low
    limit = 256 - 256 % span
    out = bytearray()
    while len(out) < count:
        for b in rng(count):
            if b < limit and len(out) < count:
                out.append(low + b % span)
    return out


def _pin_field(fmt: int, pin: bytearray, fill: bytearray) -> bytearray:
    """Control nibble, length nibble, PIN digits, then ``fill`` up to 16 nibbles."""
    if not PIN_MIN_DIGITS <= len(pin) <= PIN_MAX_DIGITS:
        raise InvalidInput("pin", f"must be {PIN_MIN_DIGITS} to {PIN_MAX_DIGITS} digits")
    nibbles = bytearray([fmt, len(pin)])
    for ch in pin:
        if not 0x30 <= ch <= 0x39:
            raise InvalidInput("pin", "must be decimal digits")
        nibbles.append(ch - 0x30)
    nibbles += fill[: _NIBBLES - len(nibbles)]
    wipe(fill)
    return _pack(nibbles)


def account_field(pan: str) -> bytes:
    """PAN field of formats 0 and 3: 0000 and the 12 rightmost digits without check digit."""
    _check_pan(pan)
    account = pan[:-1][-_ACCOUNT_DIGITS:].rjust(_ACCOUNT_DIGITS, "0")
    return bytes.fromhex("0000" + account)


def format4_pan_field(pan: str) -> bytes:
    """PAN field of format 4: length indicator (len - 12), the PAN (>= 12 digits), zero pad."""
    _check_pan(pan)
    indicator = max(len(pan) - _ACCOUNT_DIGITS, 0)
    digits = f"{indicator:X}" + pan.rjust(_ACCOUNT_DIGITS, "0")
    return bytes.fromhex(digits.ljust(2 * AES_BLOCK, "0"))


def _check_pan(pan: str) -> None:
    if not is_digits(pan) or not 1 <= len(pan) <= PAN_MAX_DIGITS:
        raise InvalidInput("pan", f"must be 1 to {PAN_MAX_DIGITS} digits")


def encode(
    fmt: PinBlockFormat, pin: bytearray, pan: str, rng: RandomBytes = secrets.token_bytes
) -> bytearray:
    """Build the clear PIN block of format 0, 1 or 3 (8 bytes) or format 4's PIN field (16).

    Args:
        fmt: the format.
        pin: ASCII digits of the PIN (not modified).
        pan: the PAN (ignored by format 1).
        rng: random source for fill digits (formats 1, 3, 4).
    """
    if fmt is PinBlockFormat.ISO_0:
        block = _pin_field(0, pin, bytearray([_FILL_F] * _NIBBLES))
        result = bytearray(xor(block, account_field(pan)))
    elif fmt is PinBlockFormat.ISO_1:
        result = _pin_field(1, pin, _random_nibbles(_NIBBLES, 0, rng))
        return result
    elif fmt is PinBlockFormat.ISO_3:
        block = _pin_field(3, pin, _random_nibbles(_NIBBLES, 0xA, rng))
        result = bytearray(xor(block, account_field(pan)))
    else:
        _check_pan(pan)
        block = _pin_field(4, pin, bytearray([_FILL_A] * _NIBBLES))
        return block + bytearray(rng(DES_BLOCK))
    wipe(block)
    return result


def decode(fmt: PinBlockFormat, clear: bytes, pan: str) -> bytearray:
    """Parse a clear PIN block (format 4: the deciphered PIN field) and return the PIN digits.

    Raises:
        PinBlockError: control nibble, length, digits or fill are not those of ``fmt``.
    """
    size = AES_BLOCK if fmt is PinBlockFormat.ISO_4 else DES_BLOCK
    if len(clear) != size:
        raise PinBlockError(f"must be {size} bytes")
    if fmt in (PinBlockFormat.ISO_0, PinBlockFormat.ISO_3):
        field = bytearray(xor(clear, account_field(pan)))
    else:
        field = bytearray(clear)
    nibbles = _unpack(field[:DES_BLOCK])
    wipe(field)
    try:
        return _parse_pin_field(fmt, nibbles)
    finally:
        wipe(nibbles)


def _parse_pin_field(fmt: PinBlockFormat, nibbles: bytearray) -> bytearray:
    if nibbles[0] != int(fmt):
        raise PinBlockError("control field does not match the format")
    length = nibbles[1]
    if not PIN_MIN_DIGITS <= length <= PIN_MAX_DIGITS:
        raise PinBlockError("PIN length out of range")
    digits = nibbles[2 : 2 + length]
    fill = nibbles[2 + length :]
    if any(d > 9 for d in digits):
        wipe(digits)
        raise PinBlockError("PIN digits are not decimal")
    bad_fill = (
        (fmt is PinBlockFormat.ISO_0 and any(f != _FILL_F for f in fill))
        or (fmt is PinBlockFormat.ISO_3 and any(f < 0xA for f in fill))
        or (fmt is PinBlockFormat.ISO_4 and any(f != _FILL_A for f in fill))
    )
    if bad_fill:
        wipe(digits)
        raise PinBlockError("fill digits do not match the format")
    pin = bytearray(d + 0x30 for d in digits)
    wipe(digits)
    return pin


def encrypt(
    cipher: BlockCipher[K],
    key: K,
    fmt: PinBlockFormat,
    pin: bytearray,
    pan: str,
    *,
    rng: RandomBytes = secrets.token_bytes,
) -> bytes:
    """Build and encipher a PIN block under ``key`` (TDES for 0/1/3, AES for 4)."""
    clear = encode(fmt, pin, pan, rng)
    try:
        if fmt is not PinBlockFormat.ISO_4:
            return cipher.encrypt_block(key, bytes(clear))
        intermediate = cipher.encrypt_block(key, bytes(clear))
        return cipher.encrypt_block(key, xor(intermediate, format4_pan_field(pan)))
    finally:
        wipe(clear)


def decrypt(
    cipher: BlockCipher[K], key: K, fmt: PinBlockFormat, block: bytes, pan: str
) -> bytearray:
    """Decipher a PIN block and return the PIN digits (wipe them after use).

    Raises:
        PinBlockError: the block has the wrong size or is not well formed once deciphered.
    """
    size = AES_BLOCK if fmt is PinBlockFormat.ISO_4 else DES_BLOCK
    if len(block) != size:
        raise PinBlockError(f"must be {size} bytes")
    if fmt is not PinBlockFormat.ISO_4:
        clear = bytearray(cipher.decrypt_block(key, bytes(block)))
    else:
        intermediate = cipher.decrypt_block(key, bytes(block))
        clear = bytearray(cipher.decrypt_block(key, xor(intermediate, format4_pan_field(pan))))
    try:
        return decode(fmt, bytes(clear), pan)
    finally:
        wipe(clear)
