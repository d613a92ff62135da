"""Operator commands of the HSM layer: ``cardswitch hsm ...`` and ``cardswitch keys ...``.

What lives here: argument parsing and output of the key custodian's and test engineer's
commands: ``hsm init`` (dev token and card-data keys, idempotent), ``keys import`` (clear
value or TR-31 key block), ``keys list``, and the card-security calculators ``hsm cvv``,
``hsm pvv``, ``hsm ibm-offset`` and ``hsm arqc``. Each prints its value alone on stdout
(``--json`` for a structured answer) and exits 0; USAGE for bad input, FAILED for an HSM
failure or a mismatch (``switch.cli.runner.ExitStatus``), with one line on stderr that never
carries a PIN, key or full PAN.

What does not: the cryptography (``hsm.api`` backends), opening the token (``hsm.token``),
the card-data keys (``switch.devsetup.ensure_card_data_keys``), the runner and the dispatcher
(``switch.cli.runner``, ``switch.__main__``). This module is part of the switch CLI layer,
not of ``hsm``, because ``hsm`` imports nothing from ``switch``.

Secrets on the command line (``--pin``, ``--clear``, ``--kbpk``) end up in shell history and
the process list: pass ``-`` to read the value from one line of standard input instead.

TR-31 import and the KEK: a TR-31 block is opened by deriving encryption and authentication
keys from the key-block protection key (KBPK) and checking a MAC over the clear header and
key. ``C_UnwrapKey`` of a general-purpose PKCS#11 token cannot do this (it knows no TR-31),
and the token's KEK is non-extractable, so the block cannot be opened inside the token. The
honest option taken here: the custodian supplies the KBPK in clear (``--kbpk``, development
and test only), the block is opened in host memory with ``psec.tr31``, and ``--kek LABEL``
names the token's KEK whose check value must equal the supplied KBPK's, so a wrong or
unexpected KBPK is refused. The unwrapped key then goes into the token as a non-extractable
key. A payment HSM backend would take the block and the KEK label and keep both inside.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import psec.tr31
import trio
from cryptography.utils import CryptographyDeprecationWarning

from hsm.api import (
    KEY_LENGTHS,
    ArpcRequest,
    ArqcGeneration,
    ArqcVerification,
    Cvn,
    CvvGeneration,
    EmvCard,
    Hsm,
    IbmOffsetGeneration,
    KeyAlgorithm,
    KeyImport,
    KeyInfo,
    KeyUsage,
    PvvGeneration,
)
from hsm.carddata import ensure_card_data_keys
from hsm.errors import KeyNotFound
from hsm.pan import mask_pan
from hsm.software import software_kcv
from switch.cli.common import config_parent
from switch.cli.runner import ExitStatus, UsageError, fail, runner
from switch.config import Config

#: The argument value that means "read this secret from one line of standard input".
STDIN_MARKER = "-"

#: TR-31 key usages (ANSI X9.143 / TR-31:2018 header bytes 5-6) accepted for each key usage.
TR31_USAGES: dict[KeyUsage, frozenset[str]] = {
    KeyUsage.ZPK: frozenset({"P0"}),
    # V0 PIN verification (other), V1 IBM 3624, V2 Visa PVV.
    KeyUsage.PVK: frozenset({"V0", "V1", "V2"}),
    KeyUsage.CVK: frozenset({"C0"}),
    KeyUsage.IMK_AC: frozenset({"E0"}),
    # K0 key encryption or wrapping, K1 TR-31 key block protection key.
    KeyUsage.KEK: frozenset({"K0", "K1"}),
    KeyUsage.DATA: frozenset({"D0"}),
    KeyUsage.HMAC: frozenset({"M7"}),
}
#: TR-31 algorithm byte (header byte 7) and key length -> our key algorithm.
TR31_ALGORITHMS: dict[tuple[str, int], KeyAlgorithm] = {
    ("T", 16): KeyAlgorithm.TDES_2KEY,
    ("T", 24): KeyAlgorithm.TDES_3KEY,
    ("A", 16): KeyAlgorithm.AES_128,
    ("A", 24): KeyAlgorithm.AES_192,
    ("A", 32): KeyAlgorithm.AES_256,
    ("H", 32): KeyAlgorithm.HMAC_SHA256,
}


# ------------------------------------------------------------------------------ parsing


def register(subparsers: Any) -> None:
    """Add ``hsm`` and ``keys`` with their subcommands to the ``cardswitch`` parser."""
    common = config_parent()
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", action="store_true", help="print a JSON object")

    hsm = subparsers.add_parser("hsm", help="HSM token and card-security calculators")
    hsm_sub = hsm.add_subparsers(dest="hsm_command", required=True, metavar="COMMAND")

    init = hsm_sub.add_parser(
        "init",
        parents=[common],
        help="create or open the dev token and the card-data keys (idempotent)",
    )
    init.set_defaults(func=runner(_cmd_init))

    cvv = hsm_sub.add_parser("cvv", parents=[common, output], help="generate a CVV/CVV2/iCVV")
    cvv.add_argument("--cvk", required=True, metavar="LABEL", help="card verification key")
    cvv.add_argument("--pan", required=True, help="primary account number")
    cvv.add_argument("--expiry", required=True, metavar="YYMM", help="expiry date")
    cvv.add_argument(
        "--service-code",
        required=True,
        metavar="SSS",
        help="as on the stripe; 000 gives CVV2, 999 gives iCVV",
    )
    cvv.set_defaults(func=runner(_cmd_cvv))

    pvv = hsm_sub.add_parser("pvv", parents=[common, output], help="generate a Visa PVV")
    pvv.add_argument("--pvk", required=True, metavar="LABEL", help="PIN verification key")
    pvv.add_argument("--pan", required=True, help="primary account number")
    pvv.add_argument("--pvki", required=True, metavar="N", help="PVK index, one digit")
    pvv.add_argument("--pin", required=True, help="clear PIN, or - to read it from stdin")
    pvv.set_defaults(func=runner(_cmd_pvv))

    ibm = hsm_sub.add_parser(
        "ibm-offset", parents=[common, output], help="generate an IBM 3624 PIN offset"
    )
    ibm.add_argument("--pvk", required=True, metavar="LABEL", help="PIN verification key")
    ibm.add_argument("--pan", required=True, help="primary account number")
    ibm.add_argument("--pin", required=True, help="clear PIN, or - to read it from stdin")
    ibm.add_argument("--dec-table", required=True, metavar="T", help="16 decimal digits")
    ibm.add_argument(
        "--validation-data",
        required=True,
        metavar="V",
        help="1-16 hex digits, or N for the account number digits of the PAN",
    )
    ibm.set_defaults(func=runner(_cmd_ibm_offset))

    arqc = hsm_sub.add_parser(
        "arqc",
        parents=[common, output],
        help="generate an ARQC, or verify one and compute the ARPC",
    )
    arqc.add_argument("--imk", required=True, metavar="LABEL", help="issuer master key (AC)")
    arqc.add_argument(
        "--cvn", required=True, choices=[c.value for c in Cvn], help="cryptogram version"
    )
    arqc.add_argument("--pan", required=True, help="primary account number")
    arqc.add_argument("--psn", default="00", metavar="N", help="PAN sequence number")
    arqc.add_argument("--atc", required=True, metavar="HEX", help="4 hex digits (9F36)")
    arqc.add_argument("--un", default="", metavar="HEX", help="8 hex digits (9F37)")
    arqc.add_argument("--data", required=True, metavar="HEX", help="the data the card MACs")
    arqc.add_argument("--verify", metavar="ARQC", help="verify this ARQC instead")
    arqc.add_argument("--arc", metavar="HEX", help="ARPC method 1: response code, 4 hex")
    arqc.add_argument("--csu", metavar="HEX", help="ARPC method 2: card status update, 8 hex")
    arqc.add_argument(
        "--prop-data", default="", metavar="HEX", help="ARPC method 2: proprietary data"
    )
    arqc.set_defaults(func=runner(_cmd_arqc))

    keys = subparsers.add_parser("keys", help="import and list HSM keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")

    imp = keys_sub.add_parser(
        "import", parents=[common, output], help="import a key; prints its check value"
    )
    imp.add_argument("label", help="label of the new key in the HSM")
    imp.add_argument(
        "--usage", required=True, choices=[u.value for u in KeyUsage], help="key usage"
    )
    imp.add_argument(
        "--algorithm",
        choices=[a.value for a in KeyAlgorithm],
        help="when the length does not decide (a 16-byte ZPK is TDES unless aes-128)",
    )
    source = imp.add_mutually_exclusive_group(required=True)
    source.add_argument("--clear", metavar="HEX", help="clear key value (dev/test), or -")
    source.add_argument("--tr31", metavar="BLOCK", help="TR-31 key block")
    imp.add_argument("--kek", metavar="LABEL", help="token KEK the TR-31 block is under")
    imp.add_argument(
        "--kbpk",
        metavar="HEX",
        help="clear value of that KEK (dev/test; must match its check value), or -",
    )
    imp.set_defaults(func=runner(_cmd_keys_import))

    lst = keys_sub.add_parser("list", parents=[common, output], help="label, usage, KCV")
    lst.set_defaults(func=runner(_cmd_keys_list))


# ------------------------------------------------------------------------------ running


class _OpenHsm:
    """``async with _OpenHsm(cfg) as hsm``: the configured backend, closed on exit."""

    def __init__(self, cfg: Config) -> None:
        self._cfg = cfg
        self._stack = AsyncExitStack()

    async def __aenter__(self) -> Hsm:
        from hsm import token  # noqa: PLC0415 - keeps `cardswitch --help` free of PKCS#11

        hsm = await trio.to_thread.run_sync(token.open_hsm, self._cfg.hsm)
        self._stack.push_async_callback(hsm.aclose)
        return hsm

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()


def _emit(args: argparse.Namespace, value: str, fields: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(fields, sort_keys=True))
    else:
        print(value)


def _secret(value: str, option: str) -> str:
    """The value of a secret option, read from stdin when it is ``-``."""
    if value != STDIN_MARKER:
        return value
    line = sys.stdin.readline().strip()
    if not line:
        raise UsageError(f"{option}: nothing on standard input")
    return line


def _hex(value: str, option: str, lengths: tuple[int, ...] | None = None) -> bytes:
    """Bytes from hex digits; ``lengths`` are the allowed lengths in hex digits."""
    if lengths is not None and len(value) not in lengths:
        allowed = " or ".join(str(n) for n in lengths)
        raise UsageError(f"{option} must be {allowed} hex digits")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise UsageError(f"{option} must be an even number of hex digits") from None


# ------------------------------------------------------------------------------ commands


async def _cmd_init(args: argparse.Namespace, cfg: Config) -> int:
    if cfg.hsm.backend != "pkcs11":
        raise UsageError("hsm init needs hsm.backend = 'pkcs11' (software keys are not kept)")
    from hsm import token  # noqa: PLC0415

    created = await trio.to_thread.run_sync(token.init_dev_token, cfg.hsm)
    state = "created" if created else "opened"
    print(f"token {cfg.hsm.token_label!r} {state} (SOFTHSM2_CONF={cfg.hsm.softhsm_conf})")
    hsm = await trio.to_thread.run_sync(token.ensure_hsm, cfg.hsm)
    try:
        for line in await ensure_card_data_keys(hsm, cfg.card_data):
            print(line)
    finally:
        await hsm.aclose()
    return ExitStatus.OK


async def _cmd_cvv(args: argparse.Namespace, cfg: Config) -> int:
    async with _OpenHsm(cfg) as hsm:
        value = await hsm.generate_cvv(
            CvvGeneration(args.cvk, args.pan, args.expiry, args.service_code)
        )
    fields = {"cvk": args.cvk, "pan": mask_pan(args.pan), "service_code": args.service_code}
    _emit(args, value, {**fields, "cvv": value})
    return ExitStatus.OK


async def _cmd_pvv(args: argparse.Namespace, cfg: Config) -> int:
    pin = _secret(args.pin, "--pin")
    async with _OpenHsm(cfg) as hsm:
        value = await hsm.generate_pvv(PvvGeneration(args.pvk, args.pan, args.pvki, pin))
    del pin
    fields = {"pvk": args.pvk, "pan": mask_pan(args.pan), "pvki": args.pvki, "pvv": value}
    _emit(args, value, fields)
    return ExitStatus.OK


async def _cmd_ibm_offset(args: argparse.Namespace, cfg: Config) -> int:
    pin = _secret(args.pin, "--pin")
    async with _OpenHsm(cfg) as hsm:
        value = await hsm.generate_ibm_offset(
            IbmOffsetGeneration(args.pvk, args.pan, pin, args.dec_table, args.validation_data)
        )
    del pin
    _emit(args, value, {"pvk": args.pvk, "pan": mask_pan(args.pan), "offset": value})
    return ExitStatus.OK


async def _cmd_arqc(args: argparse.Namespace, cfg: Config) -> int:
    card = EmvCard(imk=args.imk, cvn=Cvn(args.cvn), pan=args.pan, psn=args.psn)
    atc = _hex(args.atc, "--atc", (4,))
    un = _hex(args.un, "--un", (0, 8))
    data = _hex(args.data, "--data")
    fields: dict[str, Any] = {"imk": args.imk, "cvn": args.cvn, "pan": mask_pan(args.pan)}
    if args.verify is None:
        if args.arc is not None or args.csu is not None:
            raise UsageError("--arc and --csu go with --verify")
        async with _OpenHsm(cfg) as hsm:
            arqc = await hsm.generate_arqc(ArqcGeneration(card, atc, data, un))
        _emit(args, arqc.hex().upper(), {**fields, "arqc": arqc.hex().upper()})
        return ExitStatus.OK
    arqc = _hex(args.verify, "--verify", (16,))
    arpc_request = None
    if args.arc is not None or args.csu is not None:
        arpc_request = ArpcRequest(
            arc=None if args.arc is None else _hex(args.arc, "--arc", (4,)),
            csu=None if args.csu is None else _hex(args.csu, "--csu", (8,)),
            proprietary_auth_data=_hex(args.prop_data, "--prop-data"),
        )
    async with _OpenHsm(cfg) as hsm:
        result = await hsm.verify_arqc(
            ArqcVerification(card, atc, data, arqc, un=un, arpc=arpc_request)
        )
    fields.update(ok=result.ok, reason=None if result.reason is None else str(result.reason))
    if not result.ok:
        if args.json:
            print(json.dumps(fields, sort_keys=True))
        return fail(f"ARQC does not verify ({result.reason})", ExitStatus.FAILED)
    if result.arpc is not None:
        fields["arpc"] = result.arpc.hex().upper()
        _emit(args, fields["arpc"], fields)
    else:
        _emit(args, "ok", fields)
    return ExitStatus.OK


@dataclass(frozen=True)
class _Unwrapped:
    """A key opened from a TR-31 block; ``value`` never printed."""

    header: psec.tr31.Header
    algorithm: KeyAlgorithm
    value: bytes


async def _cmd_keys_import(args: argparse.Namespace, cfg: Config) -> int:
    usage = KeyUsage(args.usage)
    algorithm = None if args.algorithm is None else KeyAlgorithm(args.algorithm)
    extra: dict[str, Any] = {}
    async with _OpenHsm(cfg) as hsm:
        if args.clear is not None:
            if args.kek is not None or args.kbpk is not None:
                raise UsageError("--kek and --kbpk go with --tr31")
            value = _hex(_secret(args.clear, "--clear"), "--clear")
        else:
            unwrapped = await _open_tr31(hsm, args, usage)
            if algorithm is not None and algorithm is not unwrapped.algorithm:
                raise UsageError(
                    f"--algorithm {algorithm} does not match the key block ({unwrapped.algorithm})"
                )
            value, algorithm = unwrapped.value, unwrapped.algorithm
            header = unwrapped.header
            extra = {
                "tr31": {
                    "version": header.version_id,
                    "key_usage": header.key_usage,
                    "algorithm": header.algorithm,
                    "mode_of_use": header.mode_of_use,
                    "exportability": header.exportability,
                },
                "kek": args.kek,
            }
        info = await hsm.import_key(KeyImport(args.label, usage, value, algorithm))
        del value
    _emit(args, info.kcv, {**_key_fields(info), **extra})
    return ExitStatus.OK


async def _open_tr31(hsm: Hsm, args: argparse.Namespace, usage: KeyUsage) -> _Unwrapped:
    """Open the TR-31 block of ``args`` with the clear KBPK after checking it is the KEK's."""
    if args.kek is None or args.kbpk is None:
        raise UsageError("--tr31 needs --kek LABEL and --kbpk HEX (see `keys import --help`)")
    kek = await _key_info(hsm, args.kek)
    if kek.usage is not KeyUsage.KEK:
        raise UsageError(f"key {args.kek!r} has usage {kek.usage}, not kek")
    kbpk = _hex(_secret(args.kbpk, "--kbpk"), "--kbpk")
    if len(kbpk) != KEY_LENGTHS.get(kek.algorithm) or software_kcv(kek.algorithm, kbpk) != kek.kcv:
        raise UsageError(f"--kbpk does not match the check value of KEK {args.kek!r}")
    try:
        with warnings.catch_warnings():
            # psec still uses the two-key TripleDES that cryptography deprecates.
            warnings.simplefilter("ignore", CryptographyDeprecationWarning)
            header, value = psec.tr31.unwrap(kbpk, args.tr31)
    except (psec.tr31.HeaderError, psec.tr31.KeyBlockError) as exc:
        raise UsageError(f"--tr31: {exc}") from None
    finally:
        del kbpk
    if header.key_usage not in TR31_USAGES[usage]:
        expected = ", ".join(sorted(TR31_USAGES[usage]))
        raise UsageError(
            f"key block usage {header.key_usage} does not fit --usage {usage} ({expected})"
        )
    algorithm = TR31_ALGORITHMS.get((header.algorithm, len(value)))
    if algorithm is None:
        raise UsageError(
            f"key block algorithm {header.algorithm} with {len(value)}-byte key is not supported"
        )
    return _Unwrapped(header, algorithm, value)


async def _key_info(hsm: Hsm, label: str) -> KeyInfo:
    for info in await hsm.list_keys():
        if info.label == label:
            return info
    raise KeyNotFound(label)


def _key_fields(info: KeyInfo) -> dict[str, Any]:
    return {
        "label": info.label,
        "usage": str(info.usage),
        "algorithm": str(info.algorithm),
        "kcv": info.kcv,
    }


async def _cmd_keys_list(args: argparse.Namespace, cfg: Config) -> int:
    async with _OpenHsm(cfg) as hsm:
        infos = await hsm.list_keys()
    if args.json:
        print(json.dumps([_key_fields(i) for i in infos], sort_keys=True))
        return ExitStatus.OK
    rows = [("LABEL", "USAGE", "ALGORITHM", "KCV")]
    rows += [(i.label, str(i.usage), str(i.algorithm), i.kcv) for i in infos]
    widths = [max(len(r[c]) for r in rows) for c in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)), row[3])
    return ExitStatus.OK
