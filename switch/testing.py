"""What tests and benchmarks share to build a switch: never used by the daemon itself.

What lives here: ``software_engine``, a complete decision engine on the software HSM (with
the demo keys, public test keys only) and the in-memory store, provisioned with card rows and
run on a pinned clock, so pipeline tests need neither SoftHSM, nor a database file, nor TLS;
``context_for``, the ``RequestContext`` a listener's connection would give a request.

What does not: the engine itself (pipeline.py), the stores (store/), anything the daemon
configures (a software HSM and an in-memory store are never defaults).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import trio

from hsm.api import Hsm, KeyAlgorithm, KeyUsage
from hsm.carddata import HsmVault
from hsm.software import SoftwareHsm
from switch.config import Config, ListenerConfig, PipelineConfig
from switch.decisions import profile
from switch.handler import RequestContext
from switch.pipeline import Pipeline
from switch.provision import CardRow, import_cards, load_keys
from switch.store.memory import MemoryStore

#: The demo key set of the repository (public test keys).
DEMO_KEYS = Path(__file__).resolve().parents[1] / "config" / "demo" / "keys.json"
#: Labels of the card-data keys the software engine generates.
FINGERPRINT_KEY = "test-pan-fingerprint"
ENCRYPTION_KEY = "test-pan-encryption"
#: The moment the pinned clock shows unless told otherwise.
PINNED_NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


@dataclass
class SoftwareEngine:
    """A pipeline over the software HSM and the in-memory store, with what tests look at."""

    pipeline: Pipeline
    store: MemoryStore
    hsm: SoftwareHsm
    config: Config


async def software_engine(
    rows: Sequence[CardRow],
    *,
    network: str = "visa",
    pipeline: PipelineConfig | None = None,
    hsm_wrapper: Callable[[SoftwareHsm], Hsm] | None = None,
    clock: Callable[[], datetime] = lambda: PINNED_NOW,
) -> SoftwareEngine:
    """Provision ``rows`` into a fresh in-memory store and return the engine over them.

    Args:
        rows: card rows (``switch.provision.load_rows``).
        network: the profile of the one listener.
        pipeline: budget and stand-in policy.
        hsm_wrapper: wraps the HSM the pipeline talks to (a slow or failing HSM); the
            provisioning talks to the software HSM itself.
        clock: the pipeline's clock (expiry, velocity periods).
    """
    hsm = SoftwareHsm()
    for key in load_keys(DEMO_KEYS):
        algorithm = KeyAlgorithm(key.algorithm) if key.algorithm else None
        await hsm.import_key(
            key.label, KeyUsage(key.usage), bytes.fromhex(key.clear_hex), algorithm
        )
    await hsm.generate_key(FINGERPRINT_KEY, KeyUsage.HMAC)
    await hsm.generate_key(ENCRYPTION_KEY, KeyUsage.DATA)
    vault = HsmVault(hsm, FINGERPRINT_KEY, ENCRYPTION_KEY)
    store = MemoryStore()
    report = await import_cards(store, hsm, vault, rows)
    if not report.ok:
        raise ValueError(f"test cards not provisioned: {report.failures}")
    listener = ListenerConfig(name=network, network=network, port=0, zpk="demo-zpk")
    cfg = Config(listeners=(listener,), pipeline=pipeline or PipelineConfig())
    engine_hsm = hsm_wrapper(hsm) if hsm_wrapper else hsm
    engine = Pipeline(cfg, store=store, hsm=engine_hsm, vault=vault, clock=clock)
    return SoftwareEngine(engine, store, hsm, cfg)


def context_for(
    cfg: Config, *, listener: int = 0, received_at: float | None = None
) -> RequestContext:
    """The context of a request read now (or at ``received_at``) on a listener of ``cfg``."""
    lst = cfg.listeners[listener]
    when = trio.current_time() if received_at is None else received_at
    return RequestContext(lst, profile(lst.network), frozenset({"test-acquirer"}), when)


__all__ = ["SoftwareEngine", "context_for", "software_engine"]
