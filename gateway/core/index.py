"""Live sockets indexed by who may receive what, so routing is a handful of set unions.

Every bucket key starts with the tenant id: two tenants that reuse a branch, sector or session id
land in different buckets, so tenant isolation (D8) holds by construction rather than by a filter
that could be forgotten.

A socket belongs to every bucket its principal qualifies for; the categories are independent
predicates on the principal (the same ones ``gateway.core.routing.receives`` uses):

- admin: ``is_admin``;
- plain waiter: ``is_plain_waiter`` (on /ws/waiter, neither admin nor kitchen);
- kitchen: ``is_kitchen`` and not ``is_admin`` (a manager on /ws/kitchen gets admin traffic);
- diner: ``is_diner``.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator, Set
from typing import Any, Generic, TypeVar

import attrs

from gateway.core.model import Endpoint, Principal

C = TypeVar("C", bound=Hashable)
K = TypeVar("K", bound=Hashable)

TenantKey = tuple[int, int]
SectorKey = tuple[int, int, int]

# Returned for a missing bucket so lookups never allocate and never create keys.
_NONE: frozenset[Any] = frozenset()


def _put(buckets: dict[K, set[C]], key: K, conn: C) -> None:
    bucket = buckets.get(key)
    if bucket is None:
        buckets[key] = {conn}
    else:
        bucket.add(conn)


def _drop(buckets: dict[K, set[C]], key: K, conn: C) -> None:
    # Empty buckets are deleted so that ids seen once (sessions, users) do not accumulate.
    bucket = buckets.get(key)
    if bucket is not None:
        bucket.discard(conn)
        if not bucket:
            del buckets[key]


def _count(counts: dict[K, int], key: K, delta: int) -> None:
    value = counts.get(key, 0) + delta
    if value > 0:
        counts[key] = value
    else:
        counts.pop(key, None)


class ConnectionIndex(Generic[C]):
    """The registry of open sockets and the buckets routing reads.

    The ``*`` lookup methods return the live internal set (or an empty frozenset): callers must
    treat it as read-only and copy it before the index changes if they keep it.
    """

    def __init__(self) -> None:
        self._principals: dict[C, Principal] = {}
        self._admins_by_branch: dict[TenantKey, set[C]] = {}
        self._admins_by_tenant: dict[int, set[C]] = {}
        self._waiters_by_branch: dict[TenantKey, set[C]] = {}
        self._waiters_by_sector: dict[SectorKey, set[C]] = {}
        self._unassigned_by_branch: dict[TenantKey, set[C]] = {}
        self._kitchen_by_branch: dict[TenantKey, set[C]] = {}
        self._diners_by_session: dict[TenantKey, set[C]] = {}
        self._diners_by_branch: dict[TenantKey, set[C]] = {}
        self._users: dict[TenantKey, int] = {}
        self._staff_users: dict[TenantKey, int] = {}
        self._endpoints: dict[Endpoint, int] = {}

    # --- registration ------------------------------------------------------------------------
    def add(self, conn: C, principal: Principal) -> None:
        """Register ``conn``; registering a socket again replaces its principal."""
        if conn in self._principals:
            self.remove(conn)
        self._principals[conn] = principal
        t = principal.tenant_id
        if principal.is_admin:
            _put(self._admins_by_tenant, t, conn)
            for b in principal.branch_ids:
                _put(self._admins_by_branch, (t, b), conn)
        if principal.is_plain_waiter:
            for b in principal.branch_ids:
                _put(self._waiters_by_branch, (t, b), conn)
            self._add_sectors(conn, principal)
        if principal.is_kitchen and not principal.is_admin:
            for b in principal.branch_ids:
                _put(self._kitchen_by_branch, (t, b), conn)
        if principal.is_diner:
            if principal.session_id is not None:
                _put(self._diners_by_session, (t, principal.session_id), conn)
            for b in principal.branch_ids:
                _put(self._diners_by_branch, (t, b), conn)
        _count(self._users, (t, principal.user_id), 1)
        if not principal.is_diner:
            _count(self._staff_users, (t, principal.user_id), 1)
        _count(self._endpoints, principal.endpoint, 1)

    def remove(self, conn: C) -> None:
        """Unregister ``conn``; a socket that is not registered is ignored."""
        principal = self._principals.pop(conn, None)
        if principal is None:
            return
        t = principal.tenant_id
        if principal.is_admin:
            _drop(self._admins_by_tenant, t, conn)
            for b in principal.branch_ids:
                _drop(self._admins_by_branch, (t, b), conn)
        if principal.is_plain_waiter:
            for b in principal.branch_ids:
                _drop(self._waiters_by_branch, (t, b), conn)
            self._remove_sectors(conn, principal)
        if principal.is_kitchen and not principal.is_admin:
            for b in principal.branch_ids:
                _drop(self._kitchen_by_branch, (t, b), conn)
        if principal.is_diner:
            if principal.session_id is not None:
                _drop(self._diners_by_session, (t, principal.session_id), conn)
            for b in principal.branch_ids:
                _drop(self._diners_by_branch, (t, b), conn)
        _count(self._users, (t, principal.user_id), -1)
        if not principal.is_diner:
            _count(self._staff_users, (t, principal.user_id), -1)
        _count(self._endpoints, principal.endpoint, -1)

    def update_sectors(self, conn: C, sector_ids: frozenset[int]) -> None:
        """Replace the sector assignment of a registered socket (``refresh_sectors``).

        The next routed event already uses the new assignment. Raises ``KeyError`` for a socket
        that is not registered.
        """
        old = self._principals[conn]
        new = attrs.evolve(old, sector_ids=frozenset(sector_ids))
        if old.is_plain_waiter:
            self._remove_sectors(conn, old)
            self._add_sectors(conn, new)
        self._principals[conn] = new

    def _add_sectors(self, conn: C, principal: Principal) -> None:
        # One bucket per (branch, sector) pair: a sector only routes to a waiter who is also
        # authorised for the event's branch, without a check at routing time.
        t = principal.tenant_id
        for b in principal.branch_ids:
            if principal.sector_ids:
                for s in principal.sector_ids:
                    _put(self._waiters_by_sector, (t, b, s), conn)
            else:
                _put(self._unassigned_by_branch, (t, b), conn)

    def _remove_sectors(self, conn: C, principal: Principal) -> None:
        t = principal.tenant_id
        for b in principal.branch_ids:
            if principal.sector_ids:
                for s in principal.sector_ids:
                    _drop(self._waiters_by_sector, (t, b, s), conn)
            else:
                _drop(self._unassigned_by_branch, (t, b), conn)

    # --- lookups for routing -----------------------------------------------------------------
    def branch_admins(self, tenant_id: int, branch_id: int) -> Set[C]:
        return self._admins_by_branch.get((tenant_id, branch_id), _NONE)

    def tenant_admins(self, tenant_id: int) -> Set[C]:
        return self._admins_by_tenant.get(tenant_id, _NONE)

    def branch_waiters(self, tenant_id: int, branch_id: int) -> Set[C]:
        return self._waiters_by_branch.get((tenant_id, branch_id), _NONE)

    def sector_waiters(self, tenant_id: int, branch_id: int, sector_id: int) -> Set[C]:
        return self._waiters_by_sector.get((tenant_id, branch_id, sector_id), _NONE)

    def unassigned_waiters(self, tenant_id: int, branch_id: int) -> Set[C]:
        return self._unassigned_by_branch.get((tenant_id, branch_id), _NONE)

    def branch_kitchen(self, tenant_id: int, branch_id: int) -> Set[C]:
        return self._kitchen_by_branch.get((tenant_id, branch_id), _NONE)

    def session_diners(self, tenant_id: int, session_id: int) -> Set[C]:
        return self._diners_by_session.get((tenant_id, session_id), _NONE)

    def branch_diners(self, tenant_id: int, branch_id: int) -> Set[C]:
        return self._diners_by_branch.get((tenant_id, branch_id), _NONE)

    # --- queries -----------------------------------------------------------------------------
    def principal(self, conn: C) -> Principal:
        return self._principals[conn]

    def __len__(self) -> int:
        return len(self._principals)

    def __contains__(self, conn: object) -> bool:
        return conn in self._principals

    def __iter__(self) -> Iterator[C]:
        return iter(self._principals)

    def count_user(self, tenant_id: int, user_id: int) -> int:
        """Open staff sockets of the user, on every endpoint together (per-user limit, D5)."""
        return self._staff_users.get((tenant_id, user_id), 0)

    def count_session(self, tenant_id: int, session_id: int) -> int:
        """Open diner sockets of the table session (per-session limit, D5)."""
        return len(self._diners_by_session.get((tenant_id, session_id), ()))

    def count_endpoint(self, endpoint: Endpoint) -> int:
        return self._endpoints.get(endpoint, 0)

    def stats(self) -> dict[str, int]:
        """The connection counters of the health page (the existing gateway's names, §1.3)."""
        # Derived from bucket keys on demand: health checks are rare, and this keeps add/remove
        # free of bookkeeping that only the health page needs.
        branches: set[TenantKey] = set()
        branches.update(self._admins_by_branch)
        branches.update(self._waiters_by_branch)
        branches.update(self._kitchen_by_branch)
        branches.update(self._diners_by_branch)
        sectors = {(t, s) for t, _b, s in self._waiters_by_sector}
        return {
            "total_connections": len(self._principals),
            "users_connected": len(self._users),
            "branches_with_connections": len(branches),
            "sectors_with_connections": len(sectors),
            "sessions_with_connections": len(self._diners_by_session),
            "admin_connections": sum(len(s) for s in self._admins_by_tenant.values()),
        }

    def is_empty_structurally(self) -> bool:
        """True when no structure holds anything, not even an empty bucket (leak check)."""
        return not any(
            (
                self._principals,
                self._admins_by_branch,
                self._admins_by_tenant,
                self._waiters_by_branch,
                self._waiters_by_sector,
                self._unassigned_by_branch,
                self._kitchen_by_branch,
                self._diners_by_session,
                self._diners_by_branch,
                self._users,
                self._staff_users,
                self._endpoints,
            )
        )
