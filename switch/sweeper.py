"""The hold-expiry sweeper: gives back holds that no reversal or completion released in time.

What lives here: ``sweep_once`` (one pass: release up to a batch of expired holds, each
logged with its masked PAN and counted) and ``run_sweeper`` (the daemon task: a pass every
``holds.sweep_interval`` seconds, at once again while passes come back full, with a back-off
on store failures). The release itself is the store's, in small transactions and
idempotently on every backend (``Store.expire_holds``); several instances may sweep at once.

What does not: when a hold expires (the pipeline sets it from ``holds.days_for(mcc)``), the
money rule of a release (``store.rules.plan_hold_release``), the CLI (``cardswitch holds``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import trio

from switch import metrics
from switch.config import HoldsConfig
from switch.log import get_logger
from switch.store.api import Store
from switch.store.models import HoldRelease, StoreError

log = get_logger("switch.sweeper")

#: Seconds to wait after a failed pass before the next one (the store may be recovering).
_FAILURE_BACKOFF = 5.0


def utc_now() -> datetime:
    return datetime.now(UTC)


async def sweep_once(store: Store, now: datetime, batch: int) -> list[HoldRelease]:
    """Release up to ``batch`` holds expired at ``now``; log and count each."""
    released = await store.expire_holds(now.isoformat(timespec="seconds"), batch)
    for r in released:
        log.info("hold_expired", hold_id=r.hold_id, account=r.account_id,
                 masked_pan=r.masked_pan, amount=r.amount)  # fmt: skip
    metrics.observe_holds_expired(len(released))
    return released


async def run_sweeper(
    store: Store, cfg: HoldsConfig, clock: Callable[[], datetime] = utc_now
) -> None:
    """Sweep until cancelled (the daemon's nursery owns it)."""
    while True:
        try:
            released = await sweep_once(store, clock(), cfg.sweep_batch)
        except StoreError as exc:
            log.warning("hold_sweep_failed", error=str(exc))
            await trio.sleep(_FAILURE_BACKOFF)
            continue
        if len(released) < cfg.sweep_batch:
            await trio.sleep(cfg.sweep_interval)
