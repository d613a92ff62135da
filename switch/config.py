"""Typed switch configuration loaded from TOML.

What lives here: the frozen dataclasses that describe a running switch (listeners, TLS, store,
pipeline budget, metrics, logging; the HSM and card-data sections are ``hsm.config``'s, used
here as they are), their embedded defaults, and the loader that turns
a TOML file into them. Every error names the file and the dotted key and is a single line.

What does not: reading certificates or keys (tls.py), opening the store or the HSM (their own
modules), network profiles (``config/networks/*.toml``: layout, framing, security places,
DE39 table, budget; read by ``switch.wire.profile`` and ``switch.decisions``, which this
loader asks whether the profile a listener names exists and is valid, and which stand-in
reasons exist).

A listener names its profile (``network``); the profile defines the wire. A listener may
override the length header (``header``) and take the field layout of another profile
(``spec``: a profile name, or ``ascii``/``binary``/``bcd`` for iso87-ascii/-binary/-bcd),
keeping its own profile's DE39 table and security places; both empty: the profile's own.

Relative paths in a configuration are resolved against the current working directory, which
is the repository root for ``make run`` and the image's work directory in the container.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from hsm.config import CardDataConfig, HsmConfig
from switch.decisions import STAND_IN_REASONS, UnknownNetwork, profile
from switch.wire.framing import HeaderKind

StoreBackend = Literal["sqlite", "postgres"]
#: The default of ``listener.header``: none given, the profile's is filled in (a value no
#: TOML file can give, so every loaded listener ends with a real header kind).
PROFILE_HEADER: HeaderKind = typing.cast(HeaderKind, "")
#: ``listener.spec`` short names of the shipped ISO 8583:1987 layouts.
SPEC_ALIASES = {"ascii": "iso87-ascii", "binary": "iso87-binary", "bcd": "iso87-bcd"}
#: Most worker processes ``[server] workers`` may ask for.
MAX_WORKERS = 64
#: Most ``events.publishers``: SendMessageBatch calls in flight from one relay.
MAX_PUBLISHERS = 32
LogFormat = Literal["json", "console"]


class _FromProfile(str):
    """A listener setting taken from its network profile, not given (see ListenerConfig)."""

    __slots__ = ()


class ConfigError(Exception):
    """A configuration that cannot be used; ``str()`` is one line naming the file and key."""

    def __init__(self, source: str, key: str, message: str) -> None:
        self.source = source
        self.key = key
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")


@dataclass(frozen=True)
class ListenerConfig:
    """One TCP listener that a card network connects to."""

    name: str = "visa"
    #: Network profile (``config/networks/<network>.toml``): field layout, framing, where
    #: card-security values live, DE39 table, budget.
    network: str = "visa"
    host: str = "127.0.0.1"
    port: int = 8583
    #: Length header of each frame, overriding the profile's: "binary2" (2-byte big-endian),
    #: "binary4", "ascii4" (4 ASCII digits) or "bcd2"; "" keeps the profile's.
    header: HeaderKind = PROFILE_HEADER
    #: Field layout, overriding the profile's: another profile's name, or "ascii", "binary",
    #: "bcd" (iso87-ascii, iso87-binary, iso87-bcd); "" keeps the profile's.
    spec: str = ""
    #: Largest frame body accepted, in bytes; larger length headers close the connection.
    max_frame: int = 8192
    #: Seconds a TLS handshake may take before the connection is dropped.
    handshake_timeout: float = 5.0
    #: Seconds allowed between the first byte of a frame and its last (slowloris guard).
    frame_timeout: float = 10.0
    #: Requests processed concurrently on one connection; reading pauses beyond it.
    max_in_flight: int = 256
    #: Connections open on this listener at once, handshakes included; beyond it a new
    #: connection is closed at accept. A network holds a handful of links per listener.
    max_connections: int = 64
    #: TLS handshakes in progress on this listener at once; beyond it a new connection is
    #: closed at accept (a flood of connections that never handshake cannot queue up).
    max_handshakes: int = 16
    #: Handshakes in progress from one remote IP address; beyond it a new connection from
    #: that address is closed at accept, so one address cannot take every handshake slot.
    max_handshakes_per_ip: int = 4
    #: Established connections of one peer (the set of its certificate's identities);
    #: beyond it a new connection is closed right after its handshake.
    max_connections_per_peer: int = 8
    #: Seconds without a complete frame after which the connection is closed; networks
    #: send an echo test (0800 301) every minute or so on an idle link. 0 disables it.
    idle_timeout: float = 300.0
    #: Client identities (certificate subject CN or a DNS/URI SAN) allowed; empty allows any
    #: certificate that chains to the CA bundle.
    allowed_clients: tuple[str, ...] = ()
    #: Client addresses allowed, as CIDR networks ("192.0.2.0/24", "2001:db8::/32", or one
    #: address); checked against the real client address (the PROXY header's source when the
    #: listener reads one), before TLS. Empty allows any address.
    allowed_sources: tuple[str, ...] = ()
    # -- PROXY protocol (a TCP load balancer in passthrough mode in front of the switch) ----
    #: "v2": every connection must start with a PROXY protocol v2 header (before the TLS
    #: handshake, within ``handshake_timeout``); its source address is the client's for logs,
    #: the per-address handshake bound and ``allowed_sources``. A LOCAL header (the
    #: balancer's health check) keeps the socket's address. "off": no header is read.
    proxy_protocol: Literal["off", "v2"] = "off"
    #: With "v2": the CIDR networks of the balancers allowed to send the header; a
    #: connection from elsewhere is closed before anything is read. Empty: any peer (the
    #: listener must then be reachable from the balancers only).
    proxy_trusted: tuple[str, ...] = ()
    #: HSM label of the zone PIN key shared with this network (PIN blocks in DE52).
    zpk: str = "zpk"
    #: ISO 9564 format of the PIN blocks this network sends: 0, 1, 3 or 4.
    pin_block_format: Literal[0, 1, 3, 4] = 0
    #: Chip entry (DE22 05x/07x) without chip data (DE55): "decline" or "allow".
    chip_without_emv: Literal["decline", "allow"] = "decline"
    #: Magnetic-stripe entry (DE22 80x/90x) of a chip card (service code 2xx/6xx).
    chip_fallback: Literal["decline", "allow"] = "decline"
    #: A completion below its pre-authorization keeps the rest held (true) or releases it.
    completion_keeps_rest: bool = False
    #: Advice MTIs that, carrying DE90, complete the pre-authorization DE90 names (debit the
    #: completed amount, release its hold): "0220" (the default), and "0120" where the
    #: network sends completions as authorization advices. An advice not listed converts
    #: what it names and never adds: a 0120 then repeats the authorization DE90 names, and
    #: a 0220 names its own financial request (DE90 aside).
    completion_mtis: tuple[Literal["0120", "0220"], ...] = ("0220",)
    # -- keep-alive (moves to the network profile's [keepalive] section, same names) ------
    #: A zero-length frame (the keep-alive some links send): "close" the connection (a
    #: framing error, the behaviour before keep-alives), "ignore" it, or "answer" it with a
    #: zero-length frame. Either of the last two counts as traffic for the idle timers.
    zero_length_frames: Literal["close", "ignore", "answer"] = "close"
    #: Seconds without a complete frame after which the switch sends its own echo test
    #: (0800 DE70 301, a STAN of its own); 0: never. Which side echoes is agreed per network.
    idle_echo_after: float = 0.0
    #: Seconds the network has to answer that echo (0810, same STAN) before the link is
    #: closed as dead (``echo_timeout``).
    echo_timeout: float = 30.0
    # -- key exchange (0800 DE70 161 new key / 101 key change) ------------------------------
    #: HSM label of the zone master key (usage kek) the network sends new ZPKs under; empty:
    #: key exchange is not served (answered as an invalid transaction).
    zmk: str = ""
    #: How the new ZPK is carried in DE48: "raw" (hex of the key encrypted under the ZMK,
    #: ECB, then its 6-hex-digit check value) or "tr31" (a TR-31 key block, version B or D,
    #: protected by the ZMK, optionally followed by its 6-hex-digit check value).
    key_block: Literal["raw", "tr31"] = "raw"
    # -- session -----------------------------------------------------------------------------
    #: Authorizations, advices and reversals after the network signed off (0800 DE70 002)
    #: and before it signs on again: "decide" them as usual (logged), or "decline" them with
    #: ``Reason.SIGNED_OFF`` (91: the network stands in). Echo and sign-on are always served.
    after_sign_off: Literal["decide", "decline"] = "decide"
    #: Complete frames of one connection waiting for a free slot (read, timestamped, not yet
    #: started); a frame arriving when it is full is answered at once with the overload
    #: reason (``SYSTEM_OVERLOAD``). About 1.7 KiB per waiting 0100 (218-byte frame, measured
    #: with tracemalloc); more with chip data.
    max_queued: int = 512
    #: The issuer stand-in policy when the HSM (not the store) cannot answer: "decline" (the
    #: ``pipeline.stand_in`` reason) or "approve_low_risk": an active, unexpired card with no
    #: PIN or CVV2 to check, an amount of at most ``stand_in_max_amount`` and within the
    #: card's ``stand_in_daily_amount`` of stand-in approvals that day is approved, journaled
    #: as stand-in with its hold through the normal commit; anything else is declined.
    stand_in: Literal["decline", "approve_low_risk"] = "decline"
    #: Largest amount (minor units of the account's currency) approved in stand-in.
    stand_in_max_amount: int = 0
    #: Total a card may be approved in stand-in per day (minor units), counted atomically
    #: by the commit; 0: not limited per day (the per-transaction limit and the card's own
    #: velocity limits still apply).
    stand_in_daily_amount: int = 0

    def __post_init__(self) -> None:
        """Fill an empty ``header`` or ``spec`` with the profile's (its length header, its own
        layout), so that every loaded listener says what it speaks. A filled value is marked
        (:class:`_FromProfile`), so that ``dataclasses.replace(listener, network=...)`` fills
        it again from the new profile instead of keeping the old one. A profile that cannot
        be loaded leaves them empty; ``load`` reports it under ``listener[i].network``."""
        header_unset = not self.header or isinstance(self.header, _FromProfile)
        spec_unset = not self.spec or isinstance(self.spec, _FromProfile)
        if not (header_unset or spec_unset):
            return
        try:
            wire = profile(self.network).wire
        except UnknownNetwork:
            return
        if wire is not None:
            if header_unset:
                object.__setattr__(self, "header", _FromProfile(wire.framing.header))
            if spec_unset:
                object.__setattr__(self, "spec", _FromProfile(self.network))


@dataclass(frozen=True)
class TlsConfig:
    """Server certificate, key and the CA bundle client certificates must chain to."""

    ca: Path = Path("var/pki/ca.pem")
    cert: Path = Path("var/pki/server.pem")
    key: Path = Path("var/pki/server.key")
    #: Lowest protocol version offered; "1.2" or "1.3".
    min_version: Literal["1.2", "1.3"] = "1.2"
    #: PEM certificate revocation list(s) of the CA checked for client certificates (the
    #: leaf only), reloaded with the certificates on SIGHUP; empty: no revocation check.
    crl: str = ""


@dataclass(frozen=True)
class ServerConfig:
    """Process-wide limits of the switch."""

    #: Requests being decided at once across all connections (per process). More wait in
    #: their connection's queue (``ListenerConfig.max_queued``), timestamped at arrival, and
    #: get the overload answer at once when they cannot start in time. Keep it small: every
    #: request in flight is a task the event loop runs in turn, and with hundreds of them a
    #: saturated loop reaches the readers late, so requests wait in socket buffers where no
    #: budget sees them (``benchmarks/RESULTS.md``: at 2x capacity, 4096 let approvals reach
    #: the network after 4 s; with 32, frames a TLS record each, read one per connection per
    #: turn of the loop, waited up to 150 KB deep in the kernel at 2x; 16 keeps that queue
    #: near empty and still reaches the closed-loop capacity).
    max_in_flight: int = 16
    #: Longest a request may wait in its connection's queue for a slot, in seconds; one that
    #: cannot start within it (or within the budget less ``pipeline.min_remaining``, if
    #: sooner) is answered with the overload code: at once when the slots' recent service
    #: times forecast it, else at that instant. A queue as long as the budget answers the
    #: excess of an overload seconds late, at the edge of the network's own timeout
    #: (``benchmarks/RESULTS.md``: at 2x capacity, p50 1.4 s and a quarter of the answers
    #: after the 2 s budget); a fraction of it still absorbs a burst.
    max_queue_wait: float = 0.5
    #: Seconds to finish in-flight requests after SIGTERM/SIGINT before exiting.
    drain_timeout: float = 10.0
    #: Worker processes sharing the listening ports (SO_REUSEPORT) under a supervisor
    #: (switch.supervisor); 1 is one process, no supervisor. Each worker has its own loop,
    #: HSM session and store connections, and the limits above apply to each worker.
    workers: int = 1


@dataclass(frozen=True)
class PipelineConfig:
    """Latency budget and stand-in behaviour of the authorization pipeline."""

    #: Seconds from receipt of a request to its answer; networks time out at a few seconds.
    budget: float = 2.0
    #: The stand-in policy: the reason answered when the budget expires or a dependency
    #: fails before a decision is committed, mapped to DE39 by the listener's network profile
    #: ("issuer_unavailable" is 91, which lets the network stand in; "system_error" is 96).
    #: An approving stand-in is not a choice here: nothing would be journaled behind it.
    stand_in: str = "issuer_unavailable"
    #: How many chip counters (ATC) below the highest accepted one a card's cryptogram may
    #: carry and still be accepted once (requests overtaking each other on the network).
    atc_window: int = 4
    #: Seconds of the budget a request must still have to be started; with less (it waited
    #: for a slot) it is answered at once with the overload reason instead.
    min_remaining: float = 0.1
    #: Consecutive failures or timeouts of a dependency (HSM, store, card-data vault) that
    #: open its circuit breaker: while open, requests needing it get the stand-in answer at
    #: once, without calling it.
    breaker_failures: int = 5
    #: Seconds an open breaker waits before letting one request probe the dependency.
    breaker_cool_down: float = 5.0


@dataclass(frozen=True)
class StoreConfig:
    """The durable store of cards, accounts and the authorization journal."""

    #: "sqlite" (one embedded file, one process) or "postgres" (one database that several
    #: switch processes may share).
    backend: StoreBackend = "sqlite"
    #: SQLite: the database file.
    path: Path = Path("var/cardswitch.db")
    #: SQLite: most decisions committed in one group-commit transaction.
    batch_max: int = 128
    #: PostgreSQL: libpq connection string or URI, WITHOUT a password (e.g. "host=db.internal
    #: dbname=cardswitch user=cardswitch sslmode=verify-full"). The password comes from the
    #: environment (CARDSWITCH_PG_PASSWORD, or libpq's own PGPASSWORD / PGPASSFILE) or from
    #: ``password_file``, never from this file.
    dsn: str = ""
    #: PostgreSQL: a file holding the password (first line), readable by the switch only.
    password_file: str = ""
    #: PostgreSQL: connections per process; also how many decisions commit concurrently.
    pool_size: int = 8
    #: PostgreSQL: seconds one statement may run, and may wait for a row lock, before the
    #: database cancels it (the decision fails as "unavailable" and is stood in for); both
    #: must be below ``pipeline.budget``.
    statement_timeout: float = 1.0
    lock_timeout: float = 0.5
    #: PostgreSQL: seconds to establish a connection (libpq connect_timeout, at least 2).
    connect_timeout: float = 2.0


@dataclass(frozen=True)
class HoldsConfig:
    """How long an authorization's hold lasts when no reversal or completion comes.

    >>> holds = HoldsConfig()
    >>> holds.days_for("7011"), holds.days_for("3400"), holds.days_for("5411")
    (30, 30, 7)
    """

    #: Days a hold lasts (networks expect about a week for a purchase).
    expiry_days: int = 7
    #: Days for merchants that authorize long before completing: hotels and car rental.
    long_expiry_days: int = 30
    #: Merchant category codes (DE18) of ``long_expiry_days``; "A-B" is a range.
    long_expiry_mccs: tuple[str, ...] = ("7011", "3501-3999", "7512", "3351-3441")
    #: Seconds between two sweeps of expired holds inside the daemon (0: no sweeper).
    sweep_interval: float = 60.0
    #: Holds released per sweep transaction.
    sweep_batch: int = 100

    def days_for(self, mcc: str | None) -> int:
        """How many days a hold taken at merchant category ``mcc`` lasts."""
        if mcc:
            for entry in self.long_expiry_mccs:
                low, _, high = entry.partition("-")
                if low <= mcc <= (high or low):
                    return self.long_expiry_days
        return self.expiry_days


@dataclass(frozen=True)
class EventsConfig:
    """Authorization events published from the outbox to an SQS FIFO queue (``switch.relay``).

    Credentials come from the usual AWS chain (environment, shared files, instance role),
    never from this file.
    """

    #: ``sqs`` runs the relay inside the daemon; ``none`` keeps events in the outbox only.
    backend: Literal["none", "sqs"] = "none"
    #: The FIFO queue (its URL ends in ``.fifo``).
    queue_url: str = ""
    #: AWS region; empty: the AWS chain's (``AWS_DEFAULT_REGION``, the profile).
    region: str = ""
    #: Endpoint of a local SQS-compatible server; empty: AWS.
    endpoint_url: str = ""
    #: Outbox rows read per relay round (sent ten to a SendMessageBatch).
    batch_size: int = 100
    #: SendMessageBatch calls in flight at once, each for its own share of the groups
    #: (an account's events always go through the same one, in order).
    publishers: int = 4
    #: Days a published event is kept for ``cardswitch events replay``, then purged.
    retention_days: float = 7.0
    #: Seconds between two looks at an empty outbox.
    poll_interval: float = 0.5
    #: Failed attempts after which an event is parked (counted and alerted, not retried).
    max_attempts: int = 8
    #: Seconds the relay lease lasts unless renewed; another instance takes it over after.
    lease_seconds: float = 15.0


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus exposition endpoint; port 0 disables it."""

    host: str = "127.0.0.1"
    port: int = 9583


@dataclass(frozen=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: LogFormat = "json"


@dataclass(frozen=True)
class Config:
    """Everything a running switch needs, as loaded from one TOML file."""

    listeners: tuple[ListenerConfig, ...] = (ListenerConfig(),)
    tls: TlsConfig = field(default_factory=TlsConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    hsm: HsmConfig = field(default_factory=HsmConfig)
    card_data: CardDataConfig = field(default_factory=CardDataConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    holds: HoldsConfig = field(default_factory=HoldsConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)


#: TOML table names that differ from the dataclass field they fill.
_TABLE_ALIASES = {"listener": "listeners", "card-data": "card_data"}


def load(path: Path | str) -> Config:
    """Read ``path`` and return the configuration it describes over the embedded defaults.

    Raises:
        ConfigError: the file is missing or unreadable, is not TOML, has an unknown key or a
            value of the wrong type.
    """
    source = str(path)
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(source, "", "file not found") from None
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "", f"not valid TOML: {exc}") from None
    return from_mapping(raw, source)


def from_mapping(raw: Mapping[str, Any], source: str = "<config>") -> Config:
    """Build a Config from already-parsed data (a TOML document's top-level table)."""
    cfg = _build(Config, raw, source, "")
    assert isinstance(cfg, Config)
    _check(cfg, source)
    return cfg


def _build(cls: type[Any], raw: Any, source: str, prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(source, prefix or "<top>", "expected a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        attr = _TABLE_ALIASES.get(key, key.replace("-", "_"))
        dotted = f"{prefix}.{key}" if prefix else key
        if attr not in names:
            raise ConfigError(source, dotted, "unknown key")
        kwargs[attr] = _convert(hints[attr], value, source, dotted)
    return cls(**kwargs)


def _convert(tp: Any, value: Any, source: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, source, key)  # type: ignore[arg-type]
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(source, key, f"expected an array, got {_tname(value)}")
        if dataclasses.is_dataclass(item_tp):
            return tuple(
                _build(item_tp, v, source, f"{key}[{i}]")  # type: ignore[arg-type]
                for i, v in enumerate(value)
            )
        return tuple(_convert(item_tp, v, source, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            choices = ", ".join(repr(a) for a in allowed)
            raise ConfigError(source, key, f"must be one of {choices}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported config type {tp}")  # pragma: no cover - schema bug
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(source, key, f"expected a path string, got {_tname(value)}")
        return Path(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(source, key, f"expected a number, got {_tname(value)}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(source, key, f"expected an integer, got {_tname(value)}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(source, key, f"expected true or false, got {_tname(value)}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(source, key, f"expected a string, got {_tname(value)}")
        return value
    raise TypeError(f"unsupported config type {tp}")  # pragma: no cover - schema bug


def _tname(value: Any) -> str:
    names = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}
    names.update({list: "an array", dict: "a table"})
    return names.get(type(value), type(value).__name__)


def _check(cfg: Config, source: str) -> None:
    """Cross-field rules that types alone cannot express."""
    if not cfg.listeners:
        raise ConfigError(source, "listener", "at least one listener is required")
    seen: set[str] = set()
    for i, lst in enumerate(cfg.listeners):
        key = f"listener[{i}]"
        if lst.name in seen:
            raise ConfigError(source, f"{key}.name", f"duplicate listener name {lst.name!r}")
        seen.add(lst.name)
        if not 0 <= lst.port <= 65535:
            raise ConfigError(source, f"{key}.port", f"out of range: {lst.port}")
        if not 64 <= lst.max_frame <= 65535:
            raise ConfigError(source, f"{key}.max_frame", "must be between 64 and 65535")
        try:
            prof = profile(lst.network)
        except UnknownNetwork as exc:
            raise ConfigError(source, f"{key}.network", str(exc)) from None
        if lst.spec:
            try:
                profile(SPEC_ALIASES.get(lst.spec, lst.spec))
            except UnknownNetwork as exc:
                raise ConfigError(source, f"{key}.spec", str(exc)) from None
        assert prof.wire is not None
        header: HeaderKind = lst.header or prof.wire.framing.header
        if header in ("ascii4", "bcd2") and lst.max_frame > 9999:
            raise ConfigError(source, f"{key}.max_frame", f"{header} headers carry at most 9999")
        for name in ("handshake_timeout", "frame_timeout"):
            if getattr(lst, name) <= 0:
                raise ConfigError(source, f"{key}.{name}", "must be positive")
        for name in (
            "max_in_flight",
            "max_connections",
            "max_handshakes",
            "max_handshakes_per_ip",
            "max_connections_per_peer",
        ):
            if getattr(lst, name) < 1:
                raise ConfigError(source, f"{key}.{name}", "must be at least 1")
        for name in ("idle_timeout", "idle_echo_after"):
            if getattr(lst, name) < 0:
                raise ConfigError(source, f"{key}.{name}", "must be positive, or 0 (off)")
        if lst.echo_timeout <= 0:
            raise ConfigError(source, f"{key}.echo_timeout", "must be positive")
        _check_networks(lst.allowed_sources, source, f"{key}.allowed_sources")
        _check_networks(lst.proxy_trusted, source, f"{key}.proxy_trusted")
        if lst.proxy_trusted and lst.proxy_protocol == "off":
            raise ConfigError(source, f"{key}.proxy_trusted", 'only with proxy_protocol = "v2"')
        if lst.max_queued < 1:
            raise ConfigError(source, f"{key}.max_queued", "must be at least 1")
        for name in ("stand_in_max_amount", "stand_in_daily_amount"):
            if getattr(lst, name) < 0:
                raise ConfigError(source, f"{key}.{name}", "must not be negative")
        if lst.stand_in == "approve_low_risk" and lst.stand_in_max_amount <= 0:
            raise ConfigError(
                source, f"{key}.stand_in_max_amount", "approve_low_risk needs a positive limit"
            )
    if cfg.pipeline.budget <= 0:
        raise ConfigError(source, "pipeline.budget", "must be positive")
    allowed = sorted(r.value for r in STAND_IN_REASONS)
    if cfg.pipeline.stand_in not in allowed:
        raise ConfigError(
            source,
            "pipeline.stand_in",
            f"must be one of {', '.join(allowed)}, got {cfg.pipeline.stand_in!r}",
        )
    if not 0 <= cfg.pipeline.min_remaining < cfg.pipeline.budget:
        raise ConfigError(
            source, "pipeline.min_remaining", "must be at least 0 and less than the budget"
        )
    if cfg.pipeline.breaker_failures < 1:
        raise ConfigError(source, "pipeline.breaker_failures", "must be at least 1")
    if cfg.pipeline.breaker_cool_down <= 0:
        raise ConfigError(source, "pipeline.breaker_cool_down", "must be positive")
    if cfg.holds.expiry_days < 1 or cfg.holds.long_expiry_days < 1:
        raise ConfigError(source, "holds.expiry_days", "hold expiry must be at least a day")
    if cfg.holds.sweep_interval < 0 or cfg.holds.sweep_batch < 1:
        raise ConfigError(source, "holds.sweep_interval", "must be >= 0 (batch >= 1)")
    for i, mcc in enumerate(cfg.holds.long_expiry_mccs):
        bounds = mcc.split("-")
        if len(bounds) > 2 or not all(len(b) == 4 and b.isdigit() for b in bounds):
            raise ConfigError(source, f"holds.long_expiry_mccs[{i}]", "expected NNNN or NNNN-NNNN")
    if not 0 <= cfg.pipeline.atc_window <= 32:
        raise ConfigError(source, "pipeline.atc_window", "must be between 0 and 32")
    if cfg.server.max_in_flight < 1:
        raise ConfigError(source, "server.max_in_flight", "must be at least 1")
    if not cfg.server.max_queue_wait >= 0:
        raise ConfigError(source, "server.max_queue_wait", "must be 0 or more seconds")
    if not 1 <= cfg.server.workers <= MAX_WORKERS:
        raise ConfigError(source, "server.workers", f"must be between 1 and {MAX_WORKERS}")
    _check_events(cfg.events, source)
    _check_store(cfg, source)
    if not 0 <= cfg.metrics.port <= 65535:
        raise ConfigError(source, "metrics.port", f"out of range: {cfg.metrics.port}")


def _check_networks(values: tuple[str, ...], source: str, key: str) -> None:
    """Each value is an IPv4 or IPv6 network in CIDR notation (or a single address)."""
    for i, value in enumerate(values):
        try:
            ipaddress.ip_network(value, strict=True)
        except ValueError as exc:
            raise ConfigError(source, f"{key}[{i}]", f"not a CIDR network: {exc}") from None


def _check_events(events: EventsConfig, source: str) -> None:
    if events.backend == "sqs" and not events.queue_url.endswith(".fifo"):
        raise ConfigError(source, "events.queue_url", "an SQS FIFO queue URL (ending in .fifo)")
    if events.batch_size < 1 or events.max_attempts < 1:
        raise ConfigError(source, "events.batch_size", "batch_size and max_attempts must be >= 1")
    if not 1 <= events.publishers <= MAX_PUBLISHERS:
        raise ConfigError(source, "events.publishers", f"must be 1 to {MAX_PUBLISHERS}")
    if events.retention_days <= 0 or events.poll_interval <= 0 or events.lease_seconds <= 0:
        raise ConfigError(
            source,
            "events.retention_days",
            "retention_days, poll_interval and lease_seconds must be positive",
        )


#: A password written into a libpq keyword/value string or a URI's user information.
_DSN_PASSWORD = re.compile(r"(^|\s)password\s*=|^[a-z]+://[^/@\s]*:[^/@\s]*@|[?&]password=", re.I)


def _check_store(cfg: Config, source: str) -> None:
    store = cfg.store
    if store.backend != "postgres":
        return
    if not store.dsn.strip():
        raise ConfigError(source, "store.dsn", 'required with backend = "postgres"')
    if _DSN_PASSWORD.search(store.dsn.strip()):
        raise ConfigError(
            source,
            "store.dsn",
            "must not carry a password: use CARDSWITCH_PG_PASSWORD, PGPASSWORD, a pgpass "
            "file or store.password_file",
        )
    if store.pool_size < 1:
        raise ConfigError(source, "store.pool_size", "must be at least 1")
    for name in ("statement_timeout", "lock_timeout"):
        value = getattr(store, name)
        if not 0 < value < cfg.pipeline.budget:
            raise ConfigError(source, f"store.{name}", "must be positive and below pipeline.budget")
    if store.connect_timeout < 2:
        raise ConfigError(source, "store.connect_timeout", "must be at least 2 (libpq)")


#: The default configuration file shipped in the repository.
DEFAULT_PATH = Path("config/switch.toml")


def load_default_or_embedded(path: Path | None) -> Config:
    """Load ``path`` if given, else ``config/switch.toml`` if present, else the defaults."""
    if path is not None:
        return load(path)
    if DEFAULT_PATH.exists():
        return load(DEFAULT_PATH)
    return Config()
