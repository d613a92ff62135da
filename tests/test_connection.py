"""The connection loop (switch/connection.py) over in-memory streams, on the autojump clock.

Each test runs a ``Connection`` on one end of ``trio.testing.memory_stream_pair()`` with a
``Dispatcher`` over a fake engine, and plays the network on the other end. Time is virtual
(``autojump_clock``), so deadlines of seconds cost nothing and delays are exact; engine
delays come from seeded generators. What a test observes is what a network would: the
frames it reads, when it reads them, and when the stream closes; plus the outcome ``run``
returns, the metrics registry and the log events.
"""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

import iso8583
import pytest
import structlog
import trio
import trio.testing

from hsm.pan import mask_pan
from switch import metrics
from switch.acquirer import build_auth, echo
from switch.config import ListenerConfig
from switch.connection import Connection
from switch.decisions import Profile, Reason, profile
from switch.handler import Decision, Dispatcher, RequestContext, StandInCause
from switch.store.models import DeliveryMark, DuplicateKey, JournalRef, StoreError
from switch.wire import codec
from switch.wire.framing import FrameDecoder, HeaderKind, encode_frame, keepalive_frame
from switch.wire.messages import (
    AuthRequest,
    AuthResponse,
    NetworkRequest,
    NetworkResponse,
    ReversalRequest,
    ReversalResponse,
)
from switch.wire.spec import spec_for

PAN = "4123456789012345"
LISTENER = ListenerConfig(name="test", network="visa", frame_timeout=2.0, max_in_flight=64)
#: Seconds a connection may take, after reading stops, to finish what it read.
LINGER = 5.0


# ------------------------------------------------------------------------ fakes


@dataclass
class FakeEngine:
    """Approves after a delay chosen per request; records how many ran at once."""

    delay: Callable[[AuthRequest], float] = lambda _: 0.0
    raises: bool = False
    stand_in: StandInCause | None = None
    #: Say that each decision was journaled (``Decision.journal``), as the pipeline does.
    journaled: bool = False
    seen: list[str] = field(default_factory=list)
    running: int = 0
    most_running: int = 0

    async def authorize(self, request: AuthRequest, context: RequestContext) -> Decision:
        self.seen.append(request.stan)
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            await trio.sleep(self.delay(request))
        finally:
            self.running -= 1
        if self.raises:
            raise RuntimeError("engine defect")
        reason = Reason.ISSUER_UNAVAILABLE if self.stand_in else Reason.APPROVED
        code = context.profile.code(reason)
        return Decision(
            AuthResponse.answer(request, code, approval_code=request.stan),
            reason,
            stand_in=self.stand_in,
            held=request.amount or 0,
            masked_pan=mask_pan(request.pan),
            journal=journal_ref(request.stan) if self.journaled else None,
        )

    async def reverse(self, request: ReversalRequest, context: RequestContext) -> Decision:
        code = context.profile.code(Reason.REVERSAL_UNMATCHED)
        return Decision(ReversalResponse.answer(request, code), Reason.REVERSAL_UNMATCHED)


def journal_ref(stan: str) -> JournalRef:
    """The journal row FakeEngine says it wrote for the request with ``stan``."""
    return JournalRef(DuplicateKey("visa", "123", "1201101500", stan, "", "", "0100"), stan)


@dataclass
class FakeJournal:
    """Records the marks of undelivered answers; ``hang`` never answers, ``fail`` raises."""

    hang: bool = False
    fail: bool = False
    marks: list[DeliveryMark] = field(default_factory=list)

    async def mark_delivery(
        self, marks: Sequence[DeliveryMark], *, deadline: float | None = None
    ) -> int:
        if self.hang:
            await trio.sleep_forever()
        if self.fail:
            raise StoreError("unavailable", "the database is down")
        self.marks += marks
        return len(marks)


def seeded_delays(seed: int, low: float, high: float) -> Callable[[AuthRequest], float]:
    rng = random.Random(seed)
    return lambda _: rng.uniform(low, high)


@dataclass
class Received:
    at: float
    fields: dict[str, str]


class Network:
    """The network's end of the stream: sends frames, reads answers until the close."""

    def __init__(self, stream: trio.abc.HalfCloseableStream, header: HeaderKind) -> None:
        self.stream = stream
        self.header: HeaderKind = header
        self.received: list[Received] = []
        #: When each zero-length frame (a keep-alive) arrived.
        self.keepalives: list[float] = []
        self.closed_at: float | None = None
        self._decoder = FrameDecoder(header, 65535, empty_frames=True)
        self._closed = trio.Event()
        self._got = trio.Event()

    async def send(self, *bodies: bytes) -> None:
        await self.stream.send_all(b"".join(encode_frame(b, self.header) for b in bodies))

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def end(self) -> None:
        """Half-close: the switch sees EOF and may still answer."""
        await self.stream.send_eof()

    async def read_loop(self) -> None:
        while data := await self.stream.receive_some(65536):
            for frame in self._decoder.feed(bytes(data)):
                if not frame:
                    self.keepalives.append(trio.current_time())
                    continue
                self.received.append(Received(trio.current_time(), codec.decode_fields(frame)))
                self._got.set()
        self.closed_at = trio.current_time()
        self._closed.set()

    async def answers(self, count: int) -> list[dict[str, str]]:
        while len(self.received) < count:
            self._got = trio.Event()
            await self._got.wait()
        return [r.fields for r in self.received]

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def codes(self) -> dict[str, str]:
        return {r.fields["11"]: r.fields["39"] for r in self.received}


@dataclass
class Run:
    network: Network
    connection: Connection
    outcome: str | None = None


@asynccontextmanager
async def connection(
    engine: FakeEngine | None = None,
    listener: ListenerConfig = LISTENER,
    *,
    prof: Profile | None = None,
    global_slots: trio.Semaphore | None = None,
    linger: float = LINGER,
) -> AsyncIterator[Run]:
    """Run a Connection for the block; on exit, wait for it to finish (bounded)."""
    ours, theirs = trio.testing.memory_stream_pair()
    conn = Connection(
        ours,
        Dispatcher(engine or FakeEngine()),
        listener,
        prof or profile(listener.network),
        linger=linger,
        global_slots=global_slots,
    )
    run = Run(Network(theirs, listener.header), conn)

    async def serve() -> None:
        run.outcome = await conn.run()

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            nursery.start_soon(run.network.read_loop)
            yield run


def auth(stan: str, amount: int = 1000) -> bytes:
    return codec.encode(build_auth(PAN, amount, stan=stan))


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def raw(fields: dict[str, str]) -> bytes:
    data, _ = iso8583.encode(dict(fields), spec_for("ascii"))
    return bytes(data)


# ------------------------------------------------------------------------ concurrency


async def test_many_in_flight_answered_out_of_order_matched_by_stan(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine(delay=seeded_delays(64, 0.0, 1.0))
    async with connection(engine) as run:
        stans = [f"{i:06d}" for i in range(1, 65)]
        await run.network.send(*(auth(s, 100 + i) for i, s in enumerate(stans)))
        answers = await run.network.answers(64)
        await run.network.end()
    assert run.outcome == "eof"
    assert engine.most_running == 64  # all decided at once, none waited for another
    order = [a["11"] for a in answers]
    assert sorted(order) == stans and order != stans
    for a in answers:
        assert (a["0"], a["39"], a["38"]) == ("0110", "00", a["11"])
        assert int(a["4"]) == 100 + int(a["11"]) - 1
    # Each answer left as soon as it was decided: arrival times are the sorted delays.
    times = [r.at for r in run.network.received]
    assert times == sorted(times) and times[-1] < 1.0


async def test_connection_slots_apply_backpressure(autojump_clock: trio.testing.MockClock) -> None:
    engine = FakeEngine(delay=seeded_delays(2, 0.1, 0.3))
    async with connection(engine, replace(LISTENER, max_in_flight=2)) as run:
        await run.network.send(*(auth(f"{i:06d}") for i in range(1, 25)))
        await run.network.answers(24)
        await run.network.end()
    assert engine.most_running == 2  # the per-connection cap, reached and never passed
    assert set(run.network.codes().values()) == {"00"}


async def test_global_slots_are_shared_by_connections(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine(delay=seeded_delays(3, 0.1, 0.3))
    shared = trio.Semaphore(3)
    async with (
        connection(engine, global_slots=shared) as one,
        connection(engine, global_slots=shared) as two,
    ):
        await one.network.send(*(auth(f"1{i:05d}") for i in range(10)))
        await two.network.send(*(auth(f"2{i:05d}") for i in range(10)))
        await one.network.answers(10)
        await two.network.answers(10)
        await one.network.end()
        await two.network.end()
    assert engine.most_running == 3
    assert shared.value == 3


async def test_answers_wait_for_the_slowest_reader_without_losing_any(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The network reads nothing for a minute: answers queue (bounded), reading pauses,
    # then everything is delivered once it reads again.
    engine = FakeEngine()
    listener = replace(LISTENER, max_in_flight=4)
    ours, theirs = trio.testing.lockstep_stream_pair()
    conn = Connection(ours, Dispatcher(engine), listener, profile("visa"), linger=LINGER)
    network = Network(theirs, "binary2")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.run)
        frames = b"".join(encode_frame(auth(f"{i:06d}")) for i in range(1, 41))
        sender = trio.CancelScope()

        async def send_all() -> None:
            with sender:
                await network.send_raw(frames)

        nursery.start_soon(send_all)
        await trio.sleep(60)
        # Not all 40 were taken: the reader stopped once slots and outbox were full.
        assert len(engine.seen) < 40
        nursery.start_soon(network.read_loop)
        await network.answers(40)
        await network.end()
    assert sorted(network.codes()) == [f"{i:06d}" for i in range(1, 41)]


# ------------------------------------------------------------------------ deadlines


async def test_body_dripped_slower_than_the_frame_deadline_is_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connection() as run:
        frame = encode_frame(codec.encode(echo()))
        t0 = trio.current_time()
        for byte in frame:  # one byte every 0.1 s: steady, but the frame takes longer than 2 s
            if run.network.closed_at is not None:
                break
            await run.network.send_raw(bytes([byte]))
            await trio.sleep(0.1)
        await run.network.wait_closed()
    assert run.outcome == "frame_timeout"
    assert run.network.received == []
    assert run.network.closed_at is not None
    assert run.network.closed_at - t0 == pytest.approx(LISTENER.frame_timeout)


async def test_between_frames_only_the_idle_timeout_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Far longer than the frame deadline, just under the idle timeout: nothing closes.
    async with connection() as run:
        await trio.sleep(LISTENER.idle_timeout * 0.9)
        await run.network.send(codec.encode(echo(stan="000001")))
        assert (await run.network.answers(1))[0]["39"] == "00"
        await run.network.end()
    assert run.outcome == "eof"


async def test_frame_deadline_restarts_with_each_frame(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Frames that each arrive within the deadline keep the connection, however many.
    async with connection() as run:
        for i in range(1, 6):
            frame = encode_frame(codec.encode(echo(stan=f"{i:06d}")))
            await run.network.send_raw(frame[:5])
            await trio.sleep(LISTENER.frame_timeout * 0.9)
            await run.network.send_raw(frame[5:])
        await run.network.answers(5)
        await run.network.end()
    assert run.outcome == "eof"


async def test_no_complete_frame_for_the_idle_timeout_closes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    before = sample("cardswitch_connection_limit_hits_total", listener="test", limit="idle_timeout")
    async with connection(listener=replace(LISTENER, idle_timeout=60.0)) as run:
        t0 = trio.current_time()
        await run.network.wait_closed()
    assert run.outcome == "idle_timeout"
    assert run.network.closed_at is not None
    assert run.network.closed_at - t0 == pytest.approx(60.0)
    after = sample("cardswitch_connection_limit_hits_total", listener="test", limit="idle_timeout")
    assert after == before + 1


async def test_every_complete_frame_restarts_the_idle_timer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Echo requests, an unsolicited 0810 (what a keep-alive's answer will be) and a frame
    # dripped in two parts all count: the link closes one idle period after the last.
    lst = replace(LISTENER, idle_timeout=60.0)
    reply = raw({"t": "0810", "7": "0101120000", "11": "000099", "39": "00", "70": "301"})
    async with connection(listener=lst) as run:
        for i in range(1, 4):
            await trio.sleep(50.0)
            await run.network.send(codec.encode(echo(stan=f"{i:06d}")))
        await trio.sleep(50.0)
        await run.network.send(reply)
        await trio.sleep(50.0)
        frame = encode_frame(codec.encode(echo(stan="000004")))
        await run.network.send_raw(frame[:5])
        await trio.sleep(1.0)
        await run.network.send_raw(frame[5:])
        last = trio.current_time()
        await run.network.wait_closed()
    assert run.outcome == "idle_timeout"
    assert sorted(run.network.codes()) == ["000001", "000002", "000003", "000004"]
    assert run.network.closed_at is not None
    assert run.network.closed_at - last == pytest.approx(60.0)


async def test_idle_timeout_zero_never_closes(autojump_clock: trio.testing.MockClock) -> None:
    async with connection(listener=replace(LISTENER, idle_timeout=0.0)) as run:
        await trio.sleep(550.0)  # past the default idle timeout (300 s), under the guard
        await run.network.send(codec.encode(echo(stan="000001")))
        assert (await run.network.answers(1))[0]["39"] == "00"
        await run.network.end()
    assert run.outcome == "eof"


async def test_abort_writes_what_is_ready_and_abandons_the_rest(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # A drain cut short: the answers already decided leave, the slow one is abandoned and
    # counted, and the connection ends within the flush time, not the linger.
    engine = FakeEngine(delay=lambda r: 100.0 if r.stan == "000009" else 0.0)
    before = sample("cardswitch_answers_undelivered_total", listener="test", kind="abandoned")
    async with connection(engine, linger=300.0) as run:
        await run.network.send(auth("000001"), auth("000002"), auth("000009"))
        await run.network.answers(2)
        t0 = trio.current_time()
        run.connection.abort(1.0)
        await run.network.wait_closed()
    assert run.outcome == "drained"
    assert sorted(run.network.codes()) == ["000001", "000002"]
    assert run.network.closed_at is not None and run.network.closed_at - t0 <= 1.0
    after = sample("cardswitch_answers_undelivered_total", listener="test", kind="abandoned")
    assert after == before + 1


# ------------------------------------------------------------------------ bad input


async def test_truncated_frame_then_eof_closes(autojump_clock: trio.testing.MockClock) -> None:
    before = sample("cardswitch_protocol_errors_total", listener="test", kind="truncated_frame")
    async with connection() as run:
        body = codec.encode(echo())
        await run.network.send_raw(encode_frame(body)[: len(body) // 2])
        await run.network.end()
        await run.network.wait_closed()
    assert run.outcome == "truncated_frame"
    assert run.network.received == []
    after = sample("cardswitch_protocol_errors_total", listener="test", kind="truncated_frame")
    assert after - before == 1


@pytest.mark.parametrize(
    ("header", "payload", "kind"),
    [
        ("binary2", b"\xff\xff" + b"0" * 10, "oversize"),
        ("binary2", b"\x00\x00", "zero_length"),
        ("ascii4", b"+120" + b"0" * 120, "bad_header"),
        ("ascii4", b"01_0" + b"0" * 10, "bad_header"),
    ],
)
async def test_bad_length_header_closes(
    autojump_clock: trio.testing.MockClock, header: HeaderKind, payload: bytes, kind: str
) -> None:
    async with connection(listener=replace(LISTENER, header=header)) as run:
        await run.network.send_raw(payload)
        await run.network.wait_closed()
    assert run.outcome == kind
    assert run.network.received == []


async def test_format_error_is_answered_and_the_connection_kept(
    autojump_clock: trio.testing.MockClock,
) -> None:
    good = auth("004242")
    bad = good.replace(codec.decode_fields(good)["4"].encode(), b"00000000ABCD", 1)
    async with connection() as run:
        await run.network.send(bad)
        (answer,) = await run.network.answers(1)
        await run.network.send(codec.encode(echo(stan="000002")))
        await run.network.answers(2)
        await run.network.end()
    assert (answer["0"], answer["11"], answer["39"]) == ("0110", "004242", "30")
    assert run.network.codes()["000002"] == "00"
    assert run.outcome == "eof"


async def test_every_code_comes_from_the_profile(autojump_clock: trio.testing.MockClock) -> None:
    odd = Profile(
        "odd",
        {
            **profile("iso").table,
            Reason.FORMAT_ERROR: "F1",
            Reason.INVALID_TRANSACTION: "T2",
            Reason.APPROVED: "A0",
            Reason.SYSTEM_ERROR: "S6",
        },
    )
    good = auth("000001")
    bad = good.replace(codec.decode_fields(good)["4"].encode(), b"00000000ABCD", 1)
    fields = codec.decode_fields(codec.encode(echo(stan="000002")))
    fields = {k: v for k, v in fields.items() if k.isdigit() and k not in ("0", "1")}
    async with connection(FakeEngine(raises=True), prof=odd) as run:
        await run.network.send(bad, raw({**fields, "t": "0600"}), auth("000003"))
        await run.network.send(codec.encode(echo(stan="000004")))
        await run.network.send(codec.encode(echo(stan="000005", code="999")))  # DE70 not served
        await run.network.answers(5)
        await run.network.end()
    assert run.network.codes() == {
        "000001": "F1",
        "000002": "T2",
        "000003": "S6",
        "000004": "A0",
        "000005": "T2",
    }


async def test_unsupported_request_gets_12_and_unsolicited_response_is_dropped(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fields = codec.decode_fields(codec.encode(echo(stan="000555")))
    fields = {k: v for k, v in fields.items() if k.isdigit() and k not in ("0", "1")}
    before = sample(
        "cardswitch_protocol_errors_total", listener="test", kind="unsolicited_response"
    )
    async with connection() as run:
        await run.network.send(
            raw({**fields, "t": "0810", "39": "00"}), raw({**fields, "t": "0600"})
        )
        (answer,) = await run.network.answers(1)
        await run.network.end()
        await run.network.wait_closed()
    assert (answer["0"], answer["11"], answer["39"]) == ("0610", "000555", "12")
    assert len(run.network.received) == 1
    after = sample("cardswitch_protocol_errors_total", listener="test", kind="unsolicited_response")
    assert after - before == 1


async def test_engine_raising_is_answered_96(autojump_clock: trio.testing.MockClock) -> None:
    before = sample("cardswitch_decisions_total", network="visa", reason="system_error")
    async with connection(FakeEngine(raises=True)) as run:
        await run.network.send(auth("000001"))
        (answer,) = await run.network.answers(1)
        await run.network.send(codec.encode(echo(stan="000002")))
        await run.network.answers(2)
        await run.network.end()
    assert answer["39"] == "96"
    assert run.outcome == "eof"
    assert sample("cardswitch_decisions_total", network="visa", reason="system_error") - before == 1


# ------------------------------------------------------------------------ close after bad input


@pytest.mark.parametrize(
    "garbage",
    [
        encode_frame(b"\xff\xfe not a message"),  # a frame whose body cannot be used
        b"\x00\x00",  # a framing error, in the same read as the 0100
    ],
    ids=["undecodable_body", "framing_error"],
)
async def test_answer_in_flight_is_written_before_a_close_for_bad_input(
    autojump_clock: trio.testing.MockClock, garbage: bytes
) -> None:
    """Regression: an approval journaled behind which garbage arrived was never sent."""
    engine = FakeEngine(delay=lambda _: 1.5)
    async with connection(engine) as run:
        await run.network.send_raw(encode_frame(auth("000001")) + garbage)
        await run.network.wait_closed()
    assert engine.seen == ["000001"]
    assert run.network.codes() == {"000001": "00"}
    (answer,) = run.network.received
    assert run.network.closed_at is not None
    assert answer.at == pytest.approx(1.5) and answer.at <= run.network.closed_at
    assert run.outcome in ("undecodable", "zero_length")


async def test_answer_that_cannot_be_finished_in_time_is_counted_undelivered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine(delay=lambda _: 60.0)
    before = sample("cardswitch_answers_undelivered_total", listener="test", kind="abandoned")
    with structlog.testing.capture_logs() as logs:
        async with connection(engine, linger=2.0) as run:
            await run.network.send_raw(encode_frame(auth("000001")) + b"\x00\x00")
            await run.network.wait_closed()
    assert run.network.received == []
    assert run.network.closed_at == pytest.approx(2.0)  # the linger deadline, not 60 s
    after = sample("cardswitch_answers_undelivered_total", listener="test", kind="abandoned")
    assert after - before == 1
    (lost,) = [e for e in logs if e["event"] == "answer_undelivered"]
    assert (lost["stan"], lost["masked_pan"]) == ("000001", mask_pan(PAN))


async def test_answers_to_a_peer_that_stopped_reading_are_counted_undelivered(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine(delay=lambda _: 1.0)
    before = sample("cardswitch_answers_undelivered_total", listener="test", kind="write_failed")
    ours, theirs = trio.testing.memory_stream_pair()
    conn = Connection(ours, Dispatcher(engine), LISTENER, profile("visa"), linger=LINGER)
    async with trio.open_nursery() as nursery:
        outcome: list[str] = []

        async def serve() -> None:
            outcome.append(await conn.run())

        nursery.start_soon(serve)
        await theirs.send_all(b"".join(encode_frame(auth(f"{i:06d}")) for i in (1, 2)))
        await theirs.receive_stream.aclose()  # the network's socket is gone for reading
    assert outcome == ["write_failed"]
    after = sample("cardswitch_answers_undelivered_total", listener="test", kind="write_failed")
    assert after - before == 2


async def _write_fails_after_first_answer(journal: FakeJournal) -> tuple[str, list[str]]:
    """0100 000001 answered and read, an echo answered, then the network stops reading and
    0100 000002 is decided: its write fails. Returns the outcome and the STANs answered."""
    engine = FakeEngine(journaled=True, delay=lambda r: 1.0 if r.stan == "000002" else 0.0)
    ours, theirs = trio.testing.memory_stream_pair()
    conn = Connection(ours, Dispatcher(engine, journal=journal), LISTENER, profile("visa"),
                      linger=LINGER)  # fmt: skip
    outcome: list[str] = []
    answered: list[str] = []
    decoder = FrameDecoder(LISTENER.header, 65535)

    async def serve() -> None:
        outcome.append(await conn.run())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        await theirs.send_all(encode_frame(auth("000001")) + encode_frame(codec.encode(echo(
            stan="000003"))))  # fmt: skip
        while len(answered) < 2:
            for frame in decoder.feed(bytes(await theirs.receive_some(65536))):
                answered.append(codec.decode_fields(frame)["11"])
        await theirs.receive_stream.aclose()  # the peer went away: writes to it fail
        await theirs.send_all(encode_frame(auth("000002")))
    return outcome[0], answered


async def test_an_answer_whose_write_fails_is_marked_on_its_journal_row(
    autojump_clock: trio.testing.MockClock,
) -> None:
    journal = FakeJournal()
    before = sample("cardswitch_delivery_marks_total", result="marked")
    with structlog.testing.capture_logs() as logs:
        outcome, answered = await _write_fails_after_first_answer(journal)
    assert outcome == "write_failed" and sorted(answered) == ["000001", "000003"]
    # Only the journaled answer that was not written; not the delivered one, not the echo.
    assert [(m.ref, m.reason) for m in journal.marks] == [(journal_ref("000002"), "write_failed")]
    assert sample("cardswitch_delivery_marks_total", result="marked") - before == 1
    (line,) = [e for e in logs if e["event"] == "delivery_marked"]
    assert (line["marked"], line["missing"], line["kinds"]) == (1, 0, ["write_failed"])
    assert PAN not in repr(logs)


@pytest.mark.parametrize("dead", ["hang", "fail"])
async def test_a_dead_journal_never_holds_the_connection_nor_raises(
    autojump_clock: trio.testing.MockClock, dead: str
) -> None:
    journal = FakeJournal(hang=dead == "hang", fail=dead == "fail")
    result = "timeout" if dead == "hang" else "failed"
    before = sample("cardswitch_delivery_marks_total", result=result)
    with structlog.testing.capture_logs() as logs:
        outcome, _ = await _write_fails_after_first_answer(journal)
    assert outcome == "write_failed" and journal.marks == []
    assert sample("cardswitch_delivery_marks_total", result=result) - before == 1
    (line,) = [e for e in logs if e["event"] == "delivery_mark_failed"]
    assert line["marks"] == 1


# ------------------------------------------------------------------------ drain


async def test_drain_finishes_the_requests_in_flight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    engine = FakeEngine(delay=seeded_delays(7, 0.5, 1.5))
    async with connection(engine) as run:
        await run.network.send(*(auth(f"{i:06d}") for i in range(1, 9)))
        await trio.sleep(0.1)
        run.connection.stop_reading()
        await run.network.send(auth("000099"))  # after the drain began: never read
        await run.network.wait_closed()
    assert run.outcome == "drained"
    assert sorted(run.network.codes()) == [f"{i:06d}" for i in range(1, 9)]
    assert "000099" not in engine.seen
    assert run.network.closed_at is not None and run.network.closed_at < 1.6


async def test_eof_with_requests_in_flight_still_answers_them(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connection(FakeEngine(delay=lambda _: 1.0)) as run:
        await run.network.send(auth("000001"), auth("000002"))
        await run.network.end()
        await run.network.wait_closed()
    assert run.outcome == "eof"
    assert run.network.codes() == {"000001": "00", "000002": "00"}


# ------------------------------------------------------------------------ log and metrics


async def test_log_line_and_metrics_come_from_the_decision(
    autojump_clock: trio.testing.MockClock,
) -> None:
    labels = {"network": "visa", "mti": "0100", "response_code": "91"}
    before = sample("cardswitch_requests_total", **labels)
    stand_in_before = sample("cardswitch_stand_in_total", network="visa", cause="budget")
    with structlog.testing.capture_logs() as logs:
        async with connection(FakeEngine(delay=lambda _: 0.25, stand_in="budget")) as run:
            await run.network.send(auth("000001"))
            await run.network.answers(1)
            await run.network.end()
    (line,) = [e for e in logs if e["event"] == "answered"]
    assert line["reason"] == "issuer_unavailable"
    assert line["stand_in_cause"] == "budget"
    assert line["response_code"] == "91"
    assert line["masked_pan"] == mask_pan(PAN)
    assert line["ms"] == pytest.approx(250.0)
    assert all(PAN not in str(v) for e in logs for v in e.values())
    assert sample("cardswitch_requests_total", **labels) - before == 1
    assert (
        sample("cardswitch_stand_in_total", network="visa", cause="budget") - stand_in_before == 1
    )


# ------------------------------------------------------------------------ keep-alive


@pytest.mark.parametrize(("header", "frame"), [("binary2", b"\x00\x00"), ("ascii4", b"0000")])
async def test_zero_length_frame_answered_with_one_when_the_listener_says_answer(
    autojump_clock: trio.testing.MockClock, header: HeaderKind, frame: bytes
) -> None:
    assert keepalive_frame(header) == frame
    lst = replace(LISTENER, header=header, zero_length_frames="answer")
    async with connection(listener=lst) as run:
        await run.network.send_raw(frame + encode_frame(codec.encode(echo(stan="000007")), header))
        (answer,) = await run.network.answers(1)
        await run.network.send_raw(frame * 3)
        await trio.sleep(1)
        await run.network.end()
        await run.network.wait_closed()
    assert run.outcome == "eof"
    assert len(run.network.keepalives) == 4
    assert (answer["0"], answer["11"], answer["39"]) == ("0810", "000007", "00")


async def test_zero_length_frame_ignored_when_the_listener_says_ignore(
    autojump_clock: trio.testing.MockClock,
) -> None:
    before = sample("cardswitch_protocol_errors_total", listener="test", kind="zero_length")
    async with connection(listener=replace(LISTENER, zero_length_frames="ignore")) as run:
        await run.network.send_raw(b"\x00\x00" * 2)
        await run.network.send(auth("000001"))
        await run.network.answers(1)
        await run.network.end()
        await run.network.wait_closed()
    assert run.outcome == "eof"
    assert run.network.keepalives == []
    assert run.network.codes() == {"000001": "00"}
    after = sample("cardswitch_protocol_errors_total", listener="test", kind="zero_length")
    assert after == before


async def test_keepalives_restart_the_idle_timer(autojump_clock: trio.testing.MockClock) -> None:
    lst = replace(LISTENER, idle_timeout=10.0, zero_length_frames="ignore")
    async with connection(listener=lst) as run:
        start = trio.current_time()
        for _ in range(5):  # 30 s of keep-alives, each within the 10 s idle timeout
            await trio.sleep(6)
            await run.network.send_raw(b"\x00\x00")
        last = trio.current_time()
        await run.network.wait_closed()
    assert run.outcome == "idle_timeout"
    assert run.network.closed_at is not None
    assert run.network.closed_at - start > 30
    assert run.network.closed_at == pytest.approx(last + 10.0)


def reencode(fields: dict[str, str]) -> bytes:
    """The frame body of fields as ``codec.decode_fields`` gives them ("0" is the MTI)."""
    return raw({("t" if k == "0" else k): v for k, v in fields.items()})


async def _next_echo(run: Run, seen: int) -> tuple[float, dict[str, str]]:
    """The next 0800 the switch sends (after the ``seen`` frames already received)."""
    await run.network.answers(seen + 1)
    got = run.network.received[seen]
    return got.at, got.fields


async def test_switch_echoes_an_idle_link_and_an_answer_keeps_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lst = replace(LISTENER, idle_echo_after=30.0, echo_timeout=5.0)
    async with connection(listener=lst) as run:
        start = trio.current_time()
        at, first = await _next_echo(run, 0)
        assert at == pytest.approx(start + 30.0)
        assert (first["0"], first["70"]) == ("0800", "301")
        assert len(first["7"]) == 10 and first["7"].isdigit()
        request = codec.decode(reencode(first))
        assert isinstance(request, NetworkRequest)
        await trio.sleep(1)
        await run.network.send(codec.encode(NetworkResponse.answer(request)))
        answered = trio.current_time()
        at, second = await _next_echo(run, 1)
        assert at == pytest.approx(answered + 30.0)
        assert second["11"] != first["11"]  # each echo has a STAN of its own
        await run.network.end()
        await run.network.wait_closed()
    assert run.outcome == "eof"


async def test_traffic_postpones_the_echo(autojump_clock: trio.testing.MockClock) -> None:
    lst = replace(LISTENER, idle_echo_after=30.0, echo_timeout=5.0)
    async with connection(listener=lst) as run:
        for i in range(3):
            await trio.sleep(20)
            await run.network.send(auth(f"{i + 1:06d}"))
            await run.network.answers(i + 1)
        last = trio.current_time()
        at, frame = await _next_echo(run, 3)
        await run.network.end()
    assert frame["0"] == "0800"
    assert at == pytest.approx(last + 30.0)


async def test_unanswered_echo_closes_the_link(autojump_clock: trio.testing.MockClock) -> None:
    before = sample("cardswitch_protocol_errors_total", listener="test", kind="echo_timeout")
    lst = replace(LISTENER, idle_echo_after=30.0, echo_timeout=5.0)
    async with connection(listener=lst) as run:
        at, frame = await _next_echo(run, 0)
        # An 0810 of another STAN is not the answer (it is an unsolicited response).
        wrong = dict(frame, **{"0": "0810", "11": f"{int(frame['11']) % 999999 + 1:06d}"})
        wrong["39"] = "00"
        await run.network.send(reencode(wrong))
        await run.network.wait_closed()
    assert run.outcome == "echo_timeout"
    assert run.network.closed_at == pytest.approx(at + 5.0)
    after = sample("cardswitch_protocol_errors_total", listener="test", kind="echo_timeout")
    assert after - before == 1


async def test_echo_off_by_default_leaves_idle_links_to_the_idle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connection(listener=replace(LISTENER, idle_timeout=100.0)) as run:
        await run.network.wait_closed()
    assert run.outcome == "idle_timeout"
    assert run.network.received == []
