"""Catch-up over HTTP (D16): `/ws/catchup` for staff and `/ws/catchup/session` for diners.

The store holds what the gateway delivered, so each test first has the events delivered live to
connected sockets, and then checks that a catch-up returns exactly what that socket received (for
staff), or that session's events of the diner types (for diners). The store is written a few
milliseconds after delivery, so reads poll until the expected count shows up.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import httpx
import trio

from gateway.core.routing import DINER_CATCHUP_TYPES
from gateway.core.tokens import mint_legacy_table_token, mint_staff_token
from gateway.redisio.client import make_client
from gateway_testing import GatewayHandle, Publisher, WSClient

SENTINEL = "PRODUCT_AVAILABILITY_CHANGED"


async def get(url: str, params: dict[str, Any]) -> httpx.Response:
    # httpx has no Trio backend; a worker thread keeps the gateway in this loop serving.
    call = functools.partial(httpx.get, url, params=params, timeout=30.0)
    return await trio.to_thread.run_sync(call)


async def staff_catchup(handle: GatewayHandle, token: str, branch_id: Any = 2, since: Any = 0.0) -> httpx.Response:
    return await get(f"{handle.url}/ws/catchup", {"branch_id": branch_id, "since": since, "token": token})


async def session_catchup(handle: GatewayHandle, table_token: str, session_id: Any = 9,
                          since: Any = 0.0) -> httpx.Response:
    return await get(f"{handle.url}/ws/catchup/session",
                     {"session_id": session_id, "since": since, "table_token": table_token})


async def delivered(handle: GatewayHandle, count: int) -> None:
    with trio.fail_after(10):
        while True:
            if handle.gw.broadcaster.delivered_events >= count:
                return
            await trio.sleep(0.01)


async def events_when(fetch: Callable[[], Any], count: int) -> list[dict[str, Any]]:
    """Poll a catch-up endpoint until it lists ``count`` events (the store is written just after
    delivery) and return them; fails if it lists more."""
    with trio.fail_after(10):
        while True:
            response = await fetch()
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["count"] == len(body["events"])
            if body["count"] >= count:
                assert body["count"] == count, body["events"]
                return list(body["events"])
            await trio.sleep(0.02)


async def live_until_sentinel(client: WSClient) -> list[dict[str, Any]]:
    """Every event the socket received, up to and including the sentinel (published last)."""
    await client.expect(SENTINEL)
    return [m for m in client.received if isinstance(m, dict) and "tenant_id" in m]


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


# --- staff -------------------------------------------------------------------------------------


async def test_staff_catchup_returns_what_each_socket_received(gateway: GatewayHandle, publisher: Publisher) -> None:
    since = time.time() - 1
    waiter_token = gateway.staff_token(user=7, roles=["WAITER"], sector_ids=[3])
    kitchen_token = gateway.staff_token(user=11, roles=["KITCHEN"])
    admin_token = gateway.staff_token(user=1, roles=["ADMIN"])
    waiter = await gateway.connect("waiter", waiter_token)
    kitchen = await gateway.connect("kitchen", kitchen_token)
    admin = await gateway.connect("admin", admin_token)
    await gateway.connected(3)

    env = publisher.envelope
    service_call = env("SERVICE_CALL_CREATED", 1, 2, table_id=5, session_id=9, entity={"call_id": 1})
    internal = {**env("TABLE_CLEARED", 1, 2, table_id=5), "_enqueued_at": 123.0, "_retry_count": 1}
    await publisher.many([
        (None, env("ROUND_SUBMITTED", 1, 2, sector_id=3, session_id=9, entity={"round_id": 1})),
        (None, env("ROUND_SUBMITTED", 1, 2, sector_id=4, session_id=10, entity={"round_id": 2})),
        (None, env("ENTITY_UPDATED", 1, 2, entity={"entity": "product", "id": 8})),
        # One logical event on the stream and two channels: stored once.
        (None, service_call),
        ("branch:2:waiters", service_call),
        ("branch:2:admin", service_call),
        # Branch-wide for waiters whatever the sector.
        (None, env("ROUND_PENDING", 1, 2, sector_id=4, session_id=10, entity={"round_id": 3})),
        (None, internal),
        # Another branch and another tenant: never in tenant 1 branch 2's catch-up.
        (None, env("ROUND_PENDING", 1, 4, session_id=20)),
        (None, env("ROUND_PENDING", 2, 2, session_id=30)),
        (None, env(SENTINEL, 1, 2, entity={"product_id": 8, "available": False})),
    ])
    await delivered(gateway, 9)

    # Pub/sub may overtake the stream, so the live order is checked only against catch-up's order.
    admin_live = await live_until_sentinel(admin)
    assert sorted(kinds(admin_live)) == sorted(["ROUND_SUBMITTED", "ROUND_SUBMITTED", "ENTITY_UPDATED",
                                                "SERVICE_CALL_CREATED", "ROUND_PENDING", "TABLE_CLEARED", SENTINEL])
    admin_caught = await events_when(lambda: staff_catchup(gateway, admin_token, since=since), len(admin_live))
    assert admin_caught == admin_live

    waiter_live = await live_until_sentinel(waiter)
    assert sorted(kinds(waiter_live)) == sorted(["ROUND_SUBMITTED", "SERVICE_CALL_CREATED", "ROUND_PENDING",
                                                 "TABLE_CLEARED", SENTINEL])
    assert [e["sector_id"] for e in waiter_live if e["type"] == "ROUND_SUBMITTED"] == [3]
    waiter_caught = await events_when(lambda: staff_catchup(gateway, waiter_token, since=since), len(waiter_live))
    assert waiter_caught == waiter_live

    kitchen_caught = await events_when(lambda: staff_catchup(gateway, kitchen_token, since=since), 2)
    assert kinds(kitchen_caught) == ["ROUND_SUBMITTED", "ROUND_SUBMITTED"]
    # The kitchen got exactly these two live as well, and nothing after them.
    for expected in kitchen_caught:
        assert await kitchen.receive() == expected
    await kitchen.expect_nothing(within=0.2)

    for event in admin_caught:
        assert not any(key.startswith("_") for key in event), event


async def test_staff_catchup_is_oldest_first_and_starts_at_since(gateway: GatewayHandle, publisher: Publisher) -> None:
    token = gateway.staff_token(user=1, roles=["ADMIN"])
    env = publisher.envelope
    await publisher.many([(None, env("TABLE_STATUS_CHANGED", 1, 2, table_id=t)) for t in (1, 2, 3)])
    await delivered(gateway, 3)
    early = await events_when(lambda: staff_catchup(gateway, token, since=0), 3)
    assert [e["table_id"] for e in early] == [1, 2, 3]

    # The store's entry ids carry the (millisecond) time each event was stored.
    client = make_client(gateway.settings.redis_url or "")
    async with client:
        stored = await client.xrange("gw:catchup:1:2")
    last_id = stored[-1].identifier
    last_ms = int((last_id.decode() if isinstance(last_id, bytes) else last_id).split("-")[0])
    # Later events must get a later millisecond than the first batch, or `since` cannot split them.
    await trio.sleep(max(0.0, (last_ms + 3) / 1000 - time.time()))
    await publisher.many([(None, env("TABLE_STATUS_CHANGED", 1, 2, table_id=t)) for t in (4, 5)])
    await delivered(gateway, 5)
    await events_when(lambda: staff_catchup(gateway, token, since=0), 5)

    since = (last_ms + 2) / 1000
    later = (await staff_catchup(gateway, token, since=since)).json()
    assert [e["table_id"] for e in later["events"]] == [4, 5]
    assert later["count"] == 2
    # `since` is inclusive: the first batch's last event is there when since is its own time.
    inclusive = (await staff_catchup(gateway, token, since=last_ms / 1000)).json()
    assert [e["table_id"] for e in inclusive["events"]][-3:] == [3, 4, 5]
    future = (await staff_catchup(gateway, token, since=time.time() + 60)).json()
    assert future == {"events": [], "count": 0}


async def test_staff_catchup_with_nothing_stored_is_empty(gateway: GatewayHandle) -> None:
    response = await staff_catchup(gateway, gateway.staff_token())
    assert response.status_code == 200
    assert response.json() == {"events": [], "count": 0}


async def test_staff_catchup_refuses_bad_tokens(gateway: GatewayHandle) -> None:
    s = gateway.settings
    other_secret = mint_staff_token(secret="not-the-secret", issuer=s.jwt_issuer, audience=s.jwt_audience,
                                    user_id=7, tenant_id=1, branch_ids=[2], roles=["WAITER"])
    expired = gateway.staff_token(ttl=60, now=time.time() - 3600)
    refresh = gateway.staff_token(token_type="refresh")
    for token in ("garbage", "", other_secret, expired, refresh, gateway.table_token()):
        response = await staff_catchup(gateway, token)
        assert response.status_code == 401, token
        assert response.json() == {"detail": "Invalid token"}


async def test_staff_catchup_refuses_revoked_tokens(gateway: GatewayHandle, publisher: Publisher) -> None:
    await publisher.stream_event(publisher.envelope("TABLE_STATUS_CHANGED", 1, 2, table_id=5))
    await delivered(gateway, 1)
    blacklisted = gateway.staff_token(user=7, jti="revoked-jti")
    issued_before = gateway.staff_token(user=8, now=time.time() - 60)
    issued_after = gateway.staff_token(user=9, now=time.time() + 60)
    revoked_at = datetime.now(UTC).isoformat()
    client = make_client(gateway.settings.redis_url or "")
    async with client:
        await client.set("auth:token:blacklist:revoked-jti", "1")
        await client.set("auth:user:revoked:8", revoked_at)
        await client.set("auth:user:revoked:9", revoked_at)
    for token in (blacklisted, issued_before):
        response = await staff_catchup(gateway, token)
        assert response.status_code == 401
        assert response.json() == {"detail": "Invalid token"}
    # A token issued after the user's revocation is a fresh login.
    assert kinds(await events_when(lambda: staff_catchup(gateway, issued_after), 1)) == ["TABLE_STATUS_CHANGED"]


async def test_staff_catchup_refuses_other_branches(gateway: GatewayHandle) -> None:
    response = await staff_catchup(gateway, gateway.staff_token(branches=[2, 3]), branch_id=4)
    assert response.status_code == 403
    assert response.json() == {"detail": "No access to this branch"}


async def test_staff_catchup_needs_valid_parameters(gateway: GatewayHandle) -> None:
    token = gateway.staff_token()
    url = f"{gateway.url}/ws/catchup"
    full = {"branch_id": "2", "since": "0", "token": token}
    for missing in full:
        params = {k: v for k, v in full.items() if k != missing}
        response = await get(url, params)
        assert response.status_code == 422, missing
        assert missing in response.json()["detail"]
    for name, bad in (("branch_id", "two"), ("branch_id", "2.5"), ("since", "yesterday"), ("since", "nan"),
                      ("since", "inf")):
        response = await get(url, {**full, name: bad})
        assert response.status_code == 422, (name, bad)
        assert "detail" in response.json()


async def test_a_since_beyond_any_stream_id_is_an_empty_answer(gateway: GatewayHandle,
                                                               publisher: Publisher) -> None:
    token = gateway.staff_token()
    diner = gateway.table_token()
    # More requests than the Redis circuit breaker tolerates failures: none of them may count as one.
    for _ in range(2 * gateway.gw.guards.catchup.breaker.failure_threshold):
        response = await staff_catchup(gateway, token, since="1e20")
        assert response.json() == {"events": [], "count": 0}
        response = await session_catchup(gateway, diner, since="1e20")
        assert response.json() == {"events": [], "count": 0}
    detailed = await get(f"{gateway.url}/ws/health/detailed", {})
    assert detailed.status_code == 200
    assert detailed.json()["status"] == "healthy"
    waiter = await gateway.connect("waiter", token)
    await gateway.connected(1)
    await publisher.stream_event(publisher.envelope("ROUND_PENDING", 1, 2, session_id=9))
    await waiter.expect("ROUND_PENDING")


# --- diners ------------------------------------------------------------------------------------


async def test_session_catchup_returns_only_its_own_session(gateway: GatewayHandle, publisher: Publisher) -> None:
    since = time.time() - 1
    mine = gateway.table_token(table=5, session=9)
    diner = await gateway.connect("diner", mine)
    other_table = await gateway.connect("diner", gateway.table_token(table=6, session=10))
    await gateway.connected(2)

    env = publisher.envelope
    cart = env("CART_ITEM_ADDED", 1, 2, table_id=5, session_id=9, entity={"item_id": 1})
    await publisher.many([
        (None, cart),
        ("session:9", cart),
        (None, env("CART_ITEM_ADDED", 1, 2, table_id=6, session_id=10, entity={"item_id": 2})),
        (None, env("ROUND_READY", 1, 2, table_id=6, session_id=10, entity={"round_id": 7})),
        (None, env("ROUND_READY", 1, 2, table_id=5, session_id=9, entity={"round_id": 8})),
        # Delivered live, but not a diner catch-up type.
        (None, env("SERVICE_CALL_CREATED", 1, 2, table_id=5, session_id=9)),
        (None, env("ENTITY_UPDATED", 1, 2, entity={"id": 1})),
        (None, env(SENTINEL, 1, 3, entity={"product_id": 4})),
        (None, env(SENTINEL, 1, 2, entity={"product_id": 8})),
    ])
    await delivered(gateway, 8)

    live = await live_until_sentinel(diner)
    assert kinds(live) == ["CART_ITEM_ADDED", "ROUND_READY", "SERVICE_CALL_CREATED", SENTINEL]
    expected = [e for e in live if e["type"] in DINER_CATCHUP_TYPES]
    caught = await events_when(lambda: session_catchup(gateway, mine, since=since), len(expected))
    assert caught == expected
    assert all(e.get("session_id") in (9, None) for e in caught)

    other_live = await live_until_sentinel(other_table)
    other_caught = await events_when(
        lambda: session_catchup(gateway, gateway.table_token(table=6, session=10), session_id=10, since=since),
        len(other_live),
    )
    assert kinds(other_caught) == ["CART_ITEM_ADDED", "ROUND_READY", SENTINEL]
    assert other_caught == other_live


async def test_session_catchup_accepts_a_legacy_table_token(gateway: GatewayHandle, publisher: Publisher) -> None:
    await publisher.stream_event(publisher.envelope("CHECK_REQUESTED", 1, 2, table_id=5, session_id=9))
    await delivered(gateway, 1)
    legacy = mint_legacy_table_token(secret=gateway.settings.table_token_secret, tenant_id=1, branch_id=2,
                                     table_id=5, session_id=9)
    caught = await events_when(lambda: session_catchup(gateway, legacy), 1)
    assert kinds(caught) == ["CHECK_REQUESTED"]


async def test_session_catchup_refuses_bad_table_tokens(gateway: GatewayHandle) -> None:
    expired = gateway.table_token(ttl=60, now=time.time() - 3600)
    for token in ("garbage", "", gateway.staff_token(), expired, "1:2:5:9:99999999999:" + "0" * 32):
        response = await session_catchup(gateway, token)
        assert response.status_code == 401, token
        assert response.json() == {"detail": "Invalid table token"}


async def test_session_catchup_refuses_another_session(gateway: GatewayHandle) -> None:
    response = await session_catchup(gateway, gateway.table_token(session=9), session_id=10)
    assert response.status_code == 403
    assert response.json() == {"detail": "Session ID does not match token"}


async def test_session_catchup_needs_valid_parameters(gateway: GatewayHandle) -> None:
    url = f"{gateway.url}/ws/catchup/session"
    full = {"session_id": "9", "since": "0", "table_token": gateway.table_token()}
    for missing in full:
        response = await get(url, {k: v for k, v in full.items() if k != missing})
        assert response.status_code == 422, missing
        assert missing in response.json()["detail"]
    for name, bad in (("session_id", "nine"), ("since", "-inf"), ("since", "")):
        response = await get(url, {**full, name: bad})
        assert response.status_code == 422, (name, bad)


async def test_two_instances_store_each_event_once(
    gateway_factory: Callable[..., Any], publisher: Publisher
) -> None:
    # Both instances deliver every stream event and both write catch-up: one copy must win (D16).
    first = await gateway_factory()
    second = await gateway_factory()
    token = first.staff_token(user=1, roles=("ADMIN",))
    admins = [await first.connect("admin", token), await second.connect("admin", token)]
    await first.connected(1)
    await second.connected(1)
    for n in range(5):
        await publisher.stream_event(publisher.envelope("ROUND_READY", 1, 2, session_id=9, entity={"n": n}))
    for admin in admins:
        for _ in range(5):
            await admin.expect("ROUND_READY")

    async def stored() -> list[int]:
        response = await staff_catchup(first, token)
        return [e["entity"]["n"] for e in response.json()["events"]]

    with trio.fail_after(5):
        while len(await stored()) < 5:  # noqa: ASYNC110 - the store is written asynchronously
            await trio.sleep(0.02)
    await trio.sleep(0.2)  # give a second copy every chance to land
    assert await stored() == [0, 1, 2, 3, 4]
