"""``cardswitch send``: act as an acquirer, send one message to a switch, print the answer.

What lives here: the options of ``send`` and its kinds (echo, signon, signoff, auth,
reversal), the connection over mutual TLS with the dev client certificate, in the listener's
wire spec with DE52 sized by the PIN block format (``--pin-format``, else the listener's: 16
bytes for ISO 9564 format 4), the answer printed as JSON with the PAN masked, and the one-line
report of why no answer came, each with its own exit status (TIMEOUT, REFUSED, TLS, CLOSED of
``switch.cli.runner.ExitStatus``).

What does not: building the messages (``switch.acquirer``), the connection protocol
(``switch.client``), encoding (``switch.wire``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import ssl
from pathlib import Path
from typing import Any

import trio

from hsm.pan import mask_pan
from switch import acquirer
from switch.cli.runner import CommandError, ExitStatus, UsageError, runner, single_leaf
from switch.client import Client, ClientError
from switch.config import Config, ListenerConfig
from switch.pki import pki_paths
from switch.session import listener_framing, listener_spec
from switch.tls import client_context
from switch.wire.messages import Message

#: Seconds ``send`` waits for the connection, the handshake and the answer, each.
DEFAULT_TIMEOUT = 10.0

EXAMPLES = """\
examples:
  # $PAN and $TRACK2: a card of the switch's own; with the demo data (config/demo/,
  # public test keys) see the README's quick start for one, and the demo ZPKs below
  cardswitch send echo
  cardswitch send --port 9000 signon
  cardswitch send auth --pan "$PAN" --amount 1250 --track2 "$TRACK2" --pos-entry-mode 901
  cardswitch send auth --pan "$PAN" --amount 100 \\
      --pin 1234 --zpk 0123456789ABCDEFFEDCBA9876543210
  cardswitch send auth --pan "$PAN" --amount 100 \\
      --pin 1234 --zpk 00112233445566778899AABBCCDDEEFF --pin-format 4
  cardswitch send reversal --pan "$PAN" --amount 1250 \\
      --original-stan 123456 --original-time 1128120000

The connection options (--config, --listener, --host, --port, --pki-dir, --timeout) go
before or after KIND. The answer is printed as JSON whatever its DE39 (exit 0); when none
comes the exit status says why: 3 timeout, 4 connection refused, 5 TLS handshake failed,
6 closed by the switch without an answer (e.g. a client not on the allow-list).
"""


def _connection_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The options of the connection; on the kinds (``defaults=False``) they default to
    nothing, so a value given before KIND is kept."""

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument(
        "--config",
        type=Path,
        default=default(None),
        metavar="PATH",
        help="switch configuration for the listener and the PKI; default: "
        "config/switch.toml if present, else the built-in defaults",
    )
    parser.add_argument(
        "--listener", default=default(None), help="listener name; default: the first"
    )
    parser.add_argument(
        "--host", default=default(None), help="switch host; default: the listener's host"
    )
    parser.add_argument(
        "--port", type=int, default=default(None), help="switch port; default: the listener's"
    )
    parser.add_argument(
        "--pki-dir",
        type=Path,
        default=default(None),
        metavar="DIR",
        help="directory with ca.pem, client.pem and client.key; default: the directory of [tls] ca",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=default(DEFAULT_TIMEOUT),
        metavar="SECONDS",
        help="wait at most this long to connect and for the answer"
        + (" (default: %(default)s)" if defaults else f" (default: {DEFAULT_TIMEOUT})"),
    )


def register(sub: Any) -> None:
    p = sub.add_parser(
        "send",
        help="send one ISO 8583 message as an acquirer and print the answer",
        description="Send one message to a switch over mutual TLS and print its answer "
        "as JSON (PAN masked).",
        epilog=EXAMPLES,
    )
    _connection_options(p, defaults=True)
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    for name, code in acquirer.NETWORK_CODES.items():
        network = kinds.add_parser(
            name, help=f"0800 network management, {name} (DE70 {code})", epilog=EXAMPLES
        )
        _connection_options(network, defaults=False)
    auth = kinds.add_parser(
        "auth", help="0100/0101/0120/0200/0220 request built from options", epilog=EXAMPLES
    )
    _connection_options(auth, defaults=False)
    _card_options(auth)
    auth.add_argument(
        "--mti",
        default="0100",
        choices=["0100", "0101", "0120", "0200", "0220"],
        help="message type",
    )
    auth.add_argument("--processing-code", default="000000", help="DE3")
    auth.add_argument("--expiry", metavar="YYMM", help="DE14 expiry date")
    auth.add_argument("--cvv2", help="CVV2 sent in DE48 subelement 92")
    auth.add_argument(
        "--track2", help="DE35 track 2 equivalent data: PAN=YYMMSSS... or PAN D YYMMSSS..."
    )
    auth.add_argument(
        "--pos-entry-mode",
        default=None,
        help="DE22, e.g. 012 keyed, 051 chip, 901 stripe; default: 051 with --emv, else 012",
    )
    auth.add_argument("--pin", help="clear PIN, enciphered here as an ISO 9564 block (DE52)")
    auth.add_argument("--zpk", metavar="HEX", help="clear ZPK the acquirer shares (dev/test)")
    auth.add_argument(
        "--pin-format",
        type=int,
        default=None,
        choices=[0, 1, 3, 4],
        help="ISO 9564 PIN block format; 4 is the AES block (16 bytes in DE52, --zpk an AES "
        "key); default: the listener's pin_block_format",
    )
    auth.add_argument("--mcc", default="5411", help="DE18 merchant category code")
    auth.add_argument("--country", default="250", help="DE19 acquiring country (ISO numeric)")
    auth.add_argument("--emv", metavar="HEX", help="DE55 as hex BER-TLV")
    rev = kinds.add_parser(
        "reversal", help="0400/0401/0420/0421 reversal of an earlier request", epilog=EXAMPLES
    )
    _connection_options(rev, defaults=False)
    _card_options(rev)
    rev.add_argument(
        "--mti", default="0400", choices=["0400", "0401", "0420", "0421"], help="message type"
    )
    rev.add_argument("--original-mti", default="0100", help="message type of the original")
    rev.add_argument("--original-stan", required=True, help="DE11 of the original")
    rev.add_argument("--original-time", required=True, help="DE7 of the original, MMDDhhmmss")
    rev.add_argument(
        "--replacement", type=int, default=None, help="DE95 actual amount (partial reversal)"
    )
    p.set_defaults(func=runner(_send))


def _card_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pan", required=True, help="DE2 primary account number")
    p.add_argument("--amount", type=int, required=True, help="DE4, minor units")
    p.add_argument("--currency", default="978", help="DE49 (ISO 4217 numeric)")
    p.add_argument("--stan", default=None, help="DE11; default: random")
    p.add_argument("--time", default=None, help="DE7 MMDDhhmmss; default: now (UTC)")
    p.add_argument("--acquirer", default="12345678", help="DE32 acquiring institution")
    p.add_argument("--terminal", default="TERM0001", help="DE41 terminal")
    p.add_argument("--merchant", default="MERCHANT0000001", help="DE42 card acceptor")
    p.add_argument("--rrn", default=None, help="DE37; default: from DE7 and DE11")


def build_message(args: argparse.Namespace, pin_format: int = 0) -> Message:
    """The message the options of ``send KIND`` describe.

    Args:
        args: the parsed options.
        pin_format: the ISO 9564 format of the PIN block when ``--pin-format`` is not given.

    Raises:
        UsageError: an option value that cannot be used (the message names the option).
    """
    if args.kind in acquirer.NETWORK_CODES:
        return acquirer.network_request(args.kind)
    if args.kind == "auth":
        return _auth(args, pin_format_of(args, pin_format))
    original = acquirer.build_auth(
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
    return acquirer.build_reversal(
        original, mti=args.mti, replacement_amount=args.replacement, stan=args.stan, when=args.time
    )


def pin_format_of(args: argparse.Namespace, default: int) -> int:
    """The PIN block format of the message: ``--pin-format`` if given, else ``default``."""
    chosen = getattr(args, "pin_format", None)
    return default if chosen is None else int(chosen)


def _auth(args: argparse.Namespace, pin_format: int) -> Message:
    pin_block = None
    if args.pin:
        if not args.zpk:
            raise UsageError("--pin needs --zpk (the clear zone PIN key, hex)")
        try:
            pin_block = acquirer.encipher_pin(args.pin, args.pan, args.zpk, pin_format)
        except ValueError as exc:
            raise UsageError(f"--pin/--zpk: {exc}") from None
    try:
        track2 = acquirer.parse_track2(args.track2) if args.track2 else None
    except ValueError as exc:
        raise UsageError(f"--track2: {exc}") from None
    try:
        emv = bytes.fromhex(args.emv) if args.emv else None
    except ValueError:
        raise UsageError("--emv must be an even number of hex digits") from None
    return acquirer.build_auth(
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
        track2=track2,
        pos_entry_mode=args.pos_entry_mode,
        pin_block=pin_block,
        mcc=args.mcc,
        country=args.country,
        emv=emv,
    )


def _listener(cfg: Config, name: str | None) -> ListenerConfig:
    if name is None:
        return cfg.listeners[0]
    for lst in cfg.listeners:
        if lst.name == name:
            return lst
    raise UsageError(f"no listener named {name!r} in the configuration")


async def _send(args: argparse.Namespace, cfg: Config) -> int:
    listener = _listener(cfg, args.listener)
    pin_format = pin_format_of(args, listener.pin_block_format)
    message = build_message(args, pin_format)
    pki = pki_paths(args.pki_dir or cfg.tls.ca.parent)
    ctx = client_context(pki.ca, pki.client_cert, pki.client_key)
    host = args.host or listener.host
    port = args.port or listener.port
    where = f"{host}:{port}"
    try:
        async with Client.connect(
            host,
            port,
            ctx,
            header=listener_framing(listener),
            spec=listener_spec(listener, pin_block_format=pin_format),
            connect_timeout=args.timeout,
        ) as client:
            with trio.fail_after(args.timeout):
                response = await client.request(message)
    except (Exception, BaseExceptionGroup) as exc:
        failure = no_answer(single_leaf(exc), where, args.timeout)
        if failure is None:
            raise
        raise failure from None
    print(json.dumps(to_json(response), indent=2, sort_keys=True))
    return ExitStatus.OK


def no_answer(exc: BaseException, where: str, timeout: float) -> CommandError | None:
    """Why no answer came from ``where``, as a one-line error with its status; None when
    ``exc`` is not a failure of the exchange (a bug, left to propagate)."""
    if isinstance(exc, trio.TooSlowError):
        return CommandError(f"no answer from {where} within {timeout:g} s", ExitStatus.TIMEOUT)
    if any(isinstance(e, ConnectionRefusedError) for e in _causes(exc)):
        return CommandError(f"connection to {where} refused", ExitStatus.REFUSED)
    if isinstance(exc, ssl.SSLError | trio.BrokenResourceError):
        reason = _tls_reason(exc)
        return CommandError(f"TLS handshake with {where} failed: {reason}", ExitStatus.TLS)
    if isinstance(exc, ClientError):
        if "SSLError" in str(exc):
            return CommandError(f"TLS with {where} failed after the handshake", ExitStatus.TLS)
        return CommandError(
            f"{where} closed the connection without an answer "
            "(is this client allowed on the listener?)",
            ExitStatus.CLOSED,
        )
    if isinstance(exc, OSError):
        return CommandError(f"cannot connect to {where}: {exc.strerror or exc}", ExitStatus.REFUSED)
    return None


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc``, its causes and the members of exception groups among them (trio's "all
    attempts to connect failed" carries the refusals that way)."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo:
        current = todo.pop()
        if any(current is s for s in seen):
            continue
        seen.append(current)
        if isinstance(current, BaseExceptionGroup):
            todo += current.exceptions
        todo += [c for c in (current.__cause__, current.__context__) if c is not None]
    return seen


def _tls_reason(exc: BaseException) -> str:
    """The OpenSSL reason of a failed handshake (``CERTIFICATE_VERIFY_FAILED``, ...)."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, ssl.SSLError):
        cause = cause.__cause__ or cause.__context__
    if isinstance(cause, ssl.SSLError):
        return cause.reason or type(cause).__name__
    return type(exc).__name__


def to_json(message: Message) -> dict[str, Any]:
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
