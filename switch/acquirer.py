"""The acquirer's messages: what ``cardswitch send``, the tests and the benchmarks send.

What lives here: builders of the requests an acquirer sends a switch, with the fields an
acquirer usually fills: 0800 network management (``network_request``, ``echo``), 0100/0200/
0120/0220 (``build_auth``), 0400/0420 reversals of an earlier request (``build_reversal``),
ISO 9564 PIN blocks under a clear ZPK (``encipher_pin``, development and test only), track 2
from its text form (``parse_track2``), and the DE7/DE11 values (``transmission_time``,
``new_stan``).

What does not: encoding (wire/), the connection (client.py), the command line
(switch.cli.send).
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime

from hsm.algorithms import pinblock
from hsm.api import PinBlockFormat
from hsm.software import SoftKey, SoftwareCipher
from switch.wire.messages import (
    AuthRequest,
    MerchantLocation,
    NetworkRequest,
    OriginalData,
    ReversalRequest,
    Track2,
)

#: DE70 network management information codes by name (ISO 8583:1987).
NETWORK_CODES = {"echo": "301", "signon": "001", "signoff": "002"}


def transmission_time(now: datetime | None = None) -> str:
    """DE7 for ``now`` (UTC), MMDDhhmmss."""
    return (now or datetime.now(UTC)).strftime("%m%d%H%M%S")


def new_stan() -> str:
    """A random 6-digit STAN (DE11)."""
    return f"{secrets.randbelow(999_999) + 1:06d}"


def network_request(kind: str, stan: str | None = None) -> NetworkRequest:
    """An 0800 of ``kind`` (a key of ``NETWORK_CODES``: echo, signon, signoff)."""
    return echo(stan, NETWORK_CODES[kind])


def echo(stan: str | None = None, code: str = "301") -> NetworkRequest:
    """An 0800 echo test (DE70 301), or another network management code."""
    return NetworkRequest(
        mti="0800", transmission_time=transmission_time(), stan=stan or new_stan(), code=code
    )


def build_auth(
    pan: str,
    amount: int,
    *,
    mti: str = "0100",
    currency: str = "978",
    stan: str | None = None,
    when: str | None = None,
    acquirer: str = "12345678",
    terminal: str = "TERM0001",
    merchant: str = "MERCHANT0000001",
    rrn: str | None = None,
    processing_code: str = "000000",
    expiry: str | None = None,
    cvv2: str | None = None,
    track2: Track2 | None = None,
    pos_entry_mode: str | None = None,
    pin_block: bytes | None = None,
    mcc: str | None = "5411",
    country: str | None = "250",
    emv: bytes | None = None,
) -> AuthRequest:
    """An authorization-class request with the fields an acquirer usually sends."""
    stan = stan or new_stan()
    when = when or transmission_time()
    return AuthRequest(
        mti=mti,
        pan=pan,
        processing_code=processing_code,
        amount=amount,
        transmission_time=when,
        stan=stan,
        currency=currency,
        local_time=when[4:],
        local_date=when[:4],
        expiry=expiry,
        mcc=mcc,
        acquirer_country=country,
        pos_entry_mode=pos_entry_mode or ("051" if emv else "012"),
        acquirer_id=acquirer,
        track2=track2,
        rrn=rrn or (when[:4] + stan + "00")[:12],
        terminal_id=terminal,
        merchant_id=merchant,
        merchant_location=MerchantLocation("CARDSWITCH DEMO SHOP", "TALLINN", "EE"),
        cvv2=cvv2,
        pin_block=pin_block,
        emv=emv,
    )


def build_reversal(
    original: AuthRequest,
    *,
    mti: str = "0400",
    replacement_amount: int | None = None,
    stan: str | None = None,
    when: str | None = None,
) -> ReversalRequest:
    """A reversal of ``original`` (DE90 from its MTI, STAN, DE7 and acquirer)."""
    when = when or transmission_time()
    return ReversalRequest(
        mti=mti,
        stan=stan or new_stan(),
        transmission_time=when,
        amount=original.amount,
        original=OriginalData(
            mti=original.mti,
            stan=original.stan,
            transmission_time=original.transmission_time,
            acquirer_id=original.acquirer_id or "0",
            forwarding_id="0",
        ),
        pan=original.pan,
        processing_code=original.processing_code,
        currency=original.currency,
        local_time=when[4:],
        local_date=when[:4],
        acquirer_id=original.acquirer_id,
        rrn=original.rrn,
        terminal_id=original.terminal_id,
        merchant_id=original.merchant_id,
        replacement_amount=replacement_amount,
    )


def encipher_pin(pin: str, pan: str, zpk_hex: str, fmt: int = 0) -> bytes:
    """The acquirer's job: an ISO 9564 PIN block under the clear ZPK (dev and test only)."""
    digits = pinblock.pin_from_str(pin)
    try:
        key = SoftKey(bytes.fromhex(zpk_hex), aes=fmt == PinBlockFormat.ISO_4)
        return pinblock.encrypt(SoftwareCipher(), key, PinBlockFormat(fmt), digits, pan)
    finally:
        pinblock.wipe(digits)


def parse_track2(text: str) -> Track2:
    """``PAN=YYMMSSSdisc`` or ``PANDYYMMSSSdisc`` into a Track2."""
    sep = "=" if "=" in text else "D"
    pan, _, rest = text.partition(sep)
    if not rest or not pan.isdigit():
        raise ValueError("track 2 must be PAN=YYMM SSS discretionary")
    return Track2(pan=pan, expiry=rest[:4], service_code=rest[4:7], discretionary=rest[7:])
