"""Limits across the cluster (D23): instances on one Redis share the per-user and per-session
limits and the connection attempt rates; a killed instance's sockets stop counting within the lease
TTL; with Redis down the per-process limits apply (D4, D17).

Real gateways on real sockets: in-process ones from ``gateway_factory``, and a ``gateway serve``
child process where one is killed with SIGKILL. Refusals are checked where clients see them: an
HTTP 429 with Retry-After before the upgrade (D22). Waits poll an observed state, bounded.
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing
from helpers import attempt, metric_value, until_admitted

from gateway.access import limiter as limiter_module
from gateway.access.limiter import ClusterLimiter
from gateway.access.revocation import Revocation
from gateway.core.model import Principal
from gateway.metrics import Metrics
from gateway.redisio.client import make_client
from gateway.redisio.embedded import RedisProcess
from gateway.redisio.embedded_config import RedisConfig, free_port
from gateway.redisio.guards import RedisGuards, RedisHealth
from gateway.settings import Settings, SettingsError
from gateway_testing import GatewayHandle, WSClient, test_settings

Factory = Callable[..., Awaitable[GatewayHandle]]
GATEWAY_BIN = Path(sys.executable).with_name("gateway")


async def open_sockets(handle: GatewayHandle, endpoint: str, token: str, count: int) -> list[WSClient]:
    clients = [await handle.connect(endpoint, token) for _ in range(count)]
    for client in clients:
        await client.still_served()
    return clients


# --- per user and per session, across instances ------------------------------------------------


async def test_a_users_fourth_socket_is_refused_on_either_instance(gateway_factory: Factory) -> None:
    a, b = await gateway_factory(), await gateway_factory()
    token = a.staff_token(user=7)
    on_a = await open_sockets(a, "waiter", token, 2)
    await open_sockets(b, "waiter", token, 1)
    for handle in (a, b):
        assert await attempt(handle.port, "waiter", token) == (429, "5")
        assert metric_value(handle.gw.metrics.rejections, "limit_user") == 1
    # Another user is not affected.
    assert (await attempt(b.port, "waiter", a.staff_token(user=8)))[0] == 101
    # A slot freed on one instance is used on the other.
    await on_a[0].aclose()
    await a.settled(1)
    await until_admitted(b.port, "waiter", token, within=10)


async def test_diner_per_session_limit_across_instances(gateway_factory: Factory) -> None:
    a, b = await gateway_factory(), await gateway_factory()
    token = a.table_token(session=9)
    await open_sockets(a, "diner", token, 6)
    on_b = await open_sockets(b, "diner", token, 4)
    for handle in (a, b):
        assert await attempt(handle.port, "diner", token) == (429, "5")
        assert metric_value(handle.gw.metrics.rejections, "limit_session") == 1
    assert (await attempt(a.port, "diner", a.table_token(session=10)))[0] == 101
    await on_b[0].aclose()
    await until_admitted(a.port, "diner", token, within=10)


async def test_the_limit_is_atomic_across_instances(gateway_factory: Factory, nursery: trio.Nursery) -> None:
    # Eight concurrent handshakes of one user, split over two instances: exactly three get in.
    a, b = await gateway_factory(), await gateway_factory()
    token = a.staff_token(user=7)
    hold = trio.Event()
    outcomes: list[int] = []
    finished = trio.Event()

    async def one(port: int) -> None:
        status, _ = await attempt(port, "waiter", token, hold=hold)
        outcomes.append(status)
        if len(outcomes) == 5:
            finished.set()

    async with trio.open_nursery() as attempts:
        for i in range(8):
            attempts.start_soon(one, (a, b)[i % 2].port)
        with trio.fail_after(15):
            await finished.wait()  # the five refusals; the three admitted are held open
        assert sorted(outcomes) == [429] * 5
        with trio.fail_after(10):
            while len(a.gw.index) + len(b.gw.index) != 3:  # noqa: ASYNC110 - bounded poll
                await trio.sleep(0.02)
        hold.set()


async def test_nothing_is_left_in_redis_once_sockets_close(gateway_factory: Factory, redis_url: str) -> None:
    a = await gateway_factory()
    clients = await open_sockets(a, "waiter", a.staff_token(user=7), 3)
    client = make_client(redis_url)
    async with client:
        assert await client.zcard("{gw:limits:user:1:7}") == 3
        for c in clients:
            await c.aclose()
        with trio.fail_after(10):
            while await client.zcard("{gw:limits:user:1:7}"):  # noqa: ASYNC110 - polling Redis, bounded
                await trio.sleep(0.05)


async def test_a_stopped_instance_gives_its_leases_back(gateway_factory: Factory, redis_url: str) -> None:
    # A rolling restart: the sockets of the drained instance reconnect elsewhere at once.
    a = await gateway_factory(drain_period=0.2)
    b = await gateway_factory()
    token = a.staff_token(user=7)
    await open_sockets(a, "waiter", token, 3)
    a.gw.request_stop()
    client = make_client(redis_url)
    async with client:
        with trio.fail_after(10):
            while await client.zcard("{gw:limits:user:1:7}"):  # noqa: ASYNC110 - polling Redis, bounded
                await trio.sleep(0.05)
    for _ in range(3):
        assert (await attempt(b.port, "waiter", token, hold=None))[0] == 101


async def test_scripts_are_loaded_again_after_a_script_flush(gateway_factory: Factory, redis_url: str) -> None:
    a = await gateway_factory()
    token = a.staff_token(user=7)
    await open_sockets(a, "waiter", token, 1)
    client = make_client(redis_url)
    async with client:
        await client.script_flush()
        # NOSCRIPT: the calls go again as EVAL, and the limit still holds.
        await open_sockets(a, "waiter", token, 2)
        assert await client.zcard("{gw:limits:user:1:7}") == 3
    assert await attempt(a.port, "waiter", token) == (429, "5")
    assert metric_value(a.gw.metrics.limits_local_only) == 0


async def test_the_coredis_path_takes_and_gives_back_leases(redis_url: str, nursery: trio.Nursery) -> None:
    # URLs the batcher's own RESP connection does not serve (rediss://) go through coredis: the
    # same scripts, one command each, with the same NOSCRIPT fallback.
    settings = test_settings(redis_url)
    metrics = Metrics()
    guards = RedisGuards.build(settings, RedisHealth(metrics), trio.current_time)
    client = make_client(redis_url)
    async with client:
        revocation = Revocation(client, guards.auth, url=None)
        limiter = ClusterLimiter.build(settings, metrics, revocation, ())
        nursery.start_soon(revocation.batcher)
        await trio.testing.wait_all_tasks_blocked()
        user = Principal(endpoint="waiter", tenant_id=1, user_id=7, branch_ids=frozenset({2}))
        grants = [await limiter.grant(limiter.request(user, "203.0.113.1")) for _ in range(2)]
        await client.script_flush()
        grants.append(await limiter.grant(limiter.request(user, "203.0.113.1")))
        assert all(g.lease is not None and g.refusal is None for g in grants)
        assert (await limiter.grant(limiter.request(user, "203.0.113.1"))).refusal == "limit_user"
        assert await client.zcard("{gw:limits:user:1:7}") == 3
        for g in grants:
            limiter.release(g.lease)
        with trio.fail_after(10):
            while await client.zcard("{gw:limits:user:1:7}"):  # noqa: ASYNC110 - polling Redis, bounded
                await trio.sleep(0.05)
        assert metric_value(metrics.limits_local_only) == 0


async def test_renewals_in_chunks_keep_every_lease(redis_url: str, nursery: trio.Nursery,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limiter_module, "RENEW_CHUNK", 2)
    settings = test_settings(redis_url, lease_ttl=3.0)
    metrics = Metrics()
    guards = RedisGuards.build(settings, RedisHealth(metrics), trio.current_time)
    client = make_client(redis_url)
    async with client:
        revocation = Revocation(client, guards.auth, url=redis_url)
        limiter = ClusterLimiter.build(settings, metrics, revocation, ())
        nursery.start_soon(revocation.batcher)
        nursery.start_soon(limiter.renewer)
        await trio.testing.wait_all_tasks_blocked()
        users = [Principal(endpoint="waiter", tenant_id=1, user_id=u, branch_ids=frozenset({2})) for u in range(5)]
        grants = [await limiter.grant(limiter.request(u, "-")) for u in users]
        limiter.release(grants[0].lease)
        # Two lease lifetimes: only renewals (every second, two keys per round trip) keep them.
        await trio.sleep(6)
        counts = [await client.zcard(f"{{gw:limits:user:1:{u}}}") for u in range(5)]
        assert counts == [0, 1, 1, 1, 1]


# --- a killed instance ----------------------------------------------------------------------------


def child_env(redis_url: str, port: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GATEWAY_", "WS_", "REDIS_"))}
    env.update({"REDIS_URL": redis_url, "WS_GATEWAY_HOST": "127.0.0.1", "WS_GATEWAY_PORT": str(port),
                "ENVIRONMENT": "development", "LOG_LEVEL": "WARNING", **extra})
    return env


@asynccontextmanager
async def gateway_child(tmp_path: Path, redis_url: str, **extra: str) -> AsyncIterator[tuple[trio.Process, int]]:
    port = free_port()
    log = tmp_path / f"gateway-{port}.log"
    with log.open("wb") as out:
        proc = await trio.lowlevel.open_process([str(GATEWAY_BIN), "serve"], env=child_env(redis_url, port, **extra),
                                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                                start_new_session=True)
    try:
        with trio.fail_after(60):
            while True:
                assert proc.poll() is None, log.read_text()
                try:
                    if (await trio.to_thread.run_sync(httpx.get, f"http://127.0.0.1:{port}/ws/health")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                await trio.sleep(0.1)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        with trio.move_on_after(10):
            await proc.wait()


async def test_a_killed_instances_sockets_stop_counting_within_the_lease_ttl(
        gateway_factory: Factory, redis_url: str, tmp_path: Path) -> None:
    other = await gateway_factory(lease_ttl=3.0)
    token = other.staff_token(user=7)
    async with gateway_child(tmp_path, redis_url, GATEWAY_LEASE_TTL="3") as (proc, port):
        hold = trio.Event()
        async with trio.open_nursery() as held:
            for _ in range(3):
                held.start_soon(functools.partial(attempt, port, "waiter", token, hold=hold))
            client = make_client(redis_url)
            async with client:
                with trio.fail_after(10):
                    while await client.zcard("{gw:limits:user:1:7}") != 3:  # noqa: ASYNC110
                        await trio.sleep(0.05)
            # The child renews its leases (every second) as long as it lives.
            assert await attempt(other.port, "waiter", token) == (429, "5")
            proc.kill()  # SIGKILL
            await proc.wait()
            # Killed: nothing renews its leases, so they lapse and the user gets in elsewhere.
            await until_admitted(other.port, "waiter", token, within=30)
            held.cancel_scope.cancel()


# --- attempt rates --------------------------------------------------------------------------------


async def test_a_hammering_client_is_refused_cheaply_while_others_connect(
        gateway_factory: Factory, caplog: pytest.LogCaptureFixture) -> None:
    a = await gateway_factory(trusted_proxies=("127.0.0.1",), connect_rate_per_ip=20)
    hammerer = "203.0.113.66"
    statuses: list[int] = []
    caplog.set_level(logging.INFO)
    for _ in range(60):
        # A token nobody could verify: refused 4001 after the upgrade while the rate allows, then
        # 429 before the upgrade, without the token being looked at.
        statuses.append((await attempt(a.port, "waiter", "not-a-jwt-secret-value", forwarded=hammerer))[0])
    assert statuses[:20] == [4001] * 20
    assert statuses[20:] == [429] * 40
    assert metric_value(a.gw.metrics.rate_refusals, "ip", "process") == 40
    assert metric_value(a.gw.metrics.rejections, "rate_ip") == 40
    # The legacy "auth" counter has the 20 bad tokens, not the attempts refused for the rate.
    assert a.gw.legacy["auth"] == 20
    status, retry = await attempt(a.port, "waiter", "not-a-jwt", forwarded=hammerer)
    assert status == 429 and retry is not None and int(retry) >= 1
    # Logged once (then counted), with the client, never the credential.
    refused = [r for r in caplog.records if r.getMessage() == "upgrade refused: too many connection attempts"]
    assert len(refused) == 1 and getattr(refused[0], "client", None) == hammerer
    assert "not-a-jwt-secret-value" not in caplog.text
    assert all("not-a-jwt-secret-value" not in str(vars(r)) for r in caplog.records)
    # Everyone else connects normally, meanwhile.
    for i in range(5):
        assert (await attempt(a.port, "waiter", a.staff_token(user=100 + i), forwarded=f"198.51.100.{i}"))[0] == 101
    # A trusted proxy's own address (no X-Forwarded-For) is never rate-limited.
    for i in range(25):
        assert (await attempt(a.port, "diner", a.table_token(session=500 + i)))[0] == 101


async def test_the_address_rate_is_cluster_wide(gateway_factory: Factory) -> None:
    a = await gateway_factory(trusted_proxies=("127.0.0.1",), connect_rate_per_ip=10)
    b = await gateway_factory(trusted_proxies=("127.0.0.1",), connect_rate_per_ip=10)
    client = "203.0.113.7"
    for i in range(10):
        assert (await attempt(a.port, "waiter", a.staff_token(user=200 + i), forwarded=client))[0] == 101
    # The other instance has seen nothing from this address, but Redis has.
    assert (await attempt(b.port, "waiter", b.staff_token(user=300), forwarded=client))[0] == 429
    assert metric_value(b.gw.metrics.rate_refusals, "ip", "cluster") == 1
    # Remembered: the next attempts stop before the token check.
    assert (await attempt(b.port, "waiter", "not-a-jwt", forwarded=client))[0] == 429
    assert metric_value(b.gw.metrics.rate_refusals, "ip", "process") == 1
    assert (await attempt(b.port, "waiter", b.staff_token(user=301), forwarded="203.0.113.8"))[0] == 101


async def test_concurrent_attempts_of_one_address_on_two_instances_pass_exactly_the_rate(
        gateway_factory: Factory) -> None:
    a = await gateway_factory(trusted_proxies=("127.0.0.1",), connect_rate_per_ip=10)
    b = await gateway_factory(trusted_proxies=("127.0.0.1",), connect_rate_per_ip=10)
    hold = trio.Event()
    statuses: list[int] = []
    all_refused = trio.Event()

    async def one(handle: GatewayHandle, user: int) -> None:
        statuses.append((await attempt(handle.port, "waiter", handle.staff_token(user=user),
                                       forwarded="203.0.113.9", hold=hold))[0])
        if statuses.count(429) == 6:
            all_refused.set()

    async with trio.open_nursery() as attempts:
        for i in range(16):
            attempts.start_soon(one, (a, b)[i % 2], 400 + i)
        with trio.fail_after(15):
            await all_refused.wait()
            while len(a.gw.index) + len(b.gw.index) != 10:  # noqa: ASYNC110 - bounded poll
                await trio.sleep(0.02)
        hold.set()
    assert sorted(statuses) == [101] * 10 + [429] * 6


async def test_a_users_attempt_rate_is_cluster_wide(gateway_factory: Factory) -> None:
    a = await gateway_factory(connect_rate_per_user=5)
    b = await gateway_factory(connect_rate_per_user=5)
    token = a.staff_token(user=7)
    statuses = [(await attempt((a, b)[i % 2].port, "waiter", token))[0] for i in range(5)]
    assert statuses == [101] * 5
    status, retry = await attempt(b.port, "waiter", token)
    assert status == 429 and retry is not None
    assert metric_value(b.gw.metrics.rejections, "rate_user") == 1


# --- Redis down -----------------------------------------------------------------------------------


@pytest.fixture
def private_redis() -> Iterator[RedisProcess]:
    proc = RedisProcess(RedisConfig(port=0))
    proc.start()
    yield proc
    proc.close()


async def test_with_redis_down_the_per_process_limits_apply(gateway_factory: Factory,
                                                            private_redis: RedisProcess) -> None:
    a = await gateway_factory(redis_url=private_redis.url, lease_ttl=2.0, drain_period=0)
    token = a.table_token(session=9)
    private_redis.kill()
    # Diners need nothing else from Redis: they get in, up to the per-process limit (D17).
    diners = await open_sockets(a, "diner", token, 10)
    assert await attempt(a.port, "diner", token) == (429, "5")
    assert metric_value(a.gw.metrics.limits_local_only) >= 10
    # Staff sockets cannot have their revocation checked: refused as "try again later" (D4).
    assert (await attempt(a.port, "waiter", a.staff_token(user=7)))[0] == 503
    # Redis back: the renewal adds the leases of the sockets admitted meanwhile.
    await trio.to_thread.run_sync(private_redis.restart)
    client = make_client(private_redis.url)
    async with client:
        with trio.fail_after(20):
            while await client.zcard("{gw:limits:session:1:9}") != 10:  # noqa: ASYNC110
                await trio.sleep(0.1)
    for d in diners:
        await d.still_served()


# --- settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "value", "message"), [
    ("GATEWAY_LEASE_TTL", "1", "GATEWAY_LEASE_TTL: 1.0 is below the minimum 2"),
    ("GATEWAY_LEASE_TTL", "soon", "GATEWAY_LEASE_TTL: invalid value 'soon'"),
    ("WS_CONNECT_RATE_PER_IP", "-1", "WS_CONNECT_RATE_PER_IP: -1 is below the minimum 0"),
    ("WS_CONNECT_RATE_PER_USER", "many", "WS_CONNECT_RATE_PER_USER: invalid value 'many'"),
    ("WS_CONNECT_RATE_WINDOW", "0", "WS_CONNECT_RATE_WINDOW: 0.0 is below the minimum 1"),
])
def test_bad_limit_settings_are_clear_startup_errors(name: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"ENVIRONMENT": "development", name: value})
    assert str(info.value).startswith(message)


def test_defaults() -> None:
    s = Settings.from_env({"ENVIRONMENT": "development"})
    assert (s.lease_ttl, s.connect_rate_per_user, s.connect_rate_per_ip, s.connect_rate_window) == (30.0, 60, 1200, 60.0)


