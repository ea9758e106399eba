"""Redis ingestion: the critical stream through this instance's consumer group, and pub/sub.

Both readers validate every event the same way (``gateway.core.events``), hand valid ones to the
broadcast workers and survive any Redis outage: they retry forever with exponential backoff
behind a circuit breaker, and report Redis health to the gateway (D15, D17).

The stream reader acknowledges a batch only after all its entries reached their sockets' send
queues, in one pipelined round trip that also carries dead-letter moves. An entry whose routing
raised stays pending; the recovery pass reclaims it and moves it to the dead-letter stream after
``MAX_DELIVERIES`` deliveries.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import attrs
import trio
from coredis.exceptions import (
    ResponseError,
    StreamConsumerGroupError,
    StreamDuplicateConsumerGroupError,
)
from coredis.response.types import StreamPendingExt

from gateway.broadcast import Job
from gateway.core.breaker import BreakerState, CircuitBreaker
from gateway.core.events import InvalidEvent, parse_event
from gateway.logs import RateLimitedLog
from gateway.redis_ops import (
    DLQ_MAXLEN,
    group_missing,
    raise_unless_redis_failure,
    xadd_capped,
)

if TYPE_CHECKING:
    from gateway.app import Gateway

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
MAX_DELIVERIES = 3
#: Stale groups are looked for this often, or twice per ``group_stale_after`` if that is shorter.
STALE_GROUP_CHECK_INTERVAL = 300.0

_invalid_log = RateLimitedLog(log, interval=60.0)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@attrs.define(eq=False)
class _Batch:
    """Completion tracking for one XREADGROUP batch."""

    pending: int
    done: trio.Event = attrs.Factory(trio.Event)
    acked: list[Any] = attrs.Factory(list)
    failed: list[Any] = attrs.Factory(list)

    def callback(self, entry_id: Any) -> Any:
        def on_done(ok: bool) -> None:
            (self.acked if ok else self.failed).append(entry_id)
            self.pending -= 1
            if self.pending == 0:
                self.done.set()

        return on_done


@attrs.define(eq=False)
class StreamConsumer:
    gw: Gateway
    _consumerless: dict[str, float] = attrs.Factory(dict)
    last_id: str | None = None
    processed: int = 0

    @property
    def _group(self) -> str:
        return self.gw.settings.consumer_group

    @property
    def _consumer(self) -> str:
        return self.gw.settings.instance_id

    async def run(self, jobs: trio.MemorySendChannel[Job]) -> None:
        gw = self.gw
        backoff = gw.backoff()
        breaker = gw.breakers["stream"]
        next_reclaim = 0.0
        next_stale_check = 0.0
        group_ready = False
        group_lost = False
        while True:
            if not breaker.allow():
                await trio.sleep(max(breaker.seconds_until_retry(), 0.1))
                continue
            try:
                if not group_ready:
                    if group_lost:
                        await self.recreate_group()
                        group_lost = False
                    else:
                        await self.ensure_group()
                    # Entries this instance read but never acknowledged (it crashed or was killed)
                    # come back first, before new ones.
                    await self.replay_own_pending(jobs)
                    group_ready = True
                    gw.stream_ready.set()
                now = trio.current_time()
                if now >= next_reclaim:
                    await self.reclaim(jobs)
                    next_reclaim = now + gw.settings.reclaim_interval
                if now >= next_stale_check:
                    await self.remove_stale_groups()
                    next_stale_check = now + min(STALE_GROUP_CHECK_INTERVAL, gw.settings.group_stale_after / 2)
                entries = await gw.redis.xreadgroup(
                    self._group,
                    self._consumer,
                    count=gw.settings.stream_batch,
                    block=gw.settings.stream_block_ms,
                    streams={gw.settings.stream: ">"},
                )
                gw.redis_ok(breaker)
                backoff.reset()
                if entries:
                    for _stream, items in entries.items():
                        await self.process(items, jobs)
            except BaseException as exc:
                if group_missing(exc):
                    log.warning("consumer group missing: recreating it", extra={"group": self._group})
                    gw.redis_ok(breaker)
                    # Recreated at the top of the loop, inside the try: a Redis failure while doing
                    # it is then an outage like any other, not a crash of this task.
                    group_ready = False
                    group_lost = True
                    continue
                raise_unless_redis_failure(exc)
                gw.redis_failed(breaker, "stream", exc)
                await trio.sleep(backoff.next_delay())

    async def replay_own_pending(self, jobs: trio.MemorySendChannel[Job]) -> None:
        gw = self.gw
        while True:
            entries = await gw.redis.xreadgroup(
                self._group, self._consumer, count=gw.settings.stream_batch, streams={gw.settings.stream: "0"}
            )
            items = [item for _s, batch in (entries or {}).items() for item in batch if item.field_values]
            if not items:
                return
            log.info("re-delivering entries left pending by a previous run", extra={"count": len(items)})
            before = self.processed
            await self.process(items, jobs)
            if self.processed == before:
                return  # routing keeps failing: leave them to the reclaim pass and the DLQ

    async def remove_stale_groups(self) -> None:
        """Delete other instances' groups whose consumers have all been idle too long (D14)."""
        gw = self.gw
        prefix = gw.settings.group_prefix + ":"
        stale_ms = gw.settings.group_stale_after * 1000
        try:
            groups = await gw.redis.xinfo_groups(gw.settings.stream)
        except ResponseError:
            return
        for group in groups:
            name = _text(group.get(b"name", group.get("name", b"")))  # type: ignore[call-overload]
            if not name.startswith(prefix) or name == self._group:
                continue
            try:
                consumers = await gw.redis.xinfo_consumers(gw.settings.stream, name)
            except StreamConsumerGroupError:
                continue  # removed meanwhile by another instance
            idle = [int(c.get(b"idle", c.get("idle", 0)) or 0) for c in consumers]  # type: ignore[call-overload]
            if idle:
                stale = min(idle) >= stale_ms
            else:
                # No consumer (created, never read): its age is unknown, so time it from here.
                first_seen = self._consumerless.setdefault(name, trio.current_time())
                stale = trio.current_time() - first_seen >= gw.settings.group_stale_after
            if stale:
                self._consumerless.pop(name, None)
                try:
                    await gw.redis.xgroup_destroy(gw.settings.stream, name)
                except StreamConsumerGroupError:
                    continue
                log.warning("removed the consumer group of a departed instance", extra={"group": name})

    async def ensure_group(self) -> None:
        try:
            await self.gw.redis.xgroup_create(self.gw.settings.stream, self._group, "$", mkstream=True)
            log.info("consumer group created", extra={"group": self._group})
        except StreamDuplicateConsumerGroupError:
            pass  # BUSYGROUP: ours from a previous run, with its position and pending entries

    async def recreate_group(self) -> None:
        """After NOGROUP: resume where this instance stopped, but never before the catch-up window."""
        window_start_ms = int((time.time() - self.gw.settings.catchup_window) * 1000)
        start = f"{window_start_ms}-0"
        if self.last_id is not None and _id_ms(self.last_id) >= window_start_ms:
            start = self.last_id
        try:
            await self.gw.redis.xgroup_create(self.gw.settings.stream, self._group, start, mkstream=True)
            log.info("consumer group recreated", extra={"group": self._group, "start": start})
        except StreamDuplicateConsumerGroupError:
            pass

    async def process(self, items: Sequence[Any], jobs: trio.MemorySendChannel[Job]) -> None:
        """Route a batch, wait until it reached the send queues, then ack it in one round trip."""
        gw = self.gw
        now = trio.current_time()
        dead: list[tuple[Any, bytes, str]] = []
        valid: list[tuple[Any, Any]] = []
        for item in items:
            raw = item.field_values.get(b"data", b"")
            gw.metrics.events_received.labels("stream").inc()
            try:
                event = parse_event(raw, max_size=gw.settings.max_message_size)
            except InvalidEvent as exc:
                gw.metrics.events_invalid.labels("stream", exc.reason).inc()
                _invalid_log.warning("invalid stream entry moved to the dead-letter stream", reason=exc.reason)
                dead.append((item.identifier, raw if isinstance(raw, bytes) else b"", f"invalid: {exc.reason}"))
                continue
            valid.append((item.identifier, event))
        batch = _Batch(pending=len(valid))
        for entry_id, event in valid:
            await jobs.send(Job(event=event, source="stream", received_at=now, on_done=batch.callback(entry_id)))
        if valid:
            await batch.done.wait()
        if items:
            self.last_id = _text(items[-1].identifier)
        await self.finish(batch.acked, dead)
        self.processed += len(batch.acked)

    async def finish(self, acked: list[Any], dead: list[tuple[Any, bytes, str]]) -> None:
        gw = self.gw
        ids = acked + [d[0] for d in dead]
        if not ids:
            return
        async with gw.redis.pipeline(transaction=False) as pipe:
            # The batch's catch-up appends ride in the same round trip as its acknowledgements.
            gw.catchup.take_into(pipe)
            for entry_id, raw, error in dead:
                xadd_capped(pipe, gw.settings.dlq_stream, self._dlq_fields(entry_id, raw, error, 1), DLQ_MAXLEN)
            pipe.xack(gw.settings.stream, self._group, ids)
        gw.metrics.stream_acked.inc(len(ids))
        for _ in dead:
            gw.metrics.dlq.labels("invalid").inc()

    def _dlq_fields(self, entry_id: Any, raw: bytes, error: str, deliveries: int) -> dict[str, Any]:
        return {
            "original_id": _text(entry_id),
            "original_stream": self.gw.settings.stream,
            "data": raw,
            "retry_count": str(deliveries),
            "failed_at": repr(time.time()),
            "consumer": self._consumer,
            "error": error,
        }

    async def reclaim(self, jobs: trio.MemorySendChannel[Job]) -> None:
        """Take back entries idle for ``reclaim_idle`` (following the cursor to the end); entries
        delivered ``MAX_DELIVERIES`` times go to the dead-letter stream."""
        gw = self.gw
        cursor: Any = "0-0"
        idle_ms = int(gw.settings.reclaim_idle * 1000)
        while True:
            result = await gw.redis.xautoclaim(gw.settings.stream, self._group, self._consumer, idle_ms, cursor,
                                               count=100)
            cursor, claimed = result[0], [c for c in result[1] if c.field_values]
            deleted = list(result[2]) if len(result) > 2 else []
            if deleted:
                # Trimmed from the stream while pending: nothing left to deliver.
                await gw.redis.xack(gw.settings.stream, self._group, deleted)
            if claimed:
                await self._retry_claimed(claimed, jobs)
            if _text(cursor) == "0-0":
                return

    async def _retry_claimed(self, claimed: Sequence[Any], jobs: trio.MemorySendChannel[Job]) -> None:
        gw = self.gw
        first, last = claimed[0].identifier, claimed[-1].identifier
        # The claimed entries are ours now. Between them in our list there can only be entries whose
        # routing failed less than ``reclaim_idle`` ago (no batch is in flight while this runs).
        pending = await gw.redis.xpending(gw.settings.stream, self._group, start=first, end=last,
                                          count=len(claimed) + gw.settings.stream_batch, consumer=self._consumer)
        deliveries = {_text(p.identifier): int(p.delivered) for p in pending if isinstance(p, StreamPendingExt)}
        retry: list[Any] = []
        dead: list[tuple[Any, bytes, str]] = []
        for item in claimed:
            raw = item.field_values.get(b"data", b"")
            if deliveries.get(_text(item.identifier), 1) >= MAX_DELIVERIES:
                dead.append((item.identifier, raw, f"routing failed {MAX_DELIVERIES} times"))
            else:
                retry.append(item)
        if dead:
            async with gw.redis.pipeline(transaction=False) as pipe:
                for entry_id, raw, error in dead:
                    xadd_capped(pipe, gw.settings.dlq_stream,
                                self._dlq_fields(entry_id, raw, error, deliveries.get(_text(entry_id), 0)),
                                DLQ_MAXLEN)
                pipe.xack(gw.settings.stream, self._group, [d[0] for d in dead])
            gw.metrics.dlq.labels("retries").inc(len(dead))
            log.error("stream entries moved to the dead-letter stream", extra={"count": len(dead)})
        if retry:
            await self.process(retry, jobs)


def _id_ms(entry_id: str) -> int:
    try:
        return int(entry_id.split("-", 1)[0])
    except ValueError:
        return 0


@attrs.define(eq=False)
class PubSubReader:
    gw: Gateway

    async def run(self, jobs: trio.MemorySendChannel[Job]) -> None:
        gw = self.gw
        backoff = gw.backoff()
        breaker = gw.breakers["pubsub"]
        while True:
            if not breaker.allow():
                await trio.sleep(max(breaker.seconds_until_retry(), 0.1))
                continue
            try:
                # Our own retry loop (not coredis') so outages reach the breaker and health.
                pubsub = gw.redis.pubsub(
                    patterns=PUBSUB_PATTERNS, ignore_subscribe_messages=True, retry_policy=None
                )
                async with pubsub:
                    gw.pubsub_ready.set()
                    gw.redis_ok(breaker)
                    backoff.reset()
                    await self.finish_trial(breaker)
                    async for message in pubsub:
                        if message.get("type") != "pmessage":
                            continue
                        await self.handle(message.get("data"), jobs)
                raise ConnectionError("pub/sub connection ended")
            except BaseException as exc:
                raise_unless_redis_failure(exc)
                gw.redis_failed(breaker, "pubsub", exc)
                await trio.sleep(backoff.next_delay())

    async def finish_trial(self, breaker: CircuitBreaker) -> None:
        """Close a half-open breaker with further trial calls once subscribed.

        A half-open breaker closes after ``half_open_max_calls`` successful calls, but the
        subscription is one call that lasts as long as Redis does: without these PINGs the breaker
        would stay half-open until the next outage.
        """
        while breaker.state is BreakerState.HALF_OPEN and breaker.allow():
            await self.gw.redis.ping()
            self.gw.redis_ok(breaker)

    async def handle(self, raw: Any, jobs: trio.MemorySendChannel[Job]) -> None:
        gw = self.gw
        gw.metrics.events_received.labels("pubsub").inc()
        try:
            event = parse_event(raw if isinstance(raw, bytes | str) else b"", max_size=gw.settings.max_message_size)
        except InvalidEvent as exc:
            gw.metrics.events_invalid.labels("pubsub", exc.reason).inc()
            _invalid_log.warning("invalid pub/sub event dropped", reason=exc.reason)
            return
        await jobs.send(Job(event=event, source="pubsub", received_at=trio.current_time()))
