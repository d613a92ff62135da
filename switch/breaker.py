"""Circuit breakers of the switch's dependencies: a pure state machine, the clock injected.

What lives here: ``Breaker``, the state of one dependency (the HSM, the store, the
card-data vault) as seen from the calls made to it, and ``State``, its three states:

- ``CLOSED``: calls go through; ``threshold`` consecutive failures (an error of the
  dependency, or a call still unanswered when its request's deadline passed) open it;
  a success resets the count.
- ``OPEN``: no call is admitted (``admit`` returns ``None``: the caller answers by its
  stand-in policy at once) until ``cool_down`` seconds have passed since it opened.
- ``HALF_OPEN``: exactly one call is admitted, as a probe; its success closes the breaker,
  its failure opens it again for another ``cool_down``; a probe abandoned without an outcome
  (its request cancelled for another reason) lets the next call probe.

The outcome of a call admitted while closed that arrives once the breaker is open changes
nothing (only a probe closes an open breaker). Every transition calls ``on_change``
(metrics and logs are the caller's business).

What does not: I/O, time (``clock`` is passed in: ``trio.current_time`` in the switch, a
list of instants in the tests), what counts as a failure of which dependency (pipeline.py),
metrics and readiness (metrics.py, health.py).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Breaker", "Permit", "State"]


class State(enum.IntEnum):
    """A breaker's state; the value is the ``cardswitch_breaker_state`` gauge's."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave to make one call; hand it back with ``succeeded``, ``failed`` or ``abandoned``."""

    #: Whether this call probes a half-open breaker (its outcome decides the state).
    probe: bool


#: The two permits there are (immutable, so shared).
_CALL = Permit(probe=False)
_PROBE = Permit(probe=True)


class Breaker:
    """The circuit breaker of one dependency.

    Args:
        name: the dependency ("hsm", "store", "vault"), for logs and metrics.
        threshold: consecutive failures that open the breaker (at least 1).
        cool_down: seconds an open breaker waits before admitting a probe (positive).
        clock: the current time in seconds (monotonic).
        on_change: called with the breaker after every change of state.
    """

    def __init__(
        self,
        name: str,
        *,
        threshold: int,
        cool_down: float,
        clock: Callable[[], float],
        on_change: Callable[[Breaker], None] | None = None,
    ) -> None:
        if threshold < 1:
            raise ValueError("threshold must be at least 1")
        if cool_down <= 0:
            raise ValueError("cool_down must be positive")
        self.name = name
        self.threshold = threshold
        self.cool_down = cool_down
        self._clock = clock
        self._on_change = on_change
        self._state = State.CLOSED
        #: Consecutive failures while closed.
        self.failures = 0
        #: When the breaker last opened (clock seconds); meaningful while open/half-open.
        self.opened_at = 0.0
        #: The last failure seen (a one-line description, no card data).
        self.last_error: str | None = None
        self._probing = False
        self._why = ""

    def __repr__(self) -> str:
        return f"<Breaker {self.name} {self.state.name} failures={self.failures}>"

    @property
    def state(self) -> State:
        """The state now (an open breaker past its cool-down is half-open)."""
        if self._state is State.OPEN and self._clock() >= self.opened_at + self.cool_down:
            self._set(State.HALF_OPEN)
        return self._state

    def admit(self) -> Permit | None:
        """A permit for one call, or ``None`` when the breaker refuses it (open, or a probe
        is already in flight)."""
        state = self.state
        if state is State.CLOSED:
            return _CALL
        if state is State.HALF_OPEN and not self._probing:
            self._probing = True
            return _PROBE
        return None

    def succeeded(self, permit: Permit) -> None:
        """The call answered: a probe closes the breaker; a closed breaker resets its count."""
        if permit.probe:
            self._probing = False
            self.failures = 0
            self._set(State.CLOSED)
        elif self._state is State.CLOSED:
            self.failures = 0

    def failed(self, permit: Permit, error: str) -> None:
        """The call failed or timed out (``error`` says how, on one line)."""
        self.last_error = error
        if permit.probe:
            self._probing = False
            self._open("the probe failed")
        elif self._state is State.CLOSED:
            self.failures += 1
            if self.failures >= self.threshold:
                self._open(f"{self.failures} consecutive failures")

    def abandoned(self, permit: Permit) -> None:
        """The call ended without an outcome; a probe's place goes to the next call."""
        if permit.probe:
            self._probing = False

    def describe(self) -> str:
        """One line for readiness: the state and, when not closed, why and until when."""
        state = self.state
        if state is State.CLOSED:
            return "closed"
        why = f"{self._why} (last: {self.last_error})"
        if state is State.HALF_OPEN:
            return f"half-open (probing) after {why}"
        left = self.opened_at + self.cool_down - self._clock()
        return f"open after {why}; probe in {max(0.0, left):.1f} s"

    def _open(self, why: str) -> None:
        self._why = why
        self.opened_at = self._clock()
        self.failures = 0
        self._set(State.OPEN)

    def _set(self, state: State) -> None:
        changed = state is not self._state
        self._state = state
        if changed and self._on_change is not None:
            self._on_change(self)
