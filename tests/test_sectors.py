"""Where a waiter's sectors come from (§4.7): the JWT claim, the Redis set, PostgreSQL.

Real gateway, real Redis, real sockets and, for the database source, a throwaway PostgreSQL
cluster (tests/pg.py) that is really stopped for the outage test. Routing is checked by what the
socket receives: probes for several sectors, then a branch-wide sentinel on the same stream, then
a ping; the stream is dispatched in order, so whatever came before the sentinel is all the probes
produced.
"""

from __future__ import annotations

import datetime
import itertools
import logging
import zoneinfo
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import trio
from pg import PostgresCluster

from gateway.core.events import envelope
from gateway.redisio.client import make_client
from gateway.redisio.embedded import RedisProcess
from gateway.redisio.embedded_config import RedisConfig
from gateway_testing import GatewayHandle, Publisher, WSClient

Factory = Callable[..., Awaitable[GatewayHandle]]

TENANT, BRANCH = 1, 2
_nonce = itertools.count()


@pytest.fixture(scope="module")
def pg_cluster() -> Iterator[PostgresCluster]:
    cluster = PostgresCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def pg(pg_cluster: PostgresCluster) -> PostgresCluster:
    if pg_cluster.proc is None:  # an outage test that failed half-way
        pg_cluster.start()
    pg_cluster.create_schema()
    return pg_cluster


def zone_with_another_date() -> tuple[str, datetime.date]:
    """A time zone whose date today differs from the server's local date (UTC+14 and UTC-12 are
    26 hours apart, so one of them always does), and that date."""
    local = datetime.date.today()
    for name in ("Pacific/Kiritimati", "Etc/GMT+12"):
        day = datetime.datetime.now(zoneinfo.ZoneInfo(name)).date()
        if day != local:
            return name, day
    raise AssertionError("unreachable: the two zones are 26 hours apart")


async def refresh(client: WSClient) -> str:
    await client.send("refresh_sectors")
    with trio.fail_after(10):
        while True:
            message = await client.receive(within=10)
            if isinstance(message, str) and message.startswith("sectors_updated:"):
                return message


async def sectors_received(publisher: Publisher, clients: dict[str, WSClient],
                           sectors: list[int]) -> dict[str, set[int]]:
    """Publish one probe per sector; returns, per socket, the sectors whose probe it got."""
    probes = [(None, envelope("SERVICE_CALL_CREATED", TENANT, BRANCH, sector_id=s,
                              entity={"probe": next(_nonce)})) for s in sectors]
    sentinel = next(_nonce)
    await publisher.many([*probes, (None, envelope("ROUND_PENDING", TENANT, BRANCH,
                                                    entity={"sentinel": sentinel}))])
    out: dict[str, set[int]] = {}
    for name, client in clients.items():
        got: set[int] = set()
        with trio.fail_after(10):
            while True:
                message = await client.receive(within=10)
                if not isinstance(message, dict):
                    continue
                if message["type"] == "ROUND_PENDING" and message["entity"].get("sentinel") == sentinel:
                    break
                if message["type"] == "SERVICE_CALL_CREATED":
                    got.add(message["sector_id"])
        out[name] = got
    return out


async def waiter(gw: GatewayHandle, user: int, **claims: Any) -> WSClient:
    before = len(gw.gw.index)
    client = await gw.connect("waiter", gw.staff_token(user=user, tenant=TENANT, branches=(BRANCH,),
                                                       roles=("WAITER",), **claims))
    await gw.connected(before + 1)
    return client


async def sadd(redis_url: str, user: int, *sectors: int) -> None:
    async with make_client(redis_url) as client:
        await client.sadd(f"waiter:sectors:{TENANT}:{user}", [str(s) for s in sectors])


async def pong(client: WSClient) -> None:
    await client.send("ping")
    with trio.fail_after(10):
        while await client.receive(within=10) != {"type": "pong"}:
            pass


# --- JWT claim ---------------------------------------------------------------------------------


async def test_claim_is_the_first_source(gateway_factory: Factory, publisher: Publisher, redis_url: str) -> None:
    gw = await gateway_factory()
    await sadd(redis_url, 7, 4)  # the claim wins over the Redis set
    client = await waiter(gw, 7, sector_ids=[3])
    assert await sectors_received(publisher, {"w": client}, [3, 4]) == {"w": {3}}
    assert await refresh(client) == "sectors_updated:3"
    assert await sectors_received(publisher, {"w": client}, [3, 4]) == {"w": {3}}


# --- Redis set ---------------------------------------------------------------------------------


async def test_redis_set_is_used_without_a_claim_and_refresh_follows_it(
    gateway_factory: Factory, publisher: Publisher, redis_url: str
) -> None:
    gw = await gateway_factory()
    await sadd(redis_url, 7, 4, 5)
    assigned = await waiter(gw, 7)
    other = await waiter(gw, 8, sector_ids=[3])
    clients = {"assigned": assigned, "other": other}
    assert await sectors_received(publisher, clients, [3, 4, 5, 6]) == {"assigned": {4, 5}, "other": {3}}

    async with make_client(redis_url) as client:
        key = f"waiter:sectors:{TENANT}:7"
        await client.srem(key, ["4"])
        await client.sadd(key, ["6"])
    assert await refresh(assigned) == "sectors_updated:5,6"
    assert await sectors_received(publisher, clients, [3, 4, 5, 6]) == {"assigned": {5, 6}, "other": {3}}


async def test_refresh_during_a_redis_outage_keeps_the_assignment(gateway_factory: Factory) -> None:
    redis = RedisProcess(RedisConfig(port=0))
    try:
        await trio.to_thread.run_sync(redis.start)
        gw = await gateway_factory(redis_url=redis.url)
        await sadd(redis.url, 7, 4, 5)
        client = await waiter(gw, 7)
        assert await refresh(client) == "sectors_updated:4,5"

        await trio.to_thread.run_sync(redis.kill)
        # Not "sectors_updated:": an unassigned waiter would get every sector's events (D11).
        assert await refresh(client) == "sectors_updated:4,5"
        await pong(client)

        await trio.to_thread.run_sync(redis.start)  # empty: nothing on disk
        await sadd(redis.url, 7, 6)
        assert await refresh(client) == "sectors_updated:6"
    finally:
        await trio.to_thread.run_sync(redis.close)


# --- PostgreSQL --------------------------------------------------------------------------------


async def test_database_assignment_of_today_in_the_zone_routes_and_refresh_retargets(
    gateway_factory: Factory, publisher: Publisher, pg: PostgresCluster
) -> None:
    zone, today = zone_with_another_date()
    local_today = datetime.date.today()
    pg.assign([
        (TENANT, BRANCH, 3, 7, today, True),
        (TENANT, BRANCH, 8, 7, local_today, True),  # the server's local date is not the zone's
        (TENANT, BRANCH, 9, 7, today, False),  # inactive
        (2, BRANCH, 10, 7, today, True),  # another tenant's waiter 7
        (TENANT, BRANCH, 11, 70, today, True),  # another waiter
    ])
    gw = await gateway_factory(database_url=pg.url, sector_timezone=zone)
    client = await waiter(gw, 7)
    sectors = [3, 6, 8, 9, 10, 11]
    assert await sectors_received(publisher, {"w": client}, sectors) == {"w": {3}}

    await trio.to_thread.run_sync(
        pg.execute, "UPDATE waiter_sector_assignment SET is_active = false WHERE sector_id = 3")
    pg.assign([(TENANT, BRANCH, 6, 7, today, True)])
    # refresh_sectors bypasses the lookup cache: the reassignment takes effect at once.
    assert await refresh(client) == "sectors_updated:6"
    assert await sectors_received(publisher, {"w": client}, sectors) == {"w": {6}}


async def test_database_outage_fails_lookups_without_caching_them(
    gateway_factory: Factory, publisher: Publisher, pg: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    zone, today = zone_with_another_date()
    pg.assign([(TENANT, BRANCH, 3, 7, today, True), (TENANT, BRANCH, 5, 8, today, True)])
    gw = await gateway_factory(database_url=pg.url, sector_timezone=zone)
    before = await waiter(gw, 7)
    assert await sectors_received(publisher, {"w7": before}, [3, 5]) == {"w7": {3}}

    await trio.to_thread.run_sync(pg.stop)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gateway.sectors"):
        during = await waiter(gw, 8)
        # Nothing known for waiter 8: no assignment. Waiter 7 keeps its last good answer.
        assert await refresh(during) == "sectors_updated:"
        assert await refresh(before) == "sectors_updated:3"
    assert any("sector lookup failed" in r.getMessage() for r in caplog.records)
    await pong(before)
    await pong(during)
    assert await sectors_received(publisher, {"w7": before}, [3, 5]) == {"w7": {3}}

    await trio.to_thread.run_sync(pg.start)
    # A new socket looks up without refresh, so a cached failure would show here.
    after = await waiter(gw, 8)
    assert await refresh(during) == "sectors_updated:5"
    clients = {"w7": before, "w8_during": during, "w8_after": after}
    assert await sectors_received(publisher, clients, [3, 5]) == {"w7": {3}, "w8_during": {5}, "w8_after": {5}}
