"""Redis ingestion: the critical stream through this instance's consumer group (pub/sub is in
``gateway.ingest.pubsub``).

The reader validates every event (``gateway.core.events``), hands each batch's valid ones to the
broadcast worker as one job and survives any Redis outage: it retries forever with exponential
backoff behind a circuit breaker, and reports Redis health to the gateway (D15, D17).

The stream reader acknowledges a batch only after all its entries reached their sockets' send
queues, in one pipelined round trip that also carries dead-letter moves. An entry whose routing
raised stays pending; the recovery pass reclaims it and moves it to the dead-letter stream after
``MAX_DELIVERIES`` deliveries. What to route, acknowledge, dead-letter or retry is decided in
``gateway.core.streambatch``; this module does the reading and the round trips.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import coredis
import trio
from coredis.exceptions import (
    ResponseError,
    StreamConsumerGroupError,
    StreamDuplicateConsumerGroupError,
)
from coredis.response.types import StreamPendingExt

from gateway.core.breaker import Backoff
from gateway.core.linger import Linger
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
from gateway.fanout.broadcast import Job
from gateway.logs import RateLimitedLog
from gateway.metrics import Metrics
from gateway.redisio import resp
from gateway.redisio.client import (
    DLQ_MAXLEN,
    group_missing,
    raise_unless_redis_failure,
    xadd_capped,
)
from gateway.redisio.guards import RedisGuard
from gateway.redisio.topology import Topology
from gateway.settings import Settings

log = logging.getLogger("gateway.ingest")

#: Seconds a reply on the consumer's own connection may take (beyond XREADGROUP's BLOCK), as
#: coredis' ``stream_timeout``.
REPLY_TIMEOUT = 10.0
#: Stale groups are looked for this often, or twice per ``group_stale_after`` if that is shorter.
STALE_GROUP_CHECK_INTERVAL = 300.0


def _data_field(fields: list[bytes] | None) -> bytes:
    """The ``data`` field of an entry as RESP returned it (a flat field/value list)."""
    pairs = fields or []
    return next((pairs[i + 1] for i in range(0, len(pairs) - 1, 2) if pairs[i] == b"data"), b"")


def _entries(items: Iterable[Any]) -> list[Entry]:
    """coredis stream entries as (id, ``data`` field) pairs."""
    return [(item.identifier, item.field_values.get(b"data", b"")) for item in items]


@attrs.define(eq=False)
class _Outcome:
    """How the events of one stream job went, once the broadcast worker dispatched them."""

    done: trio.Event = attrs.Factory(trio.Event)
    outcomes: list[bool] = attrs.Factory(list)

    def report(self, outcomes: list[bool]) -> None:
        self.outcomes = outcomes
        self.done.set()


@attrs.frozen
class StreamSettings:
    """The settings the stream reader uses."""

    stream: str
    dlq_stream: str
    group: str
    group_prefix: str
    consumer: str
    batch: int
    block_ms: int
    reclaim_idle: float
    reclaim_interval: float
    group_stale_after: float
    catchup_window: float
    max_message_size: int
    backoff_base: float
    backoff_cap: float
    #: Seconds between reads while entries flow (``gateway.core.linger``).
    linger: float = 0.0

    @classmethod
    def of(cls, s: Settings) -> StreamSettings:
        return cls(s.stream, s.dead_letter_stream, s.consumer_group, s.group_prefix, s.instance_id, s.stream_batch,
                   s.stream_block_ms, s.reclaim_idle, s.reclaim_interval, s.group_stale_after, s.catchup_window,
                   s.max_message_size, s.redis_backoff_base, s.redis_backoff_cap, s.ingest_linger_ms / 1000)


@attrs.define(eq=False)
class StreamConsumer:
    redis: coredis.Redis[bytes]
    guard: RedisGuard
    settings: StreamSettings
    metrics: Metrics
    #: Set once the consumer group exists.
    ready: trio.Event = attrs.Factory(trio.Event)
    _stale_groups: StaleGroups = attrs.Factory(StaleGroups)
    _invalid_log: RateLimitedLog = attrs.Factory(lambda: RateLimitedLog(log, interval=60.0))
    last_id: str | None = None
    processed: int = 0
    #: Where to read new entries and acknowledge them on a connection of the consumer's own
    #: (``gateway.redisio.resp``, opened on the master of the stream's slot): no coredis tasks per
    #: round trip. None, or a deployment that module does not serve (TLS): coredis. Recovery and
    #: group management always use coredis.
    topology: Topology | None = None
    _conn: resp.RespConnection | None = None
    #: A batch's acknowledgement held for the next XREADGROUP's write: (commands, ids, dead letters).
    _deferred: tuple[list[bytes], int, int] | None = None

    @property
    def _group(self) -> str:
        return self.settings.group

    @property
    def _consumer(self) -> str:
        return self.settings.consumer

    async def run(self, jobs: trio.MemorySendChannel[Job]) -> None:
        settings, guard = self.settings, self.guard
        backoff = Backoff(base=settings.backoff_base, cap=settings.backoff_cap)
        breaker = guard.breaker
        next_reclaim = 0.0
        next_stale_check = 0.0
        linger = Linger(settings.linger)
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
                    self.ready.set()
                now = trio.current_time()
                if now >= next_reclaim or now >= next_stale_check:
                    await self._flush_deferred()  # those passes read the pending list
                if now >= next_reclaim:
                    await self.reclaim(jobs)
                    next_reclaim = now + self.settings.reclaim_interval
                if now >= next_stale_check:
                    await self.remove_stale_groups()
                    next_stale_check = now + min(STALE_GROUP_CHECK_INTERVAL, self.settings.group_stale_after / 2)
                issued = trio.current_time()
                entries = await self.read_new()
                returned = trio.current_time()
                guard.ok()
                backoff.reset()
                if entries:
                    await self.process(entries, jobs, defer_ack=True)
                    if len(entries) < settings.batch:
                        await trio.sleep(linger.pause(issued, returned, trio.current_time()))
            except BaseException as exc:
                await self._drop_connection()
                if group_missing(exc):
                    log.warning("consumer group missing: recreating it", extra={"group": self._group})
                    guard.ok()
                    # Recreated at the top of the loop, inside the try: a Redis failure while doing
                    # it is then an outage like any other, not a crash of this task.
                    group_ready = False
                    group_lost = True
                    continue
                raise_unless_redis_failure(exc)
                guard.failed(exc)
                await trio.sleep(backoff.next_delay())

    async def _connection(self) -> resp.RespConnection | None:
        """The consumer's own connection for reads and acknowledgements; None: use coredis."""
        if self.topology is None or not self.topology.raw:
            return None
        if self._conn is None:
            self._conn = await self.topology.connect(self.settings.stream)
        return self._conn

    async def _drop_connection(self) -> None:
        self._deferred = None  # unknown whether it was applied: the entries stay pending at worst
        conn, self._conn = self._conn, None
        if conn is not None:
            with trio.CancelScope(shield=True):
                await conn.aclose()

    async def _call(self, conn: resp.RespConnection, commands: list[bytes], wait: float) -> list[Any]:
        """One round trip; a reply that does not come in time is an outage (the connection goes)."""
        with trio.move_on_after(wait):
            return await conn.call(*commands)
        await self._drop_connection()
        raise TimeoutError("Redis did not answer in time")

    async def read_new(self) -> list[Entry]:
        """Up to ``batch`` new entries, waiting at most ``block_ms`` for the first (XREADGROUP >)."""
        settings = self.settings
        conn = await self._connection()
        if conn is None:
            read = await self.redis.xreadgroup(self._group, self._consumer, count=settings.batch,
                                               block=settings.block_ms, streams={settings.stream: ">"})
            return [entry for _stream, items in (read or {}).items() for entry in _entries(items)]
        command = resp.encode("XREADGROUP", "GROUP", self._group, self._consumer, "COUNT", settings.batch,
                              "BLOCK", settings.block_ms, "STREAMS", settings.stream, ">")
        # The previous batch's acknowledgement goes ahead of the read, in the same write: Redis
        # applies and answers it before blocking, as early as a round trip of its own would.
        deferred, self._deferred = self._deferred, None
        acks = deferred[0] if deferred else []
        with trio.move_on_after(settings.block_ms / 1000 + REPLY_TIMEOUT):
            await conn.send(*acks, command)
            replies: list[Any] = []
            while len(replies) <= len(acks):
                replies += await conn.receive()
                if deferred is not None and len(replies) >= len(acks):
                    resp.raise_errors(replies[: len(acks)])
                    self._count_acked(deferred[1], deferred[2])
                    deferred = None
            resp.raise_errors(replies)
            return [(entry_id, _data_field(fields)) for _stream, items in replies[-1] or ()
                    for entry_id, fields in items]
        await self._drop_connection()
        raise TimeoutError("Redis did not answer in time")

    async def replay_own_pending(self, jobs: trio.MemorySendChannel[Job]) -> None:
        while True:
            entries = await self.redis.xreadgroup(
                self._group, self._consumer, count=self.settings.batch, streams={self.settings.stream: "0"}
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
        try:
            groups = await self.redis.xinfo_groups(self.settings.stream)
        except ResponseError:
            return
        for group in groups:
            name = group_name(group)
            if not other_instance_group(name, prefix=self.settings.group_prefix, own=self._group):
                continue
            try:
                consumers = await self.redis.xinfo_consumers(self.settings.stream, name)
            except StreamConsumerGroupError:
                continue  # removed meanwhile by another instance
            if self._stale_groups.stale(name, idle_times(consumers), now=trio.current_time(),
                                        stale_after=self.settings.group_stale_after):
                try:
                    await self.redis.xgroup_destroy(self.settings.stream, name)
                except StreamConsumerGroupError:
                    continue
                log.warning("removed the consumer group of a departed instance", extra={"group": name})

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.settings.stream, self._group, "$", mkstream=True)
            log.info("consumer group created", extra={"group": self._group})
        except StreamDuplicateConsumerGroupError:
            pass  # BUSYGROUP: ours from a previous run, with its position and pending entries

    async def recreate_group(self) -> None:
        """After NOGROUP: resume where this instance stopped, but never before the catch-up window."""
        start = restart_id(self.last_id, now=time.time(), catchup_window=self.settings.catchup_window)
        try:
            await self.redis.xgroup_create(self.settings.stream, self._group, start, mkstream=True)
            log.info("consumer group recreated", extra={"group": self._group, "start": start})
        except StreamDuplicateConsumerGroupError:
            pass

    async def process(self, entries: Sequence[Entry], jobs: trio.MemorySendChannel[Job], *,
                      defer_ack: bool = False) -> None:
        """Route a batch, wait until it reached the send queues, then ack it in one round trip."""
        now = trio.current_time()
        self.metrics.events_received.labels("stream").inc(len(entries))
        batch = sort_batch(entries, max_size=self.settings.max_message_size)
        for invalid in batch.invalid:
            self.metrics.events_invalid.labels("stream", invalid.reason).inc()
            self._invalid_log.warning("invalid stream entry moved to the dead-letter stream", reason=invalid.reason)
        # The whole batch is one job: one hand-over to the broadcast worker, not one per entry.
        acked: list[Any] = []
        if batch.valid:
            tracking = _Outcome()
            await jobs.send(Job(events=[event for _id, event in batch.valid], source="stream", received_at=now,
                                on_done=tracking.report))
            await tracking.done.wait()
            acked = [entry_id for (entry_id, _e), ok in zip(batch.valid, tracking.outcomes, strict=True) if ok]
        if entries:
            self.last_id = last_entry_id(entries)
        await self.finish(acked, batch.dead, defer=defer_ack)
        self.processed += len(acked)

    async def finish(self, acked: list[Any], dead: list[DeadLetter], *, defer: bool = False) -> None:
        """Acknowledge a routed batch (with its dead letters) in one round trip; with ``defer``, in
        the same write as the next XREADGROUP (ahead of it)."""
        ids = ack_ids(acked, dead)
        if not ids:
            return
        conn = await self._connection()
        commands = resp.Commands()
        async with contextlib.AsyncExitStack() as stack:
            pipe: Any = commands if conn is not None else await stack.enter_async_context(
                self.redis.pipeline(transaction=False))
            for letter in dead:
                xadd_capped(pipe, self.settings.dlq_stream, self._dlq_fields(letter), DLQ_MAXLEN)
            pipe.xack(self.settings.stream, self._group, ids)
        if conn is not None:
            if defer:
                await self._flush_deferred()  # never two batches' acknowledgements held back
                self._deferred = (commands.queued, len(ids), len(dead))
                return
            await self._call(conn, commands.queued, REPLY_TIMEOUT)
        self._count_acked(len(ids), len(dead))

    def _count_acked(self, ids: int, dead: int) -> None:
        self.metrics.stream_acked.inc(ids)
        if dead:  # no series for a reason that never happened
            self.metrics.dlq.labels("invalid").inc(dead)

    async def _flush_deferred(self) -> None:
        deferred, self._deferred = self._deferred, None
        if deferred is not None and self._conn is not None:
            await self._call(self._conn, deferred[0], REPLY_TIMEOUT)
            self._count_acked(deferred[1], deferred[2])

    def _dlq_fields(self, letter: DeadLetter) -> dict[str, Any]:
        return dlq_fields(letter, stream=self.settings.stream, consumer=self._consumer, failed_at=time.time())

    async def reclaim(self, jobs: trio.MemorySendChannel[Job]) -> None:
        """Take back entries idle for ``reclaim_idle`` (following the cursor to the end); entries
        delivered ``MAX_DELIVERIES`` times go to the dead-letter stream."""
        cursor: Any = "0-0"
        idle_ms = int(self.settings.reclaim_idle * 1000)
        while True:
            result = await self.redis.xautoclaim(self.settings.stream, self._group, self._consumer, idle_ms, cursor,
                                               count=100)
            cursor, claimed = result[0], [c for c in result[1] if c.field_values]
            deleted = list(result[2]) if len(result) > 2 else []
            if deleted:
                # Trimmed from the stream while pending: nothing left to deliver.
                await self.redis.xack(self.settings.stream, self._group, deleted)
            if claimed:
                await self._retry_claimed(claimed, jobs)
            if text(cursor) == "0-0":
                return

    async def _retry_claimed(self, claimed: Sequence[Any], jobs: trio.MemorySendChannel[Job]) -> None:
        first, last = claimed[0].identifier, claimed[-1].identifier
        # The claimed entries are ours now. Between them in our list there can only be entries whose
        # routing failed less than ``reclaim_idle`` ago (no batch is in flight while this runs).
        pending = await self.redis.xpending(self.settings.stream, self._group, start=first, end=last,
                                          count=len(claimed) + self.settings.batch, consumer=self._consumer)
        deliveries = {text(p.identifier): int(p.delivered) for p in pending if isinstance(p, StreamPendingExt)}
        retry, dead = split_claimed(_entries(claimed), deliveries)
        if dead:
            async with self.redis.pipeline(transaction=False) as pipe:
                for letter in dead:
                    xadd_capped(pipe, self.settings.dlq_stream, self._dlq_fields(letter), DLQ_MAXLEN)
                pipe.xack(self.settings.stream, self._group, [d.entry_id for d in dead])
            self.metrics.dlq.labels("retries").inc(len(dead))
            log.error("stream entries moved to the dead-letter stream", extra={"count": len(dead)})
        if retry:
            await self.process(retry, jobs)
