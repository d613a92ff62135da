"""End to end with ISO 9564 format 4 PIN blocks: the real server over mutual TLS, the
pipeline, SQLite and SoftHSM2 via PKCS#11, a listener with ``pin_block_format = 4`` and the
demo AES zone PIN key; and ``cardswitch send`` building the block against it.

The demo card 4123456789012345 holds PIN 1234 by Visa PVV under demo-pvk; demo-zpk-aes is
psec's public AES test key (config/demo/keys.json). Expected DE39 values are ISO 8583's.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
from e2e_fixtures import Switch, running_switch
from psec import pinblock as psec_pinblock

from hsm.pkcs11 import Pkcs11Hsm
from switch.acquirer import build_auth, encipher_pin
from switch.cli.runner import ExitStatus
from switch.client import Client
from switch.pki import PkiPaths
from switch.session import listener_spec
from switch.testing import switch_env, write_config
from switch.wire.messages import AuthResponse
from switch.wire.spec import SPEC_KINDS

PAN = "4123456789012345"
PIN = "1234"
#: The clear values of demo-zpk-aes and demo-zpk (public test keys).
AES_ZPK = "00112233445566778899AABBCCDDEEFF"
TDES_ZPK = "0123456789ABCDEFFEDCBA9876543210"
#: Seconds one exchange or command may take.
TIMEOUT = 60


async def _codes(sw: Switch, ctx: ssl.SSLContext, *blocks: bytes) -> list[str]:
    """DE39 of one authorization per PIN block, sent in the listener's wire spec."""
    spec = listener_spec(sw.config.listeners[0])
    async with Client.connect("127.0.0.1", sw.port, ctx, spec=spec) as client:
        codes = []
        with trio.fail_after(TIMEOUT):
            for block in blocks:
                answer = await client.request(build_auth(PAN, 100, pin_block=block))
                assert isinstance(answer, AuthResponse)
                codes.append(answer.response_code)
        return codes


@pytest.fixture
async def switch4(
    pki: PkiPaths, demo_hsm: Pkcs11Hsm, card_rows: list[Any], tmp_path: Path
) -> AsyncIterator[Switch]:
    """A switch whose listener (ascii spec) takes format 4 blocks under demo-zpk-aes."""
    async with running_switch(
        pki, demo_hsm, card_rows, tmp_path, pin_block_format=4, zpk="demo-zpk-aes"
    ) as sw:
        yield sw


@pytest.fixture(params=SPEC_KINDS)
async def switch4_any_spec(
    request: pytest.FixtureRequest,
    pki: PkiPaths,
    demo_hsm: Pkcs11Hsm,
    card_rows: list[Any],
    tmp_path: Path,
) -> AsyncIterator[Switch]:
    """Like ``switch4``, in each wire spec in turn."""
    async with running_switch(
        pki,
        demo_hsm,
        card_rows,
        tmp_path,
        spec=request.param,
        pin_block_format=4,
        zpk="demo-zpk-aes",
    ) as sw:
        yield sw


async def test_format4_right_pin_approves_and_wrong_pin_declines_55(
    switch4_any_spec: Switch, client_ctx: ssl.SSLContext
) -> None:
    right = encipher_pin(PIN, PAN, AES_ZPK, 4)
    wrong = encipher_pin("4321", PAN, AES_ZPK, 4)
    assert len(right) == len(wrong) == 16
    codes = await _codes(switch4_any_spec, client_ctx, right, wrong, right)
    assert codes == ["00", "55", "00"]


async def test_format4_block_built_by_psec_is_approved(
    switch4: Switch, client_ctx: ssl.SSLContext
) -> None:
    block = psec_pinblock.encipher_pinblock_iso_4(bytes.fromhex(AES_ZPK), PIN, PAN)
    assert await _codes(switch4, client_ctx, block) == ["00"]


async def test_format4_block_under_another_aes_key_declines_55(
    switch4: Switch, client_ctx: ssl.SSLContext
) -> None:
    """The TDES demo key's bytes used as an AES key: the block deciphers to no format 4
    field, which the pipeline counts as a wrong PIN."""
    block = encipher_pin(PIN, PAN, TDES_ZPK, 4)
    assert await _codes(switch4, client_ctx, block) == ["55"]


async def test_tdes_sized_block_to_a_format4_listener_is_a_format_error(
    switch4: Switch, client_ctx: ssl.SSLContext
) -> None:
    """An 8-byte format 0 block in an 8-byte-DE52 frame: the format 4 listener misreads the
    message from DE52 on and answers 30, then serves the next request on the connection."""
    iso0 = build_auth(PAN, 100, pin_block=encipher_pin(PIN, PAN, TDES_ZPK, 0))
    async with Client.connect("127.0.0.1", switch4.port, client_ctx, spec="ascii") as plain:
        with trio.fail_after(TIMEOUT):
            refused = await plain.request(iso0)
    assert isinstance(refused, AuthResponse) and refused.response_code == "30"
    assert await _codes(switch4, client_ctx, encipher_pin(PIN, PAN, AES_ZPK, 4)) == ["00"]


async def _cardswitch(*argv: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(TIMEOUT):
        return await trio.run_process(
            [sys.executable, "-m", "switch", *argv],
            cwd=cwd,
            env=switch_env(),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


def _auth_argv(pin: str) -> list[str]:
    return ["auth", "--pan", PAN, "--amount", "100", "--pin", pin, "--zpk", AES_ZPK]


def _answer(done: subprocess.CompletedProcess[bytes]) -> Any:
    assert (done.returncode, done.stderr) == (ExitStatus.OK, b""), done.stderr
    return json.loads(done.stdout)


async def test_send_with_pin_format_4_gets_00_for_the_right_pin_and_55_for_a_wrong_one(
    switch4: Switch, pki: PkiPaths, tmp_path: Path
) -> None:
    """``--pin-format 4`` with the built-in configuration (whose listener is format 0)."""
    where = ["--port", str(switch4.port), "--pki-dir", str(pki.ca.parent)]
    right = await _cardswitch("send", *where, *_auth_argv(PIN), "--pin-format", "4", cwd=tmp_path)
    wrong = await _cardswitch(
        "send", *where, *_auth_argv("9999"), "--pin-format", "4", cwd=tmp_path
    )
    assert _answer(right)["response_code"] == "00"
    assert _answer(wrong)["response_code"] == "55"


async def test_send_takes_the_pin_format_of_the_configured_listener(
    switch4: Switch, tmp_path: Path
) -> None:
    """No ``--pin-format``: the configured listener's format 4 builds a 16-byte block."""
    listener = replace(switch4.config.listeners[0], port=switch4.port)
    path = write_config(replace(switch4.config, listeners=(listener,)), tmp_path / "switch.toml")
    done = await _cardswitch("send", "--config", str(path), *_auth_argv(PIN), cwd=tmp_path)
    assert _answer(done)["response_code"] == "00"
