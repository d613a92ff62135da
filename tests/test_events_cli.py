"""``cardswitch events replay|tail`` as an operator and a consumer run them, each in its own
process, against a ``moto_server`` FIFO queue on loopback and a SQLite outbox filled by the
scripted session of test_events.py (no relay ran: the queue starts empty)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio
from test_events import run_session, session_store
from test_events_support import (  # noqa: F401 - fixtures
    AWS_ENV,
    REGION,
    MotoSqs,
    fifo_queue,
    moto_sqs,
    schema_validator,
)

from switch.config import Config, EventsConfig, StoreConfig
from switch.testing import switch_env, write_config

REPO = Path(__file__).resolve().parent.parent


def _cardswitch(config: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "switch", *argv, "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=90, check=False,
        env=switch_env(AWS_ENV),
    )  # fmt: skip


def _lines(done: subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_replay_then_tail_peek_and_consume(
    tmp_path: Path,
    moto_sqs: MotoSqs,  # noqa: F811
    fifo_queue: str,  # noqa: F811
) -> None:
    async def fill() -> list[str]:
        async with session_store("sqlite", tmp_path) as session:
            await run_session(session.ask)
            return [e.event_id for e in await session.store.events_since("")]

    outbox = trio.run(fill)
    events = EventsConfig(queue_url=fifo_queue, region=REGION, endpoint_url=moto_sqs.endpoint)
    config = write_config(
        Config(store=StoreConfig(path=tmp_path / "events.db"), events=events),
        tmp_path / "switch.toml",
    )
    n = str(len(outbox))

    replayed = _cardswitch(config, "events", "replay", "--since", "2000-01-01")
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.startswith(f"{n} events re-published since 2000-01-01T00:00:00")

    peek = _lines(_cardswitch(config, "events", "tail", "--max", n, "--idle", "5",
                              "--visibility", "1"))  # fmt: skip
    assert sorted(e["event_id"] for e in peek) == sorted(outbox)
    for account in {e["account_id"] for e in peek}:  # each account in commit order
        sequence = [e["sequence"] for e in peek if e["account_id"] == account]
        assert sequence == sorted(sequence), account
    validator = schema_validator()
    assert all(not list(validator.iter_errors(e)) for e in peek)

    consumed = _lines(_cardswitch(config, "events", "tail", "--consume", "--max", n,
                                  "--idle", "10"))  # fmt: skip
    assert sorted(e["event_id"] for e in consumed) == sorted(outbox), "the peek deleted nothing"
    assert _lines(_cardswitch(config, "events", "tail", "--idle", "2")) == []

    later = _cardswitch(config, "events", "replay", "--since", "2999-01-01T00:00:00+00:00")
    assert later.returncode == 0 and later.stdout.startswith("0 events re-published")
    bad = _cardswitch(config, "events", "replay", "--since", "yesterday")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--since" in bad.stderr
