"""Circuit breaker for the Redis paths (D15); their reconnect backoff is ``gateway.core.backoff``.

The existing breaker never left the open state (§5.1 BUG); here the open state expires lazily on
any read, so nothing has to remember to move it to half-open.
"""

from __future__ import annotations

import enum
from collections.abc import Callable

import attrs

from gateway.core.backoff import Backoff

__all__ = ["Backoff", "BreakerState", "CircuitBreaker", "TransitionHook"]


class BreakerState(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


TransitionHook = Callable[[str, BreakerState, BreakerState], None]


@attrs.define
class CircuitBreaker:
    name: str
    #: Monotonic seconds.
    clock: Callable[[], float]
    failure_threshold: int = attrs.field(default=5, validator=attrs.validators.ge(1))
    recovery_timeout: float = attrs.field(default=30.0, validator=attrs.validators.ge(0))
    half_open_max_calls: int = attrs.field(default=3, validator=attrs.validators.ge(1))
    #: Called as ``(name, old, new)`` after each state change.
    on_transition: TransitionHook | None = None

    _state: BreakerState = attrs.field(default=BreakerState.CLOSED, init=False)
    #: Consecutive failures while closed.
    failure_count: int = attrs.field(default=0, init=False)
    _opened_at: float = attrs.field(default=0.0, init=False)
    _half_open_at: float = attrs.field(default=0.0, init=False)
    _trials_in_flight: int = attrs.field(default=0, init=False)
    _trial_successes: int = attrs.field(default=0, init=False)
    total_calls: int = attrs.field(default=0, init=False)
    rejected_calls: int = attrs.field(default=0, init=False)
    #: Every recorded failure, in any state.
    failures: int = attrs.field(default=0, init=False)
    state_changes: int = attrs.field(default=0, init=False)

    @property
    def state(self) -> BreakerState:
        if (
            self._state is BreakerState.OPEN
            and self.clock() - self._opened_at >= self.recovery_timeout
        ):
            self._enter(BreakerState.HALF_OPEN)
        return self._state

    def allow(self) -> bool:
        self.total_calls += 1
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.HALF_OPEN:
            if (
                self._trials_in_flight >= self.half_open_max_calls
                and self.clock() - self._half_open_at >= self.recovery_timeout
            ):
                # Trials that never reported back (a cancelled caller) must not pin the breaker
                # half-open forever; after another recovery period their slots are reclaimed.
                self._trials_in_flight = 0
                self._half_open_at = self.clock()
            if self._trials_in_flight < self.half_open_max_calls:
                self._trials_in_flight += 1
                return True
        self.rejected_calls += 1
        return False

    def record_success(self) -> None:
        state = self.state
        if state is BreakerState.CLOSED:
            self.failure_count = 0
        elif state is BreakerState.HALF_OPEN:
            self._trials_in_flight = max(0, self._trials_in_flight - 1)
            self._trial_successes += 1
            if self._trial_successes >= self.half_open_max_calls:
                self._enter(BreakerState.CLOSED)
        # OPEN: a call admitted before the breaker opened says nothing about recovery.

    def record_failure(self) -> None:
        self.failures += 1
        state = self.state
        if state is BreakerState.CLOSED:
            self.failure_count += 1
            if self.failure_count >= self.failure_threshold:
                self._enter(BreakerState.OPEN)
        elif state is BreakerState.HALF_OPEN:
            self._enter(BreakerState.OPEN)

    def seconds_until_retry(self) -> float:
        if self.state is not BreakerState.OPEN:
            return 0.0
        return max(0.0, self._opened_at + self.recovery_timeout - self.clock())

    def stats(self) -> dict[str, object]:
        return {
            "state": self.state.value,
            "failure_count": self.failure_count,
            "failures": self.failures,
            "total_calls": self.total_calls,
            "rejected_calls": self.rejected_calls,
            "state_changes": self.state_changes,
        }

    def _enter(self, new: BreakerState) -> None:
        old = self._state
        if new is old:
            return
        self._state = new
        self.state_changes += 1
        if new is BreakerState.OPEN:
            self._opened_at = self.clock()
        elif new is BreakerState.HALF_OPEN:
            self._half_open_at = self.clock()
            self._trials_in_flight = 0
            self._trial_successes = 0
        else:
            self.failure_count = 0
        if self.on_transition is not None:
            self.on_transition(self.name, old, new)
