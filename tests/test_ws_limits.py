"""End-to-end connection limits (D5): per staff user, per table session and per process.

A socket over a limit is refused before the upgrade (D22: HTTP 429/503 with Retry-After, so even
the existing clients back off instead of seeing an open socket that closes), never registered,
never counted against anyone; the sockets already open keep being served. Only a socket that
loses a race to the last slot after its upgrade is closed 1008/1013.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import httpx
import pytest
import trio
from helpers import metric_value
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from gateway_testing import DEFAULT_ORIGIN, GatewayHandle, Publisher

Factory = Callable[..., Awaitable[GatewayHandle]]

PONG = '{"type":"pong"}'


async def refused_upgrade(handle: GatewayHandle, endpoint: str, token: str) -> tuple[int, str, bytes | None]:
    """Status, detail and Retry-After of an upgrade refused before the 101."""
    param = "table_token" if endpoint == "diner" else "token"
    url = f"{handle.ws_url}/ws/{endpoint}?{param}={token}"
    with pytest.raises(ConnectionRejected) as info:
        async with open_websocket_url(url, extra_headers=[("Origin", DEFAULT_ORIGIN)]):
            pass
    headers = dict(info.value.headers)
    body = info.value.body or b"{}"
    return info.value.status_code, json.loads(body)["detail"], headers.get(b"retry-after")


TOO_MANY = (429, "Too many connections", b"5")
TRY_LATER = (503, "Try again later", b"5")


async def legacy_rejections(handle: GatewayHandle, reason: str) -> str:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{handle.url}/ws/metrics")
    prefix = f'wsgateway_connections_rejected_total{{reason="{reason}"}} '
    lines = [line for line in response.text.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1
    return lines[0].removeprefix(prefix)


# --- per staff user (default 3) ----------------------------------------------------------------


async def test_fourth_socket_of_a_staff_user_is_refused_429(gateway: GatewayHandle) -> None:
    assert gateway.settings.max_connections_per_user == 3
    token = gateway.staff_token(user=7, roles=("WAITER", "KITCHEN"))
    # The limit counts the user's sockets on every endpoint together.
    first = [
        await gateway.connect("waiter", token),
        await gateway.connect("kitchen", token),
        await gateway.connect("waiter", gateway.staff_token(user=7)),
    ]
    await gateway.connected(3)
    assert await refused_upgrade(gateway, "waiter", token) == TOO_MANY
    await gateway.settled(3)
    assert gateway.gw.index.count_user(1, 7) == 3
    assert metric_value(gateway.gw.metrics.rejections, "limit_user") == 1
    assert metric_value(gateway.gw.metrics.http_requests, "websocket", "429") == 1
    assert metric_value(gateway.gw.metrics.closes, "1008") == 0
    # The legacy "limit" line counts only the process-wide limit, as the existing gateway did.
    assert await legacy_rejections(gateway, "limit") == "0"
    for client in first:
        await client.still_served()
    # Other users, and the same user id in another tenant, are not affected.
    other_user = await gateway.connect("waiter", gateway.staff_token(user=8))
    other_tenant = await gateway.connect("waiter", gateway.staff_token(user=7, tenant=2))
    await gateway.connected(5)
    await other_user.still_served()
    await other_tenant.still_served()


async def test_closing_a_socket_frees_its_user_slot(gateway: GatewayHandle) -> None:
    token = gateway.staff_token(user=7)
    clients = [await gateway.connect("waiter", token) for _ in range(3)]
    await gateway.connected(3)
    assert await refused_upgrade(gateway, "waiter", token) == TOO_MANY
    await clients[0].aclose()
    await gateway.settled(2)
    again = await gateway.connect("waiter", token)
    await gateway.connected(3)
    await again.still_served()
    for client in clients[1:]:
        await client.still_served()


async def test_concurrent_connects_of_one_user_admit_exactly_the_limit(gateway: GatewayHandle) -> None:
    token = gateway.staff_token(user=7)
    outcomes: list[str] = []
    all_tried, done = trio.Event(), trio.Event()

    async def attempt() -> None:
        # Concurrent handshakes all pass the per-process check; the cluster-wide lease script is
        # atomic, so the ones beyond the limit are refused before the upgrade (D23).
        try:
            async with open_websocket_url(f"{gateway.ws_url}/ws/waiter?token={token}",
                                          extra_headers=[("Origin", DEFAULT_ORIGIN)]) as ws:
                # Admission finishes before the socket's first message is read, so the ping
                # tells apart a registered socket (pong) from one closed after the upgrade (whose
                # close may arrive with the 101 itself, before the ping can be sent).
                try:
                    await ws.send_message("ping")
                    with trio.fail_after(5):
                        assert await ws.get_message() == PONG
                    outcomes.append("served")
                except ConnectionClosed as exc:
                    assert exc.reason is not None
                    outcomes.append(f"{exc.reason.code} {exc.reason.reason}")
                if len(outcomes) == 8:
                    all_tried.set()
                await done.wait()
        except ConnectionRejected as exc:
            outcomes.append(str(exc.status_code))
            if len(outcomes) == 8:
                all_tried.set()

    async with trio.open_nursery() as nursery:
        for _ in range(8):
            nursery.start_soon(attempt)
        with trio.fail_after(10):
            await all_tried.wait()
        assert sorted(outcomes) == ["429"] * 5 + ["served"] * 3
        await gateway.settled(3)
        assert gateway.gw.index.count_user(1, 7) == 3
        assert metric_value(gateway.gw.metrics.rejections, "limit_user") == 5
        done.set()


# --- per table session (default 10) ------------------------------------------------------------


async def test_eleventh_diner_of_a_session_is_refused_429(gateway: GatewayHandle) -> None:
    assert gateway.settings.max_connections_per_session == 10
    staff = await gateway.connect("waiter", gateway.staff_token())
    diners = [await gateway.connect("diner", gateway.table_token(session=9)) for _ in range(10)]
    await gateway.connected(11)
    assert await refused_upgrade(gateway, "diner", gateway.table_token(session=9)) == TOO_MANY
    await gateway.settled(11)
    assert gateway.gw.index.count_session(1, 9) == 10
    assert metric_value(gateway.gw.metrics.rejections, "limit_session") == 1
    for client in [staff, *diners]:
        await client.still_served()
    other_session = await gateway.connect("diner", gateway.table_token(session=10))
    await gateway.connected(12)
    await other_session.still_served()


async def test_refused_diner_receives_no_session_events(gateway: GatewayHandle, publisher: Publisher) -> None:
    diners = [await gateway.connect("diner", gateway.table_token(session=9)) for _ in range(10)]
    await gateway.connected(10)
    # Refused before the upgrade: there is no socket that could receive anything.
    assert await refused_upgrade(gateway, "diner", gateway.table_token(session=9)) == TOO_MANY
    await publisher.stream_event(publisher.envelope("CHECK_PAID", 1, 2, table_id=5, session_id=9))
    for client in diners:
        await client.expect("CHECK_PAID")
    await gateway.settled(10)


# --- per process -------------------------------------------------------------------------------


async def test_total_limit_is_refused_503_and_a_freed_slot_is_reused(gateway_factory: Factory) -> None:
    handle = await gateway_factory(max_total_connections=2)
    waiter = await handle.connect("waiter", handle.staff_token(user=1))
    diner = await handle.connect("diner", handle.table_token())
    await handle.connected(2)
    assert await refused_upgrade(handle, "kitchen", handle.staff_token(user=2, roles=("KITCHEN",))) == TRY_LATER
    await handle.settled(2)
    assert metric_value(handle.gw.metrics.rejections, "limit_total") == 1
    assert metric_value(handle.gw.metrics.closes, "1013") == 0
    assert await legacy_rejections(handle, "limit") == "1"
    await waiter.still_served()
    await diner.still_served()

    await diner.aclose()
    await handle.settled(1)
    assert handle.gw.index.count_session(1, 9) == 0
    replacement = await handle.connect("kitchen", handle.staff_token(user=2, roles=("KITCHEN",)))
    await handle.connected(2)
    await replacement.still_served()
    await waiter.still_served()

    await waiter.aclose()
    await replacement.aclose()
    await handle.settled(0)


async def test_credentials_are_checked_before_the_total_limit(gateway_factory: Factory) -> None:
    # A bad credential must get the final 4001 even when the process is full, or the client
    # would treat 1013 as recoverable and retry its bad token forever.
    handle = await gateway_factory(max_total_connections=1)
    first = await handle.connect("waiter", handle.staff_token(user=1))
    await handle.connected(1)
    bad = await handle.connect("waiter", "not-a-jwt")
    assert await bad.closed() == (4001, "Authentication failed")
    wrong_role = await handle.connect("admin", handle.staff_token(user=2))
    assert await wrong_role.closed() == (4003, "Access denied")
    await handle.settled(1)
    assert metric_value(handle.gw.metrics.rejections, "limit_total") == 0
    await first.still_served()


async def test_every_refusal_leaves_nothing_behind(gateway_factory: Factory) -> None:
    handle = await gateway_factory(max_total_connections=4, max_connections_per_session=1)
    open_ = [
        await handle.connect("waiter", handle.staff_token(user=1)),
        await handle.connect("diner", handle.table_token(session=9)),
    ]
    await handle.connected(2)
    assert await refused_upgrade(handle, "diner", handle.table_token(session=9)) == TOO_MANY
    refusals = [
        (await handle.connect("waiter", "not-a-jwt"), (4001, "Authentication failed")),
        (await handle.connect("waiter", handle.staff_token(), origin="http://evil.test"),
         (4003, "Origin not allowed")),
    ]
    for client, expected in refusals:
        assert await client.closed() == expected
    await handle.settled(2)
    for client in open_:
        await client.still_served()
        await client.aclose()
    await handle.settled(0)
    assert handle.gw.stats()["dead_connections_pending"] == 0
