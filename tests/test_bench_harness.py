"""The load harness's own logic (benchmarks/): schedules, histograms, mixes, result files,
and that its open loop shows queueing instead of hiding it.

No sockets and no wall-clock timing: the generator runs over memory streams against the
real baseline responder on trio's autojump (virtual) clock, where a serialized sleep is an
exact single-server queue, so its open-loop latencies can be set against Lindley's recursion
over the same schedule.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
import statistics
from pathlib import Path

import pytest
import trio
import trio.testing

from benchmarks import baselines, results, schedule
from benchmarks.generator import PhaseResult, PhaseSpec, read_json, run_on_streams, write_json
from benchmarks.histogram import LatencyHistogram
from benchmarks.scenarios import CVN10_ARQC, MIX_DIR, Mix, MixError, load_mix, parse_mix
from switch.wire import codec, emv
from switch.wire.messages import AuthRequest, NetworkRequest, ReversalRequest

# -- arrival schedules ----------------------------------------------------------------------


def test_constant_arrivals_are_evenly_spaced() -> None:
    offsets = schedule.arrivals("constant", 250.0, 2.0)
    assert len(offsets) == 500
    assert offsets[0] == 0.0 and offsets[-1] < 2.0
    gaps = {round(b - a, 12) for a, b in itertools.pairwise(offsets)}
    assert gaps == {0.004}


def test_poisson_arrivals_have_poisson_mean_and_dispersion() -> None:
    rate, duration = 2000.0, 10.0
    offsets = schedule.arrivals("poisson", rate, duration, seed=7)
    n, mean = len(offsets), rate * duration
    # Count: Poisson(20000), sd 141; 5 sd either side fails once in ~3.5 million seeds.
    assert abs(n - mean) < 5 * math.sqrt(mean)
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    # Exponential gaps: mean 1/rate, coefficient of variation 1 (sd of the CV ~ 1/sqrt(n)).
    assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=5 / math.sqrt(n))
    cv = statistics.stdev(gaps) / statistics.fmean(gaps)
    assert cv == pytest.approx(1.0, abs=5 / math.sqrt(n))
    # Counts per 10 ms window: index of dispersion (variance / mean) 1 for Poisson; a
    # constant schedule would give 0.
    windows = [0] * int(duration / 0.01)
    for t in offsets:
        windows[int(t / 0.01)] += 1
    dispersion = statistics.pvariance(windows) / statistics.fmean(windows)
    assert dispersion == pytest.approx(1.0, abs=5 * math.sqrt(2 / len(windows)))
    assert all(0 <= t < duration for t in offsets)
    assert offsets == sorted(offsets)


def test_poisson_schedule_is_reproducible_by_seed() -> None:
    a = schedule.arrivals("poisson", 100.0, 5.0, seed=1)
    assert a == schedule.arrivals("poisson", 100.0, 5.0, seed=1)
    assert a != schedule.arrivals("poisson", 100.0, 5.0, seed=2)


@pytest.mark.parametrize(("rate", "duration"), [(0.0, 1.0), (10.0, 0.0), (-1.0, 1.0)])
def test_arrivals_reject_non_positive_rate_or_duration(rate: float, duration: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        schedule.arrivals("constant", rate, duration)


def test_fifo_model_by_hand() -> None:
    # Service 1 s; arrivals 0, 0.5, 0.6, 5: the second waits 0.5, the third 1.4.
    assert schedule.fifo_latencies([0, 0.5, 0.6, 5], 1.0) == pytest.approx([1, 1.5, 2.4, 1])
    assert schedule.closed_loop_latency(4, 0.002) == pytest.approx(0.008)


def test_the_service_time_a_p99_goal_allows_follows_queueing_theory() -> None:
    # M/D/1 at utilization 0.7: the waiting time's tail decays as exp(-theta t / D) with
    # theta solving 0.7 (e^theta - 1) = theta (theta = 0.69), so its p99 sojourn is about
    # 6.5-7.7 service times; a 5 ms p99 then allows a service of 0.65-0.77 ms.
    spec = PhaseSpec("open 0.7x", mode="open", rate=700.0, duration=30.0, seed=5)
    allowed = results.service_for_p99(spec, 0.001, 5.0)
    assert 0.6 < allowed < 0.8
    # A server of that service time at the same utilization meets the goal on the model.
    again = dataclasses.replace(spec, rate=0.7 / (allowed / 1000))
    assert results.model_p99(again, allowed / 1000) == pytest.approx(5.0, rel=0.1)


# -- histograms -----------------------------------------------------------------------------


def _nearest_rank(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


def test_histogram_percentiles_match_a_known_distribution() -> None:
    rng = random.Random(3)
    # Exponential latencies of mean 5 ms, 50 000 of them.
    values = [rng.expovariate(1 / 0.005) for _ in range(50_000)]
    h = LatencyHistogram()
    for v in values:
        h.record(v)
    summary = h.summary()
    assert summary is not None and summary.count == len(values)
    exact = {
        name: _nearest_rank(values, pct) * 1000
        for name, pct in (("p50", 50), ("p90", 90), ("p99", 99), ("p999", 99.9))
    }
    for name, value in exact.items():
        # 3 significant digits, plus the 1 us resolution near zero.
        assert getattr(summary, name) == pytest.approx(value, rel=2e-3, abs=1e-3)
    # And the analytic quantiles of the exponential within sampling error.
    assert summary.p50 == pytest.approx(5 * math.log(2), rel=0.03)
    assert summary.p99 == pytest.approx(5 * math.log(100), rel=0.05)
    assert summary.max == pytest.approx(max(values) * 1000, rel=2e-3)
    assert summary.mean == pytest.approx(statistics.fmean(values) * 1000, rel=2e-3)


def test_histogram_round_trips_through_its_text_form_and_adds() -> None:
    a, b = LatencyHistogram(), LatencyHistogram()
    for i in range(1, 101):
        a.record(i / 1000)
        b.record(i / 100)
    copy = LatencyHistogram.decode(a.encode())
    assert copy.summary() == a.summary()
    a.add(b)
    assert a.count == 200
    assert a.summary() is not None and a.summary().max == pytest.approx(1000, rel=1e-3)  # type: ignore[union-attr]
    assert LatencyHistogram().summary() is None


def test_histogram_clamps_values_beyond_its_range() -> None:
    h = LatencyHistogram()
    h.record(10_000.0)
    assert h.clamped == 1 and h.count == 1


# -- mix files ------------------------------------------------------------------------------

TOML_MIX = """
name = "t"
[[scenario]]
kind = "track2"
weight = 3
[[scenario]]
kind = "chip"
[[scenario]]
kind = "reversal"
name = "rev"
"""


def test_mix_file_in_toml_and_json_says_the_same(tmp_path: Path) -> None:
    toml_path = tmp_path / "m.toml"
    toml_path.write_text(TOML_MIX)
    json_path = tmp_path / "m.json"
    json_path.write_text(
        json.dumps(
            {
                "name": "t",
                "scenarios": [
                    {"kind": "track2", "weight": 3},
                    {"kind": "chip"},
                    {"kind": "reversal", "name": "rev"},
                ],
            }
        )
    )
    a, b = load_mix(toml_path), load_mix(json_path)
    assert a == b
    assert [(s.label, s.weight, s.max_per_run) for s in a.scenarios] == [
        ("track2", 3.0, None),
        ("chip", 1.0, 1),
        ("rev", 1.0, None),
    ]
    assert a.scenarios[1].pan == "1234567890123456" and a.scenarios[1].amount == 4000


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"kind": "wire"}, "kind must be one of"),
        ({"kind": "track2", "weight": 0}, "weight must be a positive"),
        ({"kind": "track2", "weight": True}, "weight must be a positive"),
        ({"kind": "track2", "colour": "red"}, "unknown keys"),
        ({"kind": "track2", "pan": "4000000000000002"}, "no published values"),
        ({"kind": "pin", "pan": "4666655554444111"}, "has no PIN"),
        ({"kind": "chip", "pan": "4123456789012345"}, "chip vector"),
        ({"kind": "chip", "amount": 100}, "covers 4000"),
        ({"kind": "echo", "max_per_run": 0}, "max_per_run"),
    ],
)
def test_bad_mix_entries_are_named(entry: dict[str, object], message: str) -> None:
    with pytest.raises(MixError, match=message) as info:
        parse_mix({"scenario": [entry]}, "x.toml")
    assert str(info.value).startswith("x.toml: scenario 1")


def test_mix_files_that_cannot_be_read_say_why(tmp_path: Path) -> None:
    with pytest.raises(MixError, match="cannot read"):
        load_mix(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[[scenario]\n")
    with pytest.raises(MixError, match="not valid toml"):
        load_mix(bad)
    with pytest.raises(MixError, match="names must be unique"):
        parse_mix({"scenario": [{"kind": "echo"}, {"kind": "echo"}]})
    with pytest.raises(MixError, match="no \\[\\[scenario\\]\\]"):
        parse_mix({"name": "empty"})


@pytest.mark.parametrize("path", sorted(MIX_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_mixes_load(path: Path) -> None:
    assert load_mix(path).scenarios


@pytest.mark.parametrize("spec", ["ascii", "binary", "bcd"])
def test_mix_frames_carry_unique_keys_and_the_published_values(spec: str) -> None:
    mix = Mix(load_mix("full"), spec, seed=5)
    stans: set[str] = set()
    rrns: set[str] = set()
    purchases: dict[str, str] = {}
    chips = 0
    for _ in range(400):
        req = mix.next()
        msg = codec.decode(req.body, spec)
        assert msg.stan == req.stan and req.stan not in stans
        stans.add(req.stan)
        if isinstance(msg, ReversalRequest):
            # It reverses a purchase sent before it, with that purchase's RRN; before any
            # purchase, one never sent (its own STAN: an unknown original).
            if msg.original.stan == msg.stan:
                assert not purchases
                continue
            assert msg.original.stan in purchases
            assert purchases.pop(msg.original.stan) == msg.rrn
            continue
        if isinstance(msg, NetworkRequest):
            assert req.scenario == "echo"
            continue
        assert isinstance(msg, AuthRequest)
        assert msg.rrn is not None and msg.rrn not in rrns
        rrns.add(msg.rrn)
        if req.scenario == "track2":
            purchases[msg.stan] = msg.rrn
            assert msg.track2 is not None and msg.track2.discretionary[5:8] == "561"
        if req.scenario == "chip":
            chips += 1
            assert msg.emv is not None
            tags = {t.tag: t.value for t in emv.parse(msg.emv)}
            assert tags[0x9F26].hex().upper() == CVN10_ARQC
    # The chip vector goes once per run: its ATC cannot repeat.
    assert chips == mix.counts["chip"] == 1
    assert sum(mix.counts.values()) == 400


def test_a_mix_whose_scenarios_are_all_spent_stops() -> None:
    mix = Mix(parse_mix({"scenario": [{"kind": "chip"}]}))
    mix.next()
    assert mix.exhausted
    with pytest.raises(RuntimeError, match="max_per_run"):
        mix.next()


# -- result files ---------------------------------------------------------------------------


async def _phase_over_memory(spec: PhaseSpec, opts: baselines.Options) -> PhaseResult:
    """Run ``spec`` against a baseline over memory streams (call under the autojump clock)."""
    handle = baselines.handler(opts)
    pairs = [trio.testing.memory_stream_pair() for _ in range(spec.connections)]
    async with trio.open_nursery() as nursery:
        for _client, server in pairs:
            nursery.start_soon(handle, server)
        result = await run_on_streams(
            [c for c, _s in pairs], spec, Mix(load_mix("full")), target_name="memory"
        )
        nursery.cancel_scope.cancel()
    return result


async def test_result_json_round_trips(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    spec = PhaseSpec("closed 2x4", connections=2, window=4, duration=0.5, warmup=0.1)
    result = await _phase_over_memory(spec, baselines.Options("bare", delay=0.001))
    assert result.sent == result.answered > 0 and result.codes == {"00": result.sent}
    assert sum(result.scenarios.values()) == result.sent
    path = tmp_path / "r.json"
    write_json(path, [result], {"command": "test"})
    (back,) = read_json(path)
    # CPU of a target without pid is NaN (null in the file): compare the rest.
    assert math.isnan(back.target_cpu_ms_per_msg)
    assert back.spec == result.spec and back.codes == result.codes
    assert back.latency == result.latency and back.sent == result.sent
    assert LatencyHistogram.decode(back.histogram).summary() == result.latency
    assert back.rate == pytest.approx(result.rate)
    with pytest.raises(KeyError):
        PhaseResult.from_json({"spec": {"name": "x"}})


# -- queueing shows ---------------------------------------------------------------------------

#: The slowed target's serialized service time (virtual seconds).
SERVICE = 0.002


@pytest.mark.parametrize(
    ("arrival", "load"), [("constant", 0.5), ("poisson", 0.7), ("poisson", 0.95), ("constant", 1.5)]
)
async def test_open_loop_p99_is_the_queue_models(
    arrival: schedule.ArrivalKind, load: float, autojump_clock: trio.testing.MockClock
) -> None:
    rate = load / SERVICE
    spec = PhaseSpec("open", "open", 1, rate=rate, arrival=arrival, duration=2.0, warmup=0, seed=11)
    result = await _phase_over_memory(spec, baselines.Options("bare", delay=SERVICE))
    offsets = schedule.arrivals(arrival, rate, 2.0, seed=11)
    model = schedule.fifo_latencies(offsets, SERVICE)
    assert result.sent == result.answered == len(offsets) and not result.errors
    assert result.latency is not None
    # The model's latencies through the same histogram: the same percentiles (within HDR's
    # 3 digits), so each request waited exactly the queue the model says.
    expected = LatencyHistogram()
    for v in model:
        expected.record(v)
    want = expected.summary()
    assert want is not None
    for name in ("p50", "p90", "p99", "p999", "max", "mean"):
        assert getattr(result.latency, name) == pytest.approx(getattr(want, name), rel=2e-3)
    assert result.latency.p99 > SERVICE * 1000 or load <= 0.5
    if load > 1:
        # Overload: the backlog grows through the phase; the last request waits for all
        # those before it, about (1 - 1/load) of the phase.
        assert result.latency.max == pytest.approx(max(model) * 1000, rel=2e-3)
        assert result.latency.max > 0.3 * 2000


async def test_closed_loop_at_the_same_target_cannot_see_the_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Four in flight against the slowed target: no latency above 4 service times, whatever
    # the demand; the open loop above at 1.5x showed hundreds of them.
    spec = PhaseSpec("closed", "closed", 1, 4, duration=2.0, warmup=0)
    result = await _phase_over_memory(spec, baselines.Options("bare", delay=SERVICE))
    assert result.latency is not None
    assert result.latency.max == pytest.approx(
        schedule.closed_loop_latency(4, SERVICE) * 1000, rel=2e-3
    )
    assert result.rate == pytest.approx(1 / SERVICE, rel=0.01)


async def test_open_loop_counts_a_target_that_never_answers_as_timeouts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async def silent(stream: trio.abc.Stream) -> None:
        while await stream.receive_some(65536):
            pass

    spec = PhaseSpec(
        "open", "open", 2, rate=100, arrival="constant", duration=1.0, warmup=0, timeout=0.5
    )
    pairs = [trio.testing.memory_stream_pair() for _ in range(2)]
    async with trio.open_nursery() as nursery:
        for _c, server in pairs:
            nursery.start_soon(silent, server)
        result = await run_on_streams([c for c, _ in pairs], spec, Mix(load_mix("echo")))
        nursery.cancel_scope.cancel()
    assert result.sent == 100 and result.answered == 0
    assert result.errors == {"timeout": 100} and result.latency is None


async def test_answers_after_the_budget_are_counted_by_response_code(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    # 1.5x the slowed target's capacity, constant arrivals: the queue grows steadily, so the
    # answers later than the budget are exactly the model's latencies above it.
    rate, budget = 1.5 / SERVICE, 0.5
    spec = PhaseSpec(
        "open", "open", 1, rate=rate, arrival="constant", duration=2.0, warmup=0, budget=budget
    )
    result = await _phase_over_memory(spec, baselines.Options("bare", delay=SERVICE))
    model = schedule.fifo_latencies(schedule.arrivals("constant", rate, 2.0), SERVICE)
    late = sum(1 for v in model if v > budget)
    assert 0 < late < len(model)
    assert result.over_budget == {"00": late}
    path = tmp_path / "r.json"
    write_json(path, [result], {"command": "test"})
    (back,) = read_json(path)
    assert back.over_budget == result.over_budget and back.spec.budget == budget
    # Without a budget nothing is counted.
    plain = await _phase_over_memory(
        dataclasses.replace(spec, budget=None), baselines.Options("bare", delay=SERVICE)
    )
    assert plain.over_budget == {} and plain.latency == result.latency
