"""Provisioning: card rows from JSON/CSV, import through the software HSM reference backend and
an HSM card-data vault into a real SQLite store, and the `cards`/`accounts` commands."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

from hsm.api import KeyAlgorithm, KeyGeneration, KeyImport, KeyUsage
from hsm.carddata import HsmVault
from hsm.software import SoftwareHsm
from switch.cli.provision import register
from switch.config import Config, StoreConfig
from switch.provision import CardRow, ProvisionError, import_cards, load_keys, load_rows
from switch.store import CardStatus, SqliteStore, open_store
from switch.store.sqlite import open_sqlite_store
from switch.testing import write_config

DEMO = Path(__file__).resolve().parent.parent / "config" / "demo"
from data_paths import VECTORS_PATH as VECTORS  # noqa: E402

FP_KEY, DATA_KEY = "test-fp", "test-data"


def vector(name: str) -> str:
    """The expected value of a published vector, by name."""
    data = json.loads(VECTORS.read_text())
    (found,) = [v["expected"] for v in data["vectors"] if v["name"] == name]
    return str(found)


async def demo_hsm() -> tuple[SoftwareHsm, HsmVault]:
    hsm = SoftwareHsm()
    for key in load_keys(DEMO / "keys.json"):
        algorithm = KeyAlgorithm(key.algorithm) if key.algorithm else None
        await hsm.import_key(
            KeyImport(key.label, KeyUsage(key.usage), bytes.fromhex(key.clear_hex), algorithm)
        )
    await hsm.generate_key(KeyGeneration(FP_KEY, KeyUsage.HMAC))
    await hsm.generate_key(KeyGeneration(DATA_KEY, KeyUsage.DATA))
    return hsm, HsmVault(hsm, FP_KEY, DATA_KEY)


def rows_by_pan() -> dict[str, CardRow]:
    return {row.pan: row for row in load_rows(DEMO / "cards.json")}


# -- rows ---------------------------------------------------------------------------------------


def test_demo_rows_load_and_hide_pan_and_pin() -> None:
    rows = rows_by_pan()
    assert len(rows) == 6
    pvv_card = rows["1122334455667718"]
    assert (pvv_card.pvki, pvv_card.method) == ("1", "pvv")
    assert "1122334455667718" not in repr(pvv_card)
    assert "0570" not in repr(pvv_card)
    assert rows["4333322221111222"].status is CardStatus.BLOCKED
    emv = rows["1234567890123456"].controls
    assert emv.blocked_mccs == frozenset({"7995"})
    assert emv.blocked_countries == frozenset({"408", "KP", "PRK"})


def test_csv_rows_parse_lists_and_integers(tmp_path: Path) -> None:
    path = tmp_path / "cards.csv"
    path.write_text(
        "pan,expiry,service_code,account,currency,balance,status,blocked_mccs,daily_count,pin\n"
        "4123456789012345,8701,101,a1,978,2500,lost,7995;5933,3,\n"
    )
    (row,) = load_rows(path)
    assert (row.balance, row.status, row.pin) == (2500, CardStatus.LOST, None)
    assert row.controls.blocked_mccs == frozenset({"7995", "5933"})
    assert row.controls.daily_count == 3


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pan": "41234567890A2345"}, "pan must be 12 to 19 digits"),
        ({"expiry": "8713"}, "expiry must be YYMM"),
        ({"status": "frozen"}, "status must be one of"),
        ({"colour": "red"}, "unknown field"),
        ({"pin": "4524", "pvk": ""}, "a PIN needs the pvk"),
        ({"pin": "4524", "pvk": "k", "pin_method": "ibm3624"}, "ibm3624 needs"),
        ({"balance": "ten"}, "balance must be an integer"),
        (
            {
                "pin": "4524",
                "pvk": "k",
                "pin_method": "ibm3624",
                "ibm_dec_table": "1234567890123456",
                "ibm_validation_data": "4123456789012345",
            },
            "validation data must not carry the PAN",
        ),
    ],
)
def test_invalid_rows_name_the_field_not_the_value(change: dict[str, str], message: str) -> None:
    raw = {
        "pan": "4123456789012345",
        "expiry": "8701",
        "service_code": "101",
        "account": "a1",
        "currency": "978",
        "pvki": "1",
    }
    raw.update(change)
    with pytest.raises(ProvisionError, match=message) as err:
        CardRow.from_mapping(raw, "cards.json:3")
    assert "cards.json:3" in str(err.value)
    assert "4123456789012345" not in str(err.value)
    assert "4524" not in str(err.value)


def test_missing_required_field_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "cards.json"
    path.write_text(json.dumps([{"pan": "4123456789012345", "expiry": "8701"}]))
    with pytest.raises(ProvisionError, match=r"cards.json:1: service_code is required"):
        load_rows(path)


# -- import -------------------------------------------------------------------------------------


async def test_import_demo_cards_with_pin_references_from_the_hsm(tmp_path: Path) -> None:
    hsm, vault = await demo_hsm()
    rows = load_rows(DEMO / "cards.json")
    async with open_sqlite_store(StoreConfig(path=tmp_path / "s.db")) as store:
        report = await import_cards(store, hsm, vault, rows)
        assert report.ok, report.failures
        assert (report.cards_created, report.cards_updated, report.accounts_created) == (6, 0, 5)

        pvv = await store.get_card_by_fingerprint(await vault.fingerprint("1122334455667718"))
        assert pvv is not None
        assert (pvv.pin_method, pvv.pvki) == ("pvv", "1")
        assert pvv.pin_verification_value == vector("PVV pvki=1 pin=0570")
        ibm = await store.get_card_by_fingerprint(await vault.fingerprint("4999988887777000"))
        assert ibm is not None and ibm.pin_method == "ibm3624"
        assert ibm.ibm_dec_table == "0123456789012345"
        assert ibm.pin_verification_value is not None and len(ibm.pin_verification_value) == 4

        # The sealed PAN opens for its own card record only.
        assert await vault.unseal(pvv.pan_ciphertext, {"card_id": pvv.id}) == "1122334455667718"
        assert pvv.masked_pan == "112233******7718"

        small = await store.get_account("demo-acct-small")
        assert small is not None and small.available_balance == 100
        blocked = await store.get_card_by_fingerprint(await vault.fingerprint("4333322221111222"))
        assert blocked is not None and blocked.status is CardStatus.BLOCKED
        assert blocked.account_id == "demo-acct-main"
        cards = await store.list_cards()
        assert sorted(c.id for c in cards) == sorted(report.card_ids)


async def test_ibm_offset_of_the_published_vector(tmp_path: Path) -> None:
    hsm, vault = await demo_hsm()
    row = CardRow.from_mapping(
        {
            "pan": "4999988887777000",
            "expiry": "9105",
            "service_code": "111",
            "account": "a1",
            "currency": "978",
            "pvk": "demo-pvk",
            "pin_method": "ibm3624",
            "pin": "1234",
            "ibm_dec_table": "1234567890123456",
            "ibm_validation_data": "1122334455667788",
        },
        "row:1",
    )
    async with open_sqlite_store(StoreConfig(path=tmp_path / "s.db")) as store:
        report = await import_cards(store, hsm, vault, [row])
        card = await store.get_card(report.card_ids[0])
    assert card is not None
    assert card.pin_verification_value == vector("offset for PIN 1234 valdata 1122334455667788")


async def test_reimport_updates_cards_in_place_and_keeps_balances(tmp_path: Path) -> None:
    from test_store_support import auth

    hsm, vault = await demo_hsm()
    rows = load_rows(DEMO / "cards.json")
    async with open_sqlite_store(StoreConfig(path=tmp_path / "s.db")) as store:
        first = await import_cards(store, hsm, vault, rows)
        card = await store.get_card_by_fingerprint(await vault.fingerprint("4666655554444111"))
        assert card is not None
        spend = auth("000001", 60, card_id=card.id, account_id="demo-acct-small", pin_check="bad")
        assert (await store.commit_auth(spend)).response_code == "55"
        again = await import_cards(store, hsm, vault, rows)
        assert (again.cards_created, again.cards_updated, again.accounts_created) == (0, 6, 0)
        assert again.card_ids == first.card_ids
        after = await store.get_card(card.id)
        assert after is not None and after.pin_tries == 1
        small = await store.get_account("demo-acct-small")
        assert small is not None and small.available_balance == 100


async def test_a_failing_row_is_reported_and_the_others_imported(tmp_path: Path) -> None:
    hsm, vault = await demo_hsm()
    base = {"expiry": "2812", "service_code": "101", "account": "a1", "balance": "10"}
    rows = [
        CardRow.from_mapping({**base, "pan": "5555555551234567", "currency": "978"}, "r:1"),
        CardRow.from_mapping({**base, "pan": "5555555551234575", "currency": "840"}, "r:2"),
        CardRow.from_mapping(
            {**base, "pan": "5555555551234583", "currency": "978", "pin": "1234",
             "pvk": "no-such-key", "pvki": "1"},
            "r:3",
        ),
    ]  # fmt: skip
    async with open_sqlite_store(StoreConfig(path=tmp_path / "s.db")) as store:
        report = await import_cards(store, hsm, vault, rows)
    assert report.cards_created == 1
    assert [f.index for f in report.failures] == [1, 2]
    assert "currency 978" in report.failures[0].reason
    assert "KeyNotFound" in report.failures[1].reason
    assert report.failures[1].masked_pan == "555555******4583"
    for failure in report.failures:
        assert "5555555551234" not in failure.reason


def _files_bytes(directory: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file())


async def test_imported_database_holds_no_clear_pan_or_pin(tmp_path: Path) -> None:
    hsm, vault = await demo_hsm()
    rows = load_rows(DEMO / "cards.json")
    async with open_sqlite_store(StoreConfig(path=tmp_path / "s.db")) as store:
        await import_cards(store, hsm, vault, rows)
    blob = _files_bytes(tmp_path)
    assert b"112233******7718" not in blob  # masked PANs are not stored on cards either
    for row in rows:
        assert row.pan.encode() not in blob
        assert row.pan[:6].encode() in blob  # first six are kept, so the search can see text


# -- CLI ------------------------------------------------------------------------------------------


def main(argv: Sequence[str]) -> int:
    """The provisioning commands as ``cardswitch`` dispatches them (``switch.__main__``)."""
    parser = argparse.ArgumentParser(prog="cardswitch")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


def _seed(path: Path) -> None:
    async def run() -> None:
        hsm, vault = await demo_hsm()
        async with open_store(StoreConfig(path=path)) as store:
            assert isinstance(store, SqliteStore)
            await import_cards(store, hsm, vault, load_rows(DEMO / "cards.json"))

    trio.run(run)


def _config(tmp_path: Path) -> Path:
    return write_config(Config(store=StoreConfig(path=tmp_path / "s.db")), tmp_path / "switch.toml")


def test_cards_list_prints_masked_pans_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _seed(tmp_path / "s.db")
    assert main(["cards", "list", "--config", str(_config(tmp_path))]) == 0
    out = capsys.readouterr().out
    assert "412345******2345" in out and "blocked" in out
    assert "4123456789012345" not in out
    assert main(["cards", "list", "--json", "--config", str(_config(tmp_path))]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert {x["pan"] for x in lines} >= {"112233******7718", "123456******3456"}


def test_accounts_show_balances_holds_and_cards(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _seed(tmp_path / "s.db")
    cfg = str(_config(tmp_path))
    assert main(["accounts", "show", "demo-acct-main", "--json", "--config", cfg]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["currency"], shown["ledger_balance"], shown["available_balance"]) == (
        "978",
        1000000,
        1000000,
    )
    assert shown["active_holds"] == 0
    assert sorted(c["pan"] for c in shown["cards"]) == ["412345******2345", "433332******1222"]
    assert main(["accounts", "show", "nope", "--config", cfg]) == 1
    assert "no account" in capsys.readouterr().err
