"""Circuit breaker and backoff (D15), on a fake clock."""

from __future__ import annotations

import random

import attrs
import pytest

from gateway.core.breaker import Backoff, BreakerState, CircuitBreaker

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


@attrs.define
class FakeClock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@attrs.define
class Harness:
    clock: FakeClock
    breaker: CircuitBreaker
    transitions: list[tuple[str, BreakerState, BreakerState]]

    def fail(self, times: int) -> None:
        for _ in range(times):
            assert self.breaker.allow()
            self.breaker.record_failure()


@pytest.fixture
def h() -> Harness:
    clock = FakeClock()
    transitions: list[tuple[str, BreakerState, BreakerState]] = []
    breaker = CircuitBreaker(
        "pubsub", clock, on_transition=lambda *args: transitions.append(args)
    )
    return Harness(clock, breaker, transitions)


def test_defaults() -> None:
    breaker = CircuitBreaker("x", FakeClock())
    assert (breaker.failure_threshold, breaker.recovery_timeout, breaker.half_open_max_calls) == (5, 30.0, 3)
    assert breaker.state is CLOSED
    assert breaker.seconds_until_retry() == 0.0


def test_closed_allows(h: Harness) -> None:
    assert all(h.breaker.allow() for _ in range(100))
    assert h.breaker.rejected_calls == 0
    assert h.breaker.total_calls == 100


def test_opens_after_five_consecutive_failures(h: Harness) -> None:
    h.fail(4)
    assert h.breaker.state is CLOSED
    assert h.breaker.failure_count == 4
    h.fail(1)
    assert h.breaker.state is OPEN
    assert h.transitions == [("pubsub", CLOSED, OPEN)]


def test_success_resets_failure_count(h: Harness) -> None:
    h.fail(4)
    h.breaker.record_success()
    assert h.breaker.failure_count == 0
    h.fail(4)
    assert h.breaker.state is CLOSED
    h.fail(1)
    assert h.breaker.state is OPEN


def test_open_rejects(h: Harness) -> None:
    h.fail(5)
    h.clock.advance(29.9)
    assert not h.breaker.allow()
    assert not h.breaker.allow()
    assert h.breaker.rejected_calls == 2
    assert h.breaker.state is OPEN
    assert h.breaker.seconds_until_retry() == pytest.approx(0.1)


def test_seconds_until_retry_counts_down(h: Harness) -> None:
    h.fail(5)
    assert h.breaker.seconds_until_retry() == pytest.approx(30.0)
    h.clock.advance(12)
    assert h.breaker.seconds_until_retry() == pytest.approx(18.0)
    h.clock.advance(18)
    assert h.breaker.seconds_until_retry() == 0.0


def test_half_open_after_recovery_timeout_on_read(h: Harness) -> None:
    h.fail(5)
    h.clock.advance(30)
    assert h.breaker.state is HALF_OPEN
    assert h.transitions == [("pubsub", CLOSED, OPEN), ("pubsub", OPEN, HALF_OPEN)]


def test_half_open_allows_three_trials(h: Harness) -> None:
    h.fail(5)
    h.clock.advance(30)
    assert [h.breaker.allow() for _ in range(4)] == [True, True, True, False]
    assert h.breaker.rejected_calls == 1


def test_three_successes_close(h: Harness) -> None:
    h.fail(5)
    h.clock.advance(30)
    for _ in range(3):
        assert h.breaker.allow()
    h.breaker.record_success()
    h.breaker.record_success()
    assert h.breaker.state is HALF_OPEN
    h.breaker.record_success()
    assert h.breaker.state is CLOSED
    assert h.breaker.failure_count == 0
    assert h.transitions == [
        ("pubsub", CLOSED, OPEN),
        ("pubsub", OPEN, HALF_OPEN),
        ("pubsub", HALF_OPEN, CLOSED),
    ]
    assert h.breaker.state_changes == 3


def test_sequential_trials_close(h: Harness) -> None:
    h.fail(5)
    h.clock.advance(30)
    for _ in range(3):
        assert h.breaker.allow()
        h.breaker.record_success()
    assert h.breaker.state is CLOSED


def test_failure_in_half_open_reopens(h: Harness) -> None:
    h.fail(5)
    h.clock.advance(30)
    assert h.breaker.allow()
    h.breaker.record_success()
    assert h.breaker.allow()
    h.breaker.record_failure()
    assert h.breaker.state is OPEN
    assert not h.breaker.allow()
    assert h.breaker.seconds_until_retry() == pytest.approx(30.0)
    assert h.transitions[-1] == ("pubsub", HALF_OPEN, OPEN)
    # A fresh half-open period starts from scratch: earlier successes do not count.
    h.clock.advance(30)
    assert h.breaker.state is HALF_OPEN
    for _ in range(2):
        assert h.breaker.allow()
        h.breaker.record_success()
    assert h.breaker.state is HALF_OPEN
    assert h.breaker.allow()
    h.breaker.record_success()
    assert h.breaker.state is CLOSED


def test_closed_after_recovery_needs_five_failures_again(h: Harness) -> None:
    h.fail(5)
    h.clock.advance(30)
    for _ in range(3):
        h.breaker.allow()
        h.breaker.record_success()
    h.fail(4)
    assert h.breaker.state is CLOSED
    h.fail(1)
    assert h.breaker.state is OPEN


def test_late_results_while_open_are_ignored(h: Harness) -> None:
    h.fail(5)
    h.breaker.record_success()
    assert h.breaker.state is OPEN
    h.clock.advance(10)
    h.breaker.record_failure()
    # The open period is not extended by a call that started before the breaker opened.
    assert h.breaker.seconds_until_retry() == pytest.approx(20.0)


def test_unreported_trials_are_reclaimed(h: Harness) -> None:
    h.fail(5)
    h.clock.advance(30)
    for _ in range(3):
        assert h.breaker.allow()  # callers cancelled, never report back
    assert not h.breaker.allow()
    h.clock.advance(30)
    assert h.breaker.allow()
    assert h.breaker.state is HALF_OPEN


def test_stats(h: Harness) -> None:
    h.fail(5)
    h.breaker.allow()
    assert h.breaker.stats() == {
        "state": "open",
        "failure_count": 5,
        "failures": 5,
        "total_calls": 6,
        "rejected_calls": 1,
        "state_changes": 1,
    }
    h.clock.advance(30)
    assert h.breaker.stats()["state"] == "half_open"


def test_custom_parameters() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("x", clock, failure_threshold=1, recovery_timeout=2.0, half_open_max_calls=1)
    breaker.record_failure()
    assert breaker.state is OPEN
    clock.advance(2)
    assert breaker.allow()
    assert not breaker.allow()
    breaker.record_success()
    assert breaker.state is CLOSED


def test_without_hook() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker("x", clock)
    for _ in range(5):
        breaker.record_failure()
    assert breaker.state is OPEN


@pytest.mark.parametrize("kwargs", [{"failure_threshold": 0}, {"half_open_max_calls": 0},
                                    {"recovery_timeout": -1.0}])
def test_invalid_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        CircuitBreaker("x", FakeClock(), **kwargs)  # type: ignore[arg-type]


# --- Backoff -------------------------------------------------------------------------------------


def test_backoff_grows_and_caps_without_jitter() -> None:
    backoff = Backoff(jitter=0.0)
    assert [backoff.next_delay() for _ in range(8)] == [1, 2, 4, 8, 16, 30, 30, 30]


def test_backoff_jitter_bounds() -> None:
    rng = random.Random(42)
    for _ in range(200):
        backoff = Backoff(base=1.0, cap=30.0, jitter=0.3, rng=rng)
        for n in range(10):
            base = min(30.0, 2.0**n)
            assert base <= backoff.next_delay() <= base * 1.3


def test_backoff_jitter_varies() -> None:
    rng = random.Random(1)
    delays = {Backoff(rng=rng).next_delay() for _ in range(50)}
    assert len(delays) > 1


def test_backoff_extremes_of_rng() -> None:
    class Fixed(random.Random):
        def __init__(self, value: float) -> None:
            super().__init__()
            self.value = value

        def random(self) -> float:
            return self.value

    assert Backoff(rng=Fixed(0.0)).next_delay() == 1.0
    high = Backoff(rng=Fixed(0.999999))
    assert [round(high.next_delay(), 3) for _ in range(7)] == [1.3, 2.6, 5.2, 10.4, 20.8, 39.0, 39.0]


def test_backoff_reset() -> None:
    backoff = Backoff(jitter=0.0)
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.next_delay() == 1.0
    assert backoff.next_delay() == 2.0


def test_backoff_long_outage_does_not_overflow() -> None:
    backoff = Backoff(jitter=0.0)
    for _ in range(100_000):
        delay = backoff.next_delay()
    assert delay == 30.0


def test_backoff_custom_base() -> None:
    backoff = Backoff(base=0.5, cap=3.0, jitter=0.0)
    assert [backoff.next_delay() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]


@pytest.mark.parametrize("kwargs", [{"base": -1.0}, {"base": 2.0, "cap": 1.0}, {"jitter": -0.1},
                                    {"cap": float("inf")}, {"jitter": 1.5}])
def test_backoff_invalid_parameters(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Backoff(**kwargs)  # type: ignore[arg-type]


def test_backoff_zero_base_retries_at_once() -> None:
    # The exponent is bounded, so a zero base cannot overflow; the client's tests use it.
    backoff = Backoff(base=0.0, cap=0.0)
    assert [backoff.next_delay() for _ in range(5)] == [0.0] * 5
