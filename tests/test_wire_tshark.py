"""An independent decoder agrees with our bytes: Wireshark's ISO 8583 dissector (tshark)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from switch.wire import codec
from switch.wire.framing import encode_frame
from switch.wire.messages import (
    AdditionalAmount,
    AuthRequest,
    AuthResponse,
    Message,
    NetworkRequest,
    NetworkResponse,
)

pytestmark = pytest.mark.skipif(
    shutil.which("tshark") is None or shutil.which("text2pcap") is None,
    reason="tshark/text2pcap (Debian package tshark) not installed",
)

#: Fields asked of tshark, in output order.
TSHARK_FIELDS: tuple[str, ...] = ("mti", "bit2", "bit3", "bit4", "bit7", "bit11", "bit38")
TSHARK_FIELDS += ("bit39", "bit41", "bit49", "bit54", "bit70")


def tshark_decode(tmp_path: Path, msg: Message) -> dict[str, str]:
    frame = encode_frame(codec.encode(msg, "ascii"), "binary2")
    dump = tmp_path / "frame.txt"
    pcap = tmp_path / "frame.pcap"
    lines = [
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
    cmd += ["-e", "_ws.malformed"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout
    values = out.rstrip("\n").split("|")
    assert len(values) == len(TSHARK_FIELDS) + 1, out
    assert values[-1] == "", "tshark flagged the message as malformed"
    return {k: v for k, v in zip(TSHARK_FIELDS, values, strict=False) if v}


def test_0810_echo(tmp_path: Path) -> None:
    req = NetworkRequest(mti="0800", transmission_time="0611123456", stan="000042", code="301")
    got = tshark_decode(tmp_path, NetworkResponse.answer(req))
    assert got == {
        "mti": "0810",
        "bit7": "0611123456",
        "bit11": "000042",
        "bit39": "00",
        "bit70": "301",
    }


def test_0110_with_balance(tmp_path: Path) -> None:
    req = AuthRequest(
        mti="0100",
        pan="4761739001010010",
        processing_code="300000",
        amount=1000,
        transmission_time="0611123456",
        stan="000999",
        currency="978",
        terminal_id="TERM0001",
    )
    balance = AdditionalAmount(account_type="00", amount_type="02", currency="978", amount=-250)
    resp = AuthResponse.answer(req, "00", approval_code="A1B2C3", available_balance=balance)
    got = tshark_decode(tmp_path, resp)
    assert got == {
        "mti": "0110",
        "bit2": "4761739001010010",
        "bit3": "300000",
        "bit4": "000000001000",
        "bit7": "0611123456",
        "bit11": "000999",
        "bit38": "A1B2C3",
        "bit39": "00",
        "bit41": "TERM0001",
        "bit49": "978",
        "bit54": "0002978D000000000250",
    }
