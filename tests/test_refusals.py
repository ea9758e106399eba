"""D22: recoverable refusals come before the upgrade, and end as soon as their cause does.

A client refused for a limit or a Redis outage gets HTTP 429/503 with Retry-After instead of an
open socket that closes, so the existing browser clients (which reset their backoff in
``onopen``) back off. When the cause passes, the next attempt is admitted.
"""

from __future__ import annotations

import time

import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url

from gateway.redisio.embedded import RedisProcess
from gateway.redisio.embedded_config import RedisConfig
from gateway_testing import DEFAULT_ORIGIN, GatewayHandle, running_gateway, test_settings


async def attempt(handle: GatewayHandle, token: str) -> int:
    """One connection attempt: 101 (admitted and answered a ping) or the refusal's status."""
    url = f"{handle.ws_url}/ws/waiter?token={token}"
    try:
        async with open_websocket_url(url, extra_headers=[("Origin", DEFAULT_ORIGIN)]) as ws:
            await ws.send_message("ping")
            with trio.fail_after(10):
                await ws.get_message()
            return 101
    except ConnectionRejected as exc:
        return exc.status_code


async def test_a_waiting_client_gets_in_within_seconds_of_redis_returning() -> None:
    proc = RedisProcess(RedisConfig(port=0))
    proc.start()
    try:
        async with running_gateway(test_settings(proc.url, drain_period=0)) as handle:
            token = handle.staff_token(user=1)
            assert await attempt(handle, token) == 101
            proc.kill()
            # Enough failures to open the auth breaker: every attempt is refused before the upgrade.
            for _ in range(7):
                assert await attempt(handle, token) == 503
            assert handle.gw.metrics.closes.labels("1013")._value.get() == 0
            await trio.to_thread.run_sync(proc.restart)
            back = time.monotonic()
            with trio.fail_after(20):
                while await attempt(handle, token) != 101:  # noqa: ASYNC110 - a client retrying
                    await trio.sleep(0.25)  # a client backing off, much faster than 1-30 s
            waited = time.monotonic() - back
            print(f"\nadmitted {waited:.1f} s after Redis returned")  # shown with -s
            # The auth breaker probes again within 2 s (not the 30 s of the other paths).
            assert waited < 10, waited
    finally:
        proc.close()


async def test_a_slot_freed_admits_the_next_attempt(gateway: GatewayHandle) -> None:
    token = gateway.staff_token(user=7)
    clients = [await gateway.connect("waiter", token) for _ in range(3)]
    await gateway.connected(3)
    assert await attempt(gateway, token) == 429
    await clients[0].aclose()
    await gateway.settled(2)
    assert await attempt(gateway, token) == 101


@pytest.mark.parametrize("kind", ["bad_token", "origin"])
async def test_credential_failures_still_close_after_the_upgrade(gateway: GatewayHandle, kind: str) -> None:
    # D1 stands: final failures are close codes after the 101, even while a limit is reached.
    token = gateway.staff_token(user=7)
    for _ in range(3):
        await gateway.connect("waiter", token)
    await gateway.connected(3)
    if kind == "bad_token":
        client = await gateway.connect("waiter", "not-a-jwt")
        assert await client.closed() == (4001, "Authentication failed")
    else:
        client = await gateway.connect("waiter", token, origin="http://evil.test")
        assert await client.closed() == (4003, "Origin not allowed")
