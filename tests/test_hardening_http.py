"""Hardening of the listener and the HTTP routes, against an in-process gateway: the bound on
connections not admitted yet, the internal operations listener, header credentials for catch-up,
and input that used to reach a 500."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import httpx
import trio

from gateway_testing import GatewayHandle

Factory = Callable[..., Awaitable[GatewayHandle]]
BARE_503 = b"HTTP/1.1 503 Service Unavailable\r\n"


async def until(predicate: Callable[[], bool]) -> None:
    with trio.fail_after(10):
        while not predicate():  # noqa: ASYNC110 - the listener's counter has no event to wait on
            await trio.sleep(0.01)


async def idle_connections(handle: GatewayHandle, count: int) -> list[trio.SocketStream]:
    """TCP connections that send nothing: each holds a pending slot until its head times out."""
    streams = [await trio.open_tcp_stream("127.0.0.1", handle.port) for _ in range(count)]
    await until(lambda: handle.gw.pending.count >= count)
    return streams


async def refused(handle: GatewayHandle) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", handle.port)
    await stream.send_all(b"GET /ws/health HTTP/1.1\r\nhost: x\r\n\r\n")
    data = b""
    with trio.fail_after(10):
        while chunk := await stream.receive_some(4096):
            data += chunk
    await stream.aclose()
    return data


async def test_connections_not_admitted_are_bounded_per_ip(gateway_factory: Factory) -> None:
    gw = await gateway_factory(max_pending_per_ip=5, handshake_timeout=30)
    # Admitted sockets do not count: they are under the connection limits instead.
    admitted = [await gw.connect("waiter", gw.staff_token(user=u)) for u in (1, 2)]
    await gw.connected(2)
    assert gw.gw.pending.count == 0
    held = await idle_connections(gw, 5)
    answer = await refused(gw)
    assert answer.startswith(BARE_503)
    assert b"retry-after: 1" in answer
    assert b'"detail":"Too many pending connections"' in answer
    assert gw.gw.metrics.rejections.labels("pending_ip")._value.get() == 1
    for client in admitted:
        await client.still_served()
    for stream in held:
        await stream.aclose()
    await until(lambda: gw.gw.pending.count == 0)
    async with httpx.AsyncClient() as http:
        assert (await http.get(f"{gw.url}/ws/health")).status_code == 200


async def test_connections_not_admitted_are_bounded_in_total(gateway_factory: Factory) -> None:
    gw = await gateway_factory(max_pending_connections=4, max_pending_per_ip=100, handshake_timeout=30)
    held = await idle_connections(gw, 4)
    assert (await refused(gw)).startswith(BARE_503)
    assert gw.gw.metrics.rejections.labels("pending_total")._value.get() == 1
    for stream in held:
        await stream.aclose()
    await until(lambda: gw.gw.pending.count == 0)
    client = await gw.connect("waiter", gw.staff_token())
    await gw.connected(1)
    await client.still_served()


async def test_operations_routes_move_to_the_admin_listener(gateway_factory: Factory) -> None:
    gw = await gateway_factory(admin_port=0, publish_token="p" * 32)
    assert gw.gw.admin_port
    admin = f"http://127.0.0.1:{gw.gw.admin_port}"
    async with httpx.AsyncClient() as http:
        for path in ("/ws/metrics", "/ws/health/detailed"):
            assert (await http.get(f"{gw.url}{path}")).status_code == 404
            assert (await http.get(f"{admin}{path}")).status_code in (200, 503)
        public_publish = await http.post(f"{gw.url}/ws/publish", json={}, headers={"authorization": "Bearer " + "p" * 32})
        assert public_publish.status_code == 404
        admin_publish = await http.post(f"{admin}/ws/publish", json={}, headers={"authorization": "Bearer " + "p" * 32})
        assert admin_publish.status_code == 422
        assert (await http.get(f"{gw.url}/ws/health")).status_code == 200
        assert (await http.get(f"{admin}/ws/health")).status_code == 200
        # The internal listener serves no sockets and no catch-up.
        assert (await http.get(f"{admin}/ws/catchup")).status_code == 404
        upgrade = await http.get(f"{admin}/ws/waiter", headers={"upgrade": "websocket", "connection": "upgrade"})
        assert upgrade.status_code in (404, 426)
    client = await gw.connect("waiter", gw.staff_token())
    await gw.connected(1)
    await client.still_served()


async def test_catchup_since_far_in_the_future_is_an_empty_answer(gateway: GatewayHandle) -> None:
    token = gateway.staff_token()
    async with httpx.AsyncClient() as http:
        for since in ("1e306", "1e19", "9" * 400):
            response = await http.get(f"{gateway.url}/ws/catchup",
                                      params={"branch_id": "2", "since": since, "token": token})
            assert response.status_code in (200, 422), since
            if response.status_code == 200:
                assert response.json()["events"] == []
    assert gateway.gw.metrics.http_requests.labels("/ws/catchup", "500")._value.get() == 0


async def test_catchup_takes_credentials_from_headers(gateway: GatewayHandle) -> None:
    # CORS advertises Authorization and X-Table-Token: catch-up accepts both, keeping tokens out of URLs.
    async with httpx.AsyncClient() as http:
        staff = await http.get(f"{gateway.url}/ws/catchup", params={"branch_id": "2", "since": "0"},
                               headers={"authorization": f"Bearer {gateway.staff_token()}"})
        assert staff.status_code == 200
        assert staff.json() == {"events": [], "count": 0}
        diner = await http.get(f"{gateway.url}/ws/catchup/session", params={"session_id": "9", "since": "0"},
                               headers={"x-table-token": gateway.table_token()})
        assert diner.status_code == 200
        bad = await http.get(f"{gateway.url}/ws/catchup", params={"branch_id": "2", "since": "0"},
                             headers={"authorization": "Bearer nonsense"})
        assert bad.status_code == 401
        missing = await http.get(f"{gateway.url}/ws/catchup", params={"branch_id": "2", "since": "0"})
        assert missing.status_code == 422
