"""What an SRE scrapes: counters and histograms with bounded labels, never card data.

Cardinality is bounded by construction: thousands of distinct unknown MTIs, response codes,
reasons and kinds, fed through the real recording functions (and, over memory streams,
through a real connection), add no series once the first "other" exists.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import iso8583
import trio
import trio.testing
from e2e_fixtures import running_switch
from prometheus_client.parser import text_string_to_metric_families

import switch
from hsm.pkcs11 import Pkcs11Hsm
from switch import metrics
from switch.acquirer import build_auth, echo
from switch.client import Client
from switch.config import ListenerConfig
from switch.connection import Connection
from switch.decisions import Reason, profile
from switch.handler import Dispatcher
from switch.pki import PkiPaths
from switch.wire import codec
from switch.wire.framing import FrameDecoder, encode_frame
from switch.wire.spec import spec_for

PAN = "4123456789012345"
#: Labels a metric may carry: bounded sets only (no PAN, STAN, terminal, peer address).
ALLOWED_LABELS = {"network", "mti", "response_code", "listener", "outcome", "kind", "step"}
ALLOWED_LABELS |= {"reason"}  # decisions.Reason values: a fixed set
ALLOWED_LABELS |= {"cause", "command", "le", "check", "certificate", "version"}
#: Labels of the default process/platform/GC collectors (python_info, python_gc_*).
COLLECTOR_LABELS = {"implementation", "major", "minor", "patchlevel", "version", "generation"}
ALLOWED_LABELS |= {"limit"}  # ListenerConfig limit names: metrics.CONNECTION_LIMITS
ALLOWED_LABELS |= {"dependency"}  # metrics.BREAKER_DEPENDENCIES: hsm, store, vault
ALLOWED_LABELS |= {"result"}  # metrics.DELIVERY_MARK_RESULTS: marked, missing, failed, ...


def _samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition().decode()
    assert PAN not in text
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            allowed = COLLECTOR_LABELS if sample.name.startswith("python_") else ALLOWED_LABELS
            assert set(sample.labels) <= allowed, sample
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


def _series_count() -> int:
    return sum(
        len(family.samples)
        for family in text_string_to_metric_families(metrics.exposition().decode())
    )


def _unknown_request_mtis() -> list[str]:
    """Every request-class MTI (function digit 0, 2 or 4) the switch does not serve."""
    served = metrics.MTIS.values
    return [
        f"{version}{cls}{function}{origin}"
        for version in "0123456789"
        for cls in "0123456789"
        for function in "024"
        for origin in "0123456789"
        if f"{version}{cls}{function}{origin}" not in served
    ]


def test_default_collectors_and_build_info_are_registered() -> None:
    families = {f.name: f for f in text_string_to_metric_families(metrics.exposition().decode())}
    assert {"process_cpu_seconds", "process_resident_memory_bytes", "python_info"} <= set(families)
    assert "python_gc_objects_collected" in families
    (build,) = families["cardswitch_build_info"].samples
    assert build.name == "cardswitch_build_info"
    assert build.labels == {"version": switch.__version__}


def test_thousands_of_unknown_label_values_add_no_series() -> None:
    mtis = _unknown_request_mtis()
    assert len(mtis) > 2900
    codes = [f"Z{i:03d}" for i in range(3000)]
    kinds = [f"kind-{i}" for i in range(3000)]

    def feed(i: int) -> None:
        metrics.observe_answer(
            "visa", mtis[i], response_code=codes[i], reason=kinds[i], seconds=0.001,
            stand_in=kinds[i],
        )  # fmt: skip
        metrics.observe_answer("no-such-network", "0100", response_code="00", reason="approved",
                               seconds=0.001)  # fmt: skip
        metrics.observe_protocol_error("visa", kinds[i])
        metrics.observe_undelivered("visa", kinds[i])
        metrics.HSM_ERRORS.labels(kinds[i], kinds[i]).inc()
        metrics.HSM_SECONDS.labels(kinds[i]).observe(0.001)
        metrics.STEP_SECONDS.labels(kinds[i]).observe(0.001)
        metrics.CONNECTIONS.labels("visa", kinds[i]).inc()

    feed(0)  # the first unknown value of each label creates its "other" series
    before = _series_count()
    for i in range(1, len(mtis)):
        feed(i)
    assert _series_count() == before
    other = metrics.REGISTRY.get_sample_value(
        "cardswitch_requests_total",
        {"network": "visa", "mti": "other", "response_code": "other"},
    )
    assert other is not None and other >= len(mtis)


def test_known_values_keep_their_own_series() -> None:
    before = (
        metrics.REGISTRY.get_sample_value(
            "cardswitch_requests_total",
            {"network": "mastercard", "mti": "0200", "response_code": "N7"},
        )
        or 0.0
    )
    metrics.observe_answer("mastercard", "0200", response_code="N7", reason="cvv2_mismatch",
                           seconds=0.001)  # fmt: skip
    after = metrics.REGISTRY.get_sample_value(
        "cardswitch_requests_total", {"network": "mastercard", "mti": "0200", "response_code": "N7"}
    )
    assert after == before + 1
    assert metrics.REASONS("cvv2_mismatch") == "cvv2_mismatch"
    assert metrics.REASONS("cvv2_mismatch_") == "other"


def test_listener_names_are_the_admitted_ones_plus_at_most_a_few() -> None:
    names = metrics.LabelValues(admit_first=4)
    names.admit(["visa", "mc"])
    seen = {names(f"listener-{i}") for i in range(3000)}
    assert seen == {"listener-0", "listener-1", "listener-2", "listener-3", "other"}
    assert names("visa") == "visa" and names("mc") == "mc"


def _unknown_mti_frame(mti: str, stan: int) -> bytes:
    data, _ = iso8583.encode(
        {"t": mti, "11": f"{stan:06d}", "41": "TERM0001", "37": f"{stan:012d}"}, spec_for("ascii")
    )
    return encode_frame(bytes(data))


async def test_unknown_mtis_over_a_connection_add_no_series(
    autojump_clock: trio.testing.MockClock,
) -> None:
    mtis = _unknown_request_mtis()
    listener = ListenerConfig(name="visa", network="visa", max_in_flight=64)
    ours, theirs = trio.testing.memory_stream_pair()
    conn = Connection(ours, Dispatcher(_NoEngine()), listener, profile("visa"), linger=5.0)
    decoder = FrameDecoder("binary2", 65535)
    answers: list[dict[str, str]] = []

    async def read_until(count: int) -> None:
        while len(answers) < count:
            data = await theirs.receive_some(65536)
            assert data, "the switch closed the connection"
            answers.extend(codec.decode_fields(f) for f in decoder.feed(bytes(data)))

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.run)
            await theirs.send_all(_unknown_mti_frame(mtis[0], 1))
            await read_until(1)
            before = _series_count()
            for start in range(1, len(mtis), 100):
                batch = mtis[start : start + 100]
                await theirs.send_all(
                    b"".join(_unknown_mti_frame(m, start + i) for i, m in enumerate(batch))
                )
                await read_until(start + len(batch))
            await theirs.send_eof()
    assert len(answers) == len(mtis)
    assert {a["39"] for a in answers} == {profile("visa").code(Reason.INVALID_TRANSACTION)}
    assert _series_count() == before


class _NoEngine:
    """An engine never reached: every frame here is an MTI the dispatcher answers itself."""

    async def authorize(self, request: Any, context: Any) -> Any:
        raise AssertionError("not an authorization")

    async def reverse(self, request: Any, context: Any) -> Any:
        raise AssertionError("not a reversal")
