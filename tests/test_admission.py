"""The wait forecast behind early shedding (switch/admission.py): plain arithmetic."""

from __future__ import annotations

import pytest

from switch.admission import WaitForecast


def test_no_forecast_before_a_request_has_finished() -> None:
    f = WaitForecast(4)
    for _ in range(100):
        f.queued()
    assert f.expected_start(10.0) == 10.0
    assert not f.too_late(10.0, start_by=10.0, deadline=10.0)


def test_the_waiter_starts_after_whole_rounds_of_service() -> None:
    f = WaitForecast(2)
    f.finished(0.5)
    # Nobody waiting: the next slot frees within one service time.
    assert f.expected_start(0.0) == pytest.approx(0.5)
    f.queued()  # one ahead: the arrival is 2nd in line, still the first round
    assert f.expected_start(0.0) == pytest.approx(0.5)
    f.queued()  # two ahead: 3rd in line, second round
    assert f.expected_start(0.0) == pytest.approx(1.0)
    # Start by 0.9 and finish by 2: it would start at 1.0, too late either way.
    assert f.too_late(0.0, start_by=0.9, deadline=2.0)
    # Start by 1.0 but finish by 1.4: it would finish at 1.5.
    assert f.too_late(0.0, start_by=1.0, deadline=1.4)
    assert not f.too_late(0.0, start_by=1.0, deadline=1.5)
    f.dequeued()
    f.dequeued()
    f.dequeued()  # never below zero
    assert f.waiting == 0


def test_service_time_is_a_moving_average_that_follows_a_change() -> None:
    f = WaitForecast(1)
    f.finished(0.010)
    for _ in range(200):
        f.finished(0.100)
    assert f.service == pytest.approx(0.100, rel=1e-3)
    f.finished(1.0)  # one outlier moves it by a twentieth of the difference
    assert f.service == pytest.approx(0.100 + 0.05 * 0.9, rel=1e-3)


def test_a_pool_has_at_least_one_slot() -> None:
    with pytest.raises(ValueError, match="at least one slot"):
        WaitForecast(0)
