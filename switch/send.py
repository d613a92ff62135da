"""``cardswitch send``: act as an acquirer and send one message to a switch.

What lives here: the command-line front of ``switch.client``: build an 0800 (echo, sign-on,
sign-off), an authorization/financial/advice request or a reversal from options, send it over
mutual TLS with the dev client certificate, and print the decoded answer as JSON with the PAN
masked. Also ``build_auth`` and ``build_reversal``, used by tests and benchmarks to make the
same messages.

What does not: message encoding (wire/), the connection (client.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import secrets
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import trio

from hsm.algorithms import pinblock
from hsm.api import PinBlockFormat
from hsm.pan import mask_pan
from hsm.software import SoftKey, SoftwareCipher
from switch import config as config_mod
from switch.client import Client, ClientError
from switch.pki import pki_paths
from switch.tls import client_context
from switch.wire.messages import (
    AuthRequest,
    MerchantLocation,
    NetworkRequest,
    OriginalData,
    ReversalRequest,
    Track2,
)

#: DE70 codes by name.
NETWORK_CODES = {"echo": "301", "signon": "001", "signoff": "002"}
#: Exit status when no answer arrived (timeout or connection closed).
EXIT_NO_ANSWER = 1


def register(sub: Any) -> None:
    p = sub.add_parser("send", help="send one ISO 8583 message as an acquirer and print the answer")
    p.add_argument("--config", type=Path, default=None, help="switch TOML (listener and PKI)")
    p.add_argument("--listener", default=None, help="listener name (default: the first)")
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--pki-dir", type=Path, default=None, help="dir with ca.pem, client.pem/.key")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the answer")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    for name in NETWORK_CODES:
        kinds.add_parser(name, help=f"0800 network management ({name})")
    auth = kinds.add_parser("auth", help="0100/0200/0120/0220 request built from options")
    _add_common(auth)
    auth.add_argument("--mti", default="0100", choices=["0100", "0101", "0120", "0200", "0220"])
    auth.add_argument("--processing-code", default="000000")
    auth.add_argument("--expiry", help="DE14 YYMM")
    auth.add_argument("--cvv2", help="CVV2 sent in DE48 subelement 92")
    auth.add_argument("--track2", help="track 2 equivalent data, PAN=YYMMSSS... or PAN D ...")
    auth.add_argument("--pos-entry-mode", default=None, help="DE22, e.g. 012 (keyed), 051 (chip)")
    auth.add_argument("--pin", help="clear PIN, enciphered here as an ISO 9564 block")
    auth.add_argument("--zpk", help="clear ZPK (hex) the acquirer shares with the switch")
    auth.add_argument("--pin-format", type=int, default=0, choices=[0, 1, 3, 4])
    auth.add_argument("--mcc", default="5411", help="DE18 merchant category code")
    auth.add_argument("--country", default="250", help="DE19 acquiring country (ISO numeric)")
    auth.add_argument("--emv", help="DE55 as hex BER-TLV")
    rev = kinds.add_parser("reversal", help="0400/0420 reversal of an earlier request")
    _add_common(rev)
    rev.add_argument("--mti", default="0400", choices=["0400", "0401", "0420", "0421"])
    rev.add_argument("--original-mti", default="0100")
    rev.add_argument("--original-stan", required=True)
    rev.add_argument("--original-time", required=True, help="original DE7 MMDDhhmmss")
    rev.add_argument("--replacement", type=int, default=None, help="DE95 actual amount (partial)")
    p.set_defaults(func=_cmd_send)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pan", required=True)
    p.add_argument("--amount", type=int, required=True, help="minor units")
    p.add_argument("--currency", default="978")
    p.add_argument("--stan", default=None, help="DE11 (random when absent)")
    p.add_argument("--time", default=None, help="DE7 MMDDhhmmss (now when absent)")
    p.add_argument("--acquirer", default="12345678")
    p.add_argument("--terminal", default="TERM0001")
    p.add_argument("--merchant", default="MERCHANT0000001")
    p.add_argument("--rrn", default=None)


def transmission_time(now: datetime | None = None) -> str:
    """DE7 for ``now`` (UTC), MMDDhhmmss."""
    return (now or datetime.now(UTC)).strftime("%m%d%H%M%S")


def new_stan() -> str:
    """A random 6-digit STAN (DE11)."""
    return f"{secrets.randbelow(999_999) + 1:06d}"


def echo(stan: str | None = None, code: str = "301") -> NetworkRequest:
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


def to_json(message: Any) -> dict[str, Any]:
    """A message as JSON-ready data, the PAN masked and secrets left out."""
    out: dict[str, Any] = {"type": type(message).__name__}
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        if value is None or value == () or (not f.repr and f.name != "emv"):
            continue
        if f.name == "pan":
            value = mask_pan(value)
        elif isinstance(value, bytes):
            value = value.hex().upper()
        elif dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)  # type: ignore[arg-type]
        elif isinstance(value, tuple):
            value = [dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v for v in value]  # type: ignore[arg-type]
        out[f.name] = value
    return out


def _build_message(args: argparse.Namespace) -> Any:
    if args.kind in NETWORK_CODES:
        return echo(code=NETWORK_CODES[args.kind])
    if args.kind == "auth":
        pin_block = None
        if args.pin:
            if not args.zpk:
                raise ValueError("--pin needs --zpk (the clear zone PIN key, hex)")
            pin_block = encipher_pin(args.pin, args.pan, args.zpk, args.pin_format)
        return build_auth(
            args.pan,
            args.amount,
            mti=args.mti,
            currency=args.currency,
            stan=args.stan,
            when=args.time,
            acquirer=args.acquirer,
            terminal=args.terminal,
            merchant=args.merchant,
            rrn=args.rrn,
            processing_code=args.processing_code,
            expiry=args.expiry,
            cvv2=args.cvv2,
            track2=parse_track2(args.track2) if args.track2 else None,
            pos_entry_mode=args.pos_entry_mode,
            pin_block=pin_block,
            mcc=args.mcc,
            country=args.country,
            emv=bytes.fromhex(args.emv) if args.emv else None,
        )
    original = build_auth(
        args.pan,
        args.amount,
        mti=args.original_mti,
        currency=args.currency,
        stan=args.original_stan,
        when=args.original_time,
        acquirer=args.acquirer,
        terminal=args.terminal,
        merchant=args.merchant,
        rrn=args.rrn,
    )
    return build_reversal(
        original, mti=args.mti, replacement_amount=args.replacement, stan=args.stan, when=args.time
    )


def _cmd_send(args: argparse.Namespace) -> int:
    cfg = config_mod.load_default_or_embedded(args.config)
    listener = cfg.listeners[0]
    if args.listener is not None:
        matches = [lst for lst in cfg.listeners if lst.name == args.listener]
        if not matches:
            print(f"cardswitch send: no listener named {args.listener!r}", file=sys.stderr)
            return 2
        listener = matches[0]
    pki = pki_paths(args.pki_dir or cfg.tls.ca.parent)
    try:
        message = _build_message(args)
    except ValueError as exc:
        print(f"cardswitch send: {exc}", file=sys.stderr)
        return 2
    ctx = client_context(pki.ca, pki.client_cert, pki.client_key)
    host = args.host or listener.host
    port = args.port or listener.port

    async def run() -> Any:
        async with Client.connect(
            host, port, ctx, header=listener.header, spec=listener.spec
        ) as client:
            with trio.fail_after(args.timeout):
                return await client.request(message)

    try:
        response = trio.run(run)
    except (ClientError, OSError, trio.TooSlowError) as exc:
        print(f"cardswitch send: no answer: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_NO_ANSWER
    print(json.dumps(to_json(response), indent=2, sort_keys=True))
    return 0
