"""End to end: the real server over mutual TLS, the pipeline, SQLite and SoftHSM via PKCS#11.

Expected security values come from the published vectors (Visa CVV table, pyemv CVN 10
ARQC/ARPC), not from our own code.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
from e2e_fixtures import (
    CVN10_ARPC_ARC_3030,
    CVN10_ARQC,
    EMV_PAN,
    Switch,
    cvn10_request,
    running_switch,
)

from hsm.pkcs11 import Pkcs11Hsm
from switch.acquirer import build_auth, build_reversal, encipher_pin
from switch.client import Client
from switch.config import StoreConfig
from switch.pki import PkiPaths
from switch.store.models import CardStatus
from switch.wire import emv
from switch.wire.messages import AuthRequest, AuthResponse, ReversalResponse, Track2

#: Visa CVV table vector: PAN, expiry 8701, service code 101 -> CVV 561 (under demo-cvk).
APPROVAL_PAN = "4123456789012345"
APPROVAL_TRACK2 = Track2(APPROVAL_PAN, "8701", "101", "1" + "0000" + "561" + "0000")
SMALL_PAN = "4666655554444111"  # balance 100
BLOCKED_PAN = "4333322221111222"
VELOCITY_PAN = "4000001234567899"  # 2 a day, 50.00 a day
RACE_PAN = "4000009876543210"  # balance covers 20 x 7.00
PIN_PAN = "4000005555555555"  # PIN 2468 by PVV, 3 tries
DEMO_ZPK = "0123456789ABCDEFFEDCBA9876543210"


@pytest.fixture
async def switch(
    pki: PkiPaths,
    demo_hsm: Pkcs11Hsm,
    card_rows: list[Any],
    tmp_path: Path,
    e2e_store: StoreConfig,
) -> Any:
    async with running_switch(pki, demo_hsm, card_rows, tmp_path, store=e2e_store) as sw:
        yield sw


async def _ask(sw: Switch, ctx: ssl.SSLContext, *messages: Any) -> list[Any]:
    # The listener's profile says where the CVV2 goes (DE126.10 for Visa).
    spec = sw.config.listeners[0].spec
    async with Client.connect("127.0.0.1", sw.port, ctx, spec=spec) as client:
        answers = []
        with trio.fail_after(10):
            for message in messages:
                answers.append(await client.request(message))
        return answers


async def _available(sw: Switch, account: str) -> int:
    acct = await sw.store.get_account(account)
    assert acct is not None
    return acct.available_balance


async def test_approval_with_track2_cvv(switch: Switch, client_ctx: ssl.SSLContext) -> None:
    (answer,) = await _ask(
        switch,
        client_ctx,
        build_auth(APPROVAL_PAN, 1000, track2=APPROVAL_TRACK2, pos_entry_mode="901"),
    )
    assert isinstance(answer, AuthResponse)
    assert answer.response_code == "00"
    assert answer.approval_code is not None and len(answer.approval_code) == 6
    balance = answer.available_balance
    assert balance is not None and (balance.amount, balance.currency) == (1_000_000 - 1000, "978")
    assert await _available(switch, "demo-acct-main") == 1_000_000 - 1000


@pytest.mark.parametrize(
    ("name", "kwargs", "code"),
    [
        ("unknown card", {"pan": "4999999999999999"}, "14"),
        ("expiry mismatch", {"pan": APPROVAL_PAN, "expiry": "8612"}, "54"),
        ("blocked card", {"pan": BLOCKED_PAN}, "62"),
        (
            "wrong CVV on track 2",
            {"pan": APPROVAL_PAN, "track2": Track2(APPROVAL_PAN, "8701", "101", "10000562")},
            "82",
        ),
        ("wrong CVV2 (Visa N7)", {"pan": APPROVAL_PAN, "cvv2": "999"}, "N7"),
        ("over per-transaction max", {"pan": APPROVAL_PAN, "amount": 600_000}, "61"),
        ("blocked MCC", {"pan": EMV_PAN, "currency": "124", "mcc": "7995"}, "57"),
        ("blocked country", {"pan": EMV_PAN, "currency": "124", "country": "408"}, "57"),
        ("insufficient funds", {"pan": SMALL_PAN, "amount": 1000}, "51"),
        ("unsupported processing code", {"pan": APPROVAL_PAN, "processing_code": "200000"}, "12"),
        ("currency of another account", {"pan": APPROVAL_PAN, "currency": "840"}, "57"),
    ],
)
async def test_declines(
    switch: Switch, client_ctx: ssl.SSLContext, name: str, kwargs: dict[str, Any], code: str
) -> None:
    args = {"amount": 1000, **kwargs}
    pan, amount = args.pop("pan"), args.pop("amount")
    (answer,) = await _ask(switch, client_ctx, build_auth(pan, amount, **args))
    assert answer.response_code == code, name
    assert answer.approval_code is None


@pytest.mark.parametrize(("status", "code"), [(CardStatus.LOST, "41"), (CardStatus.STOLEN, "43")])
async def test_lost_and_stolen(
    switch: Switch, client_ctx: ssl.SSLContext, status: CardStatus, code: str
) -> None:
    card = next(c for c in await switch.store.list_cards() if c.last4 == "2345")
    assert await switch.store.set_card_status(card.id, status)
    (answer,) = await _ask(switch, client_ctx, build_auth(APPROVAL_PAN, 1000))
    assert answer.response_code == code


async def test_velocity_count_and_amount(switch: Switch, client_ctx: ssl.SSLContext) -> None:
    answers = await _ask(
        switch,
        client_ctx,
        build_auth(VELOCITY_PAN, 100),
        build_auth(VELOCITY_PAN, 100),
        build_auth(VELOCITY_PAN, 100),
    )
    assert [a.response_code for a in answers] == ["00", "00", "65"]


async def test_velocity_amount(switch: Switch, client_ctx: ssl.SSLContext) -> None:
    answers = await _ask(
        switch, client_ctx, build_auth(VELOCITY_PAN, 4000), build_auth(VELOCITY_PAN, 1500)
    )
    assert [a.response_code for a in answers] == ["00", "61"]


async def test_arqc_verified_and_arpc_returned(switch: Switch, client_ctx: ssl.SSLContext) -> None:
    request = cvn10_request()
    (answer,) = await _ask(switch, client_ctx, request)
    assert answer.response_code == "00"
    assert answer.emv is not None
    issuer_auth = emv.TlvMap.from_bytes(answer.emv)[0x91]
    assert issuer_auth.hex().upper() == CVN10_ARPC_ARC_3030 + "3030"


async def test_repeated_chip_request_gets_the_same_arpc(
    switch: Switch, client_ctx: ssl.SSLContext
) -> None:
    request = cvn10_request()
    repeat = replace(request, mti="0101")
    first, again = await _ask(switch, client_ctx, request, repeat)
    assert first.response_code == again.response_code == "00"
    assert first.approval_code == again.approval_code
    for answer in (first, again):
        assert answer.emv is not None
        issuer_auth = emv.TlvMap.from_bytes(answer.emv)[0x91]
        assert issuer_auth.hex().upper() == CVN10_ARPC_ARC_3030 + "3030"
    assert await _available(switch, "demo-acct-emv") == 500_000 - 4000


async def test_tampered_arqc_declined(switch: Switch, client_ctx: ssl.SSLContext) -> None:
    tampered = CVN10_ARQC[:-1] + ("F" if CVN10_ARQC[-1] != "F" else "E")
    request = cvn10_request(tampered)
    (answer,) = await _ask(switch, client_ctx, request)
    assert answer.response_code == "82"  # Visa: negative CAM result
    assert answer.emv is None
    assert await _available(switch, "demo-acct-emv") == 500_000


async def test_full_and_partial_reversal(switch: Switch, client_ctx: ssl.SSLContext) -> None:
    first = build_auth(APPROVAL_PAN, 10_000)
    second = build_auth(APPROVAL_PAN, 5_000)
    answers = await _ask(switch, client_ctx, first, second)
    assert [a.response_code for a in answers] == ["00", "00"]
    assert await _available(switch, "demo-acct-main") == 1_000_000 - 15_000
    partial = build_reversal(first, replacement_amount=4_000)  # 6,000 given back
    full = build_reversal(second)
    answers = await _ask(switch, client_ctx, partial, full)
    assert all(isinstance(a, ReversalResponse) and a.response_code == "00" for a in answers)
    assert await _available(switch, "demo-acct-main") == 1_000_000 - 4_000
    assert await switch.store.active_holds_total("demo-acct-main") == 4_000


async def test_repeat_reversal_releases_once(switch: Switch, client_ctx: ssl.SSLContext) -> None:
    original = build_auth(APPROVAL_PAN, 10_000)
    reversal = build_reversal(original)
    repeat = build_reversal(
        original, mti="0401", stan=reversal.stan, when=reversal.transmission_time
    )
    advice = build_reversal(original, mti="0420")  # another reversal of the same original
    answers = await _ask(switch, client_ctx, original, reversal, repeat, advice)
    assert [a.response_code for a in answers] == ["00", "00", "00", "00"]
    assert await _available(switch, "demo-acct-main") == 1_000_000
    assert await switch.store.active_holds_total("demo-acct-main") == 0


async def test_duplicate_is_replayed_without_second_hold(
    switch: Switch, client_ctx: ssl.SSLContext
) -> None:
    request = build_auth(APPROVAL_PAN, 2_500)
    repeat = AuthRequest(**{**_fields(request), "mti": "0101"})
    first, again, repeated = await _ask(switch, client_ctx, request, request, repeat)
    assert first.response_code == again.response_code == repeated.response_code == "00"
    assert first.approval_code == again.approval_code == repeated.approval_code
    assert repeated.mti == "0110"
    assert await _available(switch, "demo-acct-main") == 1_000_000 - 2_500


async def test_repeat_0101_of_unseen_original_is_processed(
    switch: Switch, client_ctx: ssl.SSLContext
) -> None:
    (answer,) = await _ask(switch, client_ctx, build_auth(APPROVAL_PAN, 700, mti="0101"))
    assert (answer.mti, answer.response_code) == ("0110", "00")
    assert await _available(switch, "demo-acct-main") == 1_000_000 - 700


async def test_advice_applied_never_declined(switch: Switch, client_ctx: ssl.SSLContext) -> None:
    (answer,) = await _ask(switch, client_ctx, build_auth(SMALL_PAN, 1000, mti="0120"))
    assert (answer.mti, answer.response_code) == ("0130", "00")
    assert await _available(switch, "demo-acct-small") == 100 - 1000


async def test_advice_repeat_applied_once(switch: Switch, client_ctx: ssl.SSLContext) -> None:
    advice = build_auth(SMALL_PAN, 40, mti="0120")
    repeat = replace(advice, mti="0121")
    answers = await _ask(switch, client_ctx, advice, repeat, advice)
    assert [(a.mti, a.response_code) for a in answers] == [("0130", "00")] * 3
    assert await _available(switch, "demo-acct-small") == 100 - 40


async def test_advice_of_a_network_decline_moves_no_money(
    switch: Switch, client_ctx: ssl.SSLContext
) -> None:
    declined = replace(build_auth(APPROVAL_PAN, 5000, mti="0120"), response_code="05")
    unknown = build_auth("4999999999999999", 5000, mti="0220")
    answers = await _ask(switch, client_ctx, declined, unknown)
    assert [(a.mti, a.response_code) for a in answers] == [("0130", "00"), ("0230", "00")]
    assert await _available(switch, "demo-acct-main") == 1_000_000
    assert await switch.store.active_holds_total("demo-acct-main") == 0


async def test_financial_0200_debits(switch: Switch, client_ctx: ssl.SSLContext) -> None:
    (answer,) = await _ask(switch, client_ctx, build_auth(APPROVAL_PAN, 3000, mti="0200"))
    assert (answer.mti, answer.response_code) == ("0210", "00")
    acct = await switch.store.get_account("demo-acct-main")
    assert acct is not None
    assert (acct.ledger_balance, acct.available_balance) == (1_000_000 - 3000, 1_000_000 - 3000)


async def test_reversal_before_original(switch: Switch, client_ctx: ssl.SSLContext) -> None:
    original = build_auth(APPROVAL_PAN, 1000)
    (ack,) = await _ask(switch, client_ctx, build_reversal(original))
    assert ack.response_code == "00"
    (late,) = await _ask(switch, client_ctx, original)
    assert late.response_code == "05"
    assert await _available(switch, "demo-acct-main") == 1_000_000


def _pin(pin: str) -> bytes:
    return encipher_pin(pin, PIN_PAN, DEMO_ZPK)


async def test_pin_tries_to_75(switch: Switch, client_ctx: ssl.SSLContext) -> None:
    answers = await _ask(
        switch,
        client_ctx,
        build_auth(PIN_PAN, 100, pin_block=_pin("1111")),
        build_auth(PIN_PAN, 100, pin_block=_pin("1111")),
        build_auth(PIN_PAN, 100, pin_block=_pin("1111")),
        build_auth(PIN_PAN, 100, pin_block=_pin("2468")),  # right PIN, but locked
    )
    assert [a.response_code for a in answers] == ["55", "55", "75", "75"]


async def test_pin_try_counter_resets_and_replay_counts_once(
    switch: Switch, client_ctx: ssl.SSLContext
) -> None:
    wrong = build_auth(PIN_PAN, 100, pin_block=_pin("1111"))
    answers = await _ask(
        switch,
        client_ctx,
        wrong,
        wrong,  # a duplicate: replayed, not counted again
        build_auth(PIN_PAN, 100, pin_block=_pin("1111")),
        build_auth(PIN_PAN, 100, pin_block=_pin("2468")),  # resets
        build_auth(PIN_PAN, 100, pin_block=_pin("1111")),
        build_auth(PIN_PAN, 100, pin_block=_pin("1111")),
    )
    assert [a.response_code for a in answers] == ["55", "55", "55", "00", "55", "55"]
    card = next(c for c in await switch.store.list_cards() if c.last4 == "5555")
    assert card.pin_tries == 2


async def test_50_concurrent_on_balance_for_20(switch: Switch, client_ctx: ssl.SSLContext) -> None:
    codes: list[str] = []
    async with (
        Client.connect("127.0.0.1", switch.port, client_ctx) as one,
        Client.connect("127.0.0.1", switch.port, client_ctx) as two,
    ):

        async def send(i: int) -> None:
            client = one if i % 2 else two
            answer = await client.request(build_auth(RACE_PAN, 700, stan=f"{i + 1:06d}"))
            assert isinstance(answer, AuthResponse)
            codes.append(answer.response_code)

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                for i in range(50):
                    nursery.start_soon(send, i)
    assert codes.count("00") == 20
    assert codes.count("51") == 30
    assert await _available(switch, "acct-race") == 0
    assert await switch.store.active_holds_total("acct-race") == 20 * 700


async def test_no_card_data_in_database_or_logs(switch: Switch, client_ctx: ssl.SSLContext) -> None:
    pin_block = _pin("2468")
    await _ask(
        switch,
        client_ctx,
        build_auth(APPROVAL_PAN, 100, track2=APPROVAL_TRACK2, cvv2="123", pos_entry_mode="901"),
        build_auth(PIN_PAN, 100, pin_block=pin_block),
        cvn10_request(),
        build_auth("4999999999999999", 100),
    )
    sentinels = {
        "full PAN": APPROVAL_PAN.encode(),
        "PIN PAN": PIN_PAN.encode(),
        "unknown PAN": b"4999999999999999",
        "track 2": APPROVAL_TRACK2.to_text().encode(),
        "PIN block hex": pin_block.hex().encode(),
        "PIN block hex upper": pin_block.hex().upper().encode(),
        "PIN block raw": pin_block,
        "ARQC": bytes.fromhex(CVN10_ARQC),
        "ARQC hex": CVN10_ARQC.encode(),
        "CVV2 subelement": b"9203123",
    }
    blobs = switch.stored_bytes()
    blobs["log"] = switch.log.getvalue().encode()
    assert b"answered" in blobs["log"]  # the log was captured
    for where, blob in blobs.items():
        for name, sentinel in sentinels.items():
            assert sentinel not in blob, f"{name} found in {where}"


def _fields(message: Any) -> dict[str, Any]:
    return {name: getattr(message, name) for name in message.__dataclass_fields__}


async def test_log_line_names_the_reason_the_store_decided(
    switch: Switch, client_ctx: ssl.SSLContext
) -> None:
    (answer,) = await _ask(switch, client_ctx, build_auth(SMALL_PAN, 1000, stan="005151"))
    assert answer.response_code == "51"
    lines = [json.loads(line) for line in switch.log.getvalue().splitlines()]
    (line,) = [e for e in lines if e.get("event") == "answered" and e.get("stan") == "005151"]
    assert line["reason"] == "insufficient_funds"
