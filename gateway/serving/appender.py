"""Appends to the critical stream on behalf of the publish API (D19), behind its own guard."""

from __future__ import annotations

import attrs
import coredis

from gateway.redisio.client import STREAM_MAXLEN, is_redis_failure, xadd_capped
from gateway.redisio.guards import RedisGuard


@attrs.define(eq=False)
class StreamAppender:
    redis: coredis.Redis[bytes]
    guard: RedisGuard
    stream: str

    async def append(self, payload: bytes) -> str | None:
        """The new entry's id, or None when Redis cannot take it."""
        if not self.guard.allow():
            return None
        try:
            entry_id = await xadd_capped(self.redis, self.stream, {"data": payload}, STREAM_MAXLEN)
        except Exception as exc:
            if not is_redis_failure(exc):
                raise
            self.guard.failed(exc)
            return None
        self.guard.ok()
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
