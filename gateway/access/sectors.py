"""Where a waiter's sector assignment comes from (§4.7), behind one interface.

Sources are tried in order; the first that knows the answer wins:

1. the staff JWT claim ``sector_ids`` (when the backend puts it in the token);
2. the Redis set ``waiter:sectors:{tenant_id}:{user_id}`` written by the backend (members are
   sector ids; a missing key means "no answer here");
3. PostgreSQL, the existing table ``waiter_sector_assignment``, only when ``DATABASE_URL`` is set:
   distinct ``sector_id`` for the waiter and tenant on today's date in ``GATEWAY_SECTOR_TIMEZONE``,
   ``is_active``. Lookups time out after ``GATEWAY_SECTOR_LOOKUP_TIMEOUT``; successes are cached
   for ``GATEWAY_SECTOR_CACHE_TTL``; failures are never cached.

No answer from any source means "no assignment": such a waiter receives every sector-targeted
event of its branches (D11). ``refresh_sectors`` bypasses the cache.

A source that cannot be asked (Redis or the database unreachable, a timeout) is not an answer: the
last good database answer is used if there is one, otherwise the socket keeps the sectors it has.
A ``refresh_sectors`` during an outage must not turn an assigned waiter into an unassigned one
(which would receive every sector's events).
"""

from __future__ import annotations

import datetime
import logging
import zoneinfo
from collections.abc import Callable
from typing import Any

import attrs
import coredis
import trio

from gateway.core.model import Principal
from gateway.redisio.client import is_redis_failure
from gateway.settings import Settings

log = logging.getLogger("gateway.sectors")

SECTOR_QUERY = (
    "SELECT DISTINCT sector_id FROM waiter_sector_assignment "
    "WHERE waiter_id = %s AND tenant_id = %s AND assignment_date = %s AND is_active IS TRUE"
)
_CACHE_MAX = 1000


def redis_key(tenant_id: int, user_id: int) -> str:
    return f"waiter:sectors:{tenant_id}:{user_id}"


class SectorLookupError(Exception):
    pass


def _query_postgres(url: str, user_id: int, tenant_id: int, day: datetime.date, timeout: float) -> frozenset[int]:
    import psycopg  # optional dependency: gateway[postgres]

    with psycopg.connect(url, connect_timeout=max(1, int(timeout)), autocommit=True) as conn:
        conn.execute(f"SET statement_timeout = {int(timeout * 1000)}")
        rows = conn.execute(SECTOR_QUERY, (user_id, tenant_id, day)).fetchall()
    return frozenset(int(r[0]) for r in rows if isinstance(r[0], int) and r[0] > 0)


@attrs.frozen
class SectorSettings:
    """The settings a sector lookup uses."""

    database_url: str | None = attrs.field(repr=False)
    timezone: str
    cache_ttl: float
    lookup_timeout: float

    @classmethod
    def of(cls, settings: Settings) -> SectorSettings:
        return cls(settings.database_url, settings.sector_timezone, settings.sector_cache_ttl,
                   settings.sector_lookup_timeout)


@attrs.define(eq=False)
class SectorSource:
    redis: coredis.Redis[bytes]
    settings: SectorSettings
    #: (tenant, user) -> (expires_at, sectors), successes only.
    cache: dict[tuple[int, int], tuple[float, frozenset[int]]] = attrs.Factory(dict)
    clock: Callable[[], float] = trio.current_time

    async def assign_cached(self, principal: Principal) -> Principal:
        return await self.assign(principal, refresh=False)

    async def assign(self, principal: Principal, *, refresh: bool) -> Principal:
        """The principal with its current sector set (``refresh`` bypasses the cache); unchanged
        when the lookup failed."""
        if "WAITER" not in principal.roles or principal.sectors_from_claim:
            return principal
        try:
            sectors = await self.lookup(principal.tenant_id, principal.user_id, refresh=refresh)
        except SectorLookupError:
            return principal
        return attrs.evolve(principal, sector_ids=sectors or frozenset())

    async def lookup(self, tenant_id: int, user_id: int, *, refresh: bool) -> frozenset[int] | None:
        """The waiter's sectors, or None when no source has an assignment for it.

        Raises ``SectorLookupError`` when a source could not be asked and nothing is cached.
        """
        try:
            from_redis = await self._from_redis(tenant_id, user_id)
        except SectorLookupError as exc:
            # The set would win if it exists, so a lower source's answer could contradict it.
            log.warning("sector lookup failed", extra={"tenant": tenant_id, "user": user_id, "source": "redis",
                                                       "error": str(exc)})
            raise
        if from_redis is not None:
            return from_redis
        if self.settings.database_url is None:
            return None
        key = (tenant_id, user_id)
        now = self.clock()
        cached = self.cache.get(key)
        if cached is not None and not refresh and cached[0] > now:
            return cached[1]
        try:
            sectors = await self._from_postgres(tenant_id, user_id)
        except SectorLookupError as exc:
            log.warning("sector lookup failed; not cached", extra={"tenant": tenant_id, "user": user_id,
                                                                  "source": "postgres", "error": str(exc)})
            if cached is not None:
                return cached[1]
            raise
        if len(self.cache) >= _CACHE_MAX:
            self.cache.pop(next(iter(self.cache)))
        self.cache[key] = (now + self.settings.cache_ttl, sectors)
        return sectors

    async def _from_redis(self, tenant_id: int, user_id: int) -> frozenset[int] | None:
        try:
            with trio.fail_after(self.settings.lookup_timeout):
                members: Any = await self.redis.smembers(redis_key(tenant_id, user_id))
        except Exception as exc:
            if not (is_redis_failure(exc) or isinstance(exc, trio.TooSlowError)):
                raise
            raise SectorLookupError(type(exc).__name__) from None
        out = set()
        for m in members or ():
            try:
                value = int(m)
            except (TypeError, ValueError):
                continue
            if value > 0:
                out.add(value)
        return frozenset(out) if out else None

    async def _from_postgres(self, tenant_id: int, user_id: int) -> frozenset[int]:
        settings = self.settings
        assert settings.database_url is not None
        day = datetime.datetime.now(zoneinfo.ZoneInfo(settings.timezone)).date()
        timeout = settings.lookup_timeout
        try:
            with trio.fail_after(timeout + 0.5):
                # psycopg's async API is asyncio-only: its sync API runs in a worker thread, which a
                # timeout abandons (the thread finishes on its own, bounded by statement_timeout).
                return await trio.to_thread.run_sync(
                    _query_postgres, settings.database_url, user_id, tenant_id, day, timeout, abandon_on_cancel=True
                )
        except trio.TooSlowError:
            raise SectorLookupError("timed out") from None
        except Exception as exc:
            raise SectorLookupError(type(exc).__name__) from None
