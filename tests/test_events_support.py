"""Shared helpers of the events tests: the JSON Schema, a real ``moto_server`` SQS on loopback.

What lives here: ``schema_validator`` (config/events/authorization-event.v1.schema.json,
checked against its meta-schema here), ``MotoServer`` (a ``moto_server -H 127.0.0.1 -p PORT``
process that a test may kill and start again on the same port, as the KMS tests run theirs),
the session fixture ``moto_sqs``, ``fifo_queue`` (a fresh FIFO queue per test), ``receive_all``
(reads and deletes until a condition holds) and ``sentinels_found`` (card data searched for
in message bodies). What does not: the tests of the outbox and the relay
(test_events.py, test_relay*.py).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from jsonschema import Draft202012Validator, FormatChecker

from switch.decisions import Reason

if TYPE_CHECKING:
    from mypy_boto3_sqs.client import SQSClient

REPO = Path(__file__).resolve().parents[1]
SCHEMA_PATH = REPO / "config" / "events" / "authorization-event.v1.schema.json"
#: Seconds to wait for moto_server to listen.
STARTUP_TIMEOUT = 30.0
REGION = "eu-west-1"
#: Credentials of the moto server (not secrets: moto accepts any).
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": REGION,
}
_RUNNING_RE = re.compile(r"Running on http://127\.0\.0\.1:(\d+)")


def schema_validator() -> Draft202012Validator:
    schema = json.loads(SCHEMA_PATH.read_text())
    return Draft202012Validator(schema, format_checker=FormatChecker())


def test_schema_is_valid_and_names_every_reason() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    Draft202012Validator.check_schema(schema)
    assert set(schema["properties"]["reason"]["enum"]) == {r.value for r in Reason}


def _moto_server_binary() -> str:
    beside = Path(sys.executable).with_name("moto_server")
    if beside.exists():
        return str(beside)
    found = shutil.which("moto_server")
    if found is None:  # pragma: no cover - environment problem
        pytest.fail("moto_server is not installed (pip install 'moto[server]')")
    return found


class MotoServer:
    """A moto_server process on 127.0.0.1; ``kill`` and ``start`` again keep its port."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start (on the port of the last run, or one the OS chooses) and wait until it
        listens."""
        self.log.write_bytes(b"")
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [_moto_server_binary(), "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"moto_server exited: {self.log.read_text()[-500:]}")
            match = _RUNNING_RE.search(self.log.read_text(errors="replace"))
            if match:
                port = int(match.group(1))
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
                except OSError:
                    pass
                else:
                    self.port = port
                    return
            time.sleep(0.1)
        pytest.fail("moto_server did not start listening in time")

    def kill(self) -> None:
        """SIGKILL the server (its queues are gone with it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - stuck server
                self.kill()


def sqs_client(endpoint: str) -> SQSClient:
    session = boto3.session.Session(
        aws_access_key_id="testing", aws_secret_access_key="testing", region_name=REGION
    )
    client: SQSClient = session.client("sqs", endpoint_url=endpoint)
    return client


@dataclass(frozen=True)
class MotoSqs:
    server: MotoServer
    client: SQSClient

    @property
    def endpoint(self) -> str:
        return self.server.endpoint


@pytest.fixture(scope="session")
def moto_sqs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoSqs]:
    server = MotoServer(tmp_path_factory.mktemp("moto-sqs") / "moto_server.log")
    server.start()
    try:
        yield MotoSqs(server, sqs_client(server.endpoint))
    finally:
        server.stop()


def create_fifo_queue(client: SQSClient, name: str | None = None) -> str:
    """A new FIFO queue (explicit deduplication ids: ContentBasedDeduplication off)."""
    name = name or f"events-{uuid.uuid4().hex[:12]}.fifo"
    answer = client.create_queue(
        QueueName=name,
        Attributes={"FifoQueue": "true", "ContentBasedDeduplication": "false"},
    )
    return answer["QueueUrl"]


@pytest.fixture
def fifo_queue(moto_sqs: MotoSqs) -> str:
    return create_fifo_queue(moto_sqs.client)


def receive_all(
    client: SQSClient,
    queue_url: str,
    until: Callable[[list[dict[str, Any]]], bool],
    timeout: float = 30.0,
) -> list[dict[str, Any]]:
    """Receive (and delete) messages in the order SQS hands them out until ``until`` holds
    for the bodies received so far (JSON-decoded), or ``timeout`` passes; the bodies."""
    bodies: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while not until(bodies) and time.monotonic() < deadline:
        answer = client.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1,
            AttributeNames=["MessageGroupId"],
        )  # fmt: skip
        messages = answer.get("Messages", [])
        for message in messages:
            body = json.loads(message["Body"])
            body["_group"] = message.get("Attributes", {}).get("MessageGroupId")
            bodies.append(body)
        if messages:
            client.delete_message_batch(
                QueueUrl=queue_url,
                Entries=[
                    {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                    for i, m in enumerate(messages)
                ],
            )
    return bodies


class Consumer:
    """A consumer thread that receives and deletes everything from the queue until stopped,
    as a real one would (moto's FIFO queues slow down as they fill, unlike SQS)."""

    def __init__(self, client: SQSClient, queue_url: str) -> None:
        self.bodies: list[dict[str, Any]] = []
        self._client = client
        self._url = queue_url
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Consumer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while not self._stop.is_set():
            got = receive_all(self._client, self._url, bool, timeout=1.0)
            self.bodies.extend(got)

    def received(self) -> set[str]:
        return {b["event_id"] for b in list(self.bodies)}


def strip_transport(body: dict[str, Any]) -> dict[str, Any]:
    """A received body without what ``receive_all`` added."""
    return {k: v for k, v in body.items() if not k.startswith("_")}


def check_order(bodies: Iterable[dict[str, Any]]) -> list[str]:
    """Violations of per-group order: a group whose ``sequence`` goes down, once the
    duplicates (same event id) are set aside."""
    last: dict[str, int] = {}
    seen: set[str] = set()
    bad = []
    for body in bodies:
        if body["event_id"] in seen:
            continue
        seen.add(body["event_id"])
        group = body["_group"]
        if body["sequence"] <= last.get(group, 0):
            bad.append(f"group {group}: sequence {body['sequence']} after {last[group]}")
        last[group] = body["sequence"]
    return bad


def sentinels_found(texts: Iterable[str], sentinels: Iterable[str]) -> list[str]:
    """The sentinels (card data, compared case-insensitively) present in any of ``texts``."""
    lowered = [t.lower() for t in texts]
    return [s for s in sentinels if any(s.lower() in t for t in lowered)]
