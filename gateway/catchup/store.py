"""Catch-up: what a reconnecting client missed, kept per branch for a few minutes (D16).

Events are appended before fan-out by the positioner (``gateway.catchup.positions``), once across
instances, to the stream ``gw:catchup:{tenant}:{branch}``; those stream ids are protocol v2's
positions. The buffered appender here (``add``, ``take_into``, ``writer``) is the earlier path,
whose appends rode in a stream batch's acknowledgement; ``build`` no longer feeds it.

Reads return the newest ``catchup_max_events`` of the last ``catchup_window`` seconds for a branch;
the HTTP layer (``gateway.serving.catchup_http``) filters them with the routing predicate itself.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import attrs
import coredis
import trio

from gateway.core.events import InvalidEvent, parse_event
from gateway.core.model import Event
from gateway.redisio import resp
from gateway.redisio.client import is_redis_failure
from gateway.redisio.guards import RedisGuard

log = logging.getLogger("gateway.catchup")

FLUSH_INTERVAL = 0.005
#: Appends kept in memory while Redis cannot take them.
MAX_BUFFERED = 10000

# One call appends a whole batch. KEYS: a guard key and a branch stream per event, in pairs.
# ARGV[1]: TTL in seconds; ARGV[2]: entries kept per stream; ARGV[3...]: the frame payloads.
_APPEND_ONCE = """
local ttl, maxlen, appended = ARGV[1], ARGV[2], 0
for i = 1, #KEYS, 2 do
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ttl) then
    redis.call('XADD', KEYS[i + 1], 'MAXLEN', maxlen, '*', 'data', ARGV[2 + (i + 1) / 2])
    redis.call('EXPIRE', KEYS[i + 1], ttl)
    appended = appended + 1
  end
end
return appended
"""
#: Events per script call: bounds the time Redis spends in one script.
_APPEND_CHUNK = 200
#: Largest millisecond part of a stream id. A larger ``since`` is an XRANGE syntax error, which
#: would count as a Redis failure and could open the breaker that guards live delivery.
_MAX_ID_MS = 2**64 - 1


def catchup_key(tenant_id: int, branch_id: int) -> str:
    return f"gw:catchup:{tenant_id}:{branch_id}"


#: How long the writer's round trip may take on its own connection (coredis' ``stream_timeout``).
WRITE_TIMEOUT = 10.0
#: How long one catch-up read may take before it counts as a Redis failure.
READ_TIMEOUT = 2.0


@attrs.define(eq=False)
class CatchupStore:
    redis: coredis.Redis[bytes]
    guard: RedisGuard
    window: float
    max_events: int
    pending: list[Event] = attrs.Factory(list)
    _wakeup: trio.Event = attrs.Factory(trio.Event)
    #: Where the writer flushes on a connection of its own (``gateway.redisio.resp``); None, or a
    #: URL that module does not serve (TLS): through coredis.
    url: str | None = None
    _conn: resp.RespConnection | None = None

    def add(self, event: Event) -> None:
        if event.branch_id > 0:
            self.pending.append(event)
            self._wakeup.set()

    def take_into(self, pipe: Any) -> int:
        """Queue the buffered appends on ``pipe``; returns how many were queued.

        Every instance delivers every event, so each would append it: a guard key per event
        (``SET NX``, in the same script as the append) lets exactly one copy in.
        """
        events, self.pending = self.pending, []
        ttl = int(self.window) + 1
        # coredis spends hundreds of microseconds of CPU per command, pipelined or not: one script
        # call per chunk of events rather than one per event.
        for start in range(0, len(events), _APPEND_CHUNK):
            keys: list[str] = []
            payloads: list[bytes] = []
            for event in events[start : start + _APPEND_CHUNK]:
                digest = hashlib.blake2b(event.frame_payload, digest_size=16).hexdigest()
                keys += [f"gw:catchup:seen:{event.tenant_id}:{digest}", catchup_key(event.tenant_id, event.branch_id)]
                payloads.append(event.frame_payload)
            pipe.eval(_APPEND_ONCE, keys=keys, args=[ttl, self.max_events, *payloads])
        return len(events)

    async def writer(self) -> None:
        """Flush buffered appends every few milliseconds, behind the catch-up breaker.

        While Redis cannot take them they stay buffered (the newest ``MAX_BUFFERED``) and are
        written once the breaker lets a trial call through; live delivery never waits for this.
        """
        guard = self.guard
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            await trio.sleep(FLUSH_INTERVAL)
            if not self.pending:
                continue
            if not guard.allow():
                del self.pending[:-MAX_BUFFERED]
                await trio.sleep(max(guard.breaker.seconds_until_retry(), FLUSH_INTERVAL))
                self._wakeup.set()
                continue
            batch = list(self.pending)
            try:
                await self._flush()
            except Exception as exc:
                if not (is_redis_failure(exc) or isinstance(exc, trio.TooSlowError)):
                    raise
                await self._drop_connection()
                self.pending[:0] = batch
                del self.pending[:-MAX_BUFFERED]
                guard.failed(exc)
                self._wakeup.set()
                await trio.sleep(FLUSH_INTERVAL)
            else:
                guard.ok()

    async def _flush(self) -> None:
        if self.url is None or not resp.supported(self.url):
            async with self.redis.pipeline(transaction=False) as pipe:
                self.take_into(pipe)
            return
        if self._conn is None:
            self._conn = await resp.open_connection(self.url)
        commands = resp.Commands()
        self.take_into(commands)
        with trio.fail_after(WRITE_TIMEOUT):
            await self._conn.call(*commands.queued)

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with trio.CancelScope(shield=True):
                await conn.aclose()

    async def read(self, tenant_id: int, branch_id: int, since: float) -> list[Event]:
        start = max(since, time.time() - self.window) * 1000
        if start >= _MAX_ID_MS:
            return []  # nothing is stored after the end of time (and 1e306 * 1000 is inf)
        start_ms = int(start)
        # The newest ``max_events`` of the window (the stream may hold more for v2 resume).
        entries = await self.redis.xrevrange(catchup_key(tenant_id, branch_id), "+", f"{start_ms}-0",
                                            count=self.max_events)
        out: list[Event] = []
        for entry in reversed(entries):
            raw = entry.field_values.get(b"data", b"")
            try:
                out.append(parse_event(raw, max_size=1 << 20))
            except InvalidEvent:
                continue
        return out

    async def read_or_empty(self, tenant_id: int, branch_id: int, since: float) -> list[Event]:
        """:meth:`read` behind the catch-up breaker; nothing when Redis cannot answer."""
        if not self.guard.allow():
            return []
        try:
            with trio.fail_after(READ_TIMEOUT):
                events = await self.read(tenant_id, branch_id, since)
        except Exception as exc:
            if not (is_redis_failure(exc) or isinstance(exc, trio.TooSlowError)):
                raise
            self.guard.failed(exc)
            return []
        self.guard.ok()
        return events
