"""A switch process whose handler takes a while: for tests of SIGTERM with requests in flight.

Run as ``python tests/slow_switch.py CONFIG READY_FILE DELAY``; it serves through
``switch.app.serve`` (the real signal handling) with a handler that approves after DELAY s.
"""

from __future__ import annotations

import sys
from pathlib import Path

import trio

from switch import app, config, log
from switch.handler import RequestContext
from switch.wire.messages import AuthRequest, AuthResponse, ReversalRequest, ReversalResponse


class SlowHandler:
    def __init__(self, delay: float) -> None:
        self.delay = delay

    async def authorize(self, request: AuthRequest, context: RequestContext) -> AuthResponse:
        await trio.sleep(self.delay)
        return AuthResponse.answer(request, "00", approval_code="123456")

    async def reverse(self, request: ReversalRequest, context: RequestContext) -> ReversalResponse:
        await trio.sleep(self.delay)
        return ReversalResponse.answer(request, "00")


def main() -> None:
    cfg = config.load(sys.argv[1])
    log.configure("info", "json")
    trio.run(app.serve, cfg, Path(sys.argv[2]), False, SlowHandler(float(sys.argv[3])))


if __name__ == "__main__":
    main()
