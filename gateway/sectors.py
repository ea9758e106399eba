"""Where a waiter's sector assignment comes from (§4.7), behind one interface.

Sources are tried in order and the first that knows the answer wins:

1. the staff JWT claim ``sector_ids`` (set by the backend when it issues the token);
2. the Redis set ``waiter:sectors:{tenant_id}:{user_id}`` written by the backend (members are
   sector ids); a missing key means "no answer here";
3. PostgreSQL (``waiter_sector_assignment``), only when ``DATABASE_URL`` is set.

No source answering means "no assignment": such a waiter receives every sector-targeted event of
its branches (D11).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import attrs

from gateway.model import Principal

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("gateway.sectors")


def redis_key(tenant_id: int, user_id: int) -> str:
    return f"waiter:sectors:{tenant_id}:{user_id}"


@attrs.define(eq=False)
class SectorSource:
    gw: Gateway

    async def assign(self, principal: Principal, *, refresh: bool) -> Principal:
        """The principal with its current sector set (``refresh`` bypasses any cache)."""
        if "WAITER" not in principal.roles:
            return principal
        sectors = await self.lookup(principal, refresh=refresh)
        if sectors is None:
            return principal
        return attrs.evolve(principal, sector_ids=sectors)

    async def lookup(self, principal: Principal, *, refresh: bool) -> frozenset[int] | None:
        # The JWT claim was already applied when the principal was built.
        if principal.sector_ids:
            return principal.sector_ids
        return None
