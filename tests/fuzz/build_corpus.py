"""Build the seed corpus of each fuzz target in tests/fuzz/corpus/<target>/.

What lives here: the valid messages the seeds are made of (every request and answer class
the switch speaks, built with ``switch.acquirer``, plus the real messages of
tests/data/iso8583_messages.json), and how each target's seed bytes are laid out (the
choice bytes ``fuzz.targets.Input`` reads, then the payload). Run it after changing a
target's input layout or the messages; the files it writes are committed:

    PYTHONPATH=$PWD:$PWD/tests python -m fuzz.build_corpus

What does not: the targets (targets.py), crashers (kept by hand or by the fuzzer in
tests/fuzz/crashers/<target>/).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace

from fuzz.targets import CORPUS_DIR, HEADERS, MAX_FRAMES, NETWORKS, SPECS
from switch.acquirer import build_auth, build_reversal, echo, encipher_pin, parse_track2
from switch.wire import codec
from switch.wire.framing import encode_frame
from switch.wire.messages import (
    AdditionalAmount,
    AuthResponse,
    Message,
    NetworkResponse,
    OriginalData,
    ReversalResponse,
    to_fields,
)
from switch.wire.spec import SPEC_KINDS, SpecChoice

DATA = CORPUS_DIR.parents[1] / "data" / "iso8583_messages.json"
ZPK = "0123456789ABCDEFFEDCBA9876543210"
PAN = "4123456789012345"
WHEN = "1201120000"


def valid_messages() -> list[Message]:
    """One of each message shape the switch reads or writes."""
    auth = build_auth(PAN, 1250, stan="000001", when=WHEN)
    pin = build_auth(PAN, 100, stan="000002", when=WHEN, pin_block=encipher_pin("1234", PAN, ZPK))
    swiped = build_auth(
        PAN,
        100,
        stan="000003",
        when=WHEN,
        pos_entry_mode="901",
        track2=parse_track2(f"{PAN}=87011011000056100000"),
    )
    chip = build_auth(
        "1234567890123456",
        4000,
        currency="124",
        stan="000004",
        when=WHEN,
        emv=bytes.fromhex("9F2608A1B2C3D4E5F607089F02060000000040009F360200FF"),
    )
    financial = build_auth(
        PAN, 500, mti="0200", stan="000005", when=WHEN, cvv2="561", expiry="8701"
    )
    advice = replace(auth, mti="0120", response_code="00")
    completion = replace(
        build_auth(PAN, 1000, mti="0220", stan="000006", when=WHEN),
        original=OriginalData("0100", "000001", WHEN, "12345678", "0"),
    )
    reversal = build_reversal(auth, stan="000007", when=WHEN)
    partial = build_reversal(auth, mti="0420", replacement_amount=250, stan="000008", when=WHEN)
    balance = AdditionalAmount("00", "02", "978", 998_750)
    return [
        auth,
        pin,
        swiped,
        chip,
        financial,
        advice,
        completion,
        reversal,
        partial,
        replace(auth, mti="0101"),
        replace(reversal, mti="0401"),
        echo("000009"),
        echo("000010", "001"),
        echo("000011", "002"),
        AuthResponse.answer(auth, "00", approval_code="123456", available_balance=balance),
        AuthResponse.answer(financial, "51"),
        ReversalResponse.answer(reversal, "00"),
        NetworkResponse.answer(echo("000012"), "00"),
    ]


def _bodies(spec: SpecChoice) -> list[bytes]:
    out = []
    for message in valid_messages():
        try:
            out.append(codec.encode(message, spec))
        except ValueError:  # a message this spec cannot lay out (DE52 of another size)
            continue
    return out


def _real_bodies() -> list[tuple[str, bytes]]:
    """(spec kind, body) of the published messages our specs read."""
    out = []
    for m in json.loads(DATA.read_text())["messages"]:
        kind = "binary" if m["encoding"]["bitmap"].startswith("binary") else "ascii"
        out.append((kind, bytes.fromhex(m["raw_hex"])))
    return out


def _write(target: str, seeds: list[bytes]) -> int:
    folder = CORPUS_DIR / target
    if folder.exists():
        for old in folder.iterdir():
            if old.name != "valid_fields.json":
                old.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    for seed in dict.fromkeys(seeds):
        (folder / hashlib.sha1(seed, usedforsecurity=False).hexdigest()[:16]).write_bytes(seed)
    return len(set(seeds))


def main() -> None:
    counts = {}
    real = _real_bodies()
    codec_seeds = []
    for i, spec in enumerate(SPECS):
        codec_seeds += [bytes([i]) + body for body in _bodies(spec)]
        kind = getattr(spec, "kind", spec)
        codec_seeds += [bytes([i]) + body for k, body in real if k == kind]
    counts["codec"] = _write("codec", codec_seeds)

    framing_seeds = []
    bodies = _bodies(SPECS[0])
    for h, header in enumerate(HEADERS):
        stream = b"".join(encode_frame(b, header) for b in bodies[:3])
        for m in range(len(MAX_FRAMES)):
            framing_seeds.append(bytes([h, m, 0]) + stream)
            framing_seeds.append(bytes([h, m, 3, 1, 5, 0xC1]) + stream)
        framing_seeds.append(bytes([h, 2, 0]) + stream[:-3])  # cut inside a frame
        framing_seeds.append(bytes([h, 2, 0]) + b"\x00\x00" + stream)  # zero length
    counts["framing"] = _write("framing", framing_seeds)

    session_seeds = []
    for h, header in enumerate(HEADERS):
        for s, kind in enumerate(SPEC_KINDS):
            spec_bodies = _bodies(SPECS[2 * s])
            stream = b"".join(encode_frame(b, header) for b in spec_bodies)
            for n in range(len(NETWORKS)):
                session_seeds.append(bytes([h, s, 2, n, 0, 0]) + stream)
            session_seeds.append(bytes([h, s, 2, 0, 0, 2, 7, 0xFF]) + stream)
            garbled = encode_frame(b"0100" + b"\xff" * 20, header)
            session_seeds.append(bytes([h, s, 2, 0, 0, 0]) + garbled + stream[:200])
            for k, body in real:
                if k == kind:
                    session_seeds.append(bytes([h, s, 2, 0, 0, 0]) + encode_frame(body, header))
    counts["session"] = _write("session", session_seeds)

    fields = [to_fields(m) for m in valid_messages()]
    folder = CORPUS_DIR / "messages"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "valid_fields.json").write_text(json.dumps(fields, indent=1, sort_keys=True) + "\n")
    message_seeds = [bytes([i, 0]) for i in range(len(fields))]
    message_seeds += [bytes([i, 3, 0, 7, 1, 40, 5]) for i in range(len(fields))]
    counts["messages"] = _write("messages", message_seeds)
    print(counts)


if __name__ == "__main__":
    main()
