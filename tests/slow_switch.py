"""A switch process whose handler takes a while: for tests of SIGTERM with requests in flight.

Run as ``python tests/slow_switch.py CONFIG READY_FILE DELAY``; it serves through
``switch.app.serve`` (the real signal handling) with an engine that approves after DELAY s.
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from switch import app, config, log
from switch.decisions import Reason
from switch.handler import Decision, Dispatcher, RequestContext
from switch.wire.messages import AuthRequest, AuthResponse, ReversalRequest, ReversalResponse


class SlowEngine:
    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def authorize(self, request: AuthRequest, context: RequestContext) -> Decision:
        await trio.sleep(self.delay)
        code = context.profile.code(Reason.APPROVED)
        return Decision(AuthResponse.answer(request, code, approval_code="123456"), Reason.APPROVED)

    async def reverse(self, request: ReversalRequest, context: RequestContext) -> Decision:
        await trio.sleep(self.delay)
        code = context.profile.code(Reason.REVERSAL_MATCHED)
        return Decision(ReversalResponse.answer(request, code), Reason.REVERSAL_MATCHED)


def main() -> None:
    cfg = config.load(sys.argv[1])
    log.configure("info", "json")
    trio.run(app.serve, cfg, Path(sys.argv[2]), False, Dispatcher(SlowEngine(float(sys.argv[3]))))


if __name__ == "__main__":
    main()
