"""An independent decoder reads what the switch really sends: a live capture on loopback.

tshark captures the mutual-TLS conversation between a client and the running switch
(pipeline, SQLite, SoftHSM); the client logs its TLS secrets (SSLKEYLOGFILE format) so tshark
itself decrypts the stream. The server's decrypted records are then decoded by Wireshark's
ISO 8583 dissector, and the fields must be the ones our client decoded.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
import trio
from e2e_fixtures import running_switch

from hsm.pkcs11 import Pkcs11Hsm
from switch.acquirer import build_auth, echo
from switch.client import Client
from switch.pki import PkiPaths
from switch.tls import client_context
from switch.wire.messages import AuthResponse, NetworkResponse, Track2

pytestmark = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("tshark", "text2pcap", "dumpcap")),
    reason="tshark/text2pcap (Debian package tshark) not installed",
)

#: Fields asked of tshark's ISO 8583 dissector, in output order.
FIELDS = ("mti", "bit2", "bit4", "bit7", "bit11", "bit38", "bit39", "bit54", "bit70")
#: Port the decrypted server stream is replayed from in the offline pcap.
REPLAY_PORT = 8583


async def _start_capture(port: int, pcap: Path) -> trio.Process:
    proc = await trio.lowlevel.open_process(
        ["tshark", "-q", "-i", "lo", "-f", f"tcp port {port}", "-w", str(pcap)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    seen = b""
    with trio.fail_after(20):
        while b"Capturing on" not in seen:
            chunk = await proc.stderr.receive_some(4096)
            if not chunk:
                pytest.skip(f"tshark cannot capture on lo here: {seen.decode(errors='replace')}")
            seen += chunk
    # dumpcap announces the interface slightly before its filter sees packets.
    await trio.sleep(1.0)
    return proc


def _server_records(pcap: Path, keylog: Path, port: int) -> list[bytes]:
    """The decrypted TLS records the server sent, as tshark's own TLS decryption gives them."""
    out = subprocess.run(
        [
            "tshark",
            "-r",
            str(pcap),
            "-q",
            "-o",
            f"tls.keylog_file:{keylog}",
            "-d",
            f"tcp.port=={port},tls",
            "-z",
            "follow,tls,raw,0",
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    records = []
    for line in out.splitlines():
        # Lines indented with a tab are node 0 (the client); the others are the server.
        if line and not line.startswith("\t") and all(c in "0123456789abcdef" for c in line):
            records.append(bytes.fromhex(line))
    return records


def _dissect(records: list[bytes], tmp: Path) -> list[dict[str, str]]:
    dump = tmp / "server.txt"
    lines = []
    for record in records:  # each record becomes one packet from the replay port
        lines += [
            f"{off:06x} " + " ".join(f"{b:02x}" for b in record[off : off + 16])
            for off in range(0, len(record), 16)
        ]
    dump.write_text("\n".join(lines) + "\n")
    replay = tmp / "server.pcap"
    subprocess.run(
        ["text2pcap", "-q", "-T", f"{REPLAY_PORT},40000", str(dump), str(replay)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    cmd = ["tshark", "-r", str(replay), "-d", f"tcp.port=={REPLAY_PORT},iso8583"]
    cmd += ["-o", "iso8583.len_endian:Big endian", "-Y", "iso8583"]
    cmd += ["-T", "fields", "-E", "separator=|", "-E", "occurrence=a"]
    for name in FIELDS:
        cmd += ["-e", f"iso8583.{name}"]
    cmd += ["-e", "_ws.malformed"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout
    decoded = []
    for row in out.splitlines():
        values = row.split("|")
        assert values[-1] == "", f"tshark flagged a message as malformed: {row}"
        decoded.append({k: v for k, v in zip(FIELDS, values, strict=False) if v})
    return decoded


async def test_tshark_decodes_what_the_switch_sends(
    pki: PkiPaths, demo_hsm: Pkcs11Hsm, card_rows: list[Any], tmp_path: Path
) -> None:
    pcap, keylog = tmp_path / "live.pcap", tmp_path / "keys.log"
    ctx: ssl.SSLContext = client_context(pki.ca, pki.client_cert, pki.client_key)
    ctx.keylog_filename = str(keylog)
    track2 = Track2("4123456789012345", "8701", "101", "1" + "0000" + "561")
    async with running_switch(pki, demo_hsm, card_rows, tmp_path) as sw:
        capture = await _start_capture(sw.port, pcap)
        try:
            async with Client.connect("127.0.0.1", sw.port, ctx) as client:
                with trio.fail_after(10):
                    network = await client.request(echo(stan="000321"))
                    auth = await client.request(
                        build_auth(
                            "4123456789012345",
                            1234,
                            stan="000322",
                            track2=track2,
                            pos_entry_mode="901",
                        )
                    )
            await trio.sleep(1.0)  # let the capture see the last packets
        finally:
            capture.send_signal(2)  # SIGINT: tshark writes the file out and exits
            with trio.move_on_after(10):
                await capture.wait()
            if capture.poll() is None:
                capture.kill()
    assert isinstance(network, NetworkResponse) and isinstance(auth, AuthResponse)
    assert auth.response_code == "00" and auth.approval_code
    balance = auth.available_balance
    assert balance is not None

    records = await trio.to_thread.run_sync(_server_records, pcap, keylog, sw.port)
    decoded = await trio.to_thread.run_sync(_dissect, records, tmp_path)
    assert decoded == [
        {
            "mti": "0810",
            "bit7": network.transmission_time,
            "bit11": "000321",
            "bit39": "00",
            "bit70": "301",
        },
        {
            "mti": "0110",
            "bit2": "4123456789012345",
            "bit4": "000000001234",
            "bit7": auth.transmission_time or "",
            "bit11": "000322",
            "bit38": auth.approval_code,
            "bit39": "00",
            "bit54": f"0002978C{balance.amount:012d}",
        },
    ]
