"""/healthz, /readyz and /metrics of a real switch process (``python -m switch serve``).

One switch with SoftHSM and SQLite (dev-setup, as the crash tests do): ready once its
listeners, HSM session and store answer; every metric the dashboard and alerts query is on its
/metrics; unknown paths are 404; with the test hook blocking its event loop, /healthz turns
503 while /metrics still answers, and 200 again once the loop runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import trio
from crash_support import seed, switch_env
from prometheus_client.parser import text_string_to_metric_families
from test_health import get, poll_until
from test_ops import alert_queries, dashboard_queries, exported_series_names, queried_metrics

from hsm.config import CardDataConfig, HsmConfig
from switch import testing
from switch.config import Config, ListenerConfig, MetricsConfig, StoreConfig, TlsConfig
from switch.health import BLOCK_LOOP_FILE_ENV, STALE_AFTER
from switch.pki import PkiPaths

#: Seconds the hook blocks the switch's loop (above health.STALE_AFTER).
BLOCK_SECONDS = 6


def blocked_view(port: int, hook: Path) -> tuple[list[int], str]:
    """Block the loop through the hook; /healthz until 503, then /metrics (from this thread)."""
    hook.write_text(str(BLOCK_SECONDS))
    statuses = poll_until(port, "/healthz", 503, limit=BLOCK_SECONDS + 20)
    scrape = get(port, "/metrics")
    assert scrape.status == 200
    return statuses, scrape.body.decode()


def heartbeat_age(text: str) -> float:
    for family in text_string_to_metric_families(text):
        if family.name == "cardswitch_loop_heartbeat_age_seconds":
            return float(family.samples[0].value)
    raise AssertionError("no heartbeat age in the scrape")


async def test_health_endpoints_of_a_running_switch(pki: PkiPaths, tmp_path: Path) -> None:
    port = testing.free_port()
    cfg = Config(
        listeners=(ListenerConfig(name="visa", port=0, zpk="demo-zpk"),),
        tls=TlsConfig(ca=pki.ca, cert=pki.server_cert, key=pki.server_key),
        hsm=HsmConfig(softhsm_conf=tmp_path / "softhsm" / "softhsm2.conf", timeout=5.0),
        card_data=CardDataConfig(fingerprint_key="ops-fp", encryption_key="ops-pan"),
        store=StoreConfig(path=tmp_path / "cardswitch.db"),
        metrics=MetricsConfig(host="127.0.0.1", port=port),
    )
    config = testing.write_config(cfg, tmp_path / "switch.toml")
    await seed(config, tmp_path)
    hook = tmp_path / "block-loop"
    env = {**switch_env(tmp_path), BLOCK_LOOP_FILE_ENV: str(hook)}
    with (tmp_path / "switch.log").open("wb") as out:
        async with testing.switch_process(
            config, tmp_path / "ready.json", env=env, output=out
        ) as proc:
            ready = await trio.to_thread.run_sync(poll_until, port, "/readyz", 200)
            assert ready[-1] == 200
            body = (await trio.to_thread.run_sync(get, port, "/readyz")).json()
            assert body == {"ready": True, "failed": {}}
            assert (await trio.to_thread.run_sync(get, port, "/healthz")).status == 200
            assert (await trio.to_thread.run_sync(get, port, "/nope")).status == 404

            # `cardswitch status` reads /status: listeners, connections, readiness
            await trio.sleep(1.5)  # one status snapshot published after the listeners bound
            status = await trio.run_process(
                [sys.executable, "-m", "switch", "status", "--json", "--config", str(config)],
                capture_stdout=True, capture_stderr=True, check=False,
            )  # fmt: skip
            assert status.returncode == 0, status.stderr
            document = json.loads(status.stdout)
            assert document["ready"] is True and document["draining"] is False
            assert document["listeners"]["visa"]["connections"] == 0
            assert document["listeners"]["visa"]["bound"]

            scrape = await trio.to_thread.run_sync(get, port, "/metrics")
            exported = exported_series_names(scrape.body.decode())
            for exprs in (dashboard_queries(), alert_queries()):
                assert queried_metrics(exprs) <= exported, queried_metrics(exprs) - exported
            text = scrape.body.decode()
            assert 'cardswitch_tls_certificate_expiry_seconds{certificate="server"}' in text
            assert 'cardswitch_connections_open{listener="visa"} 0.0' in text

            assert heartbeat_age(text) < STALE_AFTER
            statuses, blocked = await trio.to_thread.run_sync(blocked_view, port, hook)
            assert statuses[-1] == 503
            # This scrape was served while the loop was blocked: its heartbeat was stale.
            assert heartbeat_age(blocked) > STALE_AFTER
            await trio.to_thread.run_sync(poll_until, port, "/healthz", 200)
            assert not hook.exists()
        assert proc.process.returncode == 0
