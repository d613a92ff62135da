"""The boundary between the server and the decision engine.

What lives here: what the server hands over for every decodable request (the message and a
``RequestContext``: which listener and network profile, who the peer is, when the bytes
arrived, the ZPK in force when it was read and the listener's mutable session) and what
comes back (a ``Decision``: the response to send, the ``Reason`` that decided it, the
stand-in cause if the engine could not decide, and the money it moved). The server logs
and meters a request from its ``Decision`` alone.

Also ``Dispatcher``, the ``RequestHandler`` the server calls. It answers network management
itself: echo; sign-on and sign-off, which change the listener session's state; key
exchange, which imports the new ZPK under the listener's ZMK (``switch.keys``). It passes
authorizations and reversals to an ``Engine`` (the pipeline), or, after a sign-off on a
listener that says so, declines them with ``SIGNED_OFF``; it answers a request class we do
not serve with ``INVALID_TRANSACTION`` and turns an engine that raised into
``SYSTEM_ERROR``. ``UnavailableEngine`` is the honest engine of a switch started without
HSM or store. ``Dispatcher.mark_undelivered`` passes the connection's undelivered answers to
the journal (``DeliveryJournal``: the store) so that reconciliation sees them.

What does not: the pipeline steps (pipeline.py), framing and sockets (server.py), encoding
(wire/codec.py), the Reason-to-DE39 tables (decisions.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, Literal, Protocol

from hsm.api import KeyAdmin
from switch.config import ListenerConfig
from switch.decisions import Profile, Reason
from switch.keys import ListenerSession, exchange_key
from switch.log import get_logger
from switch.wire.messages import (
    AuthRequest,
    AuthResponse,
    ErrorResponse,
    NetworkRequest,
    NetworkResponse,
    ReversalRequest,
    ReversalResponse,
    UnsupportedMessage,
)

if TYPE_CHECKING:  # the store package imports metrics, which imports this module
    from switch.store.models import DeliveryMark, JournalRef

log = get_logger("switch.handler")

#: Why a request was answered by the stand-in policy instead of a decision: the budget ran
#: out, the HSM or the store failed, or the switch was too loaded to start it in time.
StandInCause = Literal["budget", "hsm", "store", "overload"]
#: What the server passes to the handler: every decodable request-class message.
Request = AuthRequest | ReversalRequest | NetworkRequest | UnsupportedMessage
#: Everything the switch answers with.
Response = AuthResponse | ReversalResponse | NetworkResponse | ErrorResponse

#: DE70 network-management codes (ISO 8583:1987): sign-on, sign-off, echo test, and the key
#: exchange codes 101 (key change) and 161 (new key), served when the listener has a ZMK.
SIGN_ON: Final = "001"
SIGN_OFF: Final = "002"
ECHO: Final = "301"
KEY_EXCHANGE_CODES: Final = frozenset({"101", "161"})
NETWORK_CODES_SERVED = frozenset({SIGN_ON, SIGN_OFF, ECHO})


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Where a request came from, resolved once per connection; bounded values only."""

    listener: ListenerConfig
    #: The network profile of the listener (its DE39 table).
    profile: Profile
    #: Verified identities of the peer certificate (CN and SANs).
    peer: frozenset[str]
    #: trio.current_time() when the whole frame had been read.
    received_at: float
    #: HSM label of the ZPK in force when the request was read (a key exchange after it
    #: does not change the key it is verified with); the listener's own when not given.
    zpk: str = ""
    #: The listener's mutable session (sign-on state, key in force); None outside a server.
    session: ListenerSession | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.zpk:
            object.__setattr__(self, "zpk", self.listener.zpk)

    @property
    def network(self) -> str:
        return self.listener.network


@dataclass(frozen=True, slots=True)
class Decision:
    """What the switch decided for one request, and the answer that says it.

    ``response`` is what is sent; ``reason`` is why (logged, and the source of its DE39);
    ``stand_in`` names the cause when the request was answered without a decision;
    ``replayed`` is true when the answer is the stored one of an earlier identical request.
    Amounts are in minor units: newly held, debited (ledger), and released by a reversal.
    """

    response: Response
    reason: Reason
    stand_in: StandInCause | None = None
    replayed: bool = False
    held: int = 0
    debited: int = 0
    released: int = 0
    masked_pan: str | None = None
    #: The journal row this request's answer was written to (None: nothing was journaled
    #: for it, as for network management, a stand-in without a decision, or a replay whose
    #: row is the original's); named when the answer cannot be delivered.
    journal: JournalRef | None = None

    @property
    def response_code(self) -> str:
        return self.response.response_code


class Engine(Protocol):
    """Decides authorizations, financial requests, advices and reversals.

    A decline is a ``Decision``, not an exception; an exception is a defect the dispatcher
    answers with ``SYSTEM_ERROR``.
    """

    async def authorize(self, request: AuthRequest, context: RequestContext) -> Decision:
        """Answer an 0100/0101, 0200, 0120/0121 or 0220/0221."""
        ...

    async def reverse(self, request: ReversalRequest, context: RequestContext) -> Decision:
        """Answer an 0400/0401 or 0420/0421."""
        ...


class RequestHandler(Protocol):
    """What the server calls for every decodable request-class message."""

    async def handle(self, message: Request, context: RequestContext) -> Decision | None:
        """The decision for ``message``; ``None`` when nothing is to be answered."""
        ...

    def decide_now(self, message: Request, context: RequestContext) -> Decision | None:
        """The decision for ``message`` when it waits for nothing (an echo test, a sign-on),
        made on the spot without a task of its own; ``None``: ``handle`` decides it."""
        ...

    async def mark_undelivered(
        self, marks: Sequence[DeliveryMark], *, deadline: float
    ) -> int | None:
        """Mark the journal rows of answers that could not be delivered, before ``deadline``
        (trio time); how many rows were marked, ``None`` when there is no journal to mark.

        Raises:
            StoreError: the journal could not be written (the connection counts and logs it).
        """
        ...


class DeliveryJournal(Protocol):
    """Where undelivered answers are marked: ``Store.mark_delivery``."""

    async def mark_delivery(
        self, marks: Sequence[DeliveryMark], *, deadline: float | None = None
    ) -> int:
        """Mark the rows named by ``marks`` undelivered; how many were marked."""
        ...


class Dispatcher:
    """The ``RequestHandler`` of a running switch: network management here, the rest to the
    engine, every exception of the engine answered ``SYSTEM_ERROR`` and logged.

    Args:
        engine: decides authorizations and reversals.
        keys: the HSM key custody key exchanges import into; None: key exchange is not
            served (answered ``INVALID_TRANSACTION``), as for a listener without a ZMK.
        journal: where undelivered answers are marked (the engine's store); None: nothing
            is marked (an engine that journals nothing).
    """

    def __init__(
        self,
        engine: Engine,
        keys: KeyAdmin | None = None,
        journal: DeliveryJournal | None = None,
    ) -> None:
        self._engine = engine
        self._keys = keys
        self._journal = journal

    async def mark_undelivered(
        self, marks: Sequence[DeliveryMark], *, deadline: float
    ) -> int | None:
        if self._journal is None:
            return None
        return await self._journal.mark_delivery(marks, deadline=deadline)

    def decide_now(self, message: Request, context: RequestContext) -> Decision | None:
        if isinstance(message, NetworkRequest) and message.code not in KEY_EXCHANGE_CODES:
            reason = self._network_now(message, context)
            return Decision(NetworkResponse.answer(message, context.profile.code(reason)), reason)
        return None

    async def handle(self, message: Request, context: RequestContext) -> Decision | None:
        prof = context.profile
        if isinstance(message, NetworkRequest):
            reason = await self._network(message, context)
            return Decision(NetworkResponse.answer(message, prof.code(reason)), reason)
        if isinstance(message, UnsupportedMessage):
            answer = message.answer(prof.code(Reason.INVALID_TRANSACTION))
            return None if answer is None else Decision(answer, Reason.INVALID_TRANSACTION)
        session = context.session
        if session is not None and not session.signed_on:
            if context.listener.after_sign_off == "decline":
                return _declined(message, context, Reason.SIGNED_OFF)
            log.warning("request_after_sign_off", listener=context.listener.name,
                        mti=message.mti, stan=message.stan)  # fmt: skip
        try:
            if isinstance(message, AuthRequest):
                return await self._engine.authorize(message, context)
            return await self._engine.reverse(message, context)
        except Exception as exc:
            # The engine could not decide: say so rather than drop the request.
            log.error("handler_failed", listener=context.listener.name, mti=message.mti,
                      stan=message.stan, error=f"{type(exc).__name__}: {exc}")  # fmt: skip
            return _declined(message, context, Reason.SYSTEM_ERROR)

    async def _network(self, message: NetworkRequest, context: RequestContext) -> Reason:
        """The reason of an 0800's answer; sign-on, sign-off and key exchange act first."""
        session, lst = context.session, context.listener
        if message.code in KEY_EXCHANGE_CODES:
            if session is None or self._keys is None or not lst.zmk:
                return Reason.INVALID_TRANSACTION
            change = await exchange_key(session, message.key_data, self._keys)
            return change.reason
        return self._network_now(message, context)

    def _network_now(self, message: NetworkRequest, context: RequestContext) -> Reason:
        """The reason of an 0800's answer other than a key exchange (sign-on/off act first)."""
        session, lst = context.session, context.listener
        if message.code not in NETWORK_CODES_SERVED:
            return Reason.INVALID_TRANSACTION
        if session is not None and message.code in (SIGN_ON, SIGN_OFF):
            signed_on = message.code == SIGN_ON
            if session.signed_on != signed_on:
                log.info("signed_on" if signed_on else "signed_off", listener=lst.name,
                         stan=message.stan)  # fmt: skip
            session.signed_on = signed_on
        return Reason.APPROVED


def _declined(
    message: AuthRequest | ReversalRequest, context: RequestContext, reason: Reason
) -> Decision:
    """The decision answering ``message`` with ``reason`` without asking the engine."""
    code = context.profile.code(reason)
    response: Response
    if isinstance(message, AuthRequest):
        response = AuthResponse.answer(message, code)
    else:
        response = ReversalResponse.answer(message, code)
    return Decision(response, reason)


class UnavailableEngine:
    """Answers every request with the stand-in reason: a switch without HSM or store."""

    async def authorize(self, request: AuthRequest, context: RequestContext) -> Decision:
        code = context.profile.code(Reason.ISSUER_UNAVAILABLE)
        return Decision(AuthResponse.answer(request, code), Reason.ISSUER_UNAVAILABLE)

    async def reverse(self, request: ReversalRequest, context: RequestContext) -> Decision:
        code = context.profile.code(Reason.ISSUER_UNAVAILABLE)
        return Decision(ReversalResponse.answer(request, code), Reason.ISSUER_UNAVAILABLE)
