"""A full disk and a read-only database under the real process, under load.

One ``python -m switch serve`` (SoftHSM, SQLite), started and seeded as the crash tests start
it, keeps its database and WAL on a small tmpfs mounted for the test (root only: the test is
skipped, saying why, when the mount is refused). Clients keep the crash tests' mixed load
(``crash_support.Load``: new authorizations, duplicates, repeats, reversals) in flight the
whole time.

- Full disk: a filler file takes every free byte of the tmpfs. While it is full, every answer
  to a request sent then is the stand-in code (91) or a 00 the journal holds; none is late
  past the budget plus a margin, the log names the store failure and
  ``cardswitch_stand_in_total{cause="store"}`` counts it. Once the filler is removed the same
  process approves again (no restart).
- Read-only: the database and WAL on a pass-through FUSE filesystem (``read_only_fs.py``)
  that answers ``EROFS`` to every write, ``fsync``, truncation and creation while a flag file
  exists, and is writable again once it is removed: the switch's own open descriptors get
  the errors of a read-only mount and then no more (that module says why the kernel's
  ``remount,ro`` cannot do this under a running process: ``EBUSY``). Same expectations. It
  needs root, ``/dev/fuse``, libfuse2 and fusepy (``scripts/bootstrap.sh`` and the test
  extras install them); it is skipped, saying which is missing, otherwise.

Afterwards the switch drains and exits 0, its log has no traceback, and ``check_database``
finds the journal agreeing with every answer received and the money invariants holding.
"""

from __future__ import annotations

import errno
import os
import ssl
import subprocess
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
import trio
from crash_support import (
    Driver,
    Exchange,
    check_database,
    seed,
    switch_env,
    write_config,
)
from prometheus_client.parser import text_string_to_metric_families
from test_health import aget

from switch import testing
from switch.config import PipelineConfig, StoreConfig
from switch.pki import PkiPaths

#: Size of the tmpfs holding the database and its WAL: room for the seed and a few thousand
#: decisions, small enough to fill at once.
TMPFS_SIZE = "16m"
#: The pipeline budget, and what an answer may take beyond it (a thread hop and a rollback
#: on a loaded 2-core machine; the lock test's margin, doubled).
BUDGET = 2.0
MARGIN = 1.0
#: Seconds an open store breaker waits before it probes again (recovery comes after one).
COOL_DOWN = 1.0
START_TIMEOUT = 30.0
#: Bound on waiting for the FUSE filesystem to be mounted, and for its daemon to end.
FUSE_TIMEOUT = 10.0
APPROVED, STAND_IN = "00", "91"
#: The pass-through filesystem that turns read-only on a flag.
READ_ONLY_FS = Path(__file__).with_name("read_only_fs.py")


@contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` for the block (skips when refused)."""
    where.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def fill(directory: Path) -> Path:
    """A file taking every free byte of ``directory``'s filesystem (until ENOSPC)."""
    filler = directory / "filler"
    chunk = b"\0" * 65536
    with filler.open("wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
        try:  # the last partial chunk
            while True:
                f.write(b"\0" * 512)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    return filler


async def stand_ins_for_store(metrics_port: int) -> float:
    reply = await aget(metrics_port, "/metrics")
    assert reply.status == 200
    total = 0.0
    for family in text_string_to_metric_families(reply.body.decode()):
        for s in family.samples:
            if s.name == "cardswitch_stand_in_total" and s.labels.get("cause") == "store":
                total += s.value
    return total


async def run_outage(
    pki: PkiPaths,
    ctx: ssl.SSLContext,
    tmp: Path,
    *,
    filesystem: Callable[[Path], AbstractContextManager[Path]],
    fail: Callable[[Path], Awaitable[None]],
    restore: Callable[[Path], Awaitable[None]],
) -> Driver:
    """The switch with its database on ``filesystem`` (mounted at the path given, yielding
    it) under load: ``fail`` it, then ``restore`` it; the checks of the module docstring.
    Returns the driver for the test's own checks."""
    metrics_port = testing.free_port()
    with filesystem(tmp / "db") as mount:
        db = mount / "cardswitch.db"
        config = write_config(
            tmp,
            pki,
            store=StoreConfig(path=db),
            pipeline=PipelineConfig(budget=BUDGET, breaker_cool_down=COOL_DOWN),
            metrics_port=metrics_port,
        )
        await seed(config, tmp)
        with (tmp / "switch.log").open("wb") as logfile:
            proc = await testing.start_switch(
                config,
                tmp / "ready.json",
                env=switch_env(tmp),
                output=logfile,
                ready_within=START_TIMEOUT,
            )
        driver = Driver(proc.port, ctx, seed_value=12)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(driver.run)
                await driver.wait_for("before", APPROVED)
                before = await stand_ins_for_store(metrics_port)

                driver.phases.begin("failing")  # while the disk fills, say
                await fail(mount)
                driver.phases.begin("failed")
                await driver.wait_for("failed", STAND_IN)
                during = await stand_ins_for_store(metrics_port)

                await restore(mount)
                driver.phases.begin("restored")
                await driver.wait_for("restored", APPROVED)
                driver.stopping = True
            assert proc.process.poll() is None  # the same process throughout: no restart
        finally:
            status = await proc.stop()
        assert status == 0
        assert during > before  # the metric counts the store's stand-ins

        report = check_database(db, driver.load.exchanges)
    log = (tmp / "switch.log").read_text(errors="replace")
    assert "Traceback" not in log
    assert '"store_failed"' in log  # the log line naming the store failure
    assert report.violations == [], report.violations[:20]

    phases = driver.phases
    for x in driver.load.exchanges:
        assert x.response is not None and x.answered_at is not None
        assert x.answered_at - x.sent_at <= BUDGET + MARGIN, (phases.of(x), x.request.stan)
    failed = [x for x in driver.load.exchanges if phases.of(x) == "failed"]
    codes = {x.response.response_code for x in failed if x.response is not None}
    assert STAND_IN in codes

    # Before the outage nothing stands in; once an approval comes back, everything sent
    # after it is decided again (recovered, it stays recovered).
    def summary(xs: list[Exchange]) -> list[tuple[str, str, str, float]]:
        return [
            (x.request.mti, x.request.stan, x.response.response_code, x.sent_at)
            for x in xs
            if x.response is not None
        ]

    # (Requests still in flight when the failure began may stand in: only those answered
    # before it must not.)
    failure_began = next(at for at, name in phases.starts if name == "failing")
    calm = [
        x
        for x in driver.load.exchanges
        if phases.of(x) == "before" and x.answered_at is not None and x.answered_at < failure_began
    ]
    stood_in = [x for x in calm if x.response and x.response.response_code == STAND_IN]
    assert not stood_in, summary(stood_in)
    back = [x for x in driver.load.exchanges if phases.of(x) == "restored"]
    first_ok = min(
        x.answered_at
        for x in back
        if x.answered_at is not None and x.response and x.response.response_code == APPROVED
    )
    late = [x for x in back if x.sent_at > first_ok]
    relapsed = [x for x in late if x.response and x.response.response_code == STAND_IN]
    assert late and not relapsed, (first_ok, summary(relapsed))
    by_phase: dict[str, Counter[str]] = defaultdict(Counter)
    for x in driver.load.exchanges:
        assert x.response is not None
        by_phase[phases.of(x)][x.response.response_code] += 1
    print(
        f"codes by phase {dict(by_phase)}; "
        f"{len(driver.load.exchanges)} answers; sent while failed: {len(failed)}, codes "
        f"{sorted(codes)}; store stand-ins counted {during - before:g}; journal "
        f"{report.journal_rows} rows, {report.approvals_checked} approvals checked"
    )
    return driver


async def test_full_disk_stands_in_and_recovers_without_restart(
    pki: PkiPaths, client_ctx: ssl.SSLContext, tmp_path: Path
) -> None:
    filler: list[Path] = []

    async def fill_disk(mount: Path) -> None:
        filler.append(await trio.to_thread.run_sync(fill, mount))

    async def free_disk(mount: Path) -> None:
        os.unlink(filler.pop())

    await run_outage(
        pki,
        client_ctx,
        tmp_path,
        filesystem=lambda where: tmpfs(where, TMPFS_SIZE),
        fail=fill_disk,
        restore=free_disk,
    )


def read_only_flag(mount: Path) -> Path:
    """The flag file that makes ``read_only_fs`` at ``mount`` read-only (outside the mount)."""
    return mount.with_name(mount.name + ".read-only")


@contextmanager
def read_only_fs(where: Path) -> Iterator[Path]:
    """``read_only_fs.py`` mounted at ``where`` over a backing directory beside it, for the
    block (writable until ``read_only_flag(where)`` exists); skips when it cannot be had."""
    if os.geteuid() != 0:
        pytest.skip("mounting a FUSE filesystem needs root")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse on this machine")
    probe = subprocess.run(
        [sys.executable, "-c", "import fuse"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        reason = probe.stderr.strip().splitlines()[-1:] or ["?"]
        pytest.skip(f"fusepy or libfuse2 missing (scripts/bootstrap.sh installs them): {reason}")
    backing = where.with_name(where.name + ".backing")
    backing.mkdir()
    where.mkdir()
    flag = read_only_flag(where)
    with (where.parent / "read_only_fs.log").open("wb") as log:
        daemon = subprocess.Popen(
            [sys.executable, str(READ_ONLY_FS), str(backing), str(where), str(flag)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + FUSE_TIMEOUT
        while not os.path.ismount(where):
            if daemon.poll() is not None or time.monotonic() > deadline:
                said = (where.parent / "read_only_fs.log").read_text(errors="replace").strip()
                pytest.skip(f"the FUSE filesystem did not mount: {said[-300:]}")
            time.sleep(0.05)
        yield where
    finally:
        flag.unlink(missing_ok=True)
        subprocess.run(["umount", str(where)], capture_output=True, check=False)
        try:
            daemon.wait(timeout=FUSE_TIMEOUT)
        except subprocess.TimeoutExpired:
            subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)
            daemon.kill()
            daemon.wait(timeout=FUSE_TIMEOUT)


async def test_read_only_database_stands_in_and_recovers_without_restart(
    pki: PkiPaths, client_ctx: ssl.SSLContext, tmp_path: Path
) -> None:

    async def read_only(mount: Path) -> None:
        read_only_flag(mount).touch()
        # From now on every change is refused: what the switch wrote before stays readable.
        with pytest.raises(OSError) as refused:
            (mount / "probe").touch()
        assert refused.value.errno == errno.EROFS

    async def read_write(mount: Path) -> None:
        read_only_flag(mount).unlink()

    await run_outage(
        pki,
        client_ctx,
        tmp_path,
        filesystem=read_only_fs,
        fail=read_only,
        restore=read_write,
    )
