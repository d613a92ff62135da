"""Latency and throughput of each HSM command on SoftHSM2, against the software baseline.

What lives here: a benchmark run as ``python -m benchmarks.hsm_bench [--iterations N]`` from
the repository root. It creates a throw-away SoftHSM token in a temporary directory, imports
public test keys, and times every command sequentially from one trio task (so on one core;
the process is pinned to CPU 0 where the OS allows) on three configurations: PKCS#11 with a
thread hop per command (the default), PKCS#11 inline, and the software backend. It prints a
table and writes ``benchmarks/reports/hsm_bench.json`` and ``.md``.

What does not: assertions (tests/ verify correctness), the switch end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, modes

from hsm.api import (
    ArpcRequest,
    ArqcVerification,
    Cvn,
    CvvGeneration,
    CvvVerification,
    Decryption,
    EmvCard,
    Encryption,
    Fingerprint,
    Hsm,
    Ibm3624Reference,
    IbmOffsetGeneration,
    KeyAlgorithm,
    KeyGeneration,
    KeyImport,
    KeyUsage,
    PinBlockFormat,
    PinTranslation,
    PinVerification,
    PvvGeneration,
    PvvReference,
    arqc_data,
)
from hsm.config import HsmConfig
from hsm.pkcs11 import Pkcs11Hsm
from hsm.software import SoftwareHsm
from hsm.token import ensure_token

#: Calls per command and configuration (after WARMUP untimed calls).
DEFAULT_ITERATIONS = 2000
WARMUP = 50
#: Where the reports go.
REPORT_DIR = Path(__file__).resolve().parent / "reports"
#: Public test keys (Visa CVV table / psec / pyemv vectors) and arbitrary PIN keys.
TEST_KEY = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
ZPK_1 = bytes.fromhex("89ABCDEF0123456776543210FEDCBA98")
ZPK_AES = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
PAN = "4123456789012345"
PIN = "1234"
ATC = bytes.fromhex("001C")
UN = bytes.fromhex("52BF4585")
TAGS = {
    "9F02": bytes.fromhex("000000004000"),
    "9F03": bytes(6),
    "9F1A": bytes.fromhex("0124"),
    "95": bytes.fromhex("8000048000"),
    "5F2A": bytes.fromhex("0124"),
    "9A": bytes.fromhex("191105"),
    "9C": b"\x01",
    "9F37": UN,
    "82": bytes.fromhex("1800"),
    "9F36": ATC,
}
IAD = {
    Cvn.VISA_10: bytes.fromhex("06010A03A06010"),
    Cvn.VISA_18: bytes.fromhex("06011203A0B800"),
    Cvn.MC_16: bytes.fromhex("0110A04003220000000000"),
}

Command = Callable[[], Awaitable[object]]


async def _setup(hsm: Hsm) -> dict[str, Command]:
    await hsm.import_key(KeyImport("b-cvk", KeyUsage.CVK, TEST_KEY))
    await hsm.import_key(KeyImport("b-pvk", KeyUsage.PVK, TEST_KEY))
    await hsm.import_key(KeyImport("b-imk", KeyUsage.IMK_AC, TEST_KEY))
    await hsm.import_key(KeyImport("b-zpk", KeyUsage.ZPK, ZPK_1))
    await hsm.import_key(KeyImport("b-zpk2", KeyUsage.ZPK, TEST_KEY))
    await hsm.import_key(KeyImport("b-zpk-aes", KeyUsage.ZPK, ZPK_AES, KeyAlgorithm.AES_128))
    await hsm.generate_key(KeyGeneration("b-fp", KeyUsage.HMAC))
    await hsm.generate_key(KeyGeneration("b-data", KeyUsage.DATA))

    enc = Cipher(TripleDES(ZPK_1 + ZPK_1[:8]), modes.ECB()).encryptor()  # noqa: S305
    field = bytes.fromhex(f"04{PIN}FFFFFFFFFF")
    account = bytes.fromhex("0000" + PAN[-13:-1])
    block = enc.update(bytes(a ^ b for a, b in zip(field, account, strict=True)))
    pvv = await hsm.generate_pvv(PvvGeneration("b-pvk", PAN, "1", PIN))
    offset = await hsm.generate_ibm_offset(
        IbmOffsetGeneration("b-pvk", PAN, PIN, "0123456789012345", "N")
    )
    cvv = await hsm.generate_cvv(CvvGeneration("b-cvk", PAN, "2512", "101"))
    blob = await hsm.encrypt(Encryption("b-data", PAN.encode(), b"card-1"))

    def arqc_req(cvn: Cvn, arqc: bytes) -> ArqcVerification:
        data = arqc_data(cvn, {**TAGS, "9F10": IAD[cvn]})
        arpc = ArpcRequest(csu=bytes(4)) if cvn is Cvn.VISA_18 else ArpcRequest(arc=b"00")
        return ArqcVerification(EmvCard("b-imk", cvn, PAN, "01"), ATC, data, arqc, UN, arpc)

    from hsm.api import ArqcGeneration  # noqa: PLC0415 - local to keep the table short

    arqc_reqs = {}
    for cvn in Cvn:
        probe = arqc_req(cvn, bytes(8))
        arqc = await hsm.generate_arqc(ArqcGeneration(probe.card, ATC, probe.transaction_data, UN))
        arqc_reqs[cvn] = arqc_req(cvn, arqc)

    pvv_req = PinVerification(
        "b-zpk", block, PinBlockFormat.ISO_0, PAN, PvvReference("b-pvk", "1", pvv)
    )
    ibm_req = PinVerification(
        "b-zpk",
        block,
        PinBlockFormat.ISO_0,
        PAN,
        Ibm3624Reference("b-pvk", offset, "0123456789012345", "N"),
    )
    tr_00 = PinTranslation(
        "b-zpk", PinBlockFormat.ISO_0, block, "b-zpk2", PinBlockFormat.ISO_0, PAN
    )
    tr_04 = PinTranslation(
        "b-zpk", PinBlockFormat.ISO_0, block, "b-zpk-aes", PinBlockFormat.ISO_4, PAN
    )
    return {
        "verify_cvv": lambda: hsm.verify_cvv(CvvVerification("b-cvk", PAN, "2512", "101", cvv)),
        "verify_pin (PVV)": lambda: hsm.verify_pin(pvv_req),
        "verify_pin (IBM 3624)": lambda: hsm.verify_pin(ibm_req),
        "translate_pin ISO0->ISO0": lambda: hsm.translate_pin(tr_00),
        "translate_pin ISO0->ISO4": lambda: hsm.translate_pin(tr_04),
        "verify_arqc CVN10 + ARPC": lambda: hsm.verify_arqc(arqc_reqs[Cvn.VISA_10]),
        "verify_arqc CVN18 + ARPC": lambda: hsm.verify_arqc(arqc_reqs[Cvn.VISA_18]),
        "verify_arqc MC16 + ARPC": lambda: hsm.verify_arqc(arqc_reqs[Cvn.MC_16]),
        "fingerprint": lambda: hsm.fingerprint(Fingerprint("b-fp", PAN.encode())),
        "encrypt": lambda: hsm.encrypt(Encryption("b-data", PAN.encode(), b"card-1")),
        "decrypt": lambda: hsm.decrypt(Decryption("b-data", blob, b"card-1")),
    }


def _percentile(sorted_values: list[float], q: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


async def _measure(commands: dict[str, Command], iterations: int) -> dict[str, dict[str, float]]:
    results = {}
    for name, call in commands.items():
        for _ in range(WARMUP):
            await call()
        samples = []
        start = time.perf_counter()
        for _ in range(iterations):
            t0 = time.perf_counter_ns()
            await call()
            samples.append((time.perf_counter_ns() - t0) / 1000.0)
        elapsed = time.perf_counter() - start
        samples.sort()
        results[name] = {
            "median_us": statistics.median(samples),
            "p99_us": _percentile(samples, 0.99),
            "ops_per_s": iterations / elapsed,
        }
    return results


async def _run(iterations: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="hsm-bench-") as tmp:
        cfg = HsmConfig(softhsm_conf=Path(tmp) / "softhsm" / "softhsm2.conf", timeout=10.0)
        ensure_token(cfg)
        configs: dict[str, dict[str, dict[str, float]]] = {}
        for name, offload in (("pkcs11 (thread hop)", True), ("pkcs11 (inline)", False)):
            hsm = Pkcs11Hsm.open(
                cfg.module, cfg.token_label, cfg.user_pin, timeout=10.0, offload=offload
            )
            try:
                for info in await hsm.list_keys():
                    await hsm.delete_key(info.label)
                configs[name] = await _measure(await _setup(hsm), iterations)
            finally:
                await hsm.aclose()
        software = SoftwareHsm()
        configs["software"] = await _measure(await _setup(software), iterations)
    return {
        "iterations": iterations,
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "pinned_cpu": _pinned(),
        "results": configs,
    }


def _pinned() -> int | None:
    if not hasattr(os, "sched_setaffinity"):
        return None
    try:
        os.sched_setaffinity(0, {0})
    except OSError:
        return None
    return 0


def _markdown(report: dict[str, Any]) -> str:
    res = report["results"]
    hop, inline, soft = res["pkcs11 (thread hop)"], res["pkcs11 (inline)"], res["software"]
    lines = [
        "# HSM command latency (one trio task, sequential)",
        "",
        f"{report['iterations']} calls per command; Python {report['python']}, "
        f"{report['machine']}, {report['cpus']} CPUs, pinned to CPU {report['pinned_cpu']}.",
        "Latencies in microseconds.",
        "",
        "| command | SoftHSM hop median | p99 | ops/s | SoftHSM inline median | p99 | ops/s "
        "| software median | ops/s | hop/software |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in hop:
        h, i, s = hop[name], inline[name], soft[name]
        lines.append(
            f"| {name} | {h['median_us']:.0f} | {h['p99_us']:.0f} | {h['ops_per_s']:.0f} "
            f"| {i['median_us']:.0f} | {i['p99_us']:.0f} | {i['ops_per_s']:.0f} "
            f"| {s['median_us']:.0f} | {s['ops_per_s']:.0f} "
            f"| {h['median_us'] / s['median_us']:.1f}x |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--iterations", type=int, default=DEFAULT_ITERATIONS)
    args = parser.parse_args(argv)
    _pinned()
    report = trio.run(_run, args.iterations)
    REPORT_DIR.mkdir(parents=True, exist_ok=True)
    (REPORT_DIR / "hsm_bench.json").write_text(
        json.dumps(report, indent=2) + "\n", encoding="utf-8"
    )
    text = _markdown(report)
    (REPORT_DIR / "hsm_bench.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
