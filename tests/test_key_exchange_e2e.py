"""Key exchange end to end: the real server over mutual TLS, the pipeline, SQLite and SoftHSM.

The demo listener's ZPK is demo-zpk; its zone master key demo-zmk is the TR-31:2018 annex
example KBPK (config/demo/keys.json). A new ZPK arrives in an 0800 DE70 161/101, in DE48 as
the key under the ZMK (ECB) plus its check value, or as a TR-31 block built by psec. Values
under the keys are computed here with ``cryptography`` and psec (independent of the switch's
own cipher code). The demo card 4123456789012345 holds PIN 1234 by Visa PVV; DE39 values are
ISO 8583:1987's (00 approved, 55 incorrect PIN, 63 security violation).
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psec.pinblock
import psec.tr31
import pytest
import trio
from e2e_fixtures import Switch, running_switch
from test_key_exchange import tdes_ecb, tdes_kcv

from hsm.pkcs11 import Pkcs11Hsm
from switch.acquirer import build_auth, echo
from switch.client import Client
from switch.pki import PkiPaths
from switch.wire.messages import AuthResponse, NetworkResponse

pytestmark = pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")

PAN = "4123456789012345"
PIN = "1234"
#: demo-zpk and demo-zmk (public test keys, config/demo/keys.json).
OLD_ZPK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
ZMK = bytes.fromhex("DD7515F2BFC17F85CE48F3CA25CB21F6")
#: The new ZPKs sent: public test values (tests/hsm_fixtures.py ZPK_1 and ZPK_2).
NEW_ZPK = bytes.fromhex("89ABCDEF0123456776543210FEDCBA98")
OTHER_ZPK = bytes.fromhex("FEDCBA98765432100123456789ABCDEF")
TIMEOUT = 60


def pin_block(zpk: bytes, pin: str = PIN) -> bytes:
    """An ISO 9564 format 0 block built by psec, enciphered with ``cryptography``."""
    return tdes_ecb(zpk, psec.pinblock.encode_pinblock_iso_0(pin, PAN))


async def exchange(client: Client, stan: str, key_data: str, code: str = "161") -> str:
    answer = await client.request(replace(echo(stan, code), key_data=key_data))
    assert isinstance(answer, NetworkResponse)
    assert (answer.stan, answer.code) == (stan, code)
    return answer.response_code


async def pin_code(client: Client, block: bytes) -> str:
    answer = await client.request(build_auth(PAN, 100, pin_block=block))
    assert isinstance(answer, AuthResponse)
    return answer.response_code


@pytest.fixture
async def raw_switch(
    pki: PkiPaths, demo_hsm: Pkcs11Hsm, card_rows: list[Any], tmp_path: Path
) -> AsyncIterator[Switch]:
    async with running_switch(pki, demo_hsm, card_rows, tmp_path, zmk="demo-zmk") as sw:
        yield sw


async def test_new_zpk_under_the_zmk_verifies_pins(
    raw_switch: Switch, client_ctx: ssl.SSLContext
) -> None:
    async with Client.connect("127.0.0.1", raw_switch.port, client_ctx) as client:
        with trio.fail_after(TIMEOUT):
            assert await pin_code(client, pin_block(OLD_ZPK)) == "00"
            key_data = tdes_ecb(ZMK, NEW_ZPK).hex().upper() + tdes_kcv(NEW_ZPK)
            assert await exchange(client, "000101", key_data) == "00"
            assert await pin_code(client, pin_block(NEW_ZPK)) == "00"
            assert await pin_code(client, pin_block(NEW_ZPK, "9999")) == "55"
            # The acquirer side moved too: a block under the old key no longer verifies.
            assert await pin_code(client, pin_block(OLD_ZPK)) != "00"
    assert "key_exchange" in raw_switch.log.getvalue()
    assert NEW_ZPK.hex().upper() not in raw_switch.log.getvalue().upper()


async def test_wrong_kcv_is_refused_and_the_old_key_stays_in_force(
    raw_switch: Switch, client_ctx: ssl.SSLContext
) -> None:
    before = {info.label for info in await raw_switch.hsm.list_keys()}
    async with Client.connect("127.0.0.1", raw_switch.port, client_ctx) as client:
        with trio.fail_after(TIMEOUT):
            key_data = tdes_ecb(ZMK, NEW_ZPK).hex().upper() + tdes_kcv(OTHER_ZPK)
            assert await exchange(client, "000201", key_data, code="101") == "63"
            assert await pin_code(client, pin_block(OLD_ZPK)) == "00"
            assert await pin_code(client, pin_block(NEW_ZPK)) != "00"
            # A block that does not even have the raw layout: refused the same way.
            assert await exchange(client, "000202", "00" * 10) == "63"
            assert await pin_code(client, pin_block(OLD_ZPK)) == "00"
    assert {info.label for info in await raw_switch.hsm.list_keys()} == before


async def test_tr31_block_under_the_zmk(
    pki: PkiPaths,
    demo_hsm: Pkcs11Hsm,
    card_rows: list[Any],
    tmp_path: Path,
    client_ctx: ssl.SSLContext,
) -> None:
    block = psec.tr31.wrap(ZMK, "B0000P0TE00N0000", NEW_ZPK)
    tampered = block[:-1] + ("0" if block[-1] != "0" else "1")
    async with (
        running_switch(pki, demo_hsm, card_rows, tmp_path, zmk="demo-zmk", key_block="tr31") as sw,
        Client.connect("127.0.0.1", sw.port, client_ctx) as client,
    ):
        with trio.fail_after(TIMEOUT):
            assert await exchange(client, "000301", tampered) == "63"
            assert await pin_code(client, pin_block(OLD_ZPK)) == "00"
            assert await exchange(client, "000302", block + tdes_kcv(NEW_ZPK)) == "00"
            assert await pin_code(client, pin_block(NEW_ZPK)) == "00"
