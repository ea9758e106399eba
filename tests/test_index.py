"""ConnectionIndex: registration, sector refresh, counters, and no leaked buckets."""

from __future__ import annotations

import random
from collections.abc import Iterable

import pytest
from helpers import diner

from gateway.core.index import ConnectionIndex
from gateway.core.model import ENDPOINTS, Endpoint, Principal


class Conn:
    """Stands in for a production connection: hashed by identity."""


def waiter(tenant: int, user: int, branches: set[int], sectors: Iterable[int] = ()) -> Principal:
    return Principal("waiter", tenant, user, frozenset(branches), sector_ids=frozenset(sectors))


def admin(tenant: int, user: int, branches: set[int], endpoint: Endpoint = "admin") -> Principal:
    return Principal(endpoint, tenant, user, frozenset(branches), is_admin=True, is_kitchen=endpoint == "kitchen")


def kitchen(tenant: int, user: int, branches: set[int]) -> Principal:
    return Principal("kitchen", tenant, user, frozenset(branches), is_kitchen=True)


def test_add_and_query() -> None:
    idx: ConnectionIndex[Conn] = ConnectionIndex()
    a, b = Conn(), Conn()
    pa = waiter(1, 7, {1})
    idx.add(a, pa)
    assert len(idx) == 1
    assert a in idx
    assert b not in idx
    assert "nope" not in idx
    assert idx.principal(a) is pa
    assert list(idx) == [a]
    with pytest.raises(KeyError):
        idx.principal(b)


def test_remove_is_idempotent_and_cleans_up() -> None:
    idx: ConnectionIndex[Conn] = ConnectionIndex()
    c = Conn()
    idx.add(c, waiter(1, 7, {1, 2}, {3, 4}))
    assert not idx.is_empty_structurally()
    idx.remove(c)
    idx.remove(c)
    idx.remove(Conn())
    assert len(idx) == 0
    assert c not in idx
    assert idx.is_empty_structurally()


def test_adding_again_replaces_the_principal() -> None:
    idx: ConnectionIndex[Conn] = ConnectionIndex()
    c = Conn()
    idx.add(c, waiter(1, 7, {1}, {3}))
    idx.add(c, kitchen(1, 7, {2}))
    assert len(idx) == 1
    assert idx.branch_waiters(1, 1) == set()
    assert idx.sector_waiters(1, 1, 3) == set()
    assert idx.branch_kitchen(1, 2) == {c}
    assert idx.count_user(1, 7) == 1
    assert idx.count_endpoint("waiter") == 0
    idx.remove(c)
    assert idx.is_empty_structurally()


def test_buckets_by_kind() -> None:
    idx: ConnectionIndex[str] = ConnectionIndex()
    idx.add("adm", admin(1, 1, {1, 2}))
    idx.add("mgr_w", admin(1, 2, {1}, "waiter"))
    idx.add("mgr_k", admin(1, 3, {1}, "kitchen"))
    idx.add("w", waiter(1, 4, {1, 2}, {5}))
    idx.add("w0", waiter(1, 5, {1}))
    idx.add("k", kitchen(1, 6, {1}))
    idx.add("d", diner(1, 1, 9))
    idx.add("other_tenant", waiter(2, 4, {1}, {5}))
    assert idx.branch_admins(1, 1) == {"adm", "mgr_w", "mgr_k"}
    assert idx.branch_admins(1, 2) == {"adm"}
    assert idx.tenant_admins(1) == {"adm", "mgr_w", "mgr_k"}
    assert idx.branch_waiters(1, 1) == {"w", "w0"}
    assert idx.branch_waiters(1, 2) == {"w"}
    assert idx.sector_waiters(1, 1, 5) == {"w"}
    assert idx.sector_waiters(1, 2, 5) == {"w"}
    assert idx.sector_waiters(2, 1, 5) == {"other_tenant"}
    assert idx.unassigned_waiters(1, 1) == {"w0"}
    assert idx.unassigned_waiters(1, 2) == set()
    assert idx.branch_kitchen(1, 1) == {"k"}
    assert idx.session_diners(1, 9) == {"d"}
    assert idx.session_diners(2, 9) == set()
    assert idx.branch_diners(1, 1) == {"d"}
    # Lookups of absent keys must not create buckets.
    idx.branch_waiters(3, 3)
    idx.sector_waiters(3, 3, 3)
    for name in list(idx):
        idx.remove(name)
    assert idx.is_empty_structurally()


def test_update_sectors() -> None:
    idx: ConnectionIndex[str] = ConnectionIndex()
    idx.add("w", waiter(1, 4, {1, 2}, {5}))
    idx.update_sectors("w", frozenset({6, 7}))
    assert idx.principal("w").sector_ids == {6, 7}
    assert idx.sector_waiters(1, 1, 5) == set()
    assert idx.sector_waiters(1, 1, 6) == {"w"}
    assert idx.sector_waiters(1, 2, 7) == {"w"}
    assert idx.unassigned_waiters(1, 1) == set()

    idx.update_sectors("w", frozenset())
    assert idx.unassigned_waiters(1, 1) == {"w"}
    assert idx.unassigned_waiters(1, 2) == {"w"}
    assert idx.sector_waiters(1, 1, 6) == set()

    idx.update_sectors("w", frozenset({5}))
    assert idx.unassigned_waiters(1, 1) == set()
    assert idx.sector_waiters(1, 1, 5) == {"w"}
    assert idx.branch_waiters(1, 1) == {"w"}

    idx.remove("w")
    assert idx.is_empty_structurally()


def test_update_sectors_of_a_non_waiter_only_records_them() -> None:
    idx: ConnectionIndex[str] = ConnectionIndex()
    idx.add("mgr", admin(1, 2, {1}, "waiter"))
    idx.update_sectors("mgr", frozenset({5}))
    assert idx.principal("mgr").sector_ids == {5}
    assert idx.sector_waiters(1, 1, 5) == set()
    idx.remove("mgr")
    assert idx.is_empty_structurally()


def test_update_sectors_of_an_unknown_socket() -> None:
    idx: ConnectionIndex[str] = ConnectionIndex()
    with pytest.raises(KeyError):
        idx.update_sectors("ghost", frozenset({1}))
    assert idx.is_empty_structurally()


def test_counts() -> None:
    idx: ConnectionIndex[Conn] = ConnectionIndex()
    conns = [Conn() for _ in range(9)]
    idx.add(conns[0], waiter(1, 7, {1}))
    idx.add(conns[1], kitchen(1, 7, {1}))
    idx.add(conns[2], admin(1, 7, {1}))
    idx.add(conns[3], waiter(2, 7, {1}))
    idx.add(conns[4], diner(1, 1, 7))
    idx.add(conns[5], diner(1, 1, 7))
    idx.add(conns[6], diner(2, 1, 7))
    # The per-user limit counts staff sockets on every endpoint, per tenant; diners do not count.
    assert idx.count_user(1, 7) == 3
    assert idx.count_user(2, 7) == 1
    assert idx.count_user(1, -7) == 0
    assert idx.count_user(3, 7) == 0
    assert idx.count_session(1, 7) == 2
    assert idx.count_session(2, 7) == 1
    assert idx.count_session(1, 8) == 0
    assert idx.count_endpoint("waiter") == 2
    assert idx.count_endpoint("kitchen") == 1
    assert idx.count_endpoint("admin") == 1
    assert idx.count_endpoint("diner") == 3
    idx.remove(conns[0])
    idx.remove(conns[4])
    assert idx.count_user(1, 7) == 2
    assert idx.count_session(1, 7) == 1
    assert idx.count_endpoint("waiter") == 1


def test_stats() -> None:
    idx: ConnectionIndex[str] = ConnectionIndex()
    assert idx.stats() == {
        "total_connections": 0,
        "users_connected": 0,
        "branches_with_connections": 0,
        "sectors_with_connections": 0,
        "sessions_with_connections": 0,
        "admin_connections": 0,
    }
    idx.add("adm", admin(1, 1, {1, 2}))
    idx.add("adm_again", admin(1, 1, {1}))
    idx.add("mgr_k", admin(1, 2, {3}, "kitchen"))
    idx.add("w", waiter(1, 4, {1, 2}, {5, 6}))
    idx.add("w_t2", waiter(2, 4, {1}, {5}))
    idx.add("k", kitchen(1, 6, {4}))
    idx.add("d1", diner(1, 1, 9))
    idx.add("d2", diner(1, 1, 9))
    idx.add("d3", diner(1, 5, 10))
    assert idx.stats() == {
        "total_connections": 9,
        # (1,1) (1,2) (1,4) (2,4) (1,6) and the diner pseudo ids (1,-9) (1,-10)
        "users_connected": 7,
        # (1,1) (1,2) (1,3) (1,4) (1,5) (2,1)
        "branches_with_connections": 6,
        # (1,5) (1,6) (2,5)
        "sectors_with_connections": 3,
        "sessions_with_connections": 2,
        "admin_connections": 3,
    }


def _random_principal(rng: random.Random) -> Principal:
    endpoint = rng.choice(ENDPOINTS)
    tenant = rng.randint(1, 3)
    branches = frozenset(rng.sample(range(1, 5), rng.randint(0, 3)))
    sectors = frozenset(rng.sample(range(1, 6), rng.randint(0, 3)))
    if endpoint == "diner":
        session = rng.randint(1, 6)
        return Principal("diner", tenant, -session, branches, session_id=rng.choice([session, None]))
    return Principal(
        endpoint,
        tenant,
        rng.randint(1, 8),
        branches,
        is_admin=endpoint == "admin" or rng.random() < 0.2,
        is_kitchen=endpoint == "kitchen",
        sector_ids=sectors,
    )


def test_random_add_remove_cycles_leave_nothing_behind() -> None:
    rng = random.Random(20240131)
    idx: ConnectionIndex[Conn] = ConnectionIndex()
    live: dict[Conn, Principal] = {}
    for _ in range(1000):
        for _ in range(rng.randint(1, 8)):
            c, p = Conn(), _random_principal(rng)
            idx.add(c, p)
            live[c] = p
        for c in rng.sample(list(live), rng.randint(0, len(live))):
            if rng.random() < 0.3:
                sectors = frozenset(rng.sample(range(1, 6), rng.randint(0, 3)))
                idx.update_sectors(c, sectors)
                live[c] = idx.principal(c)
            else:
                idx.remove(c)
                del live[c]
        if rng.random() < 0.1:
            idx.remove(Conn())
        assert len(idx) == len(live)
        assert set(idx) == set(live)
    users = {(p.tenant_id, p.user_id) for p in live.values() if not p.is_diner}
    for tenant, user in users:
        expected = sum(
            1 for p in live.values() if not p.is_diner and (p.tenant_id, p.user_id) == (tenant, user)
        )
        assert idx.count_user(tenant, user) == expected
    for endpoint in ENDPOINTS:
        assert idx.count_endpoint(endpoint) == sum(1 for p in live.values() if p.endpoint == endpoint)
    assert idx.stats()["users_connected"] == len({(p.tenant_id, p.user_id) for p in live.values()})
    for c in list(live):
        idx.remove(c)
    assert len(idx) == 0
    assert idx.is_empty_structurally()
