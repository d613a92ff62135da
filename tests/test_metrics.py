"""What an SRE scrapes: counters and histograms with bounded labels, never card data."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from e2e_fixtures import running_switch
from prometheus_client.parser import text_string_to_metric_families

from hsm.pkcs11 import Pkcs11Hsm
from switch import metrics
from switch.acquirer import build_auth, echo
from switch.client import Client
from switch.pki import PkiPaths

PAN = "4123456789012345"
#: Labels a metric may carry: bounded sets only (no PAN, STAN, terminal, peer address).
ALLOWED_LABELS = {"network", "mti", "response_code", "listener", "outcome", "kind", "step"}
ALLOWED_LABELS |= {"reason"}  # decisions.Reason values: a fixed set
ALLOWED_LABELS |= {"cause", "command", "le"}
ALLOWED_LABELS |= {"limit"}  # ListenerConfig limit names: metrics.CONNECTION_LIMITS


def _samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition().decode()
    assert PAN not in text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED_LABELS, sample
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_requests_and_steps_are_counted(
    pki: PkiPaths,
    demo_hsm: Pkcs11Hsm,
    card_rows: list[Any],
    tmp_path: Path,
    client_ctx: ssl.SSLContext,
) -> None:
    before = _samples()
    async with running_switch(pki, demo_hsm, card_rows, tmp_path) as sw:
        async with Client.connect("127.0.0.1", sw.port, client_ctx) as client:
            await client.request(echo())
            await client.request(build_auth(PAN, 100))
            await client.request(build_auth("4666655554444111", 100_000))
            await client.send_frame(b"\x00\x00", raw=True)  # zero-length frame: closed
            await client.wait_closed()
    after = _samples()

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    requests = "cardswitch_requests_total"
    assert delta(requests, network="visa", mti="0800", response_code="00") == 1
    assert delta(requests, network="visa", mti="0100", response_code="00") == 1
    assert delta(requests, network="visa", mti="0100", response_code="51") == 1
    assert delta("cardswitch_decisions_total", network="visa", reason="approved") == 2
    assert delta("cardswitch_decisions_total", network="visa", reason="insufficient_funds") == 1
    assert delta("cardswitch_protocol_errors_total", listener="visa", kind="zero_length") == 1
    assert delta("cardswitch_connections_total", listener="visa", outcome="zero_length") == 1
    assert delta("cardswitch_pipeline_step_seconds_count", step="commit") == 2
    assert delta("cardswitch_store_batch_size_count") >= 1
    assert delta("cardswitch_hsm_command_seconds_count", command="fingerprint") == 2
    assert _value(after, "cardswitch_requests_in_flight") == 0
