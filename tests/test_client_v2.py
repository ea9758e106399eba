"""The Python client on protocol v2 (D20, D21): resume, in-band refresh, recovery failures, and
falling back to v1 and HTTP catch-up against a gateway that does not select v2. Real gateway,
real redis-server, real sockets."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import pytest
import trio
from test_client import make_client, numbered, numbers, until

from gateway.core import closecodes
from gateway.serving import listener
from gateway_client import ConnectionState
from gateway_client.listeners import Event
from gateway_testing import GatewayHandle, Publisher

Factory = Callable[..., Awaitable[GatewayHandle]]
S = ConnectionState


async def test_the_client_refreshes_in_band_before_its_token_expires(
    gateway: GatewayHandle, nursery: trio.Nursery
) -> None:
    minted: list[float] = []

    def token() -> str:
        minted.append(time.time())
        return gateway.staff_token(ttl=5)

    client = make_client(gateway.ws_url, token, refresh_margin=2.0)
    nursery.start_soon(client.run)
    with trio.fail_after(15):
        await client.wait_state(S.CONNECTED)
        await trio.sleep(10)
    assert client.v2 is not None and client.v2.refreshes >= 3 and not client.v2.refresh_failures
    assert (client.state, client.opens) == (S.CONNECTED, 1)  # never reconnected
    assert client.v2.exp is not None and client.v2.exp > time.time()
    await client.close()


async def test_recovery_failed_is_reported_and_live_events_go_on(
    gateway: GatewayHandle, publisher: Publisher, nursery: trio.Nursery
) -> None:
    failed: list[list[str]] = []
    received: list[Event] = []
    client = make_client(gateway.ws_url, gateway.staff_token(), on_recovery_failed=failed.append,
                         backoff_base=0.5, backoff_cap=0.5, jitter=0.0)
    client.on("*", received.append)
    nursery.start_soon(client.run)
    with trio.fail_after(10):
        await client.wait_state(S.CONNECTED)
        await gateway.connected(1)
        await publisher.stream_event(numbered(publisher, 1))
        await until(lambda: numbers(received) == [1])
        for conn in list(gateway.gw.sockets):
            conn.begin_close(closecodes.SERVER_RESTART)
        await until(lambda: client.state is S.RECONNECTING)
        await publisher._run(lambda c: c.flushall())  # the store is lost
        await until(lambda: client.opens == 2 and client.state is S.CONNECTED)
        await until(lambda: failed == [["1:2"]])
        await publisher.stream_event(numbered(publisher, 2))
        await until(lambda: numbers(received) == [1, 2])
    assert client.v2 is not None and "1:2" in client.v2.positions
    await client.close()


async def test_against_a_v1_gateway_the_client_catches_up_over_http(
    gateway_factory: Factory, publisher: Publisher, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listener, "negotiated_version", lambda header: 1)  # a gateway without v2
    gateway = await gateway_factory()
    received: list[Event] = []
    client = make_client(gateway.ws_url, gateway.staff_token(), backoff_base=0.5, backoff_cap=0.5, jitter=0.0)
    client.on("*", received.append)
    nursery.start_soon(client.run)
    with trio.fail_after(10):
        await client.wait_state(S.CONNECTED)
        assert not client.speaking_v2
        await gateway.connected(1)
        await publisher.stream_event(numbered(publisher, 1))
        await until(lambda: numbers(received) == [1])
        for conn in list(gateway.gw.sockets):
            conn.begin_close(closecodes.SERVER_RESTART)
        await until(lambda: client.state is S.RECONNECTING)
        await gateway.connected(0)
        await publisher.stream_event(numbered(publisher, 2))
        await until(lambda: numbers(received) == [1, 2])
    assert client.catchup_events == 1 and "_pos" not in received[0]
    await client.close()
