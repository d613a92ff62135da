"""One connection of a card network: reader, request tasks and a single writer over a stream.

What lives here: ``Connection``, which runs over any ``trio.abc.Stream`` (a TLS stream from
the listener in production, one end of ``trio.testing.memory_stream_pair()`` in tests):

- the reader closes the link when no complete frame has arrived for the listener's idle
  timeout (every complete frame, whatever it is, keep-alives included, restarts that timer);
- keep-alive: a zero-length frame the listener accepts is answered with one or ignored
  (``Session`` says which); after ``idle_echo_after`` seconds without a complete frame the
  connection sends its own echo test (0800 DE70 301, a STAN of its own, DE7 now) and closes
  the link (``echo_timeout``: logged and counted) unless the 0810 with that STAN arrives
  within ``echo_timeout`` seconds, whatever else arrives meanwhile (a link that cannot
  answer network management is not a working link). That 0810, which the session reports
  as an unsolicited response, is taken as the answer instead of being dropped;
- the reader feeds the bytes it receives to the sans-IO ``Session`` under a per-frame
  deadline (the clock starts at a frame's first byte, so a body dripped slowly is cut off
  however steady the drip) and acts on what the session returns: a request to decide is
  timestamped when its last byte arrived, its ``RequestContext`` resolved then (the ZPK in
  force in the listener's session then is the one it is verified with), and queued for
  admission; a format error's answer
  is queued as it is; a dropped frame is logged and counted; a ``Close`` stops reading;
- admission (load shedding): the reader reads eagerly, whatever the load, so a request's
  budget counts from when its bytes arrived, not from when a slot freed up. A request waits
  in a per-connection queue of complete frames (``listener.max_queued``) for a slot on this
  connection and in the switch, in arrival order; it is answered AT ONCE with the profile's
  code for ``SYSTEM_OVERLOAD`` (stand-in cause "overload", nothing decided or kept) when the
  queue is full on arrival, when the slots' recent service times forecast that behind the
  queue it would start too late or finish after its budget (``admission.WaitForecast``, on
  arrival too), or when it cannot start within ``server.max_queue_wait`` of its arrival
  while at least ``min_remaining`` of its budget is left (then at that instant, never
  later). Reading pauses only when answers cannot be written (the outbox is full: the peer
  does not read), which bounds memory to ``max_queued`` waiting frames plus the outbox;
- what the handler can decide on the spot (``decide_now``: an echo test, a sign-on) is
  answered by the reader itself, without a task or an admission slot; request tasks call the
  ``RequestHandler`` for the rest and queue the encoded answer of the ``Decision`` it
  returns; answers leave in the order they are ready (networks match them by STAN/RRN);
- one writer sends every queued answer ready at that moment in one ``send_all`` and, once an
  answer has been handed to the transport, writes its log line and metrics from the
  ``Decision`` (response code, reason, stand-in cause, masked PAN).

However the reader stops (end of stream, bad input, a drain), the requests already read are
still decided and their answers written while the stream is writable, within the linger
deadline; then the stream is closed. An answer that cannot be delivered (the write failed,
the deadline passed first) is logged and counted as undelivered, never silently lost, and
when its request was journaled (``Decision.journal``) its journal row is marked undelivered
through the handler (``RequestHandler.mark_undelivered``) by a task of its own: the marks
ready at once go in one call bounded by ``_MARK_TIMEOUT`` (a dead store never holds the
connection up, and the marks left at the close are still made, after the stream is closed);
each mark's result is counted (``cardswitch_delivery_marks_total``), and a mark that fails is
logged, never raised.

What does not: accepting, TLS and the peer allow-list (server.py), what a frame means and
which response code answers it (session.py, decisions.py), the decision (handler.py).
"""

from __future__ import annotations

import contextlib
import math
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import trio

from hsm.pan import mask_pan
from switch import metrics
from switch.acquirer import echo
from switch.admission import WaitForecast
from switch.config import ListenerConfig
from switch.decisions import Profile, Reason
from switch.handler import ECHO, Decision, Request, RequestContext, RequestHandler, Response
from switch.keys import ListenerSession
from switch.log import get_logger
from switch.session import (
    UNSOLICITED_RESPONSE,
    Answer,
    Close,
    Decide,
    Drop,
    KeepAlive,
    Session,
    keepalive_of,
)
from switch.store.models import DeliveryMark, JournalRef
from switch.wire import codec
from switch.wire.framing import encode_frame
from switch.wire.messages import (
    AuthRequest,
    AuthResponse,
    NetworkRequest,
    NetworkResponse,
    ReversalRequest,
    ReversalResponse,
    response_mti,
)

__all__ = ["Connection", "describe"]

log = get_logger("switch.connection")

#: Bytes asked of the stream per read; frames are at most a few KiB.
_RECEIVE_SIZE = 65536
#: Seconds a graceful close of the stream (TLS close_notify) may take before it is dropped.
_CLOSE_TIMEOUT = 1.0
#: What ``_decide_now`` returns when the handler raised (not a decision, not "later").
_HANDLER_FAILED: Final = object()
#: Close kind (and metric label) of a link whose echo test went unanswered.
ECHO_TIMEOUT: Final = "echo_timeout"
#: Seconds one call marking undelivered answers on their journal rows may take.
_MARK_TIMEOUT = 1.0
#: STANs (DE11) are six digits, 000001 to 999999.
_STAN_MODULUS: Final = 999_999


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What the log line and metrics of one answer say; bounded values and a masked PAN."""

    mti: str
    stan: str | None
    response_code: str | None
    #: None when the request was abandoned before it was decided.
    reason: Reason | None
    received_at: float
    stand_in: str | None = None
    replayed: bool = False
    masked_pan: str | None = None
    #: For an answer to a format error: the field at fault and what was wrong.
    field: str | None = None
    detail: str | None = None
    #: The journal row of the answer, marked if it cannot be delivered.
    journal: JournalRef | None = None

    @classmethod
    def of_decision(cls, request: Request, decision: Decision, received_at: float) -> _Outcome:
        return cls(
            mti=request.mti,
            stan=request.stan,
            response_code=decision.response_code,
            reason=decision.reason,
            received_at=received_at,
            stand_in=decision.stand_in,
            replayed=decision.replayed,
            masked_pan=decision.masked_pan,
            journal=decision.journal,
        )

    @classmethod
    def of_answer(cls, answer: Answer, received_at: float) -> _Outcome:
        return cls(
            mti=answer.mti,
            stan=answer.stan,
            response_code=answer.response_code,
            reason=answer.reason,
            received_at=received_at,
            field=answer.field,
            detail=answer.detail,
        )


@dataclass(frozen=True, slots=True)
class _Waiting:
    """A complete request read and not yet started: its message and its context (arrival
    time, ZPK in force when it was read)."""

    message: Request
    ctx: RequestContext

    @property
    def received_at(self) -> float:
        return self.ctx.received_at


@dataclass(frozen=True, slots=True)
class _Outgoing:
    """A framed answer queued for the writer, and what to log once it is written (None for
    what the connection sends of its own: keep-alives and echo tests)."""

    data: bytes
    outcome: _Outcome | None


class Connection:
    """Serve one connection until its peer goes, its input goes bad, or it is drained.

    Args:
        stream: the connection's byte stream; ``run`` closes it before returning.
        handler: decides every request the session hands over.
        listener: framing, spec, limits and deadlines of the listener that accepted it.
        profile: the listener's network profile (every response code comes from it).
        linger: seconds allowed, once reading has stopped, to finish the requests already
            read and write their answers (the switch's drain timeout).
        global_slots: requests in flight across the switch; None for no global bound.
        peer: verified identities of the peer certificate (passed to the handler).
        remote: the peer address, for logs.
        session: the listener's session state (ZPK in force, sign-on), shared by the
            listener's connections; a fresh one of ``listener`` when not given.
        budget: seconds from a request's arrival to its answer (the profile's budget, else
            ``pipeline.budget``: ``Profile.budget_or``); infinite (the default) sheds only
            when the admission queue is full.
        min_remaining: seconds of its budget a request must have left to be started
            (``pipeline.min_remaining``); with less it is answered with the overload code.
        max_queue_wait: seconds a request may wait for a slot (``server.max_queue_wait``);
            longer, it is answered with the overload code.
        forecast: the waiting requests and slot times of the pool the requests wait for,
            shared by the connections of one switch; when not given, a forecast of this
            connection's own slots.
    """

    def __init__(
        self,
        stream: trio.abc.Stream,
        handler: RequestHandler,
        listener: ListenerConfig,
        profile: Profile,
        *,
        linger: float,
        global_slots: trio.Semaphore | None = None,
        forecast: WaitForecast | None = None,
        peer: frozenset[str] = frozenset(),
        remote: str = "?",
        session: ListenerSession | None = None,
        budget: float = math.inf,
        min_remaining: float = 0.0,
        max_queue_wait: float = math.inf,
    ) -> None:
        self._stream = stream
        self._handler = handler
        self._listener = listener
        self._profile = profile
        self._linger = linger
        self._global_slots = global_slots
        self._slots = trio.Semaphore(listener.max_in_flight)
        #: Waiting requests and slot times of the pool this connection's requests wait for.
        self._forecast = forecast if forecast is not None else WaitForecast(listener.max_in_flight)
        self._peer = peer
        self._remote = remote
        self._session = Session(listener, profile)
        self._keepalive = keepalive_of(listener, profile)
        self._state = session if session is not None else ListenerSession(listener)
        #: STAN of the next echo test this connection sends, and of the one awaiting its 0810.
        self._next_stan = secrets.randbelow(_STAN_MODULUS)
        self._echo_stan: str | None = None
        self._echo_sent_at = -math.inf
        self._budget = budget
        self._min_remaining = min_remaining
        self._max_queue_wait = max_queue_wait
        # Complete frames waiting for a slot, oldest first (admission, see the docstring);
        # bounded by ``_waiting`` against ``listener.max_queued``, not by the channel.
        self._waiting_send, self._waiting_recv = trio.open_memory_channel[_Waiting](math.inf)
        self._waiting = 0
        # Bounded: when the peer stops reading, request tasks wait here holding their slots,
        # and the reader stops taking new requests.
        self._outbox_send, self._outbox_recv = trio.open_memory_channel[_Outgoing](
            listener.max_in_flight
        )
        self._reader_scope = trio.CancelScope()
        #: Around the request tasks: cancelled by ``abort`` (a drain cut short).
        self._requests_scope = trio.CancelScope()
        #: The writer's scope once ``run`` has started, and the deadline ``abort`` gives it.
        self._writer_scope: trio.CancelScope | None = None
        self._flush_deadline = math.inf
        self._write_failed = False
        self._outcome: str | None = None
        # Undelivered answers whose journal row is to be marked (``_mark_loop``); unbounded,
        # as each item is an answer already decided and counted (at most what was read).
        self._marks_send, self._marks_recv = trio.open_memory_channel[DeliveryMark](math.inf)

    def stop_reading(self) -> None:
        """Drain: read no more frames; the requests already read are answered."""
        self._set_outcome("drained")
        self._reader_scope.cancel()

    def abort(self, flush: float) -> None:
        """End the drain early: read no more, abandon the requests not yet answered (each is
        logged and counted as undelivered), and write the answers already queued within
        ``flush`` seconds."""
        self.stop_reading()
        self._flush_deadline = min(self._flush_deadline, trio.current_time() + flush)
        self._requests_scope.cancel()
        if self._writer_scope is not None:
            self._writer_scope.deadline = min(self._writer_scope.deadline, self._flush_deadline)

    async def run(self) -> str:
        """Serve until the connection ends; returns how it ended (a short metric label).

        ``"eof"`` (the peer closed), ``"drained"``, ``"broken"`` (a read failed),
        ``"write_failed"``, ``"frame_timeout"``, ``"idle_timeout"``, ``"echo_timeout"``, or
        the ``Close`` kind of the bad input.
        """
        async with trio.open_nursery() as marking:
            marking.start_soon(self._mark_loop)
            try:
                await self._serve()
            finally:
                self._marks_send.close()  # the marks of this connection are all queued
        return self._outcome or "closed"

    async def _serve(self) -> None:
        """Read, decide and write until the connection ends, then close the stream."""
        deadline = math.inf
        try:
            async with trio.open_nursery() as conn_nursery:
                self._writer_scope = conn_nursery.cancel_scope
                conn_nursery.start_soon(self._write_loop)
                try:
                    with self._requests_scope:
                        async with trio.open_nursery() as requests:
                            requests.start_soon(self._admission_loop, requests)
                            try:
                                with self._reader_scope:
                                    self._set_outcome(await self._read_loop(requests))
                            finally:
                                self._waiting_send.close()  # admission drains what was read
                            # Reading has stopped; what was read is still decided and answered.
                            deadline = trio.current_time() + self._linger
                            requests.cancel_scope.deadline = deadline
                finally:
                    self._outbox_send.close()
                conn_nursery.cancel_scope.deadline = min(deadline, self._flush_deadline)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
                await _aclose_quietly(self._stream)

    def _set_outcome(self, kind: str) -> None:
        if self._outcome is None:
            self._outcome = kind

    # ------------------------------------------------------------------------- reader

    async def _read_loop(self, requests: trio.Nursery) -> str:
        """Read and act on frames until the stream ends or must be closed; returns why."""
        lst = self._listener
        frame_deadline = math.inf
        last_frame = trio.current_time()
        idle_deadline = self._idle_deadline_after(last_frame)
        #: When to send an echo test, and when the one sent must have been answered.
        echo_at = self._echo_at(last_frame)
        echo_deadline = math.inf
        while True:
            wake = min(frame_deadline, idle_deadline, echo_at, echo_deadline)
            with trio.move_on_at(wake) as frame_scope:
                try:
                    data = await self._stream.receive_some(_RECEIVE_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    log.info("read_failed", listener=lst.name, remote=self._remote,
                             error=describe(exc.__cause__ or exc))  # fmt: skip
                    return "broken"
            if frame_scope.cancelled_caught:
                now = trio.current_time()
                if now >= frame_deadline:
                    self._protocol_error(Close("frame_timeout", "frame slower than its deadline"))
                    return "frame_timeout"
                if now >= echo_deadline:
                    self._protocol_error(Close(ECHO_TIMEOUT, "echo test not answered in time"))
                    return ECHO_TIMEOUT
                if now >= idle_deadline:
                    metrics.observe_limit(lst.name, "idle_timeout")
                    log.warning("idle_timeout", listener=lst.name, remote=self._remote,
                                seconds=lst.idle_timeout)  # fmt: skip
                    return "idle_timeout"
                # The link has been quiet for idle_echo_after: ask the network if it is there.
                echo_at = math.inf
                if self._send_echo():
                    echo_deadline = now + self._keepalive.echo_timeout
                else:  # answers are still queued for the peer: the link is not idle
                    echo_at = self._echo_at(now)
                continue
            if not data:
                close = self._session.end_of_stream()
                if close is not None:
                    self._protocol_error(close)
                    return close.kind
                return "eof"
            received_at = trio.current_time()
            actions = self._session.receive(bytes(data))
            if actions:  # each action is one complete frame: the link is alive
                idle_deadline = self._idle_deadline_after(received_at)
                if self._echo_stan is None:
                    echo_at = self._echo_at(received_at)
            for action in actions:
                if isinstance(action, Decide):
                    # Resolved now, in stream order: a key change read later does not apply.
                    ctx = RequestContext(lst, self._profile, self._peer, received_at,
                                         zpk=self._state.zpk, session=self._state)  # fmt: skip
                    # Admission: start now if nothing waits and slots are free; else queue
                    # behind the others, or answer at once when the queue is full. What waits
                    # for nothing (an echo test) is answered here, without a task or a slot.
                    immediate = self._decide_now(action.message, ctx)
                    if immediate is _HANDLER_FAILED:
                        pass  # logged and counted; nothing to answer, as from a task
                    elif isinstance(immediate, Decision):
                        await self._send(action.message, immediate, received_at)
                    elif self._waiting == 0 and self._try_slots():
                        requests.start_soon(self._request, action.message, ctx, received_at)
                    elif self._waiting >= lst.max_queued:
                        await self._shed(action.message, received_at, "queue_full")
                    elif self._forecast.too_late(
                        received_at,
                        start_by=self._start_by(received_at),
                        deadline=received_at + self._budget,
                    ):
                        await self._shed(action.message, received_at, "forecast")
                    else:
                        self._waiting += 1
                        self._forecast.queued()
                        self._waiting_send.send_nowait(_Waiting(action.message, ctx))
                elif isinstance(action, Answer):
                    metrics.observe_protocol_error(lst.name, "format_error")
                    framed = self._session.frame(action.body)
                    await self._queue(_Outgoing(framed, _Outcome.of_answer(action, received_at)))
                elif isinstance(action, KeepAlive):
                    if action.answer:
                        await self._queue(_Outgoing(self._session.keepalive(), None))
                elif isinstance(action, Drop):
                    if self._is_echo_answer(action):
                        ms = round((received_at - self._echo_sent_at) * 1000, 3)
                        log.info("echo_answered", listener=lst.name, remote=self._remote,
                                 stan=action.stan, ms=ms)  # fmt: skip
                        self._echo_stan, echo_deadline = None, math.inf
                        echo_at = self._echo_at(received_at)
                        continue
                    metrics.observe_protocol_error(lst.name, action.kind)
                    log.warning("message_dropped", listener=lst.name, remote=self._remote,
                                kind=action.kind, mti=action.mti, stan=action.stan)  # fmt: skip
                else:
                    self._protocol_error(action)
                    return action.kind
            if not self._session.in_progress:
                frame_deadline = math.inf
            elif actions or frame_deadline == math.inf:
                # A new frame began in this read: its deadline starts now.
                frame_deadline = trio.current_time() + lst.frame_timeout

    def _idle_deadline_after(self, now: float) -> float:
        """When the link counts as idle if no complete frame arrives after ``now``."""
        idle = self._listener.idle_timeout
        return now + idle if idle > 0 else math.inf

    def _echo_at(self, now: float) -> float:
        """When to send an echo test if no complete frame arrives after ``now``."""
        after = self._keepalive.idle_echo_after
        return now + after if after > 0 else math.inf

    def _send_echo(self) -> bool:
        """Queue an echo test of our own (unless answers are waiting); True when queued."""
        self._next_stan = self._next_stan % _STAN_MODULUS + 1
        stan = f"{self._next_stan:06d}"
        data = encode_frame(codec.encode(echo(stan, ECHO), self._listener.spec),
                            self._listener.header)  # fmt: skip
        try:
            self._outbox_send.send_nowait(_Outgoing(data, None))
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            return False
        self._echo_stan, self._echo_sent_at = stan, trio.current_time()
        log.info("echo_sent", listener=self._listener.name, remote=self._remote, stan=stan)
        return True

    def _is_echo_answer(self, drop: Drop) -> bool:
        """Whether a dropped response is the 0810 of the echo test awaiting its answer."""
        return (
            self._echo_stan is not None
            and drop.kind == UNSOLICITED_RESPONSE
            and drop.mti == response_mti("0800")
            and drop.stan == self._echo_stan
        )

    def _protocol_error(self, close: Close) -> None:
        metrics.observe_protocol_error(self._listener.name, close.kind)
        log.warning("connection_input_rejected", listener=self._listener.name,
                    remote=self._remote, kind=close.kind, detail=close.detail)  # fmt: skip

    # ------------------------------------------------------------------------- admission

    async def _admission_loop(self, requests: trio.Nursery) -> None:
        """Start the waiting requests in arrival order as slots free up; answer at once with
        the overload code those that cannot start by ``_start_by`` (within the queue wait,
        with ``min_remaining`` of their budget left). Ends when the reader has stopped and
        the queue is empty; requests still waiting when it is cancelled (a drain cut short)
        are counted as abandoned."""
        #: The request taken from the queue and not yet started or answered.
        current: _Waiting | None = None
        try:
            async for first in self._waiting_recv:
                current = first
                # Every waiting request whose slots are free now starts in this one turn of
                # the loop: a checkpoint per request would let one connection start at most
                # one request per turn of a busy run queue, leaving slots idle while
                # requests wait (and the wait forecast, from slot times, too optimistic).
                while current is not None:
                    start_by = self._start_by(current.received_at)
                    if self._try_slots():
                        started = True
                    elif trio.current_time() >= start_by:
                        started = False
                    else:
                        started = await self._acquire_slots(start_by)
                    item, current = current, None
                    self._waiting -= 1
                    self._forecast.dequeued()
                    if started:
                        now = trio.current_time()
                        requests.start_soon(self._request, item.message, item.ctx, now)
                    else:
                        await self._shed(item.message, item.received_at, "deadline")
                    with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                        current = self._waiting_recv.receive_nowait()
        finally:
            if current is not None:  # cancelled while it waited for its slots
                self._forecast.dequeued()
                self._undelivered(_abandoned(current.message, current.received_at), "abandoned")
            with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                while True:
                    left = self._waiting_recv.receive_nowait()
                    self._forecast.dequeued()
                    self._undelivered(_abandoned(left.message, left.received_at), "abandoned")
            self._waiting_recv.close()

    def _start_by(self, received_at: float) -> float:
        """The latest instant a request read at ``received_at`` may start."""
        wait = min(self._budget - self._min_remaining, self._max_queue_wait)
        return received_at + wait

    def _try_slots(self) -> bool:
        """Take a slot on this connection and one in the switch if both are free now."""
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            return False
        if self._global_slots is not None:
            try:
                self._global_slots.acquire_nowait()
            except trio.WouldBlock:
                self._slots.release()
                return False
        return True

    async def _acquire_slots(self, start_by: float) -> bool:
        """Take a slot on this connection and one in the switch before ``start_by``; False
        (holding neither) when that is not possible in time."""
        local = False
        try:
            with trio.move_on_at(start_by):
                await self._slots.acquire()
                local = True
                if self._global_slots is not None:
                    await self._global_slots.acquire()
                return True
        except BaseException:
            if local:
                self._slots.release()
            raise
        if local:
            self._slots.release()
        return False

    async def _shed(self, message: Request, received_at: float, why: str) -> None:
        """Answer ``message`` now with the overload code: nothing is decided or kept."""
        metrics.observe_shed(self._listener.name, why)
        code = self._profile.code(Reason.SYSTEM_OVERLOAD)
        response: Response | None
        if isinstance(message, AuthRequest):
            response = AuthResponse.answer(message, code)
        elif isinstance(message, ReversalRequest):
            response = ReversalResponse.answer(message, code)
        elif isinstance(message, NetworkRequest):
            response = NetworkResponse.answer(message, code)
        else:
            response = message.answer(code)
        pan = message.pan if isinstance(message, AuthRequest | ReversalRequest) else None
        if response is None:  # nothing to answer (a response-class message)
            return
        decision = Decision(
            response,
            Reason.SYSTEM_OVERLOAD,
            stand_in="overload",
            masked_pan=mask_pan(pan) if pan else None,
        )
        outcome = _Outcome.of_decision(message, decision, received_at)
        try:
            body = codec.encode(response, self._listener.spec)
            data = encode_frame(body, self._listener.header)
        except ValueError as exc:
            self._undelivered(outcome, "encode_failed", error=describe(exc))
            return
        await self._queue(_Outgoing(data, outcome))

    # ------------------------------------------------------------------------- requests

    async def _request(self, message: Request, ctx: RequestContext, slotted: float) -> None:
        """Decide one request (its slots taken at ``slotted``) and queue its answer; every
        way out is accounted for."""
        metrics.IN_FLIGHT.inc()
        accounted = False
        received_at = ctx.received_at
        decision: Decision | None = None
        try:
            try:
                decision = await self._handler.handle(message, ctx)
            except Exception as exc:
                # A defect of the handler itself (the dispatcher answers engine failures).
                accounted = True
                self._handler_failed(message, exc)
                return
            accounted = await self._send(message, decision, received_at)
        finally:
            if not accounted:  # cancelled: the deadline passed before it was queued
                lost = (
                    _abandoned(message, received_at)
                    if decision is None
                    else _Outcome.of_decision(message, decision, received_at)
                )
                self._undelivered(lost, "abandoned")
            metrics.IN_FLIGHT.dec()
            # From the slots' taking, not the task's start: the slots are held (and no other
            # request can start) while the new task waits for its turn on a busy loop.
            self._forecast.finished(trio.current_time() - slotted)
            if self._global_slots is not None:
                self._global_slots.release()
            self._slots.release()

    def _decide_now(self, message: Request, ctx: RequestContext) -> Decision | object | None:
        """The handler's decision made on the spot, ``None`` (to be decided in a task), or
        ``_HANDLER_FAILED`` (a defect of the handler, logged and counted)."""
        try:
            return self._handler.decide_now(message, ctx)
        except Exception as exc:
            self._handler_failed(message, exc)
            return _HANDLER_FAILED

    def _handler_failed(self, message: Request, exc: Exception) -> None:
        metrics.observe_protocol_error(self._listener.name, "internal_error")
        log.error("request_failed", listener=self._listener.name, mti=message.mti,
                  stan=message.stan, error=describe(exc), exc_info=exc)  # fmt: skip

    async def _send(self, message: Request, decision: Decision | None, received_at: float) -> bool:
        """Encode and queue the answer of ``decision`` (or log that there is none); True once
        the answer is queued or accounted for (a cancellation propagates before that)."""
        if decision is None:
            log.info("not_answered", listener=self._listener.name, mti=message.mti,
                     stan=message.stan)  # fmt: skip
            return True
        outcome = _Outcome.of_decision(message, decision, received_at)
        try:
            body = codec.encode(decision.response, self._session.spec)
            data = self._session.frame(body)
        except ValueError as exc:
            self._undelivered(outcome, "encode_failed", error=describe(exc))
            return True
        await self._queue(_Outgoing(data, outcome))
        return True

    async def _queue(self, item: _Outgoing) -> None:
        """Hand ``item`` to the writer, or account for it when nothing can be written."""
        if self._write_failed:
            self._undelivered(item.outcome, "write_failed")
            return
        try:
            # Without a checkpoint when the outbox has room: the reader queues the answers
            # it makes itself (sheds, echoes, format errors) for a whole read at once, rather
            # than one per turn of the run queue behind every request task (at 2x capacity
            # that left frames read but unanswered for a second).
            try:
                self._outbox_send.send_nowait(item)
            except trio.WouldBlock:
                await self._outbox_send.send(item)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._undelivered(item.outcome, "write_failed")

    # ------------------------------------------------------------------------- writer

    async def _write_loop(self) -> None:
        """Send every answer ready in one write; exits when the outbox closes or a write fails."""
        batch: list[_Outgoing] = []
        try:
            async for first in self._outbox_recv:
                batch = [first]
                while True:
                    try:
                        batch.append(self._outbox_recv.receive_nowait())
                    except (trio.WouldBlock, trio.EndOfChannel):
                        break
                try:
                    await self._stream.send_all(b"".join(item.data for item in batch))
                except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                    log.warning("write_failed", listener=self._listener.name,
                                remote=self._remote, unsent=len(batch),
                                error=describe(exc.__cause__ or exc))  # fmt: skip
                    self._write_failed = True
                    self._set_outcome("write_failed")
                    self._reader_scope.cancel()  # nothing read now could be answered
                    for item in batch:
                        self._undelivered(item.outcome, "write_failed")
                    batch = []
                    return
                done = trio.current_time()
                for item in batch:
                    if item.outcome is not None:
                        self._answered(item.outcome, done)
                batch = []
        finally:
            # Cancelled at the deadline during a write, or with answers still queued.
            for item in batch:
                self._undelivered(item.outcome, "deadline")
            with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                while True:
                    self._undelivered(self._outbox_recv.receive_nowait().outcome, "deadline")
            self._outbox_recv.close()

    # ------------------------------------------------------------------------- accounting

    def _answered(self, outcome: _Outcome, done: float) -> None:
        seconds = max(0.0, done - outcome.received_at)
        lst = self._listener
        code, reason = outcome.response_code or "", _reason(outcome)
        metrics.observe_answer(
            lst.network,
            outcome.mti,
            response_code=code,
            reason=reason,
            seconds=seconds,
            stand_in=outcome.stand_in,
        )
        emit = log.warning if outcome.reason is Reason.FORMAT_ERROR else log.info
        extra = {"field": outcome.field, "detail": outcome.detail} if outcome.detail else {}
        emit(
            "answered",
            listener=lst.name,
            network=lst.network,
            mti=outcome.mti,
            stan=outcome.stan,
            response_code=code,
            reason=reason,
            stand_in_cause=outcome.stand_in,
            replayed=outcome.replayed or None,
            masked_pan=outcome.masked_pan,
            ms=round(seconds * 1000, 3),
            **extra,
        )

    def _undelivered(
        self, outcome: _Outcome | None, kind: str, *, error: str | None = None
    ) -> None:
        if outcome is None:  # a keep-alive or echo test of ours: nobody waits for it
            return
        metrics.observe_undelivered(self._listener.name, kind)
        log.error(
            "answer_undelivered",
            listener=self._listener.name,
            remote=self._remote,
            kind=kind,
            mti=outcome.mti,
            stan=outcome.stan,
            response_code=outcome.response_code,
            reason=_reason(outcome),
            masked_pan=outcome.masked_pan,
            error=error,
        )
        if outcome.journal is not None:
            at = datetime.now(UTC).isoformat(timespec="microseconds")
            with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
                self._marks_send.send_nowait(DeliveryMark(outcome.journal, kind, at))

    async def _mark_loop(self) -> None:
        """Mark the journal rows of undelivered answers as they come, those ready at once in
        one call; when cancelled, the marks still queued are made (shielded, bounded)."""
        marks: list[DeliveryMark] = []
        try:
            async for first in self._marks_recv:
                marks = [first]
                with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
                    while True:
                        marks.append(self._marks_recv.receive_nowait())
                await self._mark(marks)
                marks = []
        finally:
            with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                while True:
                    marks.append(self._marks_recv.receive_nowait())
            if marks:
                await self._mark(marks)
            self._marks_recv.close()

    async def _mark(self, marks: list[DeliveryMark]) -> None:
        """One call marking ``marks``, within ``_MARK_TIMEOUT``; never raises."""
        lst = self._listener
        marked: int | None = 0
        with trio.CancelScope(shield=True):
            deadline = trio.current_time() + _MARK_TIMEOUT
            with trio.move_on_at(deadline) as scope:
                try:
                    marked = await self._handler.mark_undelivered(marks, deadline=deadline)
                except Exception as exc:  # StoreError, or a defect of the handler
                    metrics.observe_delivery_marks("failed", len(marks))
                    log.error("delivery_mark_failed", listener=lst.name, remote=self._remote,
                              marks=len(marks), error=describe(exc))  # fmt: skip
                    return
        if scope.cancelled_caught:
            metrics.observe_delivery_marks("timeout", len(marks))
            log.error("delivery_mark_failed", listener=lst.name, remote=self._remote,
                      marks=len(marks), error=f"not done within {_MARK_TIMEOUT} s")  # fmt: skip
            return
        if marked is None:
            metrics.observe_delivery_marks("no_journal", len(marks))
            return
        metrics.observe_delivery_marks("marked", marked)
        metrics.observe_delivery_marks("missing", len(marks) - marked)
        kinds = sorted({m.reason for m in marks})
        log.warning("delivery_marked", listener=lst.name, remote=self._remote, marked=marked,
                    missing=len(marks) - marked, kinds=kinds)  # fmt: skip


def _abandoned(message: Request, received_at: float) -> _Outcome:
    """The outcome of a request cancelled before it was answered (its decision is unknown)."""
    pan = message.pan if isinstance(message, AuthRequest) else None
    return _Outcome(
        mti=message.mti,
        stan=message.stan,
        response_code=None,
        reason=None,
        received_at=received_at,
        masked_pan=mask_pan(pan) if pan else None,
    )


def _reason(outcome: _Outcome) -> str:
    return outcome.reason.value if outcome.reason is not None else "undecided"


def describe(exc: BaseException) -> str:
    """A log-safe one-liner for an exception (the log processor scrubs it again)."""
    return f"{type(exc).__name__}: {exc}"


async def _aclose_quietly(stream: trio.abc.AsyncResource) -> None:
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await stream.aclose()
