"""Named guards of the Redis paths: a circuit breaker each, all reporting to one health state.

One breaker per path (D15), so an outage seen by one path (a revocation check, say) does not pause
another (the stream) that may already work again. Every guard reports successes and failures to
the shared :class:`RedisHealth`, which is what ``wsgateway_redis_up`` and the health pages show
(D17). Components get the one guard they use, never the set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import attrs

from gateway.core.breaker import BreakerState, CircuitBreaker
from gateway.metrics import Metrics
from gateway.settings import Settings

log = logging.getLogger("gateway")

_LEVEL = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}
#: Admission refuses every new socket while its breaker is open (D4, D22): it probes Redis again
#: within seconds, so clients waiting to connect get in soon after Redis answers again. The other
#: paths back off for the full recovery time.
AUTH_BREAKER_RECOVERY = 2.0


@attrs.define(eq=False)
class RedisHealth:
    """Whether the last Redis operation of any path succeeded."""

    metrics: Metrics
    healthy: bool = False

    def ok(self) -> None:
        if not self.healthy:
            log.info("redis reachable")
        self.healthy = True
        self.metrics.redis_up.set(1)

    def failed(self, path: str, exc: BaseException) -> None:
        self.metrics.redis_errors.labels(path).inc()
        if self.healthy:
            log.warning("redis unreachable", extra={"path": path, "error": type(exc).__name__})
        self.healthy = False
        self.metrics.redis_up.set(0)


@attrs.define(eq=False)
class RedisGuard:
    """One Redis path: its breaker, and the label its errors are counted under."""

    path: str
    breaker: CircuitBreaker
    health: RedisHealth

    def allow(self) -> bool:
        return self.breaker.allow()

    def ok(self) -> None:
        self.breaker.record_success()
        self.health.ok()

    def failed(self, exc: BaseException) -> None:
        self.breaker.record_failure()
        self.health.failed(self.path, exc)


@attrs.frozen
class RedisGuards:
    stream: RedisGuard
    pubsub: RedisGuard
    auth: RedisGuard
    catchup: RedisGuard
    publish: RedisGuard

    def __iter__(self) -> Iterator[tuple[str, RedisGuard]]:
        for field in attrs.fields(type(self)):
            yield field.name, getattr(self, field.name)

    def stats(self) -> dict[str, dict[str, object]]:
        return {name: guard.breaker.stats() for name, guard in self}

    @classmethod
    def build(cls, settings: Settings, health: RedisHealth, clock: Callable[[], float]) -> RedisGuards:
        metrics = health.metrics

        def transition(name: str, old: BreakerState, new: BreakerState) -> None:
            metrics.breaker_state.labels(name).set(_LEVEL[new])
            metrics.breaker_transitions.labels(name, new.value).inc()
            log.warning("circuit breaker %s: %s -> %s", name, old.value, new.value)

        def guard(name: str, path: str, recovery: float) -> RedisGuard:
            metrics.breaker_state.labels(name).set(0)
            breaker = CircuitBreaker(
                name=name, clock=clock, on_transition=transition, failure_threshold=settings.breaker_failures,
                recovery_timeout=recovery, half_open_max_calls=settings.breaker_trial_calls,
            )
            return RedisGuard(path, breaker, health)

        recovery = settings.breaker_recovery
        return cls(
            stream=guard("stream", "stream", recovery),
            pubsub=guard("pubsub", "pubsub", recovery),
            auth=guard("auth", "revocation", min(recovery, AUTH_BREAKER_RECOVERY)),
            catchup=guard("catchup", "catchup", recovery),
            publish=guard("publish", "publish", recovery),
        )
