"""Catch-up: what a reconnecting client missed, kept per branch for a few minutes (D16).

Events are appended before fan-out by the positioner (``gateway.catchup.positions``), once across
instances, to the stream ``gw:catchup:{tenant}:{branch}``; those stream ids are protocol v2's
positions, and the same streams answer the v1 catch-up endpoints.

Reads return the newest ``catchup_max_events`` of the last ``catchup_window`` seconds for a branch;
the HTTP layer (``gateway.serving.catchup_http``) filters them with the routing predicate itself.
"""

from __future__ import annotations

import logging
import time

import attrs
import coredis
import trio

from gateway.core.events import InvalidEvent, parse_event
from gateway.core.model import Event
from gateway.redisio.client import is_redis_failure
from gateway.redisio.guards import RedisGuard

log = logging.getLogger("gateway.catchup")

#: Largest millisecond part of a stream id. A larger ``since`` is an XRANGE syntax error, which
#: would count as a Redis failure and could open the breaker that guards live delivery.
_MAX_ID_MS = 2**64 - 1


def catchup_key(tenant_id: int, branch_id: int, *, tagged: bool = False) -> str:
    """The stream of a branch; ``tagged`` (a cluster): with the hash tag its companion keys share
    (``gateway.catchup.positions``), the names of one server unchanged."""
    return f"gw:catchup:{{{tenant_id}:{branch_id}}}" if tagged else f"gw:catchup:{tenant_id}:{branch_id}"


#: How long one catch-up read may take before it counts as a Redis failure.
READ_TIMEOUT = 2.0


@attrs.define(eq=False)
class CatchupStore:
    redis: coredis.Redis[bytes]
    guard: RedisGuard
    window: float
    max_events: int
    #: Keys with hash tags (a cluster).
    tagged: bool = False

    async def read(self, tenant_id: int, branch_id: int, since: float) -> list[Event]:
        start = max(since, time.time() - self.window) * 1000
        if start >= _MAX_ID_MS:
            return []  # nothing is stored after the end of time (and 1e306 * 1000 is inf)
        start_ms = int(start)
        # The newest ``max_events`` of the window (the stream may hold more for v2 resume).
        entries = await self.redis.xrevrange(catchup_key(tenant_id, branch_id, tagged=self.tagged), "+", f"{start_ms}-0",
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
