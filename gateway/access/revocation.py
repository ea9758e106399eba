"""Revocation checks of staff principals: one ``MGET`` per batch, behind the auth guard (D3, D4)."""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import coredis
import trio

from gateway.core.auth import is_revoked, revocation_keys
from gateway.core.model import Principal
from gateway.redisio.client import is_redis_failure
from gateway.redisio.guards import RedisGuard

REVOCATION_TIMEOUT = 2.0


@attrs.define(eq=False)
class Revocation:
    redis: coredis.Redis[bytes]
    guard: RedisGuard

    async def check(self, principals: Sequence[Principal]) -> list[bool] | None:
        """Whether each principal is revoked; None when Redis cannot answer (D4)."""
        keys: list[str] = []
        spans: list[tuple[int, int]] = []
        for p in principals:
            ks = revocation_keys(p)
            spans.append((len(keys), len(keys) + len(ks)))
            keys.extend(ks)
        if not keys:
            return [False] * len(principals)
        if not self.guard.allow():
            return None
        values: Sequence[bytes | str | None]
        try:
            with trio.fail_after(REVOCATION_TIMEOUT):
                values = await self.redis.mget(keys)
        except Exception as exc:
            if not is_redis_failure(exc) and not isinstance(exc, trio.TooSlowError):
                raise
            self.guard.failed(exc)
            return None
        self.guard.ok()
        return [is_revoked(p, list(values[a:b])) for p, (a, b) in zip(principals, spans, strict=True)]
