"""Helpers of the crash tests with several switch processes on one PostgreSQL database.

What lives here: ``pg_config`` (crash_support's switch configuration on a PostgreSQL DSN, with
statement and lock timeouts below the budget), ``Cluster`` (N real ``python -m switch serve``
processes on one database under crash_support's load, with a killer that SIGKILLs a random
instance at random moments while requests are in flight, each instance started again after
its death), and ``recover`` (an echo and a fresh approval from a new process once the load
is over, recorded for the checks).

The cluster's load is crash_support's ``Load`` mix (new 0100/0200s, duplicates and 0101
repeats, reversals with their repeats, wrong PINs) plus two races between instances: the
same new request sent to two instances at once (``P_TWIN``), and a new authorization whose
full reversal goes to another instance a few milliseconds later (``P_RACE``), so that the
reversal may overtake it.

What does not: assertions and the database checks (the tests and
``crash_support.check_database``).
"""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import trio
from crash_support import (
    CONNECTION_LOST,
    SEED_CARDS,
    Exchange,
    Load,
    Request,
    Response,
    RoundStats,
    pin_tries,
    switch_env,
    write_config,
)

from switch import testing
from switch.acquirer import build_auth, echo
from switch.client import Client
from switch.config import StoreConfig
from switch.pki import PkiPaths
from switch.wire.messages import AuthRequest, AuthResponse, NetworkResponse

#: Seconds an instance may take to start while the others are loaded (2-core CI).
START_WITHIN = 45.0
#: Connections each instance gets from the clients, and requests each keeps in flight.
CONNECTIONS_PER_INSTANCE = 2
SLOTS_PER_CONNECTION = 5
#: Share of new authorizations also sent, at the same moment, to another instance.
P_TWIN = 0.10
#: Share of new authorizations whose full reversal is sent to another instance while the
#: authorization itself is in flight.
P_RACE = 0.08
#: Seconds the racing reversal waits after its original was sent (drawn up to this).
RACE_DELAY = 0.02
#: Seconds between two kills are drawn from this range.
KILL_EVERY = (0.3, 2.2)
#: Seconds between two samples of the PIN-try counters.
PIN_SAMPLE_EVERY = 0.25


def pg_config(tmp: Path, pki: PkiPaths, dsn: str) -> Path:
    """crash_support's switch on the PostgreSQL database ``dsn``: statement and lock timeouts
    well below the 5 s budget, so a lock held by a decision of a killed instance (released
    when the server sees the connection close) delays, but never stalls, the others."""
    store = StoreConfig(
        backend="postgres", dsn=dsn, pool_size=6, statement_timeout=3.0, lock_timeout=2.0
    )
    return write_config(tmp, pki, store=store)


@dataclass
class Kill:
    """One SIGKILL: which instance, when (seconds into the load), requests in flight on it."""

    instance: int
    at: float
    in_flight: int


@dataclass
class Instance:
    """One switch process slot: the running process (None while it restarts) and its port."""

    index: int
    switch: testing.SwitchProcess | None = None
    starts: int = 0
    clients: list[Client] = field(default_factory=list)

    @property
    def up(self) -> bool:
        return self.switch is not None and self.switch.process.poll() is None


class Cluster:
    """``count`` switch instances on one database, loaded until ``stop`` is set."""

    def __init__(
        self,
        config: Path,
        tmp: Path,
        ctx: ssl.SSLContext,
        load: Load,
        count: int,
        *,
        db: str | Path,
    ) -> None:
        self.config, self.tmp, self.ctx, self.load = config, tmp, ctx, load
        self.db = db
        self.rng = load.rng
        self.instances = [Instance(i) for i in range(count)]
        self.stats = RoundStats(0)
        self.kills: list[Kill] = []
        self.pin_samples: list[dict[str, int]] = []
        #: Seconds each start took (until the ready file).
        self.start_seconds: list[float] = []
        #: New requests sent to two instances at once, and those both answered.
        self.twins = 0
        self.twins_answered = 0
        self.races = 0
        self._stop = trio.Event()
        self._started = 0.0

    # -- instances ---------------------------------------------------------------------------

    async def _start(self, inst: Instance) -> testing.SwitchProcess:
        tag = f"i{inst.index}-{inst.starts:03d}"
        inst.starts += 1
        began = trio.current_time()
        with (self.tmp / f"switch-{tag}.log").open("wb") as logfile:
            switch = await testing.start_switch(
                self.config,
                self.tmp / f"ready-{tag}.json",
                env=switch_env(self.tmp),
                output=logfile,
                ready_within=START_WITHIN,
            )
        self.start_seconds.append(trio.current_time() - began)
        return switch

    async def _keep_running(self, inst: Instance) -> None:
        """Start the instance, load it, and start it again whenever it dies, until stop."""
        try:
            while not self._stop.is_set():
                inst.switch = await self._start(inst)
                if self._stop.is_set():
                    break
                async with trio.open_nursery() as nursery:
                    for _ in range(CONNECTIONS_PER_INSTANCE):
                        nursery.start_soon(self._connection, inst)
                    await inst.switch.process.wait()
                    nursery.cancel_scope.deadline = trio.current_time() + 10
        finally:
            if inst.switch is not None:
                inst.switch.kill()
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    await inst.switch.process.wait()

    async def _connection(self, inst: Instance) -> None:
        """Client connections to ``inst`` (another one when one is lost) while it lives."""
        assert inst.switch is not None
        switch = inst.switch
        while switch.process.poll() is None and not self._stop.is_set():
            try:
                async with Client.connect(
                    "127.0.0.1", switch.port, self.ctx, connect_timeout=5.0
                ) as client:
                    inst.clients.append(client)
                    try:
                        async with trio.open_nursery() as nursery:
                            for _ in range(SLOTS_PER_CONNECTION):
                                nursery.start_soon(self._slot, inst, client)
                    finally:
                        inst.clients.remove(client)
            except CONNECTION_LOST:
                pass
            await trio.sleep(0.05)

    def _peer(self, inst: Instance) -> tuple[Instance, Client] | None:
        """A live client connection to another instance, if there is one."""
        others = [i for i in self.instances if i is not inst and i.up and i.clients]
        if not others:
            return None
        other = self.rng.choice(others)
        return other, self.rng.choice(other.clients)

    async def _slot(self, inst: Instance, client: Client) -> None:
        load, rng, stats = self.load, self.rng, self.stats
        while not self._stop.is_set():
            request, new = load.next_request()
            peer = self._peer(inst) if new else None
            if peer is not None and rng.random() < P_TWIN:
                self.twins += 1
                copy: list[Response | None] = []
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._send_copy, peer, request, 0.0, copy)
                    answer = await load.send(
                        client, request, new=True, stats=stats, target=inst.index
                    )
                if answer is not None and copy and copy[0] is not None:
                    self.twins_answered += 1
            elif (
                peer is not None
                and isinstance(request, AuthRequest)
                and request.pin_block is None
                and rng.random() < P_RACE
            ):
                self.races += 1
                reversal = load.racing_reversal(request)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._send_copy, peer, reversal, rng.uniform(0, RACE_DELAY))
                    answer = await load.send(
                        client, request, new=True, stats=stats, target=inst.index
                    )
            else:
                answer = await load.send(client, request, new=new, stats=stats, target=inst.index)
            if answer is None:
                return

    async def _send_copy(
        self,
        peer: tuple[Instance, Client],
        request: Request,
        delay: float = 0.0,
        answer: list[Response | None] | None = None,
    ) -> None:
        """``request`` to another instance (after ``delay`` s): a copy, not a new request;
        its answer is appended to ``answer``."""
        await trio.sleep(delay)
        other, client = peer
        got = await self.load.send(client, request, new=False, stats=self.stats, target=other.index)
        if answer is not None:
            answer.append(got)

    # -- kills and samples -------------------------------------------------------------------

    async def _killer(self, kills: int, seconds: float) -> None:
        """SIGKILL a random live instance (with requests in flight on it) at random moments,
        until ``kills`` were done and ``seconds`` of load have passed; then stop."""
        while len(self.kills) < kills or trio.current_time() - self._started < seconds:
            await trio.sleep(self.rng.uniform(*KILL_EVERY))
            with trio.move_on_after(20):
                while True:
                    live = [i for i in self.instances if i.up]
                    busy = [i for i in live if self.load.in_flight_on(i.index) > 0]
                    if busy and len(live) >= 2:
                        break
                    await trio.sleep(0.05)
            if not busy or len(live) < 2:
                continue
            victim = self.rng.choice(busy)
            assert victim.switch is not None
            in_flight = self.load.in_flight_on(victim.index)
            victim.switch.kill()
            self.kills.append(Kill(victim.index, trio.current_time() - self._started, in_flight))
        self._stop.set()

    async def _sample_pin_tries(self) -> None:
        while not self._stop.is_set():
            self.pin_samples.append(await trio.to_thread.run_sync(pin_tries, self.db))
            await trio.sleep(PIN_SAMPLE_EVERY)

    async def run(self, *, kills: int, seconds: float) -> float:
        """Load the instances with kills until both ``kills`` and ``seconds`` are reached;
        every instance is SIGKILLed at the end (not counted). Returns the seconds of load."""
        async with trio.open_nursery() as nursery:
            for inst in self.instances:
                nursery.start_soon(self._keep_running, inst)
            with trio.fail_after(START_WITHIN * 2):
                while True:
                    if all(i.up and i.clients for i in self.instances):
                        break
                    await trio.sleep(0.1)
            self._started = trio.current_time()
            nursery.start_soon(self._sample_pin_tries)
            await self._killer(kills, seconds)
            elapsed = trio.current_time() - self._started
            for inst in self.instances:
                if inst.switch is not None:
                    inst.switch.kill()  # a start in progress is killed by _keep_running
            nursery.cancel_scope.deadline = trio.current_time() + 30
        self.pin_samples.append(pin_tries(self.db))
        return elapsed


@dataclass(frozen=True)
class Recovery:
    """What a fresh switch process answered after the crashes."""

    echo_code: str
    approval: AuthResponse
    exit_code: int | None


async def recover(
    config: Path, tmp: Path, ctx: ssl.SSLContext, load: Load, *, tag: str = "final"
) -> Recovery:
    """Start one more switch, ask an echo and a fresh authorization (recorded in ``load``),
    and stop it with SIGTERM (its exit status: 0 after a drain)."""
    card = SEED_CARDS[0]
    fresh = build_auth(card.pan, 1234, stan=load.new_stan())
    with (tmp / f"switch-{tag}.log").open("wb") as logfile:
        switch = await testing.start_switch(
            config,
            tmp / f"ready-{tag}.json",
            env=switch_env(tmp),
            output=logfile,
            ready_within=START_WITHIN,
        )
    try:
        async with Client.connect("127.0.0.1", switch.port, ctx) as client:
            with trio.fail_after(15):
                pong = await client.request(echo(stan=load.new_stan()))
                answer = await client.request(fresh)
        exit_code = await switch.stop()
    finally:
        switch.kill()
    assert isinstance(pong, NetworkResponse)
    assert isinstance(answer, AuthResponse), type(answer)
    load.exchanges.append(Exchange(fresh, -1, answer))
    return Recovery(pong.response_code, answer, exit_code)


def kill_group(pids: Sequence[int]) -> None:
    """SIGKILL every pid at once (a container's processes ended by the kernel)."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
