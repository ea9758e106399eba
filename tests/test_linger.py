"""GATEWAY_INGEST_LINGER_MS: under load each Redis reader reads once per interval; sparse events
are not delayed (``gateway.core.linger``)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from gateway.core.linger import Linger
from gateway_testing.handle import GatewayHandle
from gateway_testing.publisher import Publisher
from gateway_testing.sockets import WSClient

# --- the decision -------------------------------------------------------------------------------


def test_off_never_pauses() -> None:
    assert Linger(0.0).pause(10.0, 10.0, 10.0) == 0.0


def test_a_read_that_waited_at_least_the_interval_is_not_followed_by_a_pause() -> None:
    linger = Linger(0.005)
    assert linger.pause(issued=10.0, returned=10.005, now=10.006) == 0.0
    assert linger.pause(issued=10.0, returned=12.0, now=12.0) == 0.0


def test_a_busy_read_is_followed_by_the_rest_of_the_interval() -> None:
    linger = Linger(0.005)
    assert linger.pause(issued=10.0, returned=10.001, now=10.001) == pytest.approx(0.005)
    # Handling the batch took 3 ms: the next read comes 5 ms after this one returned.
    assert linger.pause(issued=10.0, returned=10.001, now=10.004) == pytest.approx(0.002)


def test_a_batch_that_took_longer_than_the_interval_to_handle_is_not_followed_by_a_pause() -> None:
    assert Linger(0.005).pause(issued=10.0, returned=10.001, now=10.02) == 0.0


# --- end to end: each reader ---------------------------------------------------------------------

#: Much longer than a delivery on loopback, so what lingers and what does not is unmistakable.
LINGER_MS = 1000


async def _next_seq(client: WSClient) -> int:
    with trio.fail_after(30):
        return int(json.loads(await client.ws.get_message())["entity"]["seq"])


async def _latency(client: WSClient, publish: Callable[[int], Awaitable[Any]], seq: int) -> float:
    start = trio.current_time()
    await publish(seq)
    assert await _next_seq(client) == seq
    return trio.current_time() - start


@pytest.fixture
async def lingering(gateway_factory: Callable[..., Awaitable[GatewayHandle]]) -> GatewayHandle:
    return await gateway_factory(ingest_linger_ms=LINGER_MS)


async def _waiter(gateway: GatewayHandle) -> WSClient:
    client = await gateway.connect("waiter", gateway.staff_token(user=5, roles=("WAITER",)))
    await gateway.connected(1)
    return client


def _publish(publisher: Publisher, path: str) -> Callable[[int], Awaitable[Any]]:
    def publish(seq: int) -> Awaitable[Any]:
        env = publisher.envelope("ROUND_SERVED", 1, 2, table_id=5, session_id=9, entity={"seq": seq})
        if path == "stream":
            return publisher.stream_event(env)
        return publisher.channel_event("branch:2:waiters", env)
    return publish


@pytest.mark.parametrize("path", ["stream", "pubsub"])
async def test_events_that_follow_a_busy_read_wait_for_the_pause_and_come_together(
    lingering: GatewayHandle, publisher: Publisher, path: str
) -> None:
    waiter = await _waiter(lingering)
    publish = _publish(publisher, path)
    # The read that brings the first event was issued before it was published: it goes out at once.
    assert await _latency(waiter, publish, 0) < LINGER_MS / 2000
    # That read waited less than the linger, so the reader pauses: what is published meanwhile
    # arrives when it reads again, all of it, in order.
    start = trio.current_time()
    for seq in range(1, 11):
        await publish(seq)
    assert [await _next_seq(waiter) for _ in range(10)] == list(range(1, 11))
    assert trio.current_time() - start > LINGER_MS / 2000
    if path == "stream":
        with trio.fail_after(30):
            while lingering.gw.stream_consumer.processed < 11:  # noqa: ASYNC110 - bounded by fail_after
                await trio.sleep(0.05)


async def test_after_a_quiet_spell_longer_than_the_linger_the_next_events_are_not_held(
    lingering: GatewayHandle, publisher: Publisher
) -> None:
    waiter = await _waiter(lingering)
    publish = _publish(publisher, "pubsub")
    await trio.sleep(LINGER_MS / 1000 + 0.5)  # the subscription's read waits longer than the linger
    assert await _latency(waiter, publish, 0) < LINGER_MS / 2000
    # No pause after a read that waited that long: the next read is already waiting for this one.
    assert await _latency(waiter, publish, 1) < LINGER_MS / 2000


async def test_default_linger_delivers_a_burst_from_both_paths_once_and_in_order(
    gateway: GatewayHandle, publisher: Publisher
) -> None:
    waiter = await _waiter(gateway)
    count = 300
    await publisher.many([
        ("branch:2:waiters" if seq % 2 else None,
         publisher.envelope("ROUND_SERVED", 1, 2, table_id=5, session_id=9, entity={"seq": seq}))
        for seq in range(count)
    ])
    seqs = sorted([await _next_seq(waiter) for _ in range(count)])
    assert seqs == list(range(count))
