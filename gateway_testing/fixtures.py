"""The plugin's fixtures: a private Redis, a flushed database per test, gateways, a publisher."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
import trio

from gateway.app import Gateway, run_gateway
from gateway.redisio.client import make_client
from gateway.redisio.embedded import RedisProcess
from gateway.redisio.embedded_config import RedisConfig
from gateway_testing.handle import GatewayHandle, test_settings
from gateway_testing.publisher import Publisher
from gateway_testing.topologies import ClusterSet, SentinelSet

__all__ = ["gateway", "gateway_factory", "publisher", "redis_cluster", "redis_sentinel", "redis_server", "redis_url"]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A private redis-server for the test session (``GATEWAY_TEST_REDIS_URL`` uses an existing one)."""
    given = os.environ.get("GATEWAY_TEST_REDIS_URL")
    if given:
        yield given
        return
    with RedisProcess(RedisConfig(port=0)) as proc:
        yield proc.url


@pytest.fixture
async def redis_url(redis_server: str) -> AsyncIterator[str]:
    client = make_client(redis_server)
    async with client:
        await client.flushall()
    yield redis_server


@pytest.fixture
async def redis_sentinel() -> AsyncIterator[SentinelSet]:
    """A master, a replica and three sentinels of their own (function scope: tests kill the master)."""
    made = await SentinelSet.start()
    try:
        yield made
    finally:
        await trio.to_thread.run_sync(made.close)


@pytest.fixture
async def redis_cluster() -> AsyncIterator[ClusterSet]:
    """A Redis Cluster of three masters of its own (function scope)."""
    made = await ClusterSet.start()
    try:
        yield made
    finally:
        await trio.to_thread.run_sync(made.close)


@pytest.fixture
async def gateway_factory(
    nursery: trio.Nursery, redis_url: str
) -> AsyncIterator[Callable[..., Awaitable[GatewayHandle]]]:
    """Start gateways; at teardown each is stopped the way a deployment stops it (a drain)."""
    running: list[tuple[Gateway, trio.Event]] = []

    async def start(**overrides: Any) -> GatewayHandle:
        # A test may point its gateway at its own Redis (fault tests kill that one).
        settings = test_settings(overrides.pop("redis_url", redis_url), **overrides)
        done = trio.Event()

        async def run(task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await run_gateway(settings, task_status=task_status)
            finally:
                done.set()

        gw: Gateway = await nursery.start(run)
        running.append((gw, done))
        return GatewayHandle(gw, nursery)

    yield start
    for gw, done in running:
        gw.request_stop()
        with trio.move_on_after(10):
            await done.wait()


@pytest.fixture
async def gateway(gateway_factory: Callable[..., Awaitable[GatewayHandle]]) -> GatewayHandle:
    return await gateway_factory()


@pytest.fixture
def publisher(redis_url: str) -> Publisher:
    return Publisher(redis_url)
