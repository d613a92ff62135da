"""The SoftHSM token removed and restored under load, through a real switch process.

One ``python -m switch serve`` on a token made by ``dev-setup`` in a temporary directory, and
clients keeping authorizations in flight the whole time. The token directory is moved aside
("removed": what SoftHSM sees when the volume holding it goes away), then moved back. Once
the switch has seen it gone (at the next read of the token objects: commands run on session
copies of the keys, checked against the token every ``hsm.pkcs11.KEY_RECHECK`` seconds, and
the readiness probe reads the token at once; requests decided before may still be approved)
every answer while it is away is the stand-in policy's 91, /readyz says the HSM is not ready
and ``cardswitch_hsm_session_state`` is 0; once it is back the switch approves again by itself
(same process, no restart), /readyz is 200 again and ``cardswitch_hsm_reconnects_total``
counts the reconnect. Nothing is held for a 91: the account's available balance drops by the
approved amounts only.
"""

from __future__ import annotations

import itertools
import json
import shutil
import sqlite3
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import trio
from crash_support import SEED_CARDS, seed
from prometheus_client.parser import text_string_to_metric_families
from test_health import aget

from hsm.config import CardDataConfig, HsmConfig
from switch import testing
from switch.acquirer import build_auth
from switch.client import Client
from switch.config import (
    Config,
    ListenerConfig,
    MetricsConfig,
    PipelineConfig,
    StoreConfig,
    TlsConfig,
)
from switch.pki import PkiPaths
from switch.wire.messages import AuthResponse

#: Clients, each with one request in flight at a time on its own connection.
CLIENTS = 4
#: Answers each phase must collect before the test moves on (bounded by PHASE_TIMEOUT).
PER_PHASE = 24
#: Seconds a phase may take: the token is back within one reconnect delay (at most 10 s).
PHASE_TIMEOUT = 40.0
#: Seconds one request may take (the budget is 2 s).
REQUEST_TIMEOUT = 10.0
#: Seconds the switch may take to start.
START_TIMEOUT = 30.0
AMOUNT = 100
#: The first test card of the crash tests' seed (dev-setup imports them) and its account.
PAN, ACCOUNT, OPENING = SEED_CARDS[0].pan, SEED_CARDS[0].account, SEED_CARDS[0].balance
APPROVED, STAND_IN = "00", "91"


@dataclass
class Answers:
    """Every answer, with the phase when its request was sent and when it came back."""

    phase: str = "before"
    seen: list[tuple[str, str, str]] = field(default_factory=list)
    _progress: trio.Event = field(default_factory=trio.Event)

    def add(self, sent: str, code: str) -> None:
        self.seen.append((sent, self.phase, code))
        self._progress.set()
        self._progress = trio.Event()

    async def wait_for(self, phase: str, code: str) -> None:
        """Until ``PER_PHASE`` requests sent and answered in ``phase`` got ``code``."""
        with trio.fail_after(PHASE_TIMEOUT):
            while self.count(phase, code) < PER_PHASE:
                await self._progress.wait()

    def count(self, phase: str, code: str) -> int:
        return sum(1 for sent, back, c in self.seen if sent == back == phase and c == code)


async def client_loop(
    port: int, ctx: ssl.SSLContext, answers: Answers, stans: itertools.count[int]
) -> None:
    async with Client.connect("127.0.0.1", port, ctx) as client:
        while answers.phase != "done":
            sent = answers.phase
            stan = f"{next(stans) % 1_000_000:06d}"
            with trio.fail_after(REQUEST_TIMEOUT):
                answer = await client.request(
                    build_auth(PAN, AMOUNT, stan=stan, rrn=f"0001{stan}00")
                )
            assert isinstance(answer, AuthResponse)
            answers.add(sent, answer.response_code)


async def scrape(port: int) -> dict[str, float]:
    reply = await aget(port, "/metrics")
    assert reply.status == 200
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        for sample in family.samples:
            if sample.name.startswith("cardswitch_hsm_session") or sample.name.startswith(
                "cardswitch_hsm_reconnects"
            ):
                values[sample.name] = sample.value
    return values


async def ready_status(port: int, want: int, failing: str | None = None) -> dict[str, object]:
    """Poll /readyz until it answers ``want`` (with ``failing`` among its failed checks, if
    given); its body."""
    with trio.fail_after(PHASE_TIMEOUT):
        while True:
            reply = await aget(port, "/readyz")
            if reply.status == want:
                body: dict[str, object] = json.loads(reply.body)
                if failing is None or failing in body.get("failed", {}):  # type: ignore[operator]
                    return body
            await trio.sleep(0.1)


async def test_token_removed_and_restored_under_load(
    pki: PkiPaths, client_ctx: ssl.SSLContext, tmp_path: Path
) -> None:
    metrics_port = testing.free_port()
    softhsm = tmp_path / "softhsm"
    cfg = Config(
        listeners=(ListenerConfig(name="visa", host="127.0.0.1", port=0, zpk="demo-zpk"),),
        tls=TlsConfig(ca=pki.ca, cert=pki.server_cert, key=pki.server_key),
        hsm=HsmConfig(softhsm_conf=softhsm / "softhsm2.conf", timeout=2.0),
        card_data=CardDataConfig(fingerprint_key="crash-fp", encryption_key="crash-pan"),
        store=StoreConfig(path=tmp_path / "cardswitch.db"),
        metrics=MetricsConfig(host="127.0.0.1", port=metrics_port),
        pipeline=PipelineConfig(budget=2.0, stand_in="issuer_unavailable"),
    )
    config = testing.write_config(cfg, tmp_path / "switch.toml")
    await seed(config, tmp_path)
    answers = Answers()
    stans = itertools.count(1)
    with (tmp_path / "switch.log").open("wb") as logfile:
        proc = await testing.start_switch(
            config, tmp_path / "ready.json", output=logfile, ready_within=START_TIMEOUT
        )
    try:
        async with trio.open_nursery() as load:
            for _ in range(CLIENTS):
                load.start_soon(client_loop, proc.port, client_ctx, answers, stans)
            await answers.wait_for("before", APPROVED)
            assert (await scrape(metrics_port))["cardswitch_hsm_session_state"] == 1
            await ready_status(metrics_port, 200)

            shutil.move(softhsm / "tokens", softhsm / "tokens.away")
            answers.phase = "away"
            await answers.wait_for("away", STAND_IN)
            # The vault breaker may open before the HSM check's next run: wait for the HSM.
            await ready_status(metrics_port, 503, failing="hsm")
            assert (await scrape(metrics_port))["cardswitch_hsm_session_state"] == 0
            answers.phase = "gone"  # the switch has said so: nothing but 91 from here
            await answers.wait_for("gone", STAND_IN)

            shutil.move(softhsm / "tokens.away", softhsm / "tokens")
            answers.phase = "back"
            await answers.wait_for("back", APPROVED)
            answers.phase = "done"
        await ready_status(metrics_port, 200)
        after = await scrape(metrics_port)
        assert proc.process.poll() is None  # the same process throughout: no restart
    finally:
        status = await proc.stop()
    assert status == 0
    assert after["cardswitch_hsm_session_state"] == 1
    assert after["cardswitch_hsm_reconnects_total"] >= 1

    # Sent after the move: approvals until the recheck (the copies), then 91s.
    away = [code for sent, back, code in answers.seen if sent == back == "away"]
    assert STAND_IN in away, away
    # Sent once the switch reported the token gone (readiness, session state): only 91.
    gone = [code for sent, back, code in answers.seen if sent == back == "gone"]
    assert gone and set(gone) == {STAND_IN}, gone
    back = [code for sent, _, code in answers.seen if sent in ("back", "done")]
    first_ok = back.index(APPROVED)
    assert set(back[first_ok:]) == {APPROVED}, back  # once recovered, it stays recovered
    approved = sum(1 for _, _, code in answers.seen if code == APPROVED)
    with sqlite3.connect(tmp_path / "cardswitch.db") as db:
        (available,) = db.execute(
            "SELECT available_balance FROM accounts WHERE id = ?", (ACCOUNT,)
        ).fetchone()
    assert available == OPENING - approved * AMOUNT
