"""The outbox relay: publishes committed authorization events to an SQS FIFO queue.

What lives here: ``SqsPublisher`` (boto3 ``SendMessageBatch`` and its per-entry results, run
in worker threads), ``Relay`` and ``run_relay`` (the daemon task ``switch.app`` starts in its
monitors nursery when ``[events] backend = "sqs"``) and ``replay`` (what ``cardswitch events
replay`` re-publishes).

What does not: building events or writing the outbox (``switch.events`` and the store
backends, in the decision's own transaction), the consumer side (``switch.cli.events``).

How it runs:

- Off the hot path. The relay only reads the outbox and marks rows; an authorization never
  waits for it, and SQS calls run in ``trio.to_thread`` with bounded timeouts. A slow or
  absent SQS makes rows pile up (``cardswitch_events_pending``, ``..._oldest_pending_seconds``)
  and changes no answer.
- One active relay per database. A lease row (``leases``: owner, expiry in Unix seconds) is
  taken when free, expired or already ours, and renewed before each batch once a third of it
  has passed (a call lasts at most ``CONNECT_TIMEOUT + READ_TIMEOUT``); another instance
  takes it over once it has expired (the holder died or froze), and
  a clean stop gives it up at once. In PostgreSQL the claim is ``SELECT ... FROM leases WHERE
  name = $1 FOR UPDATE SKIP LOCKED`` followed by the same owner-or-expired ``UPDATE`` in one
  transaction: a contender skips a row being renewed instead of queueing behind it.
- In order per account. Rows are read in commit order (``id``, published as ``sequence``)
  and sent ten to a ``SendMessageBatch``, in order, with ``MessageGroupId`` = account id
  (else card id, else ``none``) and ``MessageDeduplicationId`` = event id. A row is marked
  published only when SQS listed its entry as successful. Once an entry of a group fails,
  the group's later rows wait for the next round, and the retry of a failed row goes without
  the rest of its group in its batch, so a failed event is not overtaken by later ones. The
  one exception: entries of the same group later in the batch where an entry fails for the
  first time may already have been taken by SQS (it answers per entry), which a consumer
  sees as a ``sequence`` going down.
- Several calls in flight. A round's rows are split into ``publishers`` lanes by group
  (``lane_of``: CRC-32 of the group key), and the lanes publish at once, one call at a
  time each: every event of an account goes through the same lane, so its order holds,
  while one SQS round trip no longer bounds the whole relay to ten events (at 30 ms a call,
  about 330 events/s; four lanes, about 1,300/s). A lane whose call or mark fails stops the
  others after the call they are in; nothing is abandoned mid-call.
- At least once. A crash between SQS's acknowledgement and the mark re-sends the row: within
  SQS's five-minute deduplication window the queue drops it, later a consumer de-duplicates
  on ``event_id``.
- Failures. A failed call (network, throttling, SQS down) counts no attempt: the relay backs
  off exponentially (``backoff_base`` doubling to ``backoff_max``) and retries the same rows.
  A failed entry counts one attempt of its row. A row SQS rejects as invalid (a sender
  fault), or that failed ``max_attempts`` times, is PARKED: kept in the outbox, counted by
  ``cardswitch_events_parked`` (alert on > 0), never retried by the relay.
- Parked rows and order. Progress wins over FIFO order: later events of a parked event's
  account keep flowing, so one bad row cannot stop an account's stream for good (and a
  queue that can never take it would block it forever). The gap is visible: the parked gauge
  and the missing ``sequence``. After a fix, ``cardswitch events replay --since`` re-sends
  the history, parked rows included.
- Retention: published rows are purged after ``retention_days`` by the active relay.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import trio

from switch import metrics
from switch.config import EventsConfig
from switch.events import EventFailure, OutboxEvent, now_iso
from switch.log import get_logger
from switch.store.api import Store
from switch.store.models import StoreError

if TYPE_CHECKING:
    from mypy_boto3_sqs.client import SQSClient

log = get_logger("switch.relay")

#: Name of the relay's lease row.
LEASE_NAME = "events-relay"
#: Entries of one SendMessageBatch (the SQS maximum).
SQS_BATCH = 10
#: Seconds to connect to SQS and to wait for an answer (one attempt: the relay retries with
#: its own backoff), so that a call ends well within a lease; the relay's thread never hangs.
CONNECT_TIMEOUT = 2.0
READ_TIMEOUT = 5.0
#: Seconds between two purges of published events older than the retention.
PURGE_INTERVAL = 300.0
#: Seconds between two readings of the outbox gauges.
STATS_INTERVAL = 1.0
#: Call-level error codes that mean the request itself is invalid (one of its messages is
#: poison): the entries are then sent one by one, and one rejected alone is parked.
_INVALID_CALL_CODES = frozenset(
    {"InvalidParameterValue", "InvalidMessageContents", "BatchRequestTooLong",
     "MissingParameter", "InvalidParameterCombination"}
)  # fmt: skip


class PublishUnavailable(Exception):
    """A whole call failed (SQS unreachable, throttling, the queue missing): retry later."""


class InvalidBatch(Exception):
    """SQS rejected the whole call as invalid (one of its messages is poison)."""


@dataclass(frozen=True, slots=True)
class BatchResult:
    """What SQS said of each entry: the row ids it took, and those it did not."""

    published: list[int]
    failed: list[EventFailure]


def make_client(cfg: EventsConfig, session: Any = None) -> SQSClient:
    """A boto3 SQS client for ``cfg`` (credentials from the AWS chain or ``session``)."""
    import boto3  # noqa: PLC0415 - only a process that publishes pays for boto3
    from botocore.config import Config as BotoConfig  # noqa: PLC0415

    boto = BotoConfig(
        connect_timeout=CONNECT_TIMEOUT,
        read_timeout=READ_TIMEOUT,
        retries={"max_attempts": 1, "mode": "standard"},
        max_pool_connections=max(10, cfg.publishers),  # one per call in flight
    )
    session = session or boto3.session.Session()
    client: SQSClient = session.client(
        "sqs",
        region_name=cfg.region or None,
        endpoint_url=cfg.endpoint_url or None,
        config=boto,
    )
    return client


class SqsPublisher:
    """Sends outbox rows to the FIFO queue ``queue_url``; blocking (call it in a thread)."""

    def __init__(self, client: SQSClient, queue_url: str) -> None:
        self._client = client
        self._queue_url = queue_url

    def send(self, rows: Sequence[OutboxEvent], dedup_suffix: str = "") -> BatchResult:
        """SendMessageBatch of up to ten rows, in order.

        Raises:
            PublishUnavailable: the call failed as a whole and may succeed later.
            InvalidBatch: SQS rejected the call as invalid.
        """
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        if not 0 < len(rows) <= SQS_BATCH:
            raise ValueError(f"a batch holds 1 to {SQS_BATCH} rows, not {len(rows)}")
        entries = [
            {
                "Id": str(i),
                "MessageBody": row.body(),
                "MessageGroupId": row.group_key,
                "MessageDeduplicationId": row.event_id + dedup_suffix,
            }
            for i, row in enumerate(rows)
        ]
        try:
            answer = self._client.send_message_batch(
                QueueUrl=self._queue_url,
                Entries=entries,  # type: ignore[arg-type]
            )
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in _INVALID_CALL_CODES:
                raise InvalidBatch(code) from exc
            raise PublishUnavailable(code or type(exc).__name__) from exc
        except BotoCoreError as exc:
            raise PublishUnavailable(type(exc).__name__) from exc
        ok = {int(e["Id"]) for e in answer.get("Successful", [])}
        failed: list[EventFailure] = []
        for entry in answer.get("Failed", []):
            index = int(entry["Id"])
            error = f"{entry.get('Code', '')}: {entry.get('Message', '')}"[:200]
            failed.append(EventFailure(rows[index].id, error, bool(entry.get("SenderFault"))))
        unanswered = set(range(len(rows))) - ok - {int(e["Id"]) for e in answer.get("Failed", [])}
        failed += [EventFailure(rows[i].id, "not in SQS's answer") for i in sorted(unanswered)]
        return BatchResult([rows[i].id for i in sorted(ok)], failed)


#: How a relay publishes one batch: rows -> result (a thread-blocking call).
SendBatch = Callable[[Sequence[OutboxEvent]], BatchResult]


def default_owner() -> str:
    """This process's lease owner name: host, pid and a random part (unique per start)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def lane_of(group_key: str, lanes: int) -> int:
    """The lane (0 to ``lanes`` - 1) that publishes every event of ``group_key``: the same
    in every round and every process (CRC-32, not Python's per-process string hash)."""
    return zlib.crc32(group_key.encode()) % lanes


def _age(created_at: str | None, now: datetime) -> float:
    if created_at is None:
        return 0.0
    try:
        return (now - datetime.fromisoformat(created_at)).total_seconds()
    except ValueError:
        return 0.0


class Relay:
    """The relay of one database (see the module docstring).

    Args:
        store: the store whose outbox is published.
        cfg: the ``[events]`` settings.
        send: publishes one batch (``SqsPublisher.send``), called in a worker thread.
        owner: this instance's lease owner name.
        clock: Unix seconds (the lease is compared across processes).
        backoff_base, backoff_max: seconds of the first and the longest wait after a failed
            call.
    """

    def __init__(
        self,
        store: Store,
        cfg: EventsConfig,
        send: SendBatch,
        *,
        owner: str | None = None,
        clock: Callable[[], float] = time.time,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        self.store = store
        self.cfg = cfg
        self.owner = owner or default_owner()
        self._send = send
        self._clock = clock
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._failed_calls = 0
        self._lease_until = 0.0
        self._last_stats = -1e9
        self._last_purge = -1e9
        #: Whether this instance held the lease at its last claim (tests look at it).
        self.active = False
        #: Rows this instance saw SQS acknowledge.
        self.published = 0

    async def run(self) -> None:
        """Publish until cancelled; gives the lease up on the way out."""
        try:
            while True:
                await self._step()
        finally:
            self.active = False
            metrics.EVENTS_RELAY_ACTIVE.set(0)
            with trio.move_on_after(2.0) as scope:
                scope.shield = True
                with contextlib.suppress(StoreError):
                    await self.store.release_lease(LEASE_NAME, self.owner)

    async def _step(self) -> None:
        try:
            if not await self._hold_lease():
                await trio.sleep(min(self.cfg.poll_interval, self.cfg.lease_seconds / 3))
                return
            sent = await self.round()
        except StoreError as exc:
            log.warning("events_relay_store_failed", error=str(exc))
            await trio.sleep(self._next_backoff())
            return
        except PublishUnavailable as exc:
            metrics.observe_publish_failure("call")
            wait = self._next_backoff()
            log.warning("events_publish_failed", error=str(exc), retry_in=wait)
            await trio.sleep(wait)
            return
        self._failed_calls = 0
        if sent == 0:
            await trio.sleep(self.cfg.poll_interval)

    def _next_backoff(self) -> float:
        wait: float = min(self._backoff_max, self._backoff_base * 2.0**self._failed_calls)
        self._failed_calls += 1
        return wait

    async def _hold_lease(self) -> bool:
        """Claim or renew the lease when a third of it has passed; whether we hold it."""
        now = self._clock()
        if self.active and now < self._lease_until - self.cfg.lease_seconds * 2 / 3:
            return True
        held = await self.store.claim_lease(LEASE_NAME, self.owner, now, self.cfg.lease_seconds)
        if held != self.active:
            log.info("events_relay_lease", owner=self.owner, active=held)
        self.active = held
        self._lease_until = now + self.cfg.lease_seconds if held else 0.0
        metrics.EVENTS_RELAY_ACTIVE.set(1 if held else 0)
        return held

    async def round(self) -> int:
        """Publish one read of pending rows; how many SQS took.

        The rows are split into ``cfg.publishers`` lanes by group (``lane_of``); the lanes
        publish at once, each its own rows in order, ten to a call. When a lane fails
        (a call, the store), the others finish the call they are in and stop; what SQS
        acknowledged is marked, the rest waits for the next round.

        Raises:
            PublishUnavailable: a call failed (rows already acknowledged are marked).
            StoreError: the outbox could not be read or marked.
        """
        await self._observe()
        rows = await self.store.pending_events(self.cfg.batch_size)
        lanes: list[list[OutboxEvent]] = [[] for _ in range(self.cfg.publishers)]
        for row in rows:
            lanes[lane_of(row.group_key, len(lanes))].append(row)
        failure: list[PublishUnavailable | StoreError] = []
        taken = 0

        async def run_lane(lane: list[OutboxEvent]) -> None:
            nonlocal taken
            try:
                published = await self._publish_lane(lane, failure)
            except (PublishUnavailable, StoreError) as exc:
                failure.append(exc)
            else:
                taken += published  # after the await: the lanes run at once

        async with trio.open_nursery() as nursery:
            for lane in lanes:
                if lane:
                    nursery.start_soon(run_lane, lane)
        if failure:
            raise failure[0]
        await self._observe(force=bool(rows))
        await self._purge()
        return taken

    async def _publish_lane(self, rows: list[OutboxEvent], failure: Sequence[BaseException]) -> int:
        """Publish ``rows`` (whole groups, in commit order) ten to a call, one call at a
        time, until done or another lane has failed (``failure`` not empty); how many SQS
        took."""
        blocked: set[str] = set()
        # Groups whose first pending row failed before: it goes alone, so that nothing of
        # its group overtakes it should it fail again.
        solo: set[str] = set()
        for row in reversed(rows):
            solo.discard(row.group_key)
            if row.attempts:
                solo.add(row.group_key)
        taken = 0
        queue = list(rows)
        while queue and not failure:
            batch: list[OutboxEvent] = []
            rest: list[OutboxEvent] = []
            alone: set[str] = set()
            for row in queue:
                if row.group_key in blocked:
                    continue  # waits behind its group's failed row until the next round
                if len(batch) < SQS_BATCH and row.group_key not in alone:
                    batch.append(row)
                    if row.group_key in solo:
                        alone.add(row.group_key)
                else:
                    rest.append(row)
            queue = rest
            if not batch or not await self._hold_lease():
                break  # a slow round must not outlive the lease: another instance may hold it
            result = await self._publish(batch)
            solo -= alone
            at = now_iso()
            await self.store.mark_published(result.published, at)
            taken += len(result.published)
            self.published += len(result.published)
            metrics.observe_published(len(result.published))
            if result.failed:
                metrics.observe_publish_failure("entry", len(result.failed))
                blocked |= {r.group_key for r in batch if r.id in {f.id for f in result.failed}}
                parked = await self.store.record_event_failures(
                    result.failed, max_attempts=self.cfg.max_attempts, at=at
                )
                if parked:
                    log.error("events_parked", count=parked,
                              ids=[f.id for f in result.failed][:10])  # fmt: skip
        return taken

    async def _publish(self, batch: list[OutboxEvent]) -> BatchResult:
        try:
            return await trio.to_thread.run_sync(self._send, batch, abandon_on_cancel=True)
        except InvalidBatch as exc:
            if len(batch) == 1:
                return BatchResult([], [EventFailure(batch[0].id, str(exc), poison=True)])
        # One message spoils the call: send them one at a time to find it.
        published: list[int] = []
        failed: list[EventFailure] = []
        for row in batch:
            one = await self._publish([row])
            published += one.published
            failed += one.failed
        return BatchResult(published, failed)

    async def _observe(self, force: bool = False) -> None:
        now = self._clock()
        if not force and now - self._last_stats < STATS_INTERVAL:
            return
        self._last_stats = now
        stats = await self.store.outbox_stats()
        metrics.observe_outbox(
            stats.pending, _age(stats.oldest_pending_at, datetime.now(UTC)), stats.parked
        )

    async def _purge(self) -> None:
        now = self._clock()
        if now - self._last_purge < PURGE_INTERVAL:
            return
        self._last_purge = now
        before = datetime.now(UTC) - timedelta(days=self.cfg.retention_days)
        purged = await self.store.purge_published(before.isoformat(timespec="microseconds"))
        if purged:
            log.info("events_purged", count=purged)


async def run_relay(store: Store, cfg: EventsConfig) -> None:
    """The daemon task: build the SQS client and run the relay until cancelled.

    A client that cannot be built (no region in the AWS chain) is logged and retried: the
    switch keeps answering, and the outbox keeps its rows.
    """
    while True:
        try:
            client = make_client(cfg)
            break
        except Exception as exc:  # botocore raises several unrelated types here
            log.error("events_relay_client_failed", error=type(exc).__name__)
            await trio.sleep(30.0)
    await Relay(store, cfg, SqsPublisher(client, cfg.queue_url).send).run()


async def replay(store: Store, send: Callable[..., BatchResult], since: str) -> tuple[int, int]:
    """Re-publish every outbox row created at or after ``since`` (published, pending or
    parked), in order, with a fresh deduplication id (SQS would otherwise drop a row sent
    in the last five minutes) and the same ``event_id`` (consumers de-duplicate on it).

    Returns (sent, failed). Changes no row.
    """
    suffix = "-replay-" + uuid.uuid4().hex[:12]
    rows = await store.events_since(since, limit=10_000_000)
    sent = failed = 0
    for start in range(0, len(rows), SQS_BATCH):
        chunk = rows[start : start + SQS_BATCH]
        try:
            result = await trio.to_thread.run_sync(send, chunk, suffix)
        except InvalidBatch:
            result = BatchResult([], [EventFailure(r.id, "invalid") for r in chunk])
        sent += len(result.published)
        failed += len(result.failed)
    return sent, failed
