"""``cardswitch events tail|replay``: the consumer's and the operator's side of the event queue.

What lives here: ``tail`` (reads the SQS FIFO queue of ``[events]`` and prints each event as
one JSON line; deletes what it printed only with ``--consume``) and ``replay`` (re-publishes
the outbox history kept for ``retention_days``, from ``--since``). What does not: the outbox
(the store backends), the relay the daemon runs (``switch.relay``), the payload
(``switch.events``, ``config/events/authorization-event.v1.schema.json``).

Without ``--consume``, a message read becomes visible again after ``--visibility`` seconds;
on a FIFO queue its message group is held for that long, so a peek delays the real consumer
of those accounts a little. Each message is printed once per run.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import trio

from switch.cli.common import config_parent
from switch.cli.runner import CommandError, ExitStatus, UsageError, runner
from switch.config import Config, EventsConfig
from switch.relay import PublishUnavailable, SqsPublisher, make_client, replay
from switch.store import open_store

if TYPE_CHECKING:
    from mypy_boto3_sqs.client import SQSClient


def register(sub: Any) -> None:
    """Add ``events tail|replay``."""
    config = config_parent()
    events = sub.add_parser("events", help="read the event queue, re-publish the outbox")
    events_sub = events.add_subparsers(dest="events_command", required=True, metavar="ACTION")
    tail = events_sub.add_parser(
        "tail", parents=[config], help="print events from the queue as JSON lines"
    )
    tail.add_argument("--consume", action="store_true", help="delete each event once printed")
    tail.add_argument("--max", type=int, default=0, help="stop after this many (0: no limit)")
    tail.add_argument(
        "--idle", type=float, default=0.0,
        help="stop after this many seconds without an event (0: follow until Ctrl-C)",
    )  # fmt: skip
    tail.add_argument(
        "--visibility", type=int, default=5,
        help="seconds a message read without --consume stays hidden (default 5)",
    )  # fmt: skip
    tail.add_argument("--queue-url", default=None, help="instead of [events] queue_url")
    tail.set_defaults(func=runner(_tail))
    again = events_sub.add_parser(
        "replay", parents=[config], help="re-publish the outbox's events created since a time"
    )
    again.add_argument("--since", required=True, help="ISO 8601 time (UTC unless it says)")
    again.add_argument("--queue-url", default=None, help="instead of [events] queue_url")
    again.set_defaults(func=runner(_replay))


def _events_config(cfg: Config, queue_url: str | None) -> EventsConfig:
    events = cfg.events
    url = queue_url or events.queue_url
    if not url:
        raise UsageError("no queue: set [events] queue_url or give --queue-url")
    return EventsConfig(
        backend="sqs", queue_url=url, region=events.region, endpoint_url=events.endpoint_url
    )


def _client(events: EventsConfig) -> SQSClient:
    try:
        return make_client(events)
    except Exception as exc:  # botocore: no region, bad endpoint URL
        raise UsageError(f"cannot reach SQS: {type(exc).__name__}: {exc}") from None


def _since(text: str) -> str:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise UsageError(f"--since: not an ISO 8601 time: {text!r}") from None
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    return when.astimezone(UTC).isoformat(timespec="microseconds")


def _unavailable(exc: Exception) -> CommandError:
    return CommandError(f"SQS: {type(exc).__name__}: {exc}", ExitStatus.UNAVAILABLE)


def _receive(client: SQSClient, url: str, wait: int, visibility: int) -> list[dict[str, Any]]:
    from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

    try:
        answer = client.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=wait,
            VisibilityTimeout=visibility,
        )  # fmt: skip
    except (BotoCoreError, ClientError) as exc:
        raise _unavailable(exc) from None
    return [dict(m) for m in answer.get("Messages", [])]


def _delete(client: SQSClient, url: str, messages: list[dict[str, Any]]) -> None:
    from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

    entries = [{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)]
    try:
        client.delete_message_batch(QueueUrl=url, Entries=entries)  # type: ignore[arg-type]
    except (BotoCoreError, ClientError) as exc:
        raise _unavailable(exc) from None


async def _tail(args: argparse.Namespace, cfg: Config) -> int:
    if args.max < 0 or args.idle < 0 or not 0 <= args.visibility <= 43200:
        raise UsageError("--max, --idle must be >= 0 and --visibility 0 to 43200")
    events = _events_config(cfg, args.queue_url)
    client = _client(events)
    printed: set[str] = set()
    count = 0
    idle_since = trio.current_time()
    while not args.max or count < args.max:
        wait = 1 if args.idle else 5  # long polling, short enough to notice --idle
        messages = await trio.to_thread.run_sync(
            _receive, client, events.queue_url, wait, args.visibility, abandon_on_cancel=True
        )
        fresh = [m for m in messages if m["MessageId"] not in printed]
        if args.max:
            fresh = fresh[: args.max - count]
        for message in fresh:
            printed.add(message["MessageId"])
            body = json.loads(message["Body"])
            print(json.dumps(body, sort_keys=True, separators=(",", ":")))
        sys.stdout.flush()
        count += len(fresh)
        if args.consume and fresh:
            await trio.to_thread.run_sync(_delete, client, events.queue_url, fresh)
        if fresh:
            idle_since = trio.current_time()
        elif args.idle and trio.current_time() - idle_since >= args.idle:
            break
    return ExitStatus.OK


async def _replay(args: argparse.Namespace, cfg: Config) -> int:
    since = _since(args.since)
    events = _events_config(cfg, args.queue_url)
    publisher = SqsPublisher(_client(events), events.queue_url)
    async with open_store(cfg.store) as store:
        try:
            sent, failed = await replay(store, publisher.send, since)
        except PublishUnavailable as exc:
            raise _unavailable(exc) from None
    print(f"{sent} events re-published since {since}" + (f", {failed} refused" if failed else ""))
    if failed:
        raise CommandError(f"{failed} events were refused by SQS")
    return ExitStatus.OK
