"""Prometheus metrics of the switch: the only module that imports prometheus_client.

What lives here: every metric the switch exports, with bounded label sets (listener, network,
MTI, response code, reason, step, error kind; never PAN, STAN or terminal), small functions
that record an observation (``observe`` takes the ``Decision`` of an answered request), and the
HTTP exposition server. What does not: deciding what happened (callers pass the outcome in).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

if TYPE_CHECKING:  # the handler boundary; only a type here
    from switch.handler import Decision

#: The registry the switch exports; a dedicated one so tests can read it without globals
#: from other libraries.
REGISTRY = CollectorRegistry(auto_describe=True)

#: Latency buckets in seconds, from sub-millisecond echo to the multi-second network budget.
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip

REQUESTS = Counter(
    "cardswitch_requests",
    "Requests answered, by request MTI and response code sent.",
    ["network", "mti", "response_code"],
    registry=REGISTRY,
)
REQUEST_SECONDS = Histogram(
    "cardswitch_request_seconds",
    "Time from a frame fully read to its response handed to TLS.",
    ["network", "mti"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
STEP_SECONDS = Histogram(
    "cardswitch_pipeline_step_seconds",
    "Time spent in each pipeline step.",
    ["step"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
DECISIONS = Counter(
    "cardswitch_decisions",
    "Requests answered, by the reason that decided the answer (decisions.Reason values).",
    ["network", "reason"],
    registry=REGISTRY,
)
UNDELIVERED = Counter(
    "cardswitch_answers_undelivered",
    "Answers decided but not handed to the transport: the write failed, the connection was"
    " closed, or the request was abandoned at a deadline.",
    ["listener", "kind"],
    registry=REGISTRY,
)
STAND_IN = Counter(
    "cardswitch_stand_in",
    "Requests answered with the stand-in code because the budget expired or a dependency failed.",
    ["network", "cause"],
    registry=REGISTRY,
)
PROTOCOL_ERRORS = Counter(
    "cardswitch_protocol_errors",
    "Frames or messages rejected: framing (connection closed) or format (answered 30) errors.",
    ["listener", "kind"],
    registry=REGISTRY,
)
CONNECTIONS = Counter(
    "cardswitch_connections",
    "Connections accepted, by how they ended.",
    ["listener", "outcome"],
    registry=REGISTRY,
)
CONNECTIONS_OPEN = Gauge(
    "cardswitch_connections_open",
    "Connections currently open.",
    ["listener"],
    registry=REGISTRY,
)
IN_FLIGHT = Gauge(
    "cardswitch_requests_in_flight",
    "Requests read and not yet answered, across all connections.",
    registry=REGISTRY,
)
HSM_SECONDS = Histogram(
    "cardswitch_hsm_command_seconds",
    "HSM command latency.",
    ["command"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
HSM_ERRORS = Counter(
    "cardswitch_hsm_errors",
    "HSM commands that failed (not mismatches: those are results).",
    ["command", "kind"],
    registry=REGISTRY,
)
STORE_COMMIT_SECONDS = Histogram(
    "cardswitch_store_commit_seconds",
    "Duration of one group-commit transaction.",
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
STORE_BATCH_SIZE = Histogram(
    "cardswitch_store_batch_size",
    "Decisions committed per group-commit transaction.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
    registry=REGISTRY,
)


def observe_answer(
    network: str,
    mti: str,
    *,
    response_code: str,
    reason: str,
    seconds: float,
    stand_in: str | None = None,
) -> None:
    """Record one answer handed to the transport.

    Args:
        network: the listener's network profile.
        mti: the MTI of the request answered.
        response_code: DE39 of the answer.
        reason: the ``Reason`` value that decided it.
        seconds: from the request fully read to its answer written.
        stand_in: the stand-in cause, when the answer is the stand-in policy's.
    """
    REQUESTS.labels(network, mti, response_code).inc()
    REQUEST_SECONDS.labels(network, mti).observe(seconds)
    DECISIONS.labels(network, reason).inc()
    if stand_in is not None:
        STAND_IN.labels(network, stand_in).inc()


def observe(network: str, mti: str, decision: Decision, seconds: float) -> None:
    """Record one answered request from its ``Decision`` (code, reason, stand-in cause)."""
    observe_answer(
        network,
        mti,
        response_code=decision.response_code,
        reason=decision.reason.value,
        seconds=seconds,
        stand_in=decision.stand_in,
    )


def observe_undelivered(listener: str, kind: str) -> None:
    """Record an answer that was decided but never written; ``kind`` says why."""
    UNDELIVERED.labels(listener, kind).inc()


def observe_protocol_error(listener: str, kind: str) -> None:
    """Record a framing or format error; ``kind`` is a short fixed identifier."""
    PROTOCOL_ERRORS.labels(listener, kind).inc()


def exposition() -> bytes:
    """The current metrics in the Prometheus text format."""
    return generate_latest(REGISTRY)


def serve(host: str, port: int) -> None:
    """Start the exposition HTTP server in a daemon thread (prometheus_client's own)."""
    start_http_server(port, addr=host, registry=REGISTRY)


# -- connection limits (listener resource bounds) ---------------------------------------------
# Self-contained block: the limit counter, its label values and its observer.

#: The ``limit`` label values: which bound refused or closed a connection.
CONNECTION_LIMITS = (
    "max_connections",
    "max_handshakes",
    "max_handshakes_per_ip",
    "max_connections_per_peer",
    "idle_timeout",
)
CONNECTION_LIMIT_HITS = Counter(
    "cardswitch_connection_limit_hits",
    "Connections refused (at accept or right after the handshake) or closed because a"
    " listener limit was reached; limit is the ListenerConfig setting.",
    ["listener", "limit"],
    registry=REGISTRY,
)


def observe_limit(listener: str, limit: str) -> None:
    """Record one connection refused or closed by ``limit`` (one of ``CONNECTION_LIMITS``)."""
    if limit not in CONNECTION_LIMITS:
        raise ValueError(f"unknown connection limit {limit!r}")
    CONNECTION_LIMIT_HITS.labels(listener, limit).inc()
