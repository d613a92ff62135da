"""Prometheus metrics of the switch: the only module that imports prometheus_client.

What lives here: every metric the switch exports (the HSM session state is read from a
callback at each scrape: ``watch_hsm_session``), the closed set of values each label may
take, small functions that record an observation (``observe`` takes the ``Decision`` of an
answered request), the process/platform collectors, build information, the TLS certificate
expiry gauges, the workers' restart counter, ``exposition`` (the text page that
``switch.health`` serves on ``/metrics``) and ``merge_expositions`` (the supervisor's one page
from every worker's, each sample labelled ``worker``).

Cardinality is bounded by construction: every labelled metric is a ``Bounded`` wrapper whose
``labels()`` passes each value through its label's closed set (``LabelValues``), and a value
outside the set is recorded as ``"other"``. The sets come from the code, never from the wire:
MTIs from the MTI sets of ``switch.wire.messages``, response codes from the profiles' tables
of ``switch.decisions``, reasons from ``Reason``, networks from the profile names, listener
names from the configuration (``configure_listeners``), steps, HSM commands and kinds from
the lists below. A new kind added elsewhere must be added here, or it shows up as ``other``.

What does not: deciding what happened (callers pass the outcome in), serving HTTP
(``switch.health``).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Final, Generic, Protocol, TypeVar, get_args

from cryptography import x509
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from hsm import errors as hsm_errors
from switch import __version__, proxy_protocol
from switch.decisions import NETWORKS, Reason, profile
from switch.handler import StandInCause
from switch.wire import messages

if TYPE_CHECKING:  # the handler boundary; only a type here
    from switch.handler import Decision

#: The registry the switch exports; a dedicated one so tests can read it without globals
#: from other libraries.
REGISTRY = CollectorRegistry(auto_describe=True)
#: Content type of ``exposition()`` (the Prometheus text format).
CONTENT_TYPE: Final = CONTENT_TYPE_LATEST
#: The label value recorded for anything outside a label's closed set.
OTHER: Final = "other"

# The default process (process_*), platform (python_info) and GC (python_gc_*) collectors,
# registered on our registry as prometheus_client registers them on its global one.
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)


# ------------------------------------------------------------------------- label sets


class LabelValues:
    """The closed set of values of one label; anything else becomes ``"other"``.

    Args:
        values: the values allowed.
        admit_first: besides ``values`` and those added by ``admit``, admit the first this
            many distinct values seen (listener names of code paths that never registered
            theirs, such as a ``Connection`` built by a unit test). 0: none.
    """

    def __init__(self, values: Iterable[str] = (), *, admit_first: int = 0) -> None:
        self._values = set(values)
        self._first_come = 0
        self._admit_first = admit_first

    @property
    def values(self) -> frozenset[str]:
        """The values currently admitted (``"other"`` aside)."""
        return frozenset(self._values)

    def admit(self, values: Iterable[str]) -> None:
        """Add ``values`` to the set (the listener names of the configuration)."""
        self._values.update(values)

    def __call__(self, value: str) -> str:
        if value in self._values:
            return value
        if self._first_come < self._admit_first:
            self._first_come += 1
            self._values.add(value)
            return value
        return OTHER


#: Every MTI the wire layer decodes into a typed message (requests and responses).
MTIS: Final = LabelValues(
    messages.AUTH_REQUEST_MTIS
    | messages.AUTH_RESPONSE_MTIS
    | messages.REVERSAL_REQUEST_MTIS
    | messages.REVERSAL_RESPONSE_MTIS
    | messages.NETWORK_REQUEST_MTIS
    | messages.NETWORK_RESPONSE_MTIS
)
#: Every DE39 of every network profile's table.
RESPONSE_CODES: Final = LabelValues(
    code for network in NETWORKS for code in profile(network).table.values()
)
#: ``Reason`` values, and "undecided" (an answer written before any decision).
REASONS: Final = LabelValues([r.value for r in Reason] + ["undecided"])
#: Network profile names (a listener's ``network`` must be one of them).
NETWORK_NAMES: Final = LabelValues(NETWORKS)
#: Listener names: the configured ones (``configure_listeners``) and, at most, a few others.
LISTENERS: Final = LabelValues(admit_first=32)
#: Pipeline steps (switch/pipeline.py ``_step``); "duplicate" is the one read of an
#: authorization (``Store.lookup_auth``: the repeat check, the card and its account).
STEPS: Final = LabelValues(["validate", "duplicate", "security", "controls", "commit"])
#: HSM and vault commands the pipeline times (switch/pipeline.py ``_hsm_command``).
HSM_COMMANDS: Final = LabelValues(
    (
        *("verify_pin", "verify_cvv", "verify_cvv2", "verify_arqc", "generate_arpc"),
        *("fingerprint", "encrypt", "decrypt", "translate_pin"),
    )
)
#: Class names of the HSM errors (hsm.errors), the kind of an HSM command failure.
HSM_ERROR_KINDS: Final = LabelValues(
    name
    for name, obj in vars(hsm_errors).items()
    if isinstance(obj, type) and issubclass(obj, hsm_errors.HsmError)
)
#: Stand-in causes (``switch.handler.StandInCause``).
STAND_IN_CAUSES: Final = LabelValues(get_args(StandInCause))
#: Protocol error kinds: framing (wire/framing.py), session (session.py) and connection ones.
PROTOCOL_KINDS: Final = LabelValues(
    (
        *("bad_header", "zero_length", "oversize"),
        *("undecodable", "truncated_frame", "unsolicited_response", "garbled_response"),
        *("format_error", "frame_timeout", "internal_error", "echo_timeout"),
    )
)
#: Why an answer was not delivered (connection.py).
UNDELIVERED_KINDS: Final = LabelValues(["write_failed", "encode_failed", "abandoned", "deadline"])
#: What became of an undelivered answer's mark on its journal row (connection.py): marked,
#: no such row (missing), no journal behind the handler, the store failed, or its 1 s passed.
DELIVERY_MARK_RESULTS: Final = LabelValues(["marked", "missing", "no_journal", "failed", "timeout"])
#: How a connection ended (server.py, connection.py ``run``) or failed to start.
CONNECTION_OUTCOMES: Final = LabelValues(
    (
        *("closed", "eof", "drained", "broken", "write_failed", "frame_timeout"),
        *("tls_error", "handshake_timeout", "peer_not_allowed", "accept_error"),
        *("refused", "idle_timeout", "proxy_refused", "source_not_allowed"),
        *PROTOCOL_KINDS.values,
    )
)
#: Why a listener reading PROXY protocol headers closed a connection before TLS (server.py):
#: the peer is not a trusted balancer, the header did not come in time or the peer closed
#: first, or the reader's own reasons (switch.proxy_protocol; "bad_signature" is also a
#: connection that sent no header at all, e.g. a client connecting past the balancer).
PROXY_REFUSALS: Final = LabelValues(("untrusted_peer", "timeout", "eof", *proxy_protocol.REASONS))
#: Dependencies behind a circuit breaker (switch/pipeline.py, switch/breaker.py).
BREAKER_DEPENDENCIES: Final = LabelValues(["hsm", "store", "vault"])
#: Readiness checks (switch.health); ``<dependency>_breaker`` per breaker.
READY_CHECKS: Final = LabelValues(
    ["listeners", "hsm", "store", "engine", *(f"{d}_breaker" for d in BREAKER_DEPENDENCIES.values)]
)
#: TLS files whose expiry is exported.
CERTIFICATES: Final = LabelValues(["server", "ca"])


def configure_listeners(names: Iterable[str]) -> None:
    """Admit the configured listener names to the listener label (``serve`` at start-up).

    Their open-connection gauges are created at 0, so they are exported before any connection.
    """
    names = list(names)
    LISTENERS.admit(names)
    for name in names:
        CONNECTIONS_OPEN.labels(name)


# ------------------------------------------------------------------------- bounded metrics

M = TypeVar("M", Counter, Gauge, Histogram)


#: Label sets each ``Bounded`` metric remembers the child of (see ``Bounded.labels``).
_CHILD_CACHE = 512


class Bounded(Generic[M]):
    """A labelled metric whose label values are each passed through their closed set.

    ``labels(*values)`` returns the child metric, as prometheus_client's ``labels`` does.
    """

    def __init__(self, metric: M, labels: Mapping[str, LabelValues]) -> None:
        self.metric: M = metric
        self._sets = tuple(labels.values())
        #: Children of the label sets seen, so that the hot path binds each once; at most
        #: ``_CHILD_CACHE`` of them, each a set of admitted values (the closed sets bound it).
        self._children: dict[tuple[str, ...], M] = {}

    def labels(self, *values: str) -> M:
        """The child for ``values`` (positional, in label order), each bounded."""
        child = self._children.get(values)
        if child is not None:
            return child
        if len(values) != len(self._sets):
            raise ValueError(f"expected {len(self._sets)} label values, got {len(values)}")
        bounded = tuple(s(v) for s, v in zip(self._sets, values, strict=True))
        child = self.metric.labels(*bounded)
        # Only values admitted as themselves: one folded into "other" may be admitted later.
        if bounded == values and len(self._children) < _CHILD_CACHE:
            self._children[values] = child
        return child


def _counter(name: str, doc: str, **labels: LabelValues) -> Bounded[Counter]:
    return Bounded(Counter(name, doc, list(labels), registry=REGISTRY), labels)


def _gauge(name: str, doc: str, **labels: LabelValues) -> Bounded[Gauge]:
    return Bounded(Gauge(name, doc, list(labels), registry=REGISTRY), labels)


def _histogram(name: str, doc: str, **labels: LabelValues) -> Bounded[Histogram]:
    metric = Histogram(name, doc, list(labels), buckets=_LATENCY_BUCKETS, registry=REGISTRY)
    return Bounded(metric, labels)


#: Latency buckets in seconds, from sub-millisecond echo to the multi-second network budget.
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0,
)  # fmt: skip

REQUESTS = _counter(
    "cardswitch_requests",
    "Requests answered, by request MTI and response code sent.",
    network=NETWORK_NAMES,
    mti=MTIS,
    response_code=RESPONSE_CODES,
)
REQUEST_SECONDS = _histogram(
    "cardswitch_request_seconds",
    "Time from a frame fully read to its response handed to TLS.",
    network=NETWORK_NAMES,
    mti=MTIS,
)
STEP_SECONDS = _histogram(
    "cardswitch_pipeline_step_seconds", "Time spent in each pipeline step.", step=STEPS
)
DECISIONS = _counter(
    "cardswitch_decisions",
    "Requests answered, by the reason that decided the answer (decisions.Reason values).",
    network=NETWORK_NAMES,
    reason=REASONS,
)
UNDELIVERED = _counter(
    "cardswitch_answers_undelivered",
    "Answers decided but not handed to the transport: the write failed, the connection was"
    " closed, or the request was abandoned at a deadline.",
    listener=LISTENERS,
    kind=UNDELIVERED_KINDS,
)
DELIVERY_MARKS = _counter(
    "cardswitch_delivery_marks",
    "Undelivered answers of journaled requests, by what became of the mark on their journal"
    " row (journal search --undelivered lists those marked).",
    result=DELIVERY_MARK_RESULTS,
)
STAND_IN = _counter(
    "cardswitch_stand_in",
    "Requests answered with the stand-in code because the budget expired or a dependency failed.",
    network=NETWORK_NAMES,
    cause=STAND_IN_CAUSES,
)
PROTOCOL_ERRORS = _counter(
    "cardswitch_protocol_errors",
    "Frames or messages rejected: framing (connection closed) or format (answered 30) errors.",
    listener=LISTENERS,
    kind=PROTOCOL_KINDS,
)
CONNECTIONS = _counter(
    "cardswitch_connections",
    "Connections accepted, by how they ended.",
    listener=LISTENERS,
    outcome=CONNECTION_OUTCOMES,
)
CONNECTIONS_OPEN = _gauge(
    "cardswitch_connections_open", "Connections currently open.", listener=LISTENERS
)
IN_FLIGHT = Gauge(
    "cardswitch_requests_in_flight",
    "Requests read and not yet answered, across all connections.",
    registry=REGISTRY,
)
HSM_SECONDS = _histogram(
    "cardswitch_hsm_command_seconds", "HSM command latency.", command=HSM_COMMANDS
)
HSM_ERRORS = _counter(
    "cardswitch_hsm_errors",
    "HSM commands that failed (not mismatches: those are results).",
    command=HSM_COMMANDS,
    kind=HSM_ERROR_KINDS,
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
READY = _gauge(
    "cardswitch_ready_check",
    "1 when the readiness check passed at its last run, 0 when it failed (switch.health).",
    check=READY_CHECKS,
)
HEARTBEAT_AGE = Gauge(
    "cardswitch_loop_heartbeat_age_seconds",
    "Seconds since the event loop last updated its heartbeat, at the time of the scrape.",
    registry=REGISTRY,
)
BUDGET = Gauge(
    "cardswitch_pipeline_budget_seconds",
    "The configured request budget (pipeline.budget): latency is judged against it.",
    registry=REGISTRY,
)
# -- circuit breakers and stand-in approvals (switch/breaker.py, switch/pipeline.py)
BREAKER_STATE = _gauge(
    "cardswitch_breaker_state",
    "Circuit breaker of a dependency: 0 closed, 1 open (stand-in at once), 2 half-open.",
    dependency=BREAKER_DEPENDENCIES,
)
STAND_IN_APPROVALS = _counter(
    "cardswitch_stand_in_approvals",
    "Authorizations approved by the issuer stand-in policy (journaled as stand-in).",
    network=NETWORK_NAMES,
)
#: Why a request was answered with the overload code before it started (connection.py).
SHED_KINDS: Final = LabelValues(["queue_full", "forecast", "deadline"])
SHED = _counter(
    "cardswitch_shed",
    "Requests answered with the overload code before they started: the admission queue was"
    " full, they were forecast to miss their budget behind the queue (both on arrival), or"
    " too little of the budget was left when a slot freed up.",
    listener=LISTENERS,
    kind=SHED_KINDS,
)
for _dependency in BREAKER_DEPENDENCIES.values:
    BREAKER_STATE.labels(_dependency).set(0)


def observe_breaker(dependency: str, state: int) -> None:
    """Record the state of a dependency's breaker (``switch.breaker.State`` value)."""
    BREAKER_STATE.labels(dependency).set(state)


def observe_shed(listener: str, kind: str) -> None:
    """Count one request answered with the overload code before it started."""
    SHED.labels(listener, kind).inc()


def observe_stand_in_approval(network: str) -> None:
    """Count one authorization approved in stand-in (at its commit)."""
    STAND_IN_APPROVALS.labels(network).inc()


BUILD = Info("cardswitch_build", "Version of the running switch.", registry=REGISTRY)
BUILD.info({"version": __version__})


# ------------------------------------------------------------------------- TLS expiry


class _CertificateExpiry:
    """The notAfter instants of the TLS files; the gauge is computed at each scrape."""

    def __init__(self) -> None:
        self._not_after: dict[str, float] = {}
        self.gauge = _gauge(
            "cardswitch_tls_certificate_expiry_seconds",
            "Seconds until the certificate expires (negative once expired): the server"
            " certificate, and the earliest-expiring certificate of the CA bundle.",
            certificate=CERTIFICATES,
        )

    def set(self, certificate: str, not_after: float) -> None:
        if certificate not in self._not_after:
            self.gauge.labels(certificate).set_function(
                functools.partial(self.seconds_left, certificate)
            )
        self._not_after[certificate] = not_after

    def seconds_left(self, certificate: str) -> float:
        """Seconds until ``certificate`` expires; NaN before its file was read."""
        not_after = self._not_after.get(certificate)
        return math.nan if not_after is None else not_after - time.time()


_EXPIRY = _CertificateExpiry()


def observe_certificates(server_cert: Path, ca: Path) -> None:
    """Read the notAfter of the server certificate and of the CA bundle (start, reload).

    A file that cannot be read or parsed leaves the previous value (the TLS layer reports
    such files itself, and keeps the previous context).
    """
    for certificate, path in (("server", server_cert), ("ca", ca)):
        try:
            certs = x509.load_pem_x509_certificates(path.read_bytes())
        except (OSError, ValueError):
            continue
        chosen = certs[:1] if certificate == "server" else certs
        if chosen:
            not_after = min(c.not_valid_after_utc for c in chosen)
            _EXPIRY.set(certificate, not_after.timestamp())


def certificate_expiry(certificate: str) -> float:
    """Seconds until ``certificate`` ("server" or "ca") expires; NaN before it was read."""
    return _EXPIRY.seconds_left(certificate)


# ------------------------------------------------------------------------- observations


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


def observe_delivery_marks(result: str, count: int) -> None:
    """Record ``count`` undelivered answers whose journal-row mark ended as ``result``."""
    if count:
        DELIVERY_MARKS.labels(result).inc(count)


def observe_protocol_error(listener: str, kind: str) -> None:
    """Record a framing or format error; ``kind`` is a short fixed identifier."""
    PROTOCOL_ERRORS.labels(listener, kind).inc()


def observe_budget(seconds: float) -> None:
    """Export the configured request budget (``serve`` at start-up)."""
    BUDGET.set(seconds)


def observe_ready(check: str, ok: bool) -> None:
    """Record the result of one readiness check."""
    READY.labels(check).set(1 if ok else 0)


def observe_heartbeat_age(seconds: float) -> None:
    """Record the age of the event loop's heartbeat (set by the HTTP side before a scrape)."""
    HEARTBEAT_AGE.set(seconds)


def exposition() -> bytes:
    """The current metrics in the Prometheus text format (``CONTENT_TYPE``)."""
    return generate_latest(REGISTRY)


# -- connection limits (listener resource bounds) ---------------------------------------------

#: The ``limit`` label values: which bound refused or closed a connection.
CONNECTION_LIMITS = (
    "max_connections",
    "max_handshakes",
    "max_handshakes_per_ip",
    "max_connections_per_peer",
    "idle_timeout",
)
CONNECTION_LIMIT_HITS = _counter(
    "cardswitch_connection_limit_hits",
    "Connections refused (at accept or right after the handshake) or closed because a"
    " listener limit was reached; limit is the ListenerConfig setting.",
    listener=LISTENERS,
    limit=LabelValues(CONNECTION_LIMITS),
)


PROXY_HEADER_REFUSED = _counter(
    "cardswitch_proxy_header_refused",
    'Connections closed before TLS on a listener with proxy_protocol = "v2": untrusted'
    " peer, no or late header, or a malformed one.",
    listener=LISTENERS,
    reason=PROXY_REFUSALS,
)


def observe_proxy_refused(listener: str, reason: str) -> None:
    """Record one connection closed for ``reason`` (one of ``PROXY_REFUSALS``)."""
    if reason not in PROXY_REFUSALS.values:
        raise ValueError(f"unknown PROXY header refusal {reason!r}")
    PROXY_HEADER_REFUSED.labels(listener, reason).inc()


def observe_limit(listener: str, limit: str) -> None:
    """Record one connection refused or closed by ``limit`` (one of ``CONNECTION_LIMITS``)."""
    if limit not in CONNECTION_LIMITS:
        raise ValueError(f"unknown connection limit {limit!r}")
    CONNECTION_LIMIT_HITS.labels(listener, limit).inc()


# -- HSM session (hsm.pkcs11 reopens a lost session by itself) --------------------------------


class HsmSessionState(Protocol):
    """What the HSM layer reports about its session (``hsm.token.session_status``)."""

    @property
    def up(self) -> bool: ...

    @property
    def reconnects(self) -> int: ...


#: Returns the current session state, or None for a backend without a session.
HsmSessionSource = Callable[[], HsmSessionState | None]


class _HsmSessionCollector:
    """``cardswitch_hsm_session_state`` and ``cardswitch_hsm_reconnects_total``, read at each
    scrape from the source given to ``watch_hsm_session`` (the hsm layer imports no switch
    module, so the switch reads its state instead of being told)."""

    def __init__(self) -> None:
        self.source: HsmSessionSource | None = None

    def _families(self) -> tuple[GaugeMetricFamily, CounterMetricFamily]:
        return (
            GaugeMetricFamily(
                "cardswitch_hsm_session_state",
                "1 while the HSM (PKCS#11) session is logged in, 0 while it is lost and being"
                " reopened (commands then fail at once and get the stand-in answer).",
            ),
            CounterMetricFamily(
                "cardswitch_hsm_reconnects",
                "Times the HSM session was reopened after it was lost, without a restart.",
            ),
        )

    def describe(self) -> Iterator[Metric]:
        yield from self._families()

    def collect(self) -> Iterator[Metric]:
        state = self.source() if self.source is not None else None
        if state is None:
            return
        gauge, counter = self._families()
        gauge.add_metric([], 1 if state.up else 0)
        counter.add_metric([], state.reconnects)
        yield gauge
        yield counter


_HSM_SESSION = _HsmSessionCollector()
REGISTRY.register(_HSM_SESSION)


def watch_hsm_session(source: HsmSessionSource | None) -> None:
    """Export the HSM session state read from ``source`` (None: stop exporting it)."""
    _HSM_SESSION.source = source


# -- hold expiry ---------------------------------------------------------------------------------

HOLDS_EXPIRED = Counter(
    "cardswitch_holds_expired",
    "Holds given back by the expiry sweeper (no reversal or completion came in time).",
    registry=REGISTRY,
)


def observe_holds_expired(count: int) -> None:
    """Count holds the sweeper released."""
    if count:
        HOLDS_EXPIRED.inc(count)


# -- workers (switch.supervisor) -------------------------------------------------------------

#: Worker indexes "0" .. "N-1" (``configure_workers``) and "supervisor".
WORKERS: Final = LabelValues(["supervisor"])
WORKER_RESTARTS = _counter(
    "cardswitch_worker_restarts",
    "Worker processes started again by the supervisor after the previous one exited.",
    worker=WORKERS,
)
WORKER_UP = _gauge(
    "cardswitch_worker_up",
    "1 when the worker process runs and answered this scrape of /metrics, else 0.",
    worker=WORKERS,
)
#: Families of the supervisor's own registry put on the aggregated page (with
#: ``worker="supervisor"`` unless they carry a worker label already); the rest of its
#: registry is the workers' business and would only add zeros.
_SUPERVISOR_FAMILIES = ("cardswitch_worker_", "process_", "cardswitch_loop_heartbeat_age")


def configure_workers(count: int) -> None:
    """Admit worker indexes 0..count-1 and create their restart counters at 0."""
    names = [str(i) for i in range(count)]
    WORKERS.admit(names)
    for name in names:
        WORKER_RESTARTS.labels(name)


def observe_worker_restart(index: int) -> None:
    """Count one restart of worker ``index``."""
    WORKER_RESTARTS.labels(str(index)).inc()


def observe_worker_up(index: int, up: bool) -> None:
    """Record whether worker ``index`` answered the scrape being served."""
    WORKER_UP.labels(str(index)).set(1 if up else 0)


class _Families:
    """A collector yielding already-built metric families (the merged page)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def merge_expositions(pages: Mapping[str, bytes]) -> bytes:
    """One Prometheus page from the supervisor's registry and each worker's page.

    Every sample of ``pages[worker]`` gets the label ``worker="<key>"``; families of the same
    name are merged (the first page's help and type win). The supervisor's own families
    (``_SUPERVISOR_FAMILIES``) come first, labelled ``worker="supervisor"``.
    """
    merged: dict[str, Metric] = {}

    def add(family: Metric, worker: str | None) -> None:
        into = merged.get(family.name)
        if into is None:
            into = merged[family.name] = Metric(family.name, family.documentation, family.type)
        for sample in family.samples:
            labels = dict(sample.labels)
            if worker is not None:
                labels.setdefault("worker", worker)
            into.samples.append(sample._replace(labels=labels))

    for family in REGISTRY.collect():
        if family.name.startswith(_SUPERVISOR_FAMILIES):
            add(family, "supervisor")
    for worker, page in pages.items():
        for family in text_string_to_metric_families(page.decode()):
            add(family, worker)
    out = CollectorRegistry(auto_describe=False)
    out.register(_Families(merged.values()))
    return generate_latest(out)


# -- authorization events (the outbox and its relay, switch.relay) ------------------------------

EVENTS_PENDING = Gauge(
    "cardswitch_events_pending",
    "Outbox events committed and not yet published (as the active relay last read it).",
    registry=REGISTRY,
)
EVENTS_OLDEST_PENDING = Gauge(
    "cardswitch_events_oldest_pending_seconds",
    "Age of the oldest event not yet published (0 when none is pending).",
    registry=REGISTRY,
)
EVENTS_PUBLISHED = Counter(
    "cardswitch_events_published",
    "Events SQS acknowledged (an event re-sent after a crash counts again).",
    registry=REGISTRY,
)
EVENTS_FAILURES = _counter(
    "cardswitch_events_publish_failures",
    "Failed SQS sends: a whole call (kind=call, counted once) or one entry (kind=entry).",
    kind=LabelValues(("call", "entry")),
)
EVENTS_PARKED = Gauge(
    "cardswitch_events_parked",
    "Events parked (rejected by SQS as invalid, or failed max_attempts times); alert on > 0.",
    registry=REGISTRY,
)
EVENTS_RELAY_ACTIVE = Gauge(
    "cardswitch_events_relay_active",
    "1 while this process holds the relay lease of its database.",
    registry=REGISTRY,
)


def observe_outbox(pending: int, oldest_age: float, parked: int) -> None:
    """Record what the relay read of the outbox."""
    EVENTS_PENDING.set(pending)
    EVENTS_OLDEST_PENDING.set(max(0.0, oldest_age))
    EVENTS_PARKED.set(parked)


def observe_published(count: int) -> None:
    if count:
        EVENTS_PUBLISHED.inc(count)


def observe_publish_failure(kind: str, count: int = 1) -> None:
    """Count failed sends; ``kind`` is ``call`` or ``entry``."""
    if kind not in ("call", "entry"):
        raise ValueError(f"unknown publish failure kind {kind!r}")
    if count:
        EVENTS_FAILURES.labels(kind).inc(count)
