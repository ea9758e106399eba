"""What the health pages and the legacy metrics report, read from the running components.

This module only takes readings (a :class:`~gateway.core.health.Snapshot`, a Redis probe); the
rules that shape them into pages live in :mod:`gateway.core.health`.
"""

from __future__ import annotations

import time
from typing import Any

import attrs
import coredis
import trio

from gateway.core import health
from gateway.core.breaker import BreakerState
from gateway.fanout.broadcast import Broadcaster
from gateway.ingest.readers import StreamConsumer
from gateway.metrics import Metrics
from gateway.redisio.client import is_redis_failure
from gateway.redisio.guards import RedisGuards, RedisHealth
from gateway.serving.registry import SocketRegistry
from gateway.settings import Settings

PROBE_TIMEOUT = 2.0


@attrs.define(eq=False)
class Status:
    settings: Settings
    registry: SocketRegistry
    metrics: Metrics
    broadcaster: Broadcaster
    stream_consumer: StreamConsumer
    guards: RedisGuards
    redis_health: RedisHealth
    redis: coredis.Redis[bytes]
    started_at: float = attrs.Factory(time.monotonic)

    def snapshot(self) -> health.Snapshot:
        m = self.metrics
        return health.Snapshot(
            index=self.registry.index.stats(),
            max_connections=self.settings.max_total_connections,
            accepted_sockets=len(self.registry.sockets),
            heartbeat_ages=self.registry.heartbeat_ages(trio.current_time()),
            heartbeat_timeout=self.settings.heartbeat_timeout,
            delivered_events=self.broadcaster.delivered_events,
            duplicate_events=self.broadcaster.duplicate_events,
            slow_consumer_closes=int(m.slow_consumer_closes._value.get()),
            rejected=dict(self.registry.legacy),
            rate_limited=int(m.frames_rejected.labels("rate_limited")._value.get()),
            heartbeat_closes=int(m.closes.labels("1001")._value.get()),
            invalid_events=int(sum(s.value for metric in m.events_invalid.collect() for s in metric.samples
                                   if s.name.endswith("_total"))),
        )

    def stats(self) -> dict[str, Any]:
        return health.stats(self.snapshot())

    def subscriber_stats(self) -> dict[str, Any]:
        return {
            "events_delivered": self.broadcaster.delivered_events,
            "events_duplicate": self.broadcaster.duplicate_events,
            "stream_processed": self.stream_consumer.processed,
            "stream_last_id": self.stream_consumer.last_id,
            "circuit_breakers": self.guards.stats(),
        }

    async def probe_redis(self) -> dict[str, Any]:
        """A PING plus the consumer group's lag and pending count, for the detailed health page."""
        out: dict[str, Any] = {"ok": False, "breakers": self.guards.stats()}
        answered = False
        try:
            with trio.fail_after(PROBE_TIMEOUT):
                started = trio.current_time()
                await self.redis.ping()
                out["latency_ms"] = round((trio.current_time() - started) * 1000, 2)
                answered = True
                groups = await self.redis.xinfo_groups(self.settings.stream)
                ours = self.settings.consumer_group.encode()
                for group in groups:
                    if group.get(b"name") == ours:
                        out["consumer_group"] = self.settings.consumer_group
                        out["pending"] = group.get(b"pending")
                        out["lag"] = group.get(b"lag")
        except Exception as exc:
            if not (is_redis_failure(exc) or isinstance(exc, trio.TooSlowError)):
                raise
            out["error"] = type(exc).__name__
        out["ok"] = health.redis_ok(answered=answered, healthy=self.redis_health.healthy,
                                    pubsub_open=self.guards.pubsub.breaker.state is BreakerState.OPEN)
        return out
