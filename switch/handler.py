"""The boundary between the server and the authorization engine.

What lives here: the ``RequestHandler`` protocol the server calls for every authorization,
financial, advice and reversal request; the ``RequestContext`` it passes (which listener and
network, who the peer is, when the frame arrived); and ``UnavailableHandler``, the honest
answer of a switch without a decision engine (DE39 91, issuer unavailable).

What does not: network management (answered by the server itself), the pipeline steps
(pipeline.py), encoding (wire/codec.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from switch.wire.messages import AuthRequest, AuthResponse, ReversalRequest, ReversalResponse

#: DE39 "issuer or switch inoperative": lets the network stand in for the issuer.
ISSUER_UNAVAILABLE = "91"


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Where a request came from; bounded values only (safe as metric labels)."""

    listener: str
    network: str
    #: Verified identities of the peer certificate (CN and SANs).
    peer: frozenset[str]
    #: trio.current_time() when the whole frame had been read.
    received_at: float


class RequestHandler(Protocol):
    """Decides authorization and reversal requests.

    Implementations return a response value for every request they were given; a decline is
    a response, not an exception. An exception means the switch could not decide and the
    server answers with a system-error code.
    """

    async def authorize(self, request: AuthRequest, context: RequestContext) -> AuthResponse:
        """Answer an 0100/0101, 0200, 0120/0121 or 0220/0221."""
        ...

    async def reverse(self, request: ReversalRequest, context: RequestContext) -> ReversalResponse:
        """Answer an 0400/0401 or 0420/0421."""
        ...


class UnavailableHandler:
    """Answers every request with 91: what a switch without a decision engine can honestly say."""

    async def authorize(self, request: AuthRequest, context: RequestContext) -> AuthResponse:
        return AuthResponse.answer(request, ISSUER_UNAVAILABLE)

    async def reverse(self, request: ReversalRequest, context: RequestContext) -> ReversalResponse:
        return ReversalResponse.answer(request, ISSUER_UNAVAILABLE)
