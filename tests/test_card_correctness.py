"""What a payment engineer would catch, each through the real server (mutual TLS, SoftHSM via
PKCS#11, SQLite): cryptograms bound to the message, duplicates and reversals that cannot be
fooled, advices and completions that convert instead of adding, money-field edge cases.

Chip values come from pyemv's published Visa CVN 10 vector (e2e_fixtures); every test that
moves money ends with the money invariants checked on the database.
"""

from __future__ import annotations

import json
import socket
import ssl
import struct
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import trio
from e2e_fixtures import EMV_PAN, Switch, cvn10_de55, cvn10_request, running_switch

from hsm.pkcs11 import Pkcs11Hsm
from switch.acquirer import build_auth, build_reversal
from switch.client import Client
from switch.config import StoreConfig
from switch.pki import PkiPaths
from switch.testing import write_config
from switch.tls import client_context
from switch.wire import codec
from switch.wire.framing import FrameDecoder, encode_frame
from switch.wire.messages import AuthResponse, OriginalData, ReversalResponse

APPROVAL_PAN = "4123456789012345"  # demo-acct-main, 1,000,000
OTHER_PAN = "1122334455667718"  # demo-acct-pvv, 500,000
RACE_PAN = "4000009876543210"  # acct-race, 14,000
SMALL_PAN = "4666655554444111"  # demo-acct-small, 100
WHEN = "1201101500"


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
    async with Client.connect("127.0.0.1", sw.port, ctx) as client:
        with trio.fail_after(10):
            return [await client.request(m) for m in messages]


def _invariants(sw: Switch) -> dict[str, tuple[int, int, int]]:
    """available = ledger - active holds on every account; one money row per journal row;
    nothing released beyond what was held. Returns (ledger, available, holds) by account."""
    figures = {}
    for acct, ledger, available in sw.query(
        "SELECT id, ledger_balance, available_balance FROM accounts"
    ):
        ((held,),) = sw.query(
            "SELECT coalesce(sum(remaining), 0) FROM holds WHERE account_id = ? AND kind = 'hold'",
            (acct,),
        )
        assert available == ledger - held, acct
        figures[acct] = (ledger, available, int(held))
    assert not sw.query("SELECT journal_id FROM holds GROUP BY journal_id HAVING count(*) > 1")
    assert not sw.query("SELECT id FROM holds WHERE remaining < 0 OR remaining > amount")
    return figures


# -- cryptograms bound to the message ---------------------------------------------------------


async def test_cryptogram_of_another_amount_is_declined_and_holds_nothing(
    switch: Switch, client_ctx: ssl.SSLContext
) -> None:
    """A valid CVN 10 cryptogram over CAD 40.00 sent with DE4 = 2,500.00 (before: 00 and
    2,500.00 held). Visa maps the mismatch to 82 (a cryptogram that does not cover it)."""
    (answer,) = await _ask(switch, client_ctx, replace(cvn10_request(), amount=250_000))
    assert (answer.response_code, answer.approval_code) == ("82", None)
    assert _invariants(switch)["demo-acct-emv"] == (500_000, 500_000, 0)


@pytest.mark.parametrize(
    ("field", "value"),
    [("currency", "978"), ("acquirer_country", "250"), ("local_date", "1106"),
     ("processing_code", "000000")],
)  # fmt: skip
async def test_cryptogram_bound_to_currency_country_date_and_type(
    switch: Switch, client_ctx: ssl.SSLContext, field: str, value: str
) -> None:
    request: Any = cvn10_request()
    (answer,) = await _ask(switch, client_ctx, replace(request, **{field: value}))
    assert answer.response_code != "00"
    assert _invariants(switch)["demo-acct-emv"][2] == 0


async def test_replayed_cryptogram_with_a_new_stan_is_declined(
    switch: Switch, client_ctx: ssl.SSLContext
) -> None:
    first, replayed = await _ask(
        switch, client_ctx, cvn10_request(stan="000101"), cvn10_request(stan="000102")
    )
    assert first.response_code == "00"
    assert (replayed.response_code, replayed.approval_code) == ("82", None)
    assert _invariants(switch)["demo-acct-emv"] == (500_000, 496_000, 4000)


async def test_chip_entry_without_chip_data_is_declined_by_default(
    switch: Switch, client_ctx: ssl.SSLContext
) -> None:
    no_de55 = replace(cvn10_request(), emv=None)
    fallback = build_auth(EMV_PAN, 100, currency="124", pos_entry_mode="901")
    answers = await _ask(switch, client_ctx, no_de55, fallback)
    assert [a.response_code for a in answers] == ["05", "05"]
    assert _invariants(switch)["demo-acct-emv"][2] == 0


async def test_chip_rules_follow_the_listener(
    pki: PkiPaths, demo_hsm: Pkcs11Hsm, card_rows: list[Any], tmp_path: Path,
    client_ctx: ssl.SSLContext,
) -> None:  # fmt: skip
    async with running_switch(
        pki, demo_hsm, card_rows, tmp_path, chip_without_emv="allow", chip_fallback="allow"
    ) as sw:
        answers = await _ask(
            sw, client_ctx,
            build_auth(APPROVAL_PAN, 100, pos_entry_mode="051"),
            build_auth(EMV_PAN, 100, currency="124", pos_entry_mode="901"),
        )  # fmt: skip
        assert [a.response_code for a in answers] == ["00", "00"]
        _invariants(sw)


# -- duplicates by key and content --------------------------------------------------------------


async def test_same_key_with_another_amount_gets_94_and_one_hold(
    switch: Switch, client_ctx: ssl.SSLContext
) -> None:
    first = build_auth(APPROVAL_PAN, 700, stan="000201", when=WHEN)
    other = replace(first, amount=999)
    answers = await _ask(switch, client_ctx, first, other, other, replace(first, mti="0101"))
    assert [a.response_code for a in answers] == ["00", "94", "94", "00"]
    assert answers[1].approval_code is None and answers[1].amount == 999
    assert answers[3].approval_code == answers[0].approval_code  # the repeat replays
    assert _invariants(switch)["demo-acct-main"] == (1_000_000, 999_300, 700)


# -- one way to name an original ----------------------------------------------------------------


async def test_reversals_release_only_their_own_cards_hold(
    switch: Switch, client_ctx: ssl.SSLContext
) -> None:
    """Approvals on two cards share DE32/DE11/DE7 (different DE37). Reversals naming the other
    card, another currency, or sharing only DE32/DE11/DE7 release nothing; each card's own
    reversal releases its own hold."""
    on_a = build_auth(APPROVAL_PAN, 700, stan="000301", when=WHEN, rrn="RRNA00000001")
    on_b = build_auth(OTHER_PAN, 500, stan="000301", when=WHEN, rrn="RRNB00000001")
    other_card = replace(build_reversal(on_a), pan=OTHER_PAN)  # names A's original, PAN B
    other_currency = replace(build_reversal(on_b), currency="840")
    shares_key_only = replace(build_reversal(on_a), pan=RACE_PAN, rrn="RRNC00000001")
    approved = await _ask(switch, client_ctx, on_a, on_b)
    assert [a.response_code for a in approved] == ["00", "00"]
    fooled = await _ask(switch, client_ctx, other_card, other_currency, shares_key_only)
    assert all(isinstance(a, ReversalResponse) and a.response_code == "00" for a in fooled)
    figures = _invariants(switch)
    assert figures["demo-acct-main"][2] == 700 and figures["demo-acct-pvv"][2] == 500
    own = await _ask(switch, client_ctx, build_reversal(on_a), build_reversal(on_b))
    assert all(a.response_code == "00" for a in own)
    figures = _invariants(switch)
    assert figures["demo-acct-main"] == (1_000_000, 1_000_000, 0)
    assert figures["demo-acct-pvv"] == (500_000, 500_000, 0)


async def test_partial_reversals_and_repeats_never_release_more_than_remains(
    switch: Switch, client_ctx: ssl.SSLContext
) -> None:
    original = build_auth(APPROVAL_PAN, 1000, stan="000401", when=WHEN)
    answers = await _ask(
        switch, client_ctx, original,
        build_reversal(original, replacement_amount=1500),  # above the original: nothing
        build_reversal(original, replacement_amount=600),  # 4.00 back
        build_reversal(original, stan="000499"),  # the rest, under another STAN
        build_reversal(original, stan="000498"),  # again: nothing left
    )  # fmt: skip
    assert all(a.response_code == "00" for a in answers)
    assert _invariants(switch)["demo-acct-main"] == (1_000_000, 1_000_000, 0)


async def test_reversal_of_a_declined_original_releases_nothing(
    switch: Switch, client_ctx: ssl.SSLContext
) -> None:
    declined = build_auth(SMALL_PAN, 5000, stan="000501", when=WHEN)
    answers = await _ask(switch, client_ctx, declined, build_reversal(declined))
    assert [a.response_code for a in answers] == ["51", "00"]
    assert _invariants(switch)["demo-acct-small"] == (100, 100, 0)


# -- advices and completions convert, never add -------------------------------------------------


async def test_authorization_and_its_advice_leave_one_hold(
    switch: Switch, client_ctx: ssl.SSLContext
) -> None:
    auth = build_auth(RACE_PAN, 1000, stan="000601", when=WHEN)
    answers = await _ask(switch, client_ctx, auth, replace(auth, mti="0120"))
    assert [(a.mti, a.response_code) for a in answers] == [("0110", "00"), ("0130", "00")]
    assert _invariants(switch)["acct-race"] == (14_000, 13_000, 1000)


async def test_financial_and_its_advice_leave_one_debit(
    switch: Switch, client_ctx: ssl.SSLContext
) -> None:
    purchase = build_auth(RACE_PAN, 1000, mti="0200", stan="000701", when=WHEN)
    answers = await _ask(switch, client_ctx, purchase, replace(purchase, mti="0220"))
    assert [(a.mti, a.response_code) for a in answers] == [("0210", "00"), ("0230", "00")]
    assert _invariants(switch)["acct-race"] == (13_000, 13_000, 0)


async def test_pre_authorization_and_completion_leave_one_debit_and_no_hold(
    switch: Switch, client_ctx: ssl.SSLContext
) -> None:
    pre = build_auth(RACE_PAN, 5000, stan="000801", when=WHEN)
    completion = replace(
        build_auth(RACE_PAN, 4200, mti="0220", stan="000802", when="1201180000"),
        rrn=pre.rrn,
        original=OriginalData(pre.mti, pre.stan, pre.transmission_time, "12345678", "0"),
    )
    answers = await _ask(switch, client_ctx, pre, completion, replace(completion, stan="000803"))
    assert [a.response_code for a in answers] == ["00", "00", "00"]
    # 50.00 held, then 42.00 debited and the hold released; the second completion adds nothing
    assert _invariants(switch)["acct-race"] == (14_000 - 4200, 14_000 - 4200, 0)
    late = await _ask(switch, client_ctx, build_reversal(pre))
    assert late[0].response_code == "00"
    assert _invariants(switch)["acct-race"] == (14_000 - 4200, 14_000 - 4200, 0)


@pytest.mark.parametrize("listed", [True, False], ids=["0120_listed", "0120_not_listed"])
async def test_0120_with_de90_follows_the_listeners_completion_mtis(  # noqa: PLR0917
    pki: PkiPaths,
    demo_hsm: Pkcs11Hsm,
    card_rows: list[Any],
    tmp_path: Path,
    e2e_store: StoreConfig,
    client_ctx: ssl.SSLContext,
    listed: bool,
) -> None:
    """A pre-authorization then an 0120 naming it in DE90 (new STAN), sent twice. With 0120
    in ``completion_mtis``: one debit of 42.00 and no hold left; otherwise the 0120 is an
    advice of the authorization already approved: the 50.00 hold stays and nothing is added."""
    mtis = ("0120", "0220") if listed else ("0220",)
    pre = build_auth(RACE_PAN, 5000, stan="000811", when=WHEN)
    advice = replace(
        build_auth(RACE_PAN, 4200, mti="0120", stan="000812", when="1201180000"),
        rrn=pre.rrn,
        original=OriginalData(pre.mti, pre.stan, pre.transmission_time, "12345678", "0"),
    )
    async with running_switch(
        pki, demo_hsm, card_rows, tmp_path, store=e2e_store, completion_mtis=mtis
    ) as sw:
        answers = await _ask(sw, client_ctx, pre, advice, replace(advice, stan="000813"))
        assert [a.response_code for a in answers] == ["00", "00", "00"]
        figures = _invariants(sw)["acct-race"]
        reasons = [r for (r,) in sw.query("SELECT reason FROM journal ORDER BY id")]
        debits = sw.query("SELECT amount FROM holds WHERE kind = 'debit'")
        if listed:
            assert figures == (14_000 - 4200, 14_000 - 4200, 0)
            assert reasons == ["approved", "completion_applied", "advice_already_applied"]
            assert debits == [(4200,)]
        else:
            assert figures == (14_000, 14_000 - 5000, 5000)
            assert reasons == ["approved", "advice_already_applied", "advice_already_applied"]
            assert debits == []
        late = await _ask(sw, client_ctx, build_reversal(pre))
        assert late[0].response_code == "00"
        after = _invariants(sw)["acct-race"]
        # The reversal gives back the hold once, or nothing after a completion.
        assert after == ((14_000 - 4200,) * 2 + (0,) if listed else (14_000, 14_000, 0))


async def test_advice_for_an_unknown_card_is_acknowledged_and_kept(
    switch: Switch, client_ctx: ssl.SSLContext
) -> None:
    (answer,) = await _ask(switch, client_ctx, build_auth("4999999999999999", 100, mti="0120"))
    assert answer.response_code == "00"
    assert switch.query("SELECT reason FROM journal") == [("advice_unknown_card",)]


# -- money-field edge cases ---------------------------------------------------------------------


async def test_zero_amount_is_an_account_verification_without_a_hold(
    switch: Switch, client_ctx: ssl.SSLContext
) -> None:
    answers = await _ask(
        switch, client_ctx, build_auth(APPROVAL_PAN, 0), build_auth(APPROVAL_PAN, 0, mti="0200")
    )
    assert answers[0].response_code == "00" and answers[0].approval_code
    assert answers[1].response_code == "13"  # a zero financial request is no verification
    assert _invariants(switch)["demo-acct-main"] == (1_000_000, 1_000_000, 0)


async def test_amount_at_the_de4_maximum_is_answered(
    switch: Switch, client_ctx: ssl.SSLContext
) -> None:
    (answer,) = await _ask(switch, client_ctx, build_auth(SMALL_PAN, 999_999_999_999))
    assert isinstance(answer, AuthResponse) and answer.response_code == "51"
    assert answer.amount == 999_999_999_999
    _invariants(switch)


# -- no approval without its answer --------------------------------------------------------------


async def test_valid_request_then_garbage_gets_its_answer_before_the_close(
    switch: Switch, pki: PkiPaths
) -> None:
    ctx = client_context(pki.ca, pki.client_cert, pki.client_key)
    request = build_auth(APPROVAL_PAN, 700, stan="000901", when=WHEN)
    spec = switch.config.listeners[0].spec
    header = switch.config.listeners[0].header
    data = encode_frame(codec.encode(request, spec), header) + encode_frame(b"\xff" * 20, header)
    with trio.fail_after(10):
        stream = await trio.open_ssl_over_tcp_stream("127.0.0.1", switch.port, ssl_context=ctx)
        await stream.send_all(data)
        received = b""
        while chunk := await stream.receive_some(65536):
            received += chunk
        await trio.aclose_forcefully(stream)
    frames = FrameDecoder(header, 8192).feed(received)
    answers = [codec.decode(f, spec) for f in frames]
    assert len(answers) == 1 and isinstance(answers[0], AuthResponse)
    assert (answers[0].stan, answers[0].response_code) == ("000901", "00")
    assert _invariants(switch)["demo-acct-main"][2] == 700


def test_vector_de55_helper_changes_only_named_tags() -> None:
    """The tests above rely on cvn10_de55 keeping the published values unless told."""
    from switch.wire.emv import TlvMap

    tlv = TlvMap.from_bytes(cvn10_de55(**{"9F02": "000000250000"}))
    assert tlv[0x9F02].hex() == "000000250000" and tlv[0x5F2A].hex() == "0124"


class _CommitWhenGateOpens:
    """The real store, except that the commit of ``stan`` waits until ``gate`` is set
    (``arrived`` says it is waiting): the answer is decided after its peer is gone."""

    def __init__(self, store: Any, stan: str) -> None:
        self._store, self._stan = store, stan
        self.arrived, self.gate = trio.Event(), trio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def commit_auth(self, intent: Any, *, deadline: float | None = None) -> Any:
        if intent.dup_key.stan == self._stan:
            self.arrived.set()
            await self.gate.wait()
        return await self._store.commit_auth(intent, deadline=deadline)


async def _logged(sw: Switch, event: str) -> None:
    """Wait (bounded: 1,000 looks) until the switch has logged ``event``."""
    for _ in range(1000):
        if any(json.loads(line).get("event") == event for line in sw.log.getvalue().splitlines()):
            return
        await trio.sleep(0.01)
    raise AssertionError(f"{event} never logged")


async def test_an_approval_whose_peer_went_away_is_marked_undelivered_on_its_row(  # noqa: PLR0917
    pki: PkiPaths,
    demo_hsm: Pkcs11Hsm,
    card_rows: list[Any],
    tmp_path: Path,
    e2e_store: StoreConfig,
    client_ctx: ssl.SSLContext,
) -> None:
    """0100 000952 is read, then its peer resets the connection before the approval is
    decided: the approval is journaled (700 held), its write fails, and its journal row is
    marked undelivered, which ``journal search --undelivered`` lists; the approval answered
    before it (000951) is not marked."""
    gated: list[_CommitWhenGateOpens] = []

    def wrap(store: Any) -> Any:
        gated.append(_CommitWhenGateOpens(store, "000952"))
        return gated[0]

    async with running_switch(
        pki, demo_hsm, card_rows, tmp_path, store=e2e_store, pipeline_store=wrap
    ) as sw:
        (sent,) = await _ask(sw, client_ctx, build_auth(APPROVAL_PAN, 300, stan="000951"))
        assert sent.response_code == "00"
        spec, header = sw.config.listeners[0].spec, sw.config.listeners[0].header
        request = build_auth(APPROVAL_PAN, 700, stan="000952", when=WHEN)
        with trio.fail_after(10):
            stream = await trio.open_ssl_over_tcp_stream(
                "127.0.0.1", sw.port, ssl_context=client_ctx
            )
            await stream.send_all(encode_frame(codec.encode(request, spec), header))
            await gated[0].arrived.wait()
            sock = stream.transport_stream.socket
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await trio.aclose_forcefully(stream)  # an RST: the peer is gone
        await _logged(sw, "read_failed")
        gated[0].gate.set()
        await _logged(sw, "delivery_marked")
        rows = sw.query(
            "SELECT stan, response_code, delivery, delivery_reason, delivery_at FROM journal "
            "ORDER BY id"
        )
        assert [r[:4] for r in rows] == [
            ("000951", "00", None, None),
            ("000952", "00", "undelivered", "write_failed"),
        ]
        assert rows[1][4]
        assert _invariants(sw)["demo-acct-main"][2] == 1000  # both approvals hold their money
        config = write_config(replace(sw.config, store=e2e_store), tmp_path / "switch.toml")
        found = await trio.run_process(
            [sys.executable, "-m", "switch", "journal", "search", "--undelivered", "--json",
             "--config", str(config)],
            capture_stdout=True, capture_stderr=True,
        )  # fmt: skip
    listed = [json.loads(line) for line in found.stdout.decode().splitlines()]
    assert [(r["stan"], r["delivery"], r["delivery_reason"]) for r in listed] == [
        ("000952", "undelivered", "write_failed")
    ]
    assert APPROVAL_PAN not in found.stdout.decode() + sw.log.getvalue()
