"""Soak: the real process under mixed load for a while, its descriptors and memory sampled.

One ``python -m switch serve`` (SoftHSM, SQLite), started and seeded as the crash tests start
it, takes the crash tests' mixed load (``crash_support.Load`` with the PIN cards: new 0100
and 0200, duplicates, 0101 repeats, reversals with their repeats, wrong PINs), with 0800
echo tests beside it on each connection (each answered 0810 00), for
``CARDSWITCH_SOAK_SECONDS`` (default 10; ``make soak`` runs 300). Every ``SAMPLE_EVERY``
seconds the test samples the process's open descriptors (/proc/PID/fd), its resident memory
(VmRSS) and the cards' PIN-try counters, and prints the samples.

After the warm-up (the first ``WARM_UP_SHARE`` of the run, at least one sample) the
descriptor count never exceeds the warm-up's last sample by more than ``FD_SLACK``, and the
resident memory at the end is within ``RSS_GROWTH`` of it: the allocator's arenas and
SQLite's page cache grow at first and then level off, while a leak per request (a few
hundred bytes of each of thousands of requests a minute) would keep climbing past it. At the
end the switch drains and exits 0, its log has no traceback, and ``check_database`` finds the
journal agreeing with every answer and the money and PIN-counter invariants holding.
"""

from __future__ import annotations

import os
import ssl
from collections import Counter
from pathlib import Path

import trio
from crash_support import Driver, check_database, pin_tries, seed, switch_env, write_config

from benchmarks.procstat import ProcSample, sample
from switch import testing
from switch.pki import PkiPaths

#: Environment variable: seconds of load (``make soak`` sets 300).
SOAK_ENV = "CARDSWITCH_SOAK_SECONDS"
DEFAULT_SECONDS = 10.0
#: Seconds between two samples.
SAMPLE_EVERY = 2.0
#: Share of the run that is warm-up (its last sample is the reference).
WARM_UP_SHARE = 0.3
#: Descriptors above the warm-up reference allowed later: one being opened or closed at the
#: moment of a sample (a SQLite temporary file, a SoftHSM object file read).
FD_SLACK = 2
#: Resident memory growth allowed from the warm-up reference to the end, bytes.
RSS_GROWTH = 16 * 2**20
START_TIMEOUT = 30.0


def soak_seconds() -> float:
    raw = os.environ.get(SOAK_ENV, "").strip()
    return float(raw) if raw else DEFAULT_SECONDS


async def test_soak_mixed_load_keeps_fds_and_memory_level(
    pki: PkiPaths, client_ctx: ssl.SSLContext, tmp_path: Path
) -> None:
    seconds = soak_seconds()
    db = tmp_path / "cardswitch.db"
    config = write_config(tmp_path, pki)
    await seed(config, tmp_path)
    with (tmp_path / "switch.log").open("wb") as logfile:
        proc = await testing.start_switch(
            config,
            tmp_path / "ready.json",
            env=switch_env(tmp_path),
            output=logfile,
            ready_within=START_TIMEOUT,
        )
    driver = Driver(proc.port, client_ctx, seed_value=7, pins=True, echoes=True)
    samples: list[tuple[float, int, ProcSample]] = []
    pin_samples: list[dict[str, int]] = []
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(driver.run)
            started = trio.current_time()
            while True:
                await trio.sleep(SAMPLE_EVERY)
                now = trio.current_time() - started
                samples.append((now, len(driver.load.exchanges), sample(proc.pid)))
                pin_samples.append(await trio.to_thread.run_sync(pin_tries, db))
                print(f"soak t={now:6.1f}s requests={samples[-1][1]:7d} {samples[-1][2]}")
                if now >= seconds:
                    break
            driver.stopping = True
        assert proc.process.poll() is None
    finally:
        status = await proc.stop()
    assert status == 0
    log = (tmp_path / "switch.log").read_text(errors="replace")
    assert "Traceback" not in log

    warm = max(1, int(len(samples) * WARM_UP_SHARE))
    reference = samples[warm - 1][2]
    later = [s for _, _, s in samples[warm:]] or [reference]
    end = samples[-1][2]
    codes = Counter(
        x.response.response_code for x in driver.load.exchanges if x.response is not None
    )
    print(
        f"soak {seconds:g}s: {len(driver.load.exchanges)} requests, codes {dict(codes)}, "
        f"{driver.echoes} echoes; "
        f"reference (after warm-up) {reference}, max fds later {max(s.fds for s in later)}, "
        f"end {end}, RSS growth {(end.rss - reference.rss) / 2**20:+.1f}MiB"
    )
    assert max(s.fds for s in later) <= reference.fds + FD_SLACK, samples
    assert end.rss <= reference.rss + RSS_GROWTH, samples

    report = check_database(db, driver.load.exchanges, pin_samples=pin_samples)
    assert report.violations == [], report.violations[:20]
    assert report.approvals_checked > 0 and report.pin_tries > 0
    assert driver.echoes > 0
