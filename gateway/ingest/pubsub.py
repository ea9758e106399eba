"""Redis pub/sub ingestion: the backend's channels by pattern, one job per read.

The reader subscribes to the §5.1 patterns (plus the tenant-wide admin channel, D12), validates
every message like the stream reader does (``gateway.core.events``) and hands each read's valid
events to the broadcast worker as one job. It survives any Redis outage: it retries forever with
exponential backoff behind its circuit breaker and reports Redis health (D15, D17). It reads on a
connection of its own (``gateway.redisio.resp``) unless the URL needs TLS, where coredis serves;
``gateway.redisio.topology`` says which server.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import attrs
import coredis
import trio
from coredis.exceptions import ResponseError

from gateway.core.breaker import Backoff, BreakerState, CircuitBreaker
from gateway.core.events import InvalidEvent, parse_event
from gateway.core.linger import Linger
from gateway.core.model import Event
from gateway.fanout.broadcast import Job
from gateway.logs import RateLimitedLog
from gateway.metrics import Metrics
from gateway.redisio import resp
from gateway.redisio.client import raise_unless_redis_failure, ready_messages
from gateway.redisio.guards import RedisGuard
from gateway.redisio.topology import Topology

log = logging.getLogger("gateway.ingest")

#: §5.1 patterns plus the tenant-wide admin channel (D12).
PUBSUB_PATTERNS = (
    "branch:*:waiters",
    "branch:*:kitchen",
    "branch:*:admin",
    "sector:*:waiters",
    "session:*",
    "tenant:*:admin",
)


@attrs.define(eq=False)
class PubSubReader:
    redis: coredis.Redis[bytes]
    guard: RedisGuard
    metrics: Metrics
    max_message_size: int
    backoff: Backoff
    #: Messages per job at most (each job is at most this many of the broadcast queue's events).
    max_batch: int = 100
    #: Where to subscribe on a connection of the reader's own (``gateway.redisio.resp``); None, or
    #: a deployment that module does not serve (TLS), subscribes through coredis. On a cluster any
    #: node will do: each receives every PUBLISH of the cluster.
    topology: Topology | None = None
    #: Seconds between reads while messages flow (``gateway.core.linger``).
    linger: float = 0.0
    #: Set once the patterns are subscribed.
    ready: trio.Event = attrs.Factory(trio.Event)
    _invalid_log: RateLimitedLog = attrs.Factory(lambda: RateLimitedLog(log, interval=60.0))

    async def run(self, jobs: trio.MemorySendChannel[Job]) -> None:
        guard, backoff = self.guard, self.backoff
        breaker = guard.breaker
        while True:
            if not breaker.allow():
                await trio.sleep(max(breaker.seconds_until_retry(), 0.1))
                continue
            try:
                if self.topology is not None and self.topology.raw:
                    await self._read_raw(self.topology, jobs)
                else:
                    await self._read_coredis(jobs)
                raise ConnectionError("pub/sub connection ended")
            except BaseException as exc:
                raise_unless_redis_failure(exc)
                guard.failed(exc)
                await trio.sleep(backoff.next_delay())

    async def _subscribed(self) -> None:
        self.ready.set()
        self.guard.ok()
        self.backoff.reset()
        await self.finish_trial(self.guard.breaker)

    async def _read_raw(self, topology: Topology, jobs: trio.MemorySendChannel[Job]) -> None:
        """Subscribe on a connection of our own and hand over every message of each read as one job.
        A lost node or a failover ends the connection; the next one is opened where the topology
        says, and subscribes again."""
        conn = await topology.connect(None)
        try:
            await conn.send(resp.encode("PSUBSCRIBE", *PUBSUB_PATTERNS))
            confirmed = 0
            while confirmed < len(PUBSUB_PATTERNS):
                for reply in await conn.receive():
                    if isinstance(reply, ResponseError):
                        raise reply
                    if isinstance(reply, list) and reply and reply[0] == b"psubscribe":
                        confirmed += 1
            await self._subscribed()
            limit = self.max_batch
            linger = Linger(self.linger)
            while True:
                issued = trio.current_time()
                replies = await conn.receive()
                returned = trio.current_time()
                raws = [r[3] for r in replies if isinstance(r, list) and len(r) == 4 and r[0] == b"pmessage"]
                for start in range(0, len(raws), limit):
                    await self.handle(raws[start : start + limit], jobs)
                if raws:
                    # Messages published meanwhile wait in the socket's buffer for the next read.
                    await trio.sleep(linger.pause(issued, returned, trio.current_time()))
        finally:
            with trio.CancelScope(shield=True):
                await conn.aclose()

    async def _read_coredis(self, jobs: trio.MemorySendChannel[Job]) -> None:
        # Our own retry loop (not coredis') so outages reach the breaker and health.
        pubsub = self.redis.pubsub(patterns=PUBSUB_PATTERNS, ignore_subscribe_messages=True, retry_policy=None)
        async with pubsub:
            await self._subscribed()
            linger = Linger(self.linger)
            issued = trio.current_time()
            async for message in pubsub:
                returned = trio.current_time()
                # Every message coredis already holds goes in the same job.
                messages = [message, *ready_messages(pubsub, self.max_batch - 1)]
                await self.handle([m.get("data") for m in messages if m and m.get("type") == "pmessage"], jobs)
                await trio.sleep(linger.pause(issued, returned, trio.current_time()))
                issued = trio.current_time()

    async def finish_trial(self, breaker: CircuitBreaker) -> None:
        """Close a half-open breaker with further trial calls once subscribed.

        A half-open breaker closes after ``half_open_max_calls`` successful calls, but the
        subscription is one call that lasts as long as Redis does: without these PINGs the breaker
        would stay half-open until the next outage.
        """
        while breaker.state is BreakerState.HALF_OPEN and breaker.allow():
            await self.redis.ping()
            self.guard.ok()

    async def handle(self, raws: Sequence[Any], jobs: trio.MemorySendChannel[Job]) -> None:
        """Validate the messages of one wake-up and hand the valid ones over as one job."""
        if not raws:
            return
        metrics = self.metrics
        metrics.events_received.labels("pubsub").inc(len(raws))
        events: list[Event] = []
        for raw in raws:
            try:
                events.append(parse_event(raw if isinstance(raw, bytes | str) else b"", max_size=self.max_message_size))
            except InvalidEvent as exc:
                metrics.events_invalid.labels("pubsub", exc.reason).inc()
                self._invalid_log.warning("invalid pub/sub event dropped", reason=exc.reason)
        if events:
            await jobs.send(Job(events=events, source="pubsub", received_at=trio.current_time()))
