"""Redis ingestion: the critical stream through this instance's consumer group, and pub/sub.

Both readers validate every event the same way (``gateway.core.events``), hand valid ones to the
broadcast workers and survive any Redis outage: they retry forever with exponential backoff
behind a circuit breaker, and report Redis health to the gateway (D15, D17).

The stream reader acknowledges a batch only after all its entries reached their sockets' send
queues, in one pipelined round trip that also carries dead-letter moves. An entry whose routing
raised stays pending; the recovery pass reclaims it and moves it to the dead-letter stream after
``MAX_DELIVERIES`` deliveries. What to route, acknowledge, dead-letter or retry is decided in
``gateway.core.streambatch``; this module does the reading and the round trips.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import anyio
import attrs
import coredis
import trio
from coredis.exceptions import (
    RedisError,
    ResponseError,
    StreamConsumerGroupError,
    StreamDuplicateConsumerGroupError,
    UnblockedError,
)
from coredis.response.types import StreamPendingExt

from gateway.broadcast import Job
from gateway.core.breaker import BreakerState, CircuitBreaker
from gateway.core.events import InvalidEvent, parse_event
from gateway.core.streambatch import (
    DeadLetter,
    Entry,
    StaleGroups,
    ack_ids,
    dlq_fields,
    group_name,
    idle_times,
    last_entry_id,
    other_instance_group,
    restart_id,
    sort_batch,
    split_claimed,
    text,
)
from gateway.logs import RateLimitedLog
from gateway.redis_ops import DLQ_MAXLEN, xadd_capped

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
#: Stale groups are looked for this often, or twice per ``group_stale_after`` if that is shorter.
STALE_GROUP_CHECK_INTERVAL = 300.0


def is_redis_failure(exc: BaseException) -> bool:
    """True for errors that mean "Redis is unreachable or misbehaving", also inside groups."""
    if isinstance(exc, BaseExceptionGroup):
        return all(is_redis_failure(e) for e in exc.exceptions)
    # coredis runs on anyio: a connection dropped under it surfaces as anyio's resource errors.
    return isinstance(
        exc,
        RedisError | OSError | TimeoutError | trio.BrokenResourceError | EOFError
        | anyio.ClosedResourceError | anyio.BrokenResourceError | anyio.EndOfStream,
    )


def strip_redis_failures(exc: BaseException) -> BaseException | None:
    """``exc`` without its Redis-failure leaves; None when nothing else is left.

    Cancelling a task inside coredis' pub/sub context can raise a group that holds both the
    cancellation and a connection error from coredis' own clean-up: the cancellation must go on,
    the connection error is noise.
    """
    if isinstance(exc, BaseExceptionGroup):
        _, rest = exc.split(lambda e: not isinstance(e, BaseExceptionGroup) and is_redis_failure(e))
        return rest
    return None if is_redis_failure(exc) else exc


def group_missing(exc: BaseException) -> bool:
    """NOGROUP (the stream or the group was deleted), or a blocked XREADGROUP cut short because
    its stream was deleted (UNBLOCKED). Redis answered: this is not an outage.

    coredis maps these replies to their own classes, which are not ``ResponseError`` and whose
    message no longer carries the error code.
    """
    if isinstance(exc, StreamDuplicateConsumerGroupError):
        return False
    return isinstance(exc, StreamConsumerGroupError | UnblockedError)


def raise_unless_redis_failure(exc: BaseException) -> None:
    """Return when ``exc`` is only a Redis failure (the caller backs off); raise anything else."""
    rest = strip_redis_failures(exc)
    if rest is exc:
        raise exc
    if rest is not None:
        raise rest from None


def _entries(items: Iterable[Any]) -> list[Entry]:
    """coredis stream entries as (id, ``data`` field) pairs."""
    return [(item.identifier, item.field_values.get(b"data", b"")) for item in items]


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
    _stale_groups: StaleGroups = attrs.Factory(StaleGroups)
    _invalid_log: RateLimitedLog = attrs.Factory(lambda: RateLimitedLog(log, interval=60.0))
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
                        await self.process(_entries(items), jobs)
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
            await self.process(_entries(items), jobs)
            if self.processed == before:
                return  # routing keeps failing: leave them to the reclaim pass and the DLQ

    async def remove_stale_groups(self) -> None:
        """Delete other instances' groups whose consumers have all been idle too long (D14)."""
        gw = self.gw
        try:
            groups = await gw.redis.xinfo_groups(gw.settings.stream)
        except ResponseError:
            return
        for group in groups:
            name = group_name(group)
            if not other_instance_group(name, prefix=gw.settings.group_prefix, own=self._group):
                continue
            try:
                consumers = await gw.redis.xinfo_consumers(gw.settings.stream, name)
            except StreamConsumerGroupError:
                continue  # removed meanwhile by another instance
            if self._stale_groups.stale(name, idle_times(consumers), now=trio.current_time(),
                                        stale_after=gw.settings.group_stale_after):
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
        start = restart_id(self.last_id, now=time.time(), catchup_window=self.gw.settings.catchup_window)
        try:
            await self.gw.redis.xgroup_create(self.gw.settings.stream, self._group, start, mkstream=True)
            log.info("consumer group recreated", extra={"group": self._group, "start": start})
        except StreamDuplicateConsumerGroupError:
            pass

    async def process(self, entries: Sequence[Entry], jobs: trio.MemorySendChannel[Job]) -> None:
        """Route a batch, wait until it reached the send queues, then ack it in one round trip."""
        gw = self.gw
        now = trio.current_time()
        gw.metrics.events_received.labels("stream").inc(len(entries))
        batch = sort_batch(entries, max_size=gw.settings.max_message_size)
        for invalid in batch.invalid:
            gw.metrics.events_invalid.labels("stream", invalid.reason).inc()
            self._invalid_log.warning("invalid stream entry moved to the dead-letter stream", reason=invalid.reason)
        tracking = _Batch(pending=len(batch.valid))
        for entry_id, event in batch.valid:
            await jobs.send(Job(event=event, source="stream", received_at=now, on_done=tracking.callback(entry_id)))
        if batch.valid:
            await tracking.done.wait()
        if entries:
            self.last_id = last_entry_id(entries)
        await self.finish(tracking.acked, batch.dead)
        self.processed += len(tracking.acked)

    async def finish(self, acked: list[Any], dead: list[DeadLetter]) -> None:
        gw = self.gw
        ids = ack_ids(acked, dead)
        if not ids:
            return
        async with gw.redis.pipeline(transaction=False) as pipe:
            # The batch's catch-up appends ride in the same round trip as its acknowledgements.
            gw.catchup.take_into(pipe)
            for letter in dead:
                xadd_capped(pipe, gw.settings.dlq_stream, self._dlq_fields(letter), DLQ_MAXLEN)
            pipe.xack(gw.settings.stream, self._group, ids)
        gw.metrics.stream_acked.inc(len(ids))
        for _ in dead:
            gw.metrics.dlq.labels("invalid").inc()

    def _dlq_fields(self, letter: DeadLetter) -> dict[str, Any]:
        return dlq_fields(letter, stream=self.gw.settings.stream, consumer=self._consumer, failed_at=time.time())

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
            if text(cursor) == "0-0":
                return

    async def _retry_claimed(self, claimed: Sequence[Any], jobs: trio.MemorySendChannel[Job]) -> None:
        gw = self.gw
        first, last = claimed[0].identifier, claimed[-1].identifier
        # The claimed entries are ours now. Between them in our list there can only be entries whose
        # routing failed less than ``reclaim_idle`` ago (no batch is in flight while this runs).
        pending = await gw.redis.xpending(gw.settings.stream, self._group, start=first, end=last,
                                          count=len(claimed) + gw.settings.stream_batch, consumer=self._consumer)
        deliveries = {text(p.identifier): int(p.delivered) for p in pending if isinstance(p, StreamPendingExt)}
        retry, dead = split_claimed(_entries(claimed), deliveries)
        if dead:
            async with gw.redis.pipeline(transaction=False) as pipe:
                for letter in dead:
                    xadd_capped(pipe, gw.settings.dlq_stream, self._dlq_fields(letter), DLQ_MAXLEN)
                pipe.xack(gw.settings.stream, self._group, [d.entry_id for d in dead])
            gw.metrics.dlq.labels("retries").inc(len(dead))
            log.error("stream entries moved to the dead-letter stream", extra={"count": len(dead)})
        if retry:
            await self.process(retry, jobs)


@attrs.define(eq=False)
class PubSubReader:
    gw: Gateway
    _invalid_log: RateLimitedLog = attrs.Factory(lambda: RateLimitedLog(log, interval=60.0))

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
            self._invalid_log.warning("invalid pub/sub event dropped", reason=exc.reason)
            return
        await jobs.send(Job(event=event, source="pubsub", received_at=trio.current_time()))


def make_client(url: str) -> coredis.Redis[bytes]:
    return coredis.Redis.from_url(url, decode_responses=False, connect_timeout=5.0, stream_timeout=10.0)
