"""Money, PIN-try, velocity, duplicate and reversal semantics of the store.

The decision semantics run on every backend (SQLite, PostgreSQL and the in-memory test store
share the commit rules); batching, cancellation and closing are the SQLite writer's own
(PostgreSQL's are in test_postgres_store.py).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio
import trio.testing
from test_store_support import (
    ACCOUNT_ID,
    CARD_ID,
    CURRENCY,
    PAN,
    Backend,
    auth,
    dup_key,
    make_card,
    orig_key,
    reversal,
    seeded_store,
)

from hsm.pan import mask_pan
from switch.decisions import Reason
from switch.store import (
    AuthOutcome,
    CardStatus,
    DeliveryMark,
    DuplicateKey,
    JournalRef,
    OriginalKey,
    ReversalOutcome,
    SpendControls,
    StoreError,
    mti_class,
    normalise_acquirer_id,
)
from switch.store.models import JournalQuery

BALANCE = 100_000


@pytest.fixture(params=["sqlite", "memory", "postgres"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "postgres":
        return Backend("postgres", request.getfixturevalue("pg_dsn"))
    return Backend(str(request.param))


async def balances(store: object, account_id: str = ACCOUNT_ID) -> tuple[int, int]:
    account = await store.get_account(account_id)  # type: ignore[attr-defined]
    assert account is not None
    return account.ledger_balance, account.available_balance


# -- keys -------------------------------------------------------------------------------------


def test_acquirer_ids_and_mti_classes_are_normalised() -> None:
    assert normalise_acquirer_id("00000012345") == "12345"
    assert normalise_acquirer_id("0000") == "0"
    assert DuplicateKey("v", "00012345", "t", "s", "r", "id", "0101") == DuplicateKey(
        "v", "12345", "t", "s", "r", "id", "0100"
    )
    assert OriginalKey("v", "00012345", "t", "s", "0101") == OriginalKey(
        "v", "12345", "t", "s", "0100"
    )
    assert mti_class("0421") == mti_class("0420") != mti_class("0400")
    with pytest.raises(ValueError, match="not an MTI"):
        mti_class("04")


# -- authorizations ----------------------------------------------------------------------------


async def test_approved_hold_reserves_available_only(tmp_path: Path, backend: Backend) -> None:
    async with seeded_store(tmp_path / "s.db", BALANCE, backend=backend) as store:
        out = await store.commit_auth(auth("000001", 2500))
        assert out.response_code == "00"
        assert out.approval_code == "A00001"
        assert out.hold_id is not None
        assert out.available_balance == BALANCE - 2500
        assert out.currency == CURRENCY
        assert not out.replayed
        assert await balances(store) == (BALANCE, BALANCE - 2500)
        assert await store.active_holds_total(ACCOUNT_ID) == 2500


async def test_insufficient_funds_declines_51_without_moving_money(
    tmp_path: Path, backend: Backend
) -> None:
    async with seeded_store(tmp_path / "s.db", balance=1000, backend=backend) as store:
        out = await store.commit_auth(auth("000001", 1001))
        assert (out.response_code, out.approval_code, out.hold_id) == ("51", None, None)
        assert out.available_balance == 1000
        assert await balances(store) == (1000, 1000)
        exact = await store.commit_auth(auth("000002", 1000))
        assert exact.response_code == "00"
        assert exact.available_balance == 0


async def test_financial_request_debits_ledger_and_available(
    tmp_path: Path, backend: Backend
) -> None:
    async with seeded_store(tmp_path / "s.db", BALANCE, backend=backend) as store:
        out = await store.commit_auth(auth("000001", 4000, kind="debit"))
        assert out.response_code == "00"
        assert await balances(store) == (BALANCE - 4000, BALANCE - 4000)
        assert await store.active_holds_total(ACCOUNT_ID) == 0
        declined = await store.commit_auth(auth("000002", BALANCE, kind="debit"))
        assert declined.response_code == "51"
        assert await balances(store) == (BALANCE - 4000, BALANCE - 4000)


async def test_advices_are_applied_even_beyond_funds_and_never_declined(
    tmp_path: Path, backend: Backend
) -> None:
    limits = SpendControls(daily_count=1)
    async with seeded_store(
        tmp_path / "s.db", balance=500, controls=limits, backend=backend
    ) as store:
        # Lock the PIN first: advices must still be applied.
        for i in range(3):
            await store.commit_auth(
                auth(
                    f"00009{i}", 1, kind="decline", decline_reason=Reason.WRONG_PIN, pin_check="bad"
                )
            )
        hold = await store.commit_auth(
            auth("000001", 800, kind="advice_hold", pin_check="bad", velocity=limits)
        )
        assert hold.response_code == "00"
        assert hold.available_balance == 500 - 800
        debit = await store.commit_auth(auth("000002", 300, kind="advice_debit", velocity=limits))
        assert debit.response_code == "00"
        assert await balances(store) == (500 - 300, 500 - 800 - 300)
        card = await store.get_card(CARD_ID)
        assert card is not None and card.pin_tries == 3  # the advice did not count a try


async def test_pipeline_decline_is_recorded_without_money(tmp_path: Path, backend: Backend) -> None:
    async with seeded_store(tmp_path / "s.db", BALANCE, backend=backend) as store:
        out = await store.commit_auth(
            auth("000001", 100, kind="decline", decline_reason=Reason.EXPIRED_CARD)
        )
        assert (out.response_code, out.approval_code, out.hold_id) == ("54", None, None)
        assert await balances(store) == (BALANCE, BALANCE)
        stored = await store.find_outcome(dup_key("000001"), auth("000001", 100).digest)
        assert isinstance(stored, AuthOutcome) and stored.response_code == "54"
        with pytest.raises(StoreError) as err:
            await store.commit_auth(auth("000002", 100, kind="decline"))
        assert err.value.kind == "invalid"


async def test_unknown_card_decline_needs_no_account(tmp_path: Path, backend: Backend) -> None:
    async with seeded_store(tmp_path / "s.db", BALANCE, backend=backend) as store:
        out = await store.commit_auth(
            auth(
                "000001",
                100,
                kind="decline",
                decline_reason=Reason.UNKNOWN_CARD,
                card_id=None,
                account_id=None,
            )
        )
        assert out.response_code == "14"
        assert out.available_balance is None


async def test_duplicate_replays_stored_answer_without_second_hold(
    tmp_path: Path, backend: Backend
) -> None:
    async with seeded_store(tmp_path / "s.db", BALANCE, backend=backend) as store:
        first = await store.commit_auth(auth("000001", 1000))
        again = await store.commit_auth(auth("000001", 1000, approval_code="ZZZZZZ"))
        assert again.replayed
        assert (again.response_code, again.approval_code, again.hold_id) == (
            first.response_code,
            first.approval_code,
            first.hold_id,
        )
        assert again.available_balance == first.available_balance
        # An 0101 repeat has the same duplicate key class as its 0100.
        repeat = await store.commit_auth(
            auth("000001", 1000, mti="0101", dup_key=dup_key("000001", "0101"))
        )
        assert repeat.replayed and repeat.hold_id == first.hold_id
        found = await store.find_outcome(dup_key("000001", "0101"), auth("000001", 1000).digest)
        assert found == again
        assert await store.find_outcome(dup_key("000999"), auth("000999").digest) is None
        assert await balances(store) == (BALANCE, BALANCE - 1000)
        assert await store.active_holds_total(ACCOUNT_ID) == 1000


async def test_wrong_pins_count_to_75_and_replays_do_not_count(
    tmp_path: Path, backend: Backend
) -> None:
    async with seeded_store(tmp_path / "s.db", BALANCE, backend=backend) as store:
        codes = [
            (await store.commit_auth(auth(f"00000{i}", 100, pin_check="bad"))).response_code
            for i in range(1, 4)
        ]
        assert codes == ["55", "55", "75"]
        replay = await store.commit_auth(auth("000003", 100, pin_check="bad"))
        assert replay.replayed and replay.response_code == "75"
        card = await store.get_card(CARD_ID)
        assert card is not None and card.pin_tries == 3
        # At the limit even the right PIN is refused and nothing is counted or reset.
        locked = await store.commit_auth(auth("000004", 100, pin_check="ok"))
        assert locked.response_code == "75"
        card = await store.get_card(CARD_ID)
        assert card is not None and card.pin_tries == 3
        assert await balances(store) == (BALANCE, BALANCE)


async def test_correct_pin_resets_tries_even_when_declined_for_funds(
    tmp_path: Path, backend: Backend
) -> None:
    async with seeded_store(tmp_path / "s.db", balance=1000, backend=backend) as store:
        await store.commit_auth(auth("000001", 100, pin_check="bad"))
        await store.commit_auth(auth("000002", 100, pin_check="bad"))
        out = await store.commit_auth(auth("000003", 5000, pin_check="ok"))
        assert out.response_code == "51"
        card = await store.get_card(CARD_ID)
        assert card is not None and card.pin_tries == 0
        bad = await store.commit_auth(auth("000004", 100, pin_check="bad"))
        assert bad.response_code == "55"  # counting starts again from zero


async def test_daily_amount_velocity_declines_61(tmp_path: Path, backend: Backend) -> None:
    limits = SpendControls(daily_amount=1000)
    async with seeded_store(tmp_path / "s.db", BALANCE, controls=limits, backend=backend) as store:
        assert (await store.commit_auth(auth("000001", 600, velocity=limits))).response_code == "00"
        assert (await store.commit_auth(auth("000002", 500, velocity=limits))).response_code == "61"
        # The declined 500 did not count: 600 + 400 reaches the limit exactly.
        assert (await store.commit_auth(auth("000003", 400, velocity=limits))).response_code == "00"
        # Another day starts from zero.
        next_day = auth("000004", 1000, velocity=limits, velocity_day="20250102")
        assert (await store.commit_auth(next_day)).response_code == "00"
        assert await balances(store) == (BALANCE, BALANCE - 2000)


async def test_count_velocity_declines_65_daily_and_monthly(
    tmp_path: Path, backend: Backend
) -> None:
    limits = SpendControls(daily_count=2, monthly_count=3)
    async with seeded_store(tmp_path / "s.db", BALANCE, controls=limits, backend=backend) as store:
        day1 = [
            (await store.commit_auth(auth(f"00000{i}", 10, velocity=limits))).response_code
            for i in range(1, 4)
        ]
        assert day1 == ["00", "00", "65"]
        day2 = [
            (
                await store.commit_auth(
                    auth(f"00001{i}", 10, velocity=limits, velocity_day="20250102")
                )
            ).response_code
            for i in range(1, 3)
        ]
        assert day2 == ["00", "65"]  # the month's third is allowed, the fourth is not


async def test_monthly_amount_velocity_declines_61(tmp_path: Path, backend: Backend) -> None:
    limits = SpendControls(monthly_amount=1500)
    async with seeded_store(tmp_path / "s.db", BALANCE, controls=limits, backend=backend) as store:
        first = auth("000001", 1000, velocity=limits, velocity_day="20250101")
        second = auth("000002", 1000, velocity=limits, velocity_day="20250115")
        assert (await store.commit_auth(first)).response_code == "00"
        assert (await store.commit_auth(second)).response_code == "61"


# -- reversals ---------------------------------------------------------------------------------


async def test_full_reversal_releases_the_hold_once(tmp_path: Path, backend: Backend) -> None:
    async with seeded_store(tmp_path / "s.db", BALANCE, backend=backend) as store:
        await store.commit_auth(auth("000001", 1000))
        out = await store.commit_reversal(reversal("000101", "000001", 1000))
        assert out == ReversalOutcome(Reason.REVERSAL_MATCHED, "00", True, 1000, BALANCE, False)
        assert await store.active_holds_total(ACCOUNT_ID) == 0
        repeat = await store.commit_reversal(reversal("000101", "000001", 1000, mti="0401"))
        assert repeat.replayed and repeat.released_amount == 1000
        advice = await store.commit_reversal(reversal("000102", "000001", 1000, mti="0420"))
        assert (advice.matched, advice.released_amount, advice.replayed) == (True, 0, False)
        again = await store.commit_reversal(reversal("000103", "000001", 1000, mti="0421"))
        assert again.released_amount == 0
        assert await balances(store) == (BALANCE, BALANCE)


async def test_partial_reversals_never_release_more_than_held(
    tmp_path: Path, backend: Backend
) -> None:
    async with seeded_store(tmp_path / "s.db", BALANCE, backend=backend) as store:
        await store.commit_auth(auth("000001", 1000))
        part = await store.commit_reversal(reversal("000101", "000001", 1000, replacement=600))
        assert part.released_amount == 400
        assert await store.active_holds_total(ACCOUNT_ID) == 600
        # A replacement above what remains releases nothing (a hold is never raised).
        higher = await store.commit_reversal(reversal("000102", "000001", 1000, replacement=700))
        assert higher.released_amount == 0
        rest = await store.commit_reversal(reversal("000103", "000001", 1000))
        assert rest.released_amount == 600
        assert await balances(store) == (BALANCE, BALANCE)
        assert await store.active_holds_total(ACCOUNT_ID) == 0


async def test_reversal_of_a_debit_credits_ledger_and_available(
    tmp_path: Path, backend: Backend
) -> None:
    async with seeded_store(tmp_path / "s.db", BALANCE, backend=backend) as store:
        await store.commit_auth(auth("000001", 3000, kind="debit"))
        out = await store.commit_reversal(
            reversal("000101", "000001", 3000, replacement=1000, original_mti="0200")
        )
        assert out.released_amount == 2000
        assert await balances(store) == (BALANCE - 1000, BALANCE - 1000)


async def test_reversal_finds_original_through_zero_filled_de90_acquirer(
    tmp_path: Path, backend: Backend
) -> None:
    async with seeded_store(tmp_path / "s.db", BALANCE, backend=backend) as store:
        await store.commit_auth(auth("000001", 1000))
        out = await store.commit_reversal(
            reversal("000101", "000001", 1000, acquirer="00000012345")
        )
        assert out.matched and out.released_amount == 1000


async def test_reversal_of_a_declined_original_matches_and_releases_nothing(
    tmp_path: Path, backend: Backend
) -> None:
    async with seeded_store(tmp_path / "s.db", balance=10, backend=backend) as store:
        assert (await store.commit_auth(auth("000001", 1000))).response_code == "51"
        out = await store.commit_reversal(reversal("000101", "000001", 1000))
        assert (out.matched, out.released_amount, out.available_balance) == (True, 0, 10)


async def test_reversal_releases_velocity_of_the_original(tmp_path: Path, backend: Backend) -> None:
    limits = SpendControls(daily_amount=1000, daily_count=1)
    async with seeded_store(tmp_path / "s.db", BALANCE, controls=limits, backend=backend) as store:
        assert (await store.commit_auth(auth("000001", 1000, velocity=limits))).approved
        assert not (await store.commit_auth(auth("000002", 10, velocity=limits))).approved
        await store.commit_reversal(reversal("000101", "000001", 1000))
        assert (await store.commit_auth(auth("000003", 1000, velocity=limits))).approved


async def test_unmatched_reversal_is_kept_and_late_original_declined(
    tmp_path: Path, backend: Backend
) -> None:
    async with seeded_store(tmp_path / "s.db", BALANCE, backend=backend) as store:
        early = await store.commit_reversal(reversal("000101", "000001", 1000))
        assert early == ReversalOutcome(Reason.REVERSAL_UNMATCHED, "00", False, 0, None, False)
        late = await store.commit_auth(auth("000001", 1000))
        assert (late.response_code, late.hold_id, late.approval_code) == ("05", None, None)
        assert await balances(store) == (BALANCE, BALANCE)
        # A reversal repeat now finds the (declined) original and releases nothing.
        again = await store.commit_reversal(reversal("000102", "000001", 1000, mti="0420"))
        assert (again.matched, again.released_amount) == (True, 0)


async def test_advice_after_its_reversal_is_acknowledged_without_money(
    tmp_path: Path, backend: Backend
) -> None:
    async with seeded_store(tmp_path / "s.db", BALANCE, backend=backend) as store:
        # The network reversed its stand-in 0200 (DE90 names the 0200), then advises it.
        await store.commit_reversal(
            reversal("000101", "000001", 1000, mti="0420", original_mti="0200")
        )
        advice = await store.commit_auth(
            auth("000001", 1000, kind="advice_debit", original=orig_key("000001", mti="0200"))
        )
        assert advice.response_code == "00"
        assert await balances(store) == (BALANCE, BALANCE)


# -- provisioning writes and failures ---------------------------------------------------------


async def test_card_upsert_status_and_unique_fingerprint(tmp_path: Path) -> None:
    async with seeded_store(tmp_path / "s.db", BALANCE) as store:
        assert await store.set_card_status(CARD_ID, CardStatus.LOST)
        assert not await store.set_card_status("no-such-card", CardStatus.LOST)
        card = await store.get_card(CARD_ID)
        assert card is not None and card.status is CardStatus.LOST
        assert await store.get_card_by_fingerprint(card.pan_fingerprint) == card
        with pytest.raises(StoreError) as err:
            await store.put_card(make_card("card-2"))  # same PAN, another id
        assert err.value.kind == "integrity"
        with pytest.raises(StoreError) as err:
            await store.put_card(make_card("card-3", "5555555551234567", account_id="nope"))
        assert err.value.kind == "integrity"
        assert [c.id for c in await store.list_cards()] == [CARD_ID]
        assert card.masked_pan == "412345******2345"
        assert "4123456789012345" not in repr(card)


async def test_one_failing_write_in_a_batch_fails_only_its_caller(tmp_path: Path) -> None:
    async with seeded_store(tmp_path / "s.db", BALANCE) as store:
        results: dict[str, object] = {}

        async def run(stan: str, currency: str) -> None:
            try:
                results[stan] = await store.commit_auth(auth(stan, 100, currency=currency))
            except StoreError as exc:
                results[stan] = exc

        async with trio.open_nursery() as nursery:
            for i in range(10):
                nursery.start_soon(run, f"00000{i}", "840" if i == 5 else CURRENCY)
        assert isinstance(results["000005"], StoreError)
        assert results["000005"].kind == "invalid"
        approved = [r for r in results.values() if isinstance(r, AuthOutcome) and r.approved]
        assert len(approved) == 9
        assert await balances(store) == (BALANCE, BALANCE - 900)
        assert await store.find_outcome(dup_key("000005"), auth("000005").digest) is None


async def test_cancelled_writes_are_withdrawn_if_queued_and_answered_if_taken(
    tmp_path: Path,
) -> None:
    path = tmp_path / "s.db"
    async with seeded_store(path, BALANCE) as store:
        # Another connection holds the write lock, so the writer's first batch blocks in BEGIN
        # and the second intent stays queued behind it.
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        results: dict[str, object] = {}

        async def submit(stan: str, scope: trio.CancelScope) -> None:
            with scope:
                results[stan] = await store.commit_auth(auth(stan, 100))
            results[stan + "-cancelled"] = scope.cancelled_caught

        taken, queued = trio.CancelScope(), trio.CancelScope()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(submit, "000001", taken)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(submit, "000002", queued)
            await trio.testing.wait_all_tasks_blocked()
            taken.cancel()
            queued.cancel()
            await trio.testing.wait_all_tasks_blocked()
            blocker.execute("COMMIT")
            blocker.close()
        # The taken one was committed and its outcome returned despite the cancellation.
        first = results["000001"]
        assert isinstance(first, AuthOutcome) and first.approved
        assert results["000001-cancelled"] is False
        # The queued one was withdrawn: nothing written.
        assert "000002" not in results and results["000002-cancelled"] is True
        assert await store.find_outcome(dup_key("000002"), auth("000002", 100).digest) is None
        assert await balances(store) == (BALANCE, BALANCE - 100)


async def test_closed_store_refuses_operations(tmp_path: Path) -> None:
    async with seeded_store(tmp_path / "s.db", BALANCE) as store:
        pass
    with pytest.raises(StoreError) as err:
        await store.commit_auth(auth("000001"))
    assert err.value.kind == "closed"
    with pytest.raises(StoreError):
        await store.get_account(ACCOUNT_ID)


# -- hold expiry ---------------------------------------------------------------------------------


async def test_expired_holds_are_released_once_and_reversals_after_release_nothing(
    tmp_path: Path, backend: Backend
) -> None:
    limits = SpendControls(daily_amount=1000)
    async with seeded_store(tmp_path / "s.db", BALANCE, controls=limits, backend=backend) as store:
        expiring = auth("000001", 700, velocity=limits, hold_expires_at="2026-12-08T12:00:00+00:00")
        lasting = auth("000002", 300, velocity=limits, hold_expires_at="2027-01-01T12:00:00+00:00")
        assert (await store.commit_auth(expiring)).approved
        assert (await store.commit_auth(lasting)).approved
        assert await store.expire_holds("2026-12-08T11:59:59+00:00") == []
        released = await store.expire_holds("2026-12-08T12:00:00+00:00")
        assert [(r.amount, r.by) for r in released] == [(700, "expiry")]
        assert await store.expire_holds("2026-12-09T00:00:00+00:00") == []  # once
        assert await balances(store) == (BALANCE, BALANCE - 300)
        assert await store.active_holds_total(ACCOUNT_ID) == 300
        late = await store.commit_reversal(reversal("000101", "000001", 700))
        assert (late.matched, late.released_amount) == (True, 0)
        assert await balances(store) == (BALANCE, BALANCE - 300)
        # the expired amount no longer counts against the daily limit
        assert (await store.commit_auth(auth("000003", 700, velocity=limits))).approved
        views = await store.list_holds(account_id=ACCOUNT_ID, active=False)
        expired = next(v for v in views if v.amount == 700 and v.released_by == "expiry")
        assert (expired.remaining, expired.masked_pan) == (0, mask_pan(PAN))


async def test_operator_release_gives_back_once_and_never_a_debit(
    tmp_path: Path, backend: Backend
) -> None:
    async with seeded_store(tmp_path / "s.db", BALANCE, backend=backend) as store:
        hold = await store.commit_auth(auth("000001", 700))
        debit = await store.commit_auth(auth("000002", 200, kind="debit"))
        assert hold.hold_id is not None and debit.hold_id is not None
        released = await store.release_hold(hold.hold_id, actor="alice")
        assert released is not None and (released.amount, released.by) == (700, "alice")
        assert await store.release_hold(hold.hold_id, actor="alice") is None
        assert await store.release_hold(debit.hold_id, actor="alice") is None
        assert await balances(store) == (BALANCE - 200, BALANCE - 200)


async def test_journal_search_by_stan_rrn_masked_pan_and_card(
    tmp_path: Path, backend: Backend
) -> None:
    async with seeded_store(tmp_path / "s.db", BALANCE, backend=backend) as store:
        await store.commit_auth(auth("000001", 700))
        await store.commit_auth(auth("000002", 300))
        await store.commit_reversal(reversal("000101", "000001", 700))
        by_stan = await store.search_journal(JournalQuery(stan="000002"))
        assert [(r.stan, r.amount, r.reason) for r in by_stan] == [("000002", 300, "approved")]
        by_rrn = await store.search_journal(JournalQuery(rrn=dup_key("000001").rrn))
        assert [r.stan for r in by_rrn] == ["000001"]
        masked = mask_pan(PAN)
        by_pan = await store.search_journal(JournalQuery(masked_pan=masked))
        assert [r.stan for r in by_pan] == ["000101", "000002", "000001"]  # newest first
        assert [r.stan for r in await store.search_journal(JournalQuery(masked_pan=PAN[-4:]))]
        assert await store.search_journal(JournalQuery(masked_pan="999999")) == []
        assert len(await store.search_journal(JournalQuery(card_id=CARD_ID, limit=2))) == 2
        assert await store.search_journal(JournalQuery(since="2999-01-01")) == []


async def test_card_updates_change_only_the_named_columns_and_are_journaled(
    tmp_path: Path, backend: Backend
) -> None:
    async with seeded_store(tmp_path / "s.db", BALANCE, backend=backend) as store:
        await store.commit_auth(auth("000001", 100, pin_check="bad"))
        change = await store.update_card(
            CARD_ID, {"status": CardStatus.BLOCKED, "pin_tries": 0}, actor="ops@test"
        )
        assert change is not None and change.actor == "ops@test"
        assert change.changed["status"] == ["active", "blocked"]
        assert change.changed["pin_tries"] == [1, 0]
        card = await store.get_card(CARD_ID)
        assert card is not None
        assert (card.status, card.pin_tries, card.expiry) == (CardStatus.BLOCKED, 0, "8701")
        assert [c.changed for c in await store.card_changes(CARD_ID)] == [change.changed]
        assert await store.update_card("no-such-card", {"expiry": "9912"}, actor="x") is None
        with pytest.raises(StoreError) as err:
            await store.update_card(CARD_ID, {"pan_fingerprint": b"x"}, actor="x")
        assert err.value.kind == "invalid"


async def test_journal_search_lists_stand_in_decisions_for_reconciliation(
    tmp_path: Path, backend: Backend
) -> None:
    async with seeded_store(tmp_path / "s.db", BALANCE, backend=backend) as store:
        await store.commit_auth(auth("000001", 700))
        await store.commit_auth(auth("000002", 300, stand_in=True))
        found = await store.search_journal(JournalQuery(stand_in=True))
        assert [(r.stan, r.stand_in) for r in found] == [("000002", True)]


async def test_mark_delivery_marks_only_the_row_named_and_moves_no_money(
    tmp_path: Path, backend: Backend
) -> None:
    """The row of an undelivered answer is named by its duplicate key and digest: an
    approval, the duplicate-transmission row of its key reused with other content, and a
    reversal are each marked alone; the first mark stays; a ref naming no row marks nothing."""
    async with seeded_store(tmp_path / "s.db", BALANCE, backend=backend) as store:
        first = auth("000001", 700)
        reused = auth("000001", 999, digest="other-content")
        sent = auth("000002", 300)
        rev = reversal("000003", "000002", 300)
        for intent in (first, reused, sent):
            await store.commit_auth(intent)
        await store.commit_reversal(rev)
        before = await balances(store)
        marks = [
            DeliveryMark(JournalRef(reused.dup_key, reused.digest), "write_failed", "t1"),
            DeliveryMark(JournalRef(rev.dup_key, rev.digest), "deadline", "t2"),
            DeliveryMark(JournalRef(dup_key("000009"), "none"), "write_failed", "t3"),
        ]
        assert await store.mark_delivery(marks) == 2
        again = DeliveryMark(JournalRef(rev.dup_key, rev.digest), "abandoned", "t4")
        assert await store.mark_delivery([again]) == 0
        assert await store.mark_delivery([]) == 0
        found = await store.search_journal(JournalQuery(undelivered=True))
        assert [(r.stan, r.kind, r.amount, r.delivery, r.delivery_reason, r.delivery_at)
                for r in found] == [
            ("000003", "reversal", rev.amount, "undelivered", "deadline", "t2"),
            ("000001", "duplicate", 999, "undelivered", "write_failed", "t1"),
        ]  # fmt: skip
        every = await store.search_journal(JournalQuery())
        assert {(r.stan, r.amount) for r in every if r.delivery is None} == {
            ("000001", 700),
            ("000002", 300),
        }
        assert await balances(store) == before


async def test_mark_delivery_after_its_deadline_writes_nothing(
    tmp_path: Path, backend: Backend
) -> None:
    async with seeded_store(tmp_path / "s.db", BALANCE, backend=backend) as store:
        intent = auth("000001", 700)
        await store.commit_auth(intent)
        mark = DeliveryMark(JournalRef(intent.dup_key, intent.digest), "write_failed", "t1")
        with pytest.raises(StoreError) as err:
            await store.mark_delivery([mark], deadline=trio.current_time() - 1)
        assert err.value.kind == "unavailable"
        assert await store.search_journal(JournalQuery(undelivered=True)) == []


async def test_lookup_auth_reads_what_the_three_reads_read(
    tmp_path: Path, backend: Backend
) -> None:
    async with seeded_store(tmp_path / "s.db", BALANCE, backend=backend) as store:
        card = await store.get_card(CARD_ID)
        assert card is not None
        new = await store.lookup_auth(dup_key("000001"), auth("000001", 100).digest,
                                      card.pan_fingerprint)  # fmt: skip
        assert new.stored is None and new.card == card
        assert new.account == await store.get_account(ACCOUNT_ID) and new.account is not None
        unknown = await store.lookup_auth(dup_key("000002"), auth("000002").digest, b"\0" * 32)
        assert (unknown.stored, unknown.card, unknown.account) == (None, None, None)
        first = await store.commit_auth(auth("000001", 100))
        repeat = await store.lookup_auth(dup_key("000001"), auth("000001", 100).digest,
                                         card.pan_fingerprint)  # fmt: skip
        assert repeat.stored == await store.find_outcome(
            dup_key("000001"), auth("000001", 100).digest
        )
        assert isinstance(repeat.stored, AuthOutcome) and repeat.stored.hold_id == first.hold_id
        assert (repeat.card, repeat.account) == (None, None)  # a repeat reads nothing more
