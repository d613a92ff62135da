"""Smoke run of the load harness (benchmarks/load.py): it runs and its counts add up.

A few dozen requests through the real switch process (dev-setup, mutual TLS, SoftHSM,
SQLite); no timing is asserted, only that the report is written and is consistent. Plus the
pure helpers on hand-made input.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from benchmarks.load import percentile, summarize_profile

REPO = Path(__file__).resolve().parents[1]

#: Requests per phase and the levels of the smoke run.
REQUESTS = 24
LEVELS = (1, 4)


def test_smoke_run_writes_a_consistent_report(tmp_path: Path) -> None:
    out = tmp_path / "reports"
    cmd = [sys.executable, "-m", "benchmarks.load", "--levels", ",".join(map(str, LEVELS))]
    cmd += ["--requests", str(REQUESTS), "--warmup", "4", "--connections", "2"]
    cmd += ["--no-pin-cpus", "--out", str(out), "--name", "smoke"]
    cmd += ["--work-dir", str(tmp_path / "work"), "--log-level", "warning"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]

    report = json.loads((out / "smoke.json").read_text())
    markdown = (out / "smoke.md").read_text()
    phases = report["phases"]
    assert [(p["level"], p["mode"]) for p in phases] == [
        (level, mode) for level in LEVELS for mode in ("echo", "auth")
    ]
    for p in phases:
        assert p["planned"] == p["sent"] == REQUESTS
        assert not p["truncated"]
        assert p["answered"] + sum(p["errors"].values()) == p["sent"]
        assert sum(p["codes"].values()) == p["answered"]
        # Loopback, a handful of requests, a card with funds and no limits: no errors, and
        # the published CVV vector (561 for 4123456789012345, 8701, 101) approves.
        assert p["errors"] == {}
        assert p["codes"] == {"00": REQUESTS}
        assert p["latency_ms"]["p50"] <= p["latency_ms"]["p99"] <= p["latency_ms"]["max"]
    assert [r["level"] for r in report["ratios"]] == list(LEVELS)
    assert report["server_exit"] == 0
    assert report["machine"]["python"]
    for level in LEVELS:
        assert f"| {level} | auth | {REQUESTS}/{REQUESTS} | 0 |" in markdown
    # The work directory keeps the switch log; no full PAN of the load card in it.
    assert "4123456789012345" not in (tmp_path / "work" / "switch.log").read_text()


@pytest.mark.parametrize(
    ("pct", "expected"), [(50, 3.0), (90, 5.0), (99, 5.0), (1, 1.0), (100, 5.0)]
)
def test_percentile_is_nearest_rank(pct: float, expected: float) -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], pct) == expected


def test_profile_summary_counts_samples_per_category() -> None:
    site = "/venv/lib/python3.11/site-packages"
    raw = "\n".join(
        [
            # 3 samples in an HSM call reached through trio's thread hop.
            f"serve (/work/main/switch/server.py:10);verify_cvv (/work/main/hsm/pkcs11.py:5);"
            f"run_sync ({site}/trio/_threads.py:1) 3",
            # 1 sample in trio's run loop alone.
            f"unrolled_run ({site}/trio/_core/_run.py:2) 1",
        ]
    )
    prof = summarize_profile(raw, requests=2, level=1)
    assert prof.samples == 4
    by_name = {e.frame: e.samples for e in prof.categories}
    assert by_name == {
        "HSM commands (PKCS#11 on SoftHSM, with thread hop)": 3,
        "trio run loop and scheduling": 1,
    }
    # 3 samples at 200 Hz are 15 ms, over 2 requests.
    hsm = prof.categories[0]
    assert hsm.ms_per_request == pytest.approx(7.5)


# -- the load generator against the in-process echo baseline (about 1 s) -------------------


async def test_generator_runs_against_the_in_process_echo_baseline() -> None:
    from benchmarks import baselines
    from benchmarks.generator import PhaseSpec, Target, run_phase
    from benchmarks.scenarios import Mix, load_mix

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(baselines.serve, baselines.Options("echo"))
        port = listeners[0].socket.getsockname()[1]
        target = Target(port=port)
        mix = Mix(load_mix("full"))
        closed = PhaseSpec("closed 2x4", connections=2, window=4, duration=0.4, warmup=0.1)
        opened = PhaseSpec("open", "open", 2, rate=500, duration=0.4, warmup=0.1, timeout=2)
        results = [await run_phase(target, s, mix, name="echo") for s in (closed, opened)]
        nursery.cancel_scope.cancel()
    for r in results:
        # The echo baseline returns each frame as it came: matched by STAN, no DE39.
        assert r.sent > 0 and r.answered + r.error_count == r.sent
        assert r.codes == {"-": r.answered} and not r.errors
        assert sum(r.scenarios.values()) == r.sent
        assert r.latency is not None and r.latency.p50 <= r.latency.p99 <= r.latency.max
    assert results[1].offered_rate == 500


def test_cardswitch_bench_drives_a_baseline_process(tmp_path: Path) -> None:
    from benchmarks.generator import read_json
    from switch import testing
    from switch.__main__ import main

    ready = tmp_path / "ready.json"
    cmd = [sys.executable, "-m", "benchmarks.baselines", "bare", "--ready-file", str(ready)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=testing.switch_env())
    try:
        for _ in range(500):
            if ready.exists() or proc.poll() is not None:
                break
            trio.run(trio.sleep, 0.02)
        port = testing.read_ready(ready).port
        out = tmp_path / "bench.json"
        args = ["bench", "--port", str(port), "--mix", "track2", "--connections", "2"]
        args += ["--window", "4", "--duration", "0.4", "--warmup", "0.1", "--quiet"]
        args += ["--target-pid", str(proc.pid), "--json", str(out)]
        assert main(args) == 0
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0
    (result,) = read_json(out)
    assert result.answered == result.sent > 0 and result.codes == {"00": result.sent}
    assert result.scenarios == {"track2": result.sent}


def test_cardswitch_bench_reports_a_bad_mix_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from switch.__main__ import main

    bad = tmp_path / "bad.toml"
    bad.write_text('[[scenario]]\nkind = "wire"\n')
    assert main(["bench", "--port", "1", "--mix", str(bad), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "kind must be one of" in err


def test_workers_bench_runs_each_setup_and_its_counts_add_up(tmp_path: Path) -> None:
    """benchmarks.workers_bench on SQLite and PostgreSQL, spread and hot, tiny: every setup
    ran, every answer is counted once, the spread cards' CVVs approve, the switches exited 0.
    (No throughput is asserted: that is the report's job.)"""
    out = tmp_path / "reports"
    setups = ["sqlite:1", "pg:1", "pg:1x2:hot"]
    cmd = [sys.executable, "-m", "benchmarks.workers_bench", "--setups", ",".join(setups)]
    cmd += ["--requests", "40", "--warmup", "8", "--level", "4", "--connections", "2"]
    cmd += ["--rounds", "1", "--out", str(out), "--name", "smoke"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]

    report = json.loads((out / "smoke.json").read_text())
    assert [r["setup"] for r in report["runs"]] == setups
    assert set(report["summary"]) == set(setups)
    for run in report["runs"]:
        assert run["requests"] == 40
        assert run["answered"] + sum(run["errors"].values()) == run["requests"]
        assert sum(run["codes"].values()) == run["answered"]
        assert run["exit_status"] == [0] * (2 if "x2" in run["setup"] else 1)
    spread = report["runs"][0]
    assert spread["codes"] == {"00": 40}, spread
    assert "| pg:1x2:hot |" in (out / "smoke.md").read_text()


def test_workers_bench_refuses_a_bad_setup_in_one_line(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "benchmarks.workers_bench", "--setups", "sqlite:1x2"]
    cmd += ["--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "workers_bench: setup 'sqlite:1x2': several instances need PostgreSQL"
    ]
