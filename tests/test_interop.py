"""Independent ISO 8583 stacks talk to the running switch, one shipped profile at a time.

The switch (pipeline, SQLite, SoftHSM, mutual TLS) serves a listener of each profile; the
requests are bytes made by another implementation from plain field dictionaries, and the
answers are read back field by field by that implementation:

- plain pyiso8583 with its own ``default_ascii`` (profile iso87-ascii) and ``default``
  (iso87-binary) specs: network management, a track-2 approval, a PIN purchase whose block
  psec builds and enciphers, and a chip purchase (pyemv's CVN 10 vector) whose ARPC comes back
  in DE55;
- the npm ``iso_8583`` package (iso87-binary), which always sends a secondary bitmap (all
  zero) and defines DE55 as text;
- tshark's ISO 8583 dissector, reading the PIN and chip purchases and their answers (DE52 and
  DE55 present) with no field flagged MALFORMED.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import iso8583
import pytest
import trio
from data_paths import DATA
from e2e_fixtures import CVN10_ARPC_ARC_3030, EMV_PAN, cvn10_de55, running_switch
from iso8583.specs import default as pyiso_default
from iso8583.specs import default_ascii as pyiso_default_ascii
from psec import des as psec_des
from psec import pinblock as psec_pinblock

from hsm.pkcs11 import Pkcs11Hsm
from switch.pki import PkiPaths
from switch.wire.emv import TlvMap
from switch.wire.framing import FrameDecoder, encode_frame

#: The demo card of the track-2 approval (CVV 561 in its track 2) and its track.
APPROVAL_PAN = "4123456789012345"
APPROVAL_TRACK2 = "4123456789012345D87011011000056100000"
#: The test card with PIN 2468 (PVV) and the demo zone PIN key in the clear.
PIN_PAN, PIN = "4000005555555555", "2468"
DEMO_ZPK = "0123456789ABCDEFFEDCBA9876543210"
WHEN = "1128120000"
#: Where scripts/bootstrap.sh installs the npm peer, and the script that drives it.
REPO = Path(__file__).resolve().parents[1]
NPM_PREFIX = Path(os.environ.get("ISO8583_NPM_PREFIX", REPO / "var" / "npm"))
NPM_PEER = DATA / "interop" / "iso8583_peer.js"

Fields = dict[str, str]


def _pin_block() -> str:
    """ISO 9564 format 0 block of PIN 2468 for the PIN card, under the demo ZPK (psec)."""
    clear = psec_pinblock.encode_pinblock_iso_0(PIN, PIN_PAN)
    return psec_des.encrypt_tdes_ecb(bytes.fromhex(DEMO_ZPK), clear).hex().upper()


def _requests() -> dict[str, Fields]:
    """The requests, by name, as plain field dictionaries (no switch code builds them)."""
    base = {
        "3": "000000",
        "7": WHEN,
        "12": WHEN[4:],
        "13": WHEN[:4],
        "41": "TERM0001",
        "42": "MERCHANT0000001",
        "49": "978",
    }
    return {
        "echo": {"t": "0800", "7": WHEN, "11": "000701", "70": "301"},
        "approval": {
            **base,
            "t": "0100",
            "4": "000000001250",
            "11": "000702",
            "22": "901",
            "35": APPROVAL_TRACK2,
        },
        "pin": {
            **base,
            "t": "0200",
            "2": PIN_PAN,
            "4": "000000000100",
            "11": "000703",
            "22": "021",
            "52": _pin_block(),
        },
        "chip": {
            **base,
            "t": "0100",
            "2": EMV_PAN,
            "3": "010000",
            "4": "000000004000",
            "7": "1105120000",
            "12": "120000",
            "13": "1105",
            "11": "000704",
            "19": "124",
            "22": "051",
            "49": "124",
            "55": cvn10_de55().hex().upper(),
        },
    }


def _check_answers(answers: Mapping[str, Fields]) -> None:
    """What each answer must say, read from the peer's own decoding."""
    echo = answers["echo"]
    assert (echo["t"], echo["39"], echo["70"], echo["11"]) == ("0810", "00", "301", "000701")
    approval = answers["approval"]
    assert (approval["t"], approval["39"], approval["11"]) == ("0110", "00", "000702")
    assert approval["4"] == "000000001250" and len(approval["38"]) == 6
    pin = answers["pin"]
    assert (pin["t"], pin["39"], pin["2"]) == ("0210", "00", PIN_PAN)
    chip = answers["chip"]
    assert (chip["t"], chip["39"], chip["11"]) == ("0110", "00", "000704")
    issuer_auth = TlvMap.from_bytes(bytes.fromhex(chip["55"]))[0x91]
    assert issuer_auth.hex().upper() == CVN10_ARPC_ARC_3030 + "3030"


async def _exchange(port: int, ctx: ssl.SSLContext, frames: list[bytes]) -> list[bytes]:
    """Send framed requests on one connection; the answer frames, as many as were sent."""
    stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=ctx)
    decoder = FrameDecoder("binary2")
    answers: list[bytes] = []
    async with stream:
        with trio.fail_after(15):
            await stream.send_all(b"".join(frames))
            while len(answers) < len(frames):
                chunk = await stream.receive_some(65536)
                assert chunk, "the switch closed the connection"
                answers += decoder.feed(bytes(chunk))
    return answers


def _by_stan(answers: list[Fields], requests: Mapping[str, Fields]) -> dict[str, Fields]:
    stans = {fields["11"]: name for name, fields in requests.items()}
    return {stans[a["11"]]: a for a in answers}


@pytest.mark.parametrize(
    ("network", "peer_spec"),
    [("iso87-ascii", pyiso_default_ascii), ("iso87-binary", pyiso_default)],
    ids=["iso87-ascii=default_ascii", "iso87-binary=default"],
)
async def test_plain_pyiso8583_client(  # noqa: PLR0917 - pytest fixtures
    pki: PkiPaths,
    demo_hsm: Pkcs11Hsm,
    card_rows: list[Any],
    tmp_path: Path,
    client_ctx: ssl.SSLContext,
    network: str,
    peer_spec: dict[str, Any],
) -> None:
    requests = _requests()
    frames = [encode_frame(bytes(iso8583.encode(dict(f), peer_spec)[0])) for f in requests.values()]
    async with running_switch(pki, demo_hsm, card_rows, tmp_path, network=network) as sw:
        raw = await _exchange(sw.port, client_ctx, frames)
    answers = [iso8583.decode(body, peer_spec)[0] for body in raw]
    _check_answers(_by_stan(answers, requests))


# -- npm iso_8583 ------------------------------------------------------------------------------


def _npm(request: Mapping[str, Any]) -> str:
    done = subprocess.run(
        ["node", str(NPM_PEER)],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "ISO8583_NPM_PREFIX": str(NPM_PREFIX)},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


npm_available = pytest.mark.skipif(
    shutil.which("node") is None
    or not (NPM_PREFIX / "node_modules" / "iso_8583" / "package.json").is_file(),
    reason="node or the npm iso_8583 package (scripts/bootstrap.sh installs it) missing",
)


def _npm_fields(fields: Fields) -> dict[str, str]:
    """The package's field names: "0" for the MTI."""
    return {("0" if k == "t" else k): v for k, v in fields.items()}


@npm_available
async def test_npm_iso_8583_client_on_the_binary_profile(
    pki: PkiPaths,
    demo_hsm: Pkcs11Hsm,
    card_rows: list[Any],
    tmp_path: Path,
    client_ctx: ssl.SSLContext,
) -> None:
    """Echo, approval and PIN purchase from the npm package; its DE55 is text, so its chip
    request carries the hex of the TLV as characters: not chip data on a raw-binary DE55,
    declined (not approved) with an answer the package still reads."""
    requests = _requests()
    frames = [
        bytes.fromhex(_npm({"mode": "encode", "fields": _npm_fields(f)})) for f in requests.values()
    ]
    # The package frames with a 2-byte length and always sends a secondary bitmap.
    assert all(int.from_bytes(f[:2], "big") == len(f) - 2 for f in frames)
    assert all(f[6] & 0x80 for f in frames)
    async with running_switch(pki, demo_hsm, card_rows, tmp_path, network="iso87-binary") as sw:
        raw = await _exchange(sw.port, client_ctx, frames)
    answers = []
    for body in raw:
        read = json.loads(_npm({"mode": "decode", "hex": encode_frame(body).hex()}))
        answers.append({("t" if k == "0" else k): v for k, v in read.items()})
    by_name = _by_stan(answers, requests)
    chip = by_name["chip"]
    assert chip["t"] == "0110" and chip["39"] != "00"
    echo, approval, pin = by_name["echo"], by_name["approval"], by_name["pin"]
    assert (echo["t"], echo["39"], echo["70"]) == ("0810", "00", "301")
    assert (approval["t"], approval["39"], approval["4"]) == ("0110", "00", "000000001250")
    assert (pin["t"], pin["39"], pin["2"]) == ("0210", "00", PIN_PAN)


# -- tshark ----------------------------------------------------------------------------------

tshark_available = pytest.mark.skipif(
    shutil.which("tshark") is None or shutil.which("text2pcap") is None,
    reason="tshark/text2pcap (Debian package tshark) not installed",
)
#: Fields asked of tshark's dissector, in output order.
TSHARK_FIELDS = ("mti", "bit2", "bit4", "bit11", "bit39", "bit52", "bit55")


def _dissect(frames: list[bytes], tmp: Path) -> list[dict[str, str]]:
    """tshark's reading of each framed message (one TCP packet each)."""
    dump, pcap = tmp / "frames.txt", tmp / "frames.pcap"
    lines = []
    for frame in frames:
        lines += [
            f"{off:06x} " + " ".join(f"{b:02x}" for b in frame[off : off + 16])
            for off in range(0, len(frame), 16)
        ]
    dump.write_text("\n".join(lines) + "\n")
    subprocess.run(
        ["text2pcap", "-q", "-T", "40000,8583", str(dump), str(pcap)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    cmd = ["tshark", "-r", str(pcap), "-d", "tcp.port==8583,iso8583"]
    cmd += ["-o", "iso8583.len_endian:Big endian", "-T", "fields", "-E", "separator=|"]
    for name in TSHARK_FIELDS:
        cmd += ["-e", f"iso8583.{name}"]
    cmd += ["-e", "_ws.malformed", "-e", "_ws.expert"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout
    rows = []
    for row in out.splitlines():
        values = row.split("|")
        assert values[-2] == "" and values[-1] == "", f"tshark flagged a message: {row}"
        rows.append(dict(zip(TSHARK_FIELDS, values, strict=False)))
    return rows


@tshark_available
async def test_tshark_reads_pin_and_chip_purchases_both_ways(
    pki: PkiPaths,
    demo_hsm: Pkcs11Hsm,
    card_rows: list[Any],
    tmp_path: Path,
    client_ctx: ssl.SSLContext,
) -> None:
    requests = {k: v for k, v in _requests().items() if k in ("pin", "chip")}
    frames = [
        encode_frame(bytes(iso8583.encode(dict(f), pyiso_default_ascii)[0]))
        for f in requests.values()
    ]
    async with running_switch(pki, demo_hsm, card_rows, tmp_path, network="iso87-ascii") as sw:
        raw = await _exchange(sw.port, client_ctx, frames)
    answers = [iso8583.decode(body, pyiso_default_ascii)[0] for body in raw]
    by_name = _by_stan(answers, requests)
    assert by_name["pin"]["39"] == by_name["chip"]["39"] == "00"
    rows = await trio.to_thread.run_sync(
        _dissect, frames + [encode_frame(b) for b in raw], tmp_path
    )
    pin_req, chip_req, *answer_rows = rows
    assert pin_req["bit52"].upper() == requests["pin"]["52"]
    assert chip_req["bit55"].upper() == requests["chip"]["55"]
    by_stan = {row["bit11"]: row for row in answer_rows}
    chip_answer = by_stan["000704"]
    assert chip_answer["mti"] == "0110" and chip_answer["bit39"] == "00"
    assert chip_answer["bit55"].upper() == by_name["chip"]["55"].upper()
    assert by_stan["000703"]["bit39"] == "00"
