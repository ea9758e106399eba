"""The plain HTTP side of the gateway's port: health, metrics, the publish API (D19), CORS and
malformed requests.

Everything runs against a real gateway and a real redis-server over loopback. httpx is a
synchronous client here, run in a worker thread so the gateway (in the test's Trio loop) keeps
serving; requests that httpx cannot express (a slow head, garbage bytes) go over raw sockets.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
import trio

from gateway.redisio.client import make_client
from gateway.redisio.embedded import RedisProcess
from gateway.redisio.embedded_config import RedisConfig
from gateway_testing import GatewayHandle, Publisher

Factory = Callable[..., Awaitable[GatewayHandle]]

ALLOWED_ORIGIN = "http://localhost:5173"
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

HEALTH_KEYS = (
    "status", "service", "version", "environment", "total_connections", "max_connections",
    "utilization_percent", "users_connected", "branches_with_connections", "sectors_with_connections",
    "sessions_with_connections", "admin_connections", "rate_limiter_tracked", "branch_locks_count",
    "user_locks_count", "metrics",
)
HEALTH_METRIC_KEYS = (
    "broadcasts_total", "broadcasts_failed", "broadcasts_failed_recipients", "broadcasts_rate_limited",
    "connections_rejected_limit", "connections_rejected_rate_limit", "connections_rejected_auth",
    "connections_timeouts", "events_processed", "events_dropped", "events_invalid_schema",
    "events_callback_timeouts", "locks_cleaned",
)

# §1.3: the existing gateway's metric names and types, which dashboards already read.
LEGACY_METRICS = {
    "wsgateway_connections_total": "gauge",
    "wsgateway_connections_max": "gauge",
    "wsgateway_connections_utilization_percent": "gauge",
    "wsgateway_users_connected": "gauge",
    "wsgateway_branches_with_connections": "gauge",
    "wsgateway_sectors_with_connections": "gauge",
    "wsgateway_sessions_with_connections": "gauge",
    "wsgateway_admin_connections": "gauge",
    "wsgateway_dead_connections_pending": "gauge",
    "wsgateway_broadcasts_total": "counter",
    "wsgateway_broadcasts_failed": "counter",
    "wsgateway_broadcasts_failed_recipients": "counter",
    "wsgateway_broadcasts_rate_limited": "counter",
    "wsgateway_connections_rejected_total": "counter",
    "wsgateway_events_processed": "counter",
    "wsgateway_events_dropped": "counter",
    "wsgateway_events_invalid_schema": "counter",
    "wsgateway_locks_cleaned": "counter",
    "wsgateway_branch_locks": "gauge",
    "wsgateway_user_locks": "gauge",
    "wsgateway_rate_limiter_tracked": "gauge",
    "wsgateway_heartbeat_tracked_connections": "gauge",
    "wsgateway_heartbeat_timeout_seconds": "gauge",
    "wsgateway_heartbeat_oldest_age_seconds": "gauge",
    "wsgateway_scrape_timestamp": "gauge",
}
NEW_METRICS = {
    "wsgateway_open_connections": "gauge",
    "wsgateway_events_received_total": "counter",
    "wsgateway_events_invalid_total": "counter",
    "wsgateway_events_routed_total": "counter",
    "wsgateway_frames_delivered_total": "counter",
    "wsgateway_closes_total": "counter",
    "wsgateway_rejections_total": "counter",
    "wsgateway_slow_consumer_closes_total": "counter",
    "wsgateway_delivery_latency_seconds": "histogram",
}


# --- helpers -----------------------------------------------------------------------------------


async def request(method: str, url: str, **kwargs: Any) -> httpx.Response:
    # A thread, because httpx has no Trio backend; the timeout only guards against a hang.
    call = functools.partial(httpx.request, method, url, timeout=30.0, **kwargs)
    return await trio.to_thread.run_sync(call)


async def get(url: str, **kwargs: Any) -> httpx.Response:
    return await request("GET", url, **kwargs)


async def raw_exchange(handle: GatewayHandle, data: bytes, *, keep_open: bool = False) -> bytes:
    """Send ``data`` on a fresh TCP connection and return everything the gateway sends back
    until it hangs up. ``keep_open`` leaves our side open, as a stalled client does."""
    stream = await trio.open_tcp_stream("127.0.0.1", handle.port)
    received = b""
    async with stream:
        if data:
            await stream.send_all(data)
        if not keep_open:
            await stream.send_eof()
        with trio.fail_after(30):
            while True:
                try:
                    chunk = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    # The gateway may reset after answering a request it did not read in full.
                    break
                if not chunk:
                    break
                received += chunk
    return received


def text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def status_of(raw_response: bytes) -> int:
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", raw_response)
    assert match, f"not an HTTP response: {raw_response[:200]!r}"
    return int(match.group(1))


def body_of(raw_response: bytes) -> Any:
    _head, _sep, body = raw_response.partition(b"\r\n\r\n")
    return json.loads(body)


async def assert_still_serving(handle: GatewayHandle) -> None:
    response = await get(f"{handle.url}/ws/health")
    assert response.status_code == 200
    assert response.json()["status"] == "healthy"


Sample = tuple[str, dict[str, str], float]


def parse_exposition(text: str) -> tuple[dict[str, str], list[Sample]]:
    """``# TYPE`` declarations and samples of a Prometheus text exposition; fails on a family
    declared twice, which a Prometheus server rejects."""
    types: dict[str, str] = {}
    samples: list[Sample] = []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert name not in types, f"{name} declared twice"
            types[name] = kind
        elif line and not line.startswith("#"):
            match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)", line)
            assert match, f"unparsable sample line {line!r}"
            labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
            samples.append((match.group(1), labels, float(match.group(3))))
    return types, samples


def sample(samples: list[Sample], name: str, **labels: str) -> float | None:
    for sample_name, sample_labels, value in samples:
        if sample_name == name and sample_labels == labels:
            return value
    return None


async def scrape(handle: GatewayHandle) -> tuple[dict[str, str], list[Sample]]:
    response = await get(f"{handle.url}/ws/metrics")
    assert response.status_code == 200
    return parse_exposition(response.text)


async def health_until(handle: GatewayHandle, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Poll /ws/health until ``check`` holds: a closed socket is unregistered asynchronously."""
    with trio.fail_after(10):
        while True:
            body: dict[str, Any] = (await get(f"{handle.url}/ws/health")).json()
            if check(body):
                return body
            await trio.sleep(0.02)


# --- health ------------------------------------------------------------------------------------


async def test_health_has_every_key_and_counts_connected_sockets(gateway_factory: Factory) -> None:
    handle = await gateway_factory(max_total_connections=20)
    empty = await get(f"{handle.url}/ws/health")
    assert empty.status_code == 200
    assert empty.headers["content-type"].startswith("application/json")
    body = empty.json()
    assert set(HEALTH_KEYS) <= set(body)
    assert set(HEALTH_METRIC_KEYS) <= set(body["metrics"])
    assert body["status"] == "healthy"
    assert body["service"] == "ws-gateway"
    assert isinstance(body["version"], str) and body["version"]
    assert body["environment"] == "development"
    assert body["total_connections"] == 0
    assert body["max_connections"] == 20

    await handle.connect("waiter", handle.staff_token(user=7, sector_ids=[3]))
    await handle.connect("waiter", handle.staff_token(user=8))
    await handle.connect("kitchen", handle.staff_token(user=11, roles=["KITCHEN"]))
    await handle.connect("admin", handle.staff_token(user=1, branches=[2, 4], roles=["ADMIN"]))
    diner = await handle.connect("diner", handle.table_token(session=9))
    await handle.connected(5)

    body = (await get(f"{handle.url}/ws/health")).json()
    assert body["total_connections"] == 5
    assert body["utilization_percent"] == 25.0
    # Four staff users plus the diner's pseudo user.
    assert body["users_connected"] == 5
    # The admin's second branch counts too.
    assert body["branches_with_connections"] == 2
    assert body["sectors_with_connections"] == 1
    assert body["sessions_with_connections"] == 1
    assert body["admin_connections"] == 1
    assert body["rate_limiter_tracked"] == 5

    _types, samples = await scrape(handle)
    assert sample(samples, "wsgateway_connections_total") == 5
    assert sample(samples, "wsgateway_open_connections", endpoint="waiter") == 2
    assert sample(samples, "wsgateway_open_connections", endpoint="diner") == 1

    await diner.aclose()
    body = await health_until(handle, lambda b: b["total_connections"] == 4)
    assert body["sessions_with_connections"] == 0
    assert body["users_connected"] == 4


async def test_detailed_health_is_healthy_with_redis(gateway: GatewayHandle) -> None:
    response = await get(f"{gateway.url}/ws/health/detailed")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "healthy"
    assert body["service"] == "ws-gateway"
    assert body["dependencies"]["redis"]["ok"] is True
    assert "heartbeat_stats" in body["connections"]


async def test_detailed_health_reports_degraded_when_redis_is_down(gateway_factory: Factory) -> None:
    # A private redis-server, because killing the session's one would break every later test.
    with RedisProcess(RedisConfig(port=0)) as proc:
        handle = await gateway_factory(redis_url=proc.url)
        assert handle.settings.redis_url == proc.url
        assert (await get(f"{handle.url}/ws/health/detailed")).status_code == 200
        proc.kill()
        with trio.fail_after(20):
            while True:
                response = await get(f"{handle.url}/ws/health/detailed")
                if response.status_code == 503:
                    break
                await trio.sleep(0.05)
        body = response.json()
        assert body["status"] == "degraded"
        assert body["dependencies"]["redis"]["ok"] is False
        # The process itself is fine: the plain health page still answers.
        assert (await get(f"{handle.url}/ws/health")).status_code == 200


# --- metrics -----------------------------------------------------------------------------------


async def test_metrics_exposition_has_legacy_and_new_families(gateway: GatewayHandle, publisher: Publisher) -> None:
    waiter = await gateway.connect("waiter", gateway.staff_token())
    await gateway.connected(1)
    await publisher.stream_event(publisher.envelope("ROUND_PENDING", 1, 2, table_id=5, session_id=9))
    await waiter.expect("ROUND_PENDING")

    response = await get(f"{gateway.url}/ws/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"] == METRICS_CONTENT_TYPE
    assert response.text.endswith("\n")
    types, samples = parse_exposition(response.text)
    for name, kind in {**LEGACY_METRICS, **NEW_METRICS}.items():
        assert types.get(name) == kind, f"{name}: TYPE {types.get(name)!r}, expected {kind}"
    for reason in ("limit", "rate_limit", "auth"):
        assert sample(samples, "wsgateway_connections_rejected_total", reason=reason) is not None
    assert sample(samples, "wsgateway_connections_total") == 1
    assert sample(samples, "wsgateway_events_routed_total", source="stream") == 1
    assert sample(samples, "wsgateway_events_received_total", source="stream") == 1
    assert sample(samples, "wsgateway_frames_delivered_total") == 1
    assert sample(samples, "wsgateway_delivery_latency_seconds_count") == 1


def _invalid_payloads() -> dict[str, bytes]:
    from gateway.core.events import encode_envelope, envelope

    missing_tenant = envelope("ROUND_PENDING", 1, 2)
    del missing_tenant["tenant_id"]
    string_tenant = envelope("ROUND_PENDING", 1, 2)
    string_tenant["tenant_id"] = "1"
    unknown = {**envelope("ROUND_PENDING", 1, 2), **{f"extra_{i}": i for i in range(11)}}
    too_large = envelope("ROUND_PENDING", 1, 2, entity={"pad": "x" * 65536})
    return {
        "not_json": b'{"type": "ROUND_PENDING", "tenant_id": 1',
        "missing_tenant": encode_envelope(missing_tenant),
        "bad_tenant": encode_envelope(string_tenant),
        "too_many_unknown_fields": encode_envelope(unknown),
        "too_large": encode_envelope(too_large),
    }


async def test_invalid_events_are_counted_dead_lettered_and_do_not_stop_delivery(
    gateway: GatewayHandle, publisher: Publisher
) -> None:
    waiter = await gateway.connect("waiter", gateway.staff_token())
    await gateway.connected(1)
    payloads = _invalid_payloads()
    stream_ids = {reason: await publisher.stream_event(raw) for reason, raw in payloads.items()}
    for raw in payloads.values():
        await publisher.channel_event("branch:2:waiters", raw)
    # Different entities, so the two are distinct logical events and both must arrive.
    await publisher.stream_event(publisher.envelope("SERVICE_CALL_CREATED", 1, 2, entity={"n": 1}))
    await publisher.channel_event(
        "branch:2:waiters", publisher.envelope("SERVICE_CALL_CREATED", 1, 2, entity={"n": 2})
    )
    first = await waiter.expect("SERVICE_CALL_CREATED")
    second = await waiter.expect("SERVICE_CALL_CREATED")
    assert {first["entity"]["n"], second["entity"]["n"]} == {1, 2}

    # Each source handles its events in order, so the invalid ones before are counted by now.
    _types, samples = await scrape(gateway)
    for source in ("stream", "pubsub"):
        for reason in payloads:
            assert sample(samples, "wsgateway_events_invalid_total", source=source, reason=reason) == 1, (
                source, reason,
            )
    health = (await get(f"{gateway.url}/ws/health")).json()
    assert health["metrics"]["events_invalid_schema"] == 2 * len(payloads)

    client = make_client(gateway.settings.redis_url or "")
    async with client:
        # The dead-letter entries are written with the batch's acknowledgements, after delivery.
        with trio.fail_after(10):
            while True:
                entries = await client.xrange("events:dlq")
                if len(entries) >= len(payloads):
                    break
                await trio.sleep(0.02)
    assert len(entries) == len(payloads)
    by_original = {text(e.field_values[b"original_id"]): e.field_values for e in entries}
    assert set(by_original) == set(stream_ids.values())
    for reason, entry_id in stream_ids.items():
        fields = by_original[entry_id]
        assert set(fields) >= {b"original_id", b"original_stream", b"data", b"retry_count", b"failed_at",
                               b"consumer", b"error"}
        assert fields[b"original_stream"] == b"events:critical"
        assert fields[b"data"] == payloads[reason]
        assert fields[b"consumer"] == gateway.settings.instance_id.encode()
        assert reason.encode() in fields[b"error"]
        float(fields[b"failed_at"])
        int(fields[b"retry_count"])


# --- malformed and unexpected requests ---------------------------------------------------------


async def test_unknown_path_is_404(gateway: GatewayHandle) -> None:
    response = await get(f"{gateway.url}/ws/nope")
    assert response.status_code == 404
    assert response.json() == {"detail": "Not Found"}
    await assert_still_serving(gateway)


async def test_wrong_method_is_405_with_allow(gateway: GatewayHandle) -> None:
    response = await request("POST", f"{gateway.url}/ws/health", content=b"{}")
    assert response.status_code == 405
    assert response.headers["allow"] == "GET, HEAD"
    response = await request("DELETE", f"{gateway.url}/ws/publish")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    await assert_still_serving(gateway)


async def test_head_gets_the_status_without_a_body(gateway: GatewayHandle) -> None:
    for path, status in (("/ws/health", 200), ("/ws/metrics", 200), ("/ws/nope", 404), ("/ws/publish", 405)):
        response = await request("HEAD", f"{gateway.url}{path}")
        assert response.status_code == status, path
        assert response.content == b""
    await assert_still_serving(gateway)


UPGRADE_HEADERS = (b"Host: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")


async def test_websocket_upgrade_with_another_method_is_405(gateway: GatewayHandle) -> None:
    answer = await raw_exchange(gateway, b"POST /ws/waiter?token=x HTTP/1.1\r\n" + UPGRADE_HEADERS)
    assert status_of(answer) == 405
    await assert_still_serving(gateway)


async def test_websocket_upgrade_with_head_is_405(gateway: GatewayHandle) -> None:
    answer = await raw_exchange(gateway, b"HEAD /ws/waiter?token=x HTTP/1.1\r\n" + UPGRADE_HEADERS)
    assert status_of(answer) == 405
    await assert_still_serving(gateway)


async def test_websocket_path_without_upgrade_is_426(gateway: GatewayHandle) -> None:
    response = await get(f"{gateway.url}/ws/waiter", params={"token": gateway.staff_token()})
    assert response.status_code == 426
    assert response.headers["upgrade"] == "websocket"
    assert "detail" in response.json()
    await assert_still_serving(gateway)


async def test_oversized_head_is_431(gateway: GatewayHandle) -> None:
    # The head keeps growing past 16 KiB without ever ending.
    head = b"GET /ws/health HTTP/1.1\r\nHost: gw\r\n" + b"X-Padding: " + b"a" * (20 * 1024) + b"\r\n"
    answer = await raw_exchange(gateway, head, keep_open=True)
    assert status_of(answer) == 431
    await assert_still_serving(gateway)


async def test_complete_oversized_head_is_431(gateway: GatewayHandle) -> None:
    # Two pieces, each under the limit: the buffer never holds 16 KiB of an unfinished head.
    first = b"GET /ws/health HTTP/1.1\r\nHost: gw\r\nX-Padding-1: " + b"a" * (10 * 1024) + b"\r\n"
    second = b"X-Padding-2: " + b"b" * (7 * 1024) + b"\r\n\r\n"
    stream = await trio.open_tcp_stream("127.0.0.1", gateway.port)
    async with stream:
        await stream.send_all(first)
        await stream.send_all(second)
        with trio.fail_after(30):
            answer = await stream.receive_some(65536)
    assert status_of(answer) == 431


async def test_slow_head_gets_408(gateway_factory: Factory) -> None:
    handle = await gateway_factory(handshake_timeout=0.5)
    answer = await raw_exchange(handle, b"GET /ws/health HTTP/1.1\r\nHost: gw\r\nX-Slow", keep_open=True)
    assert status_of(answer) == 408
    await assert_still_serving(handle)


async def test_idle_connection_is_closed_without_a_response(gateway_factory: Factory) -> None:
    handle = await gateway_factory(handshake_timeout=0.5)
    assert await raw_exchange(handle, b"", keep_open=True) == b""
    await assert_still_serving(handle)


async def test_slow_body_gets_408(gateway_factory: Factory) -> None:
    handle = await gateway_factory(handshake_timeout=0.5, publish_token="s3cret")
    head = (b"POST /ws/publish HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer s3cret\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
    answer = await raw_exchange(handle, head + b'{"type":', keep_open=True)
    assert status_of(answer) == 408
    await assert_still_serving(handle)


async def test_oversized_body_is_413(gateway_factory: Factory) -> None:
    handle = await gateway_factory(max_body_bytes=1024, publish_token="s3cret")
    body = b'{"type":"ROUND_READY","tenant_id":1,"entity":{"pad":"' + b"x" * 2048 + b'"}}'
    head = (b"POST /ws/publish HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer s3cret\r\n"
            b"Content-Type: application/json\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n")
    answer = await raw_exchange(handle, head + body)
    assert status_of(answer) == 413
    await assert_still_serving(handle)


async def test_garbage_is_400(gateway: GatewayHandle) -> None:
    answer = await raw_exchange(gateway, b"\x16\x03\x01\x02\x00garbage that is not HTTP\r\n\r\n")
    assert status_of(answer) == 400
    assert "detail" in body_of(answer)
    await assert_still_serving(gateway)


async def test_keep_alive_serves_several_requests_on_one_connection(gateway: GatewayHandle) -> None:
    one = b"GET /ws/health HTTP/1.1\r\nHost: gw\r\n\r\n"
    last = b"GET /ws/nope HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    answer = await raw_exchange(gateway, one + one + last)
    assert [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", answer)] == [200, 200, 404]


# --- publish API (D19) -------------------------------------------------------------------------


async def test_publish_is_off_without_a_token_outside_development(gateway_factory: Factory) -> None:
    handle = await gateway_factory(environment="production", jwt_secret="s" * 32, table_token_secret="t" * 32,
                                   allowed_origins="http://localhost:5173")
    env = json.dumps({"type": "ROUND_READY", "tenant_id": 1, "branch_id": 2})
    response = await request("POST", f"{handle.url}/ws/publish", content=env,
                             headers={"Authorization": "Bearer anything", "Content-Type": "application/json"})
    assert response.status_code == 404


async def test_development_without_a_token_takes_events_from_this_machine(gateway: GatewayHandle) -> None:
    # What makes `./scripts/serve` then `gateway publish ...` work with the private embedded Redis.
    waiter = await gateway.connect("waiter", gateway.staff_token())
    await gateway.connected(1)
    env = json.dumps({"type": "ROUND_READY", "tenant_id": 1, "branch_id": 2})
    response = await request("POST", f"{gateway.url}/ws/publish", content=env,
                             headers={"Content-Type": "application/json"})
    assert response.status_code == 202
    await waiter.expect("ROUND_READY")


async def test_publish_api(gateway_factory: Factory, publisher: Publisher) -> None:
    handle = await gateway_factory(publish_token="s3cret")
    waiter = await handle.connect("waiter", handle.staff_token())
    await handle.connected(1)
    url = f"{handle.url}/ws/publish"
    good = json.dumps(publisher.envelope("ROUND_READY", 1, 2, table_id=5, session_id=9, entity={"round_id": 3}))
    json_type = {"Content-Type": "application/json"}

    assert (await request("POST", url, content=good, headers=json_type)).status_code == 401
    wrong = {**json_type, "Authorization": "Bearer nope"}
    response = await request("POST", url, content=good, headers=wrong)
    assert response.status_code == 401
    assert "detail" in response.json()
    basic = {**json_type, "Authorization": "Basic s3cret"}
    assert (await request("POST", url, content=good, headers=basic)).status_code == 401

    auth = {"Authorization": "Bearer s3cret"}
    response = await request("POST", url, content=good, headers={**auth, "Content-Type": "text/plain"})
    assert response.status_code == 415

    bad = json.dumps({"type": "ROUND_READY", "tenant_id": "1", "branch_id": 2})
    response = await request("POST", url, content=bad, headers={**auth, **json_type})
    assert response.status_code == 422
    assert "bad_tenant" in response.json()["detail"]
    response = await request("POST", url, content=b"{not json", headers={**auth, **json_type})
    assert response.status_code == 422
    assert "not_json" in response.json()["detail"]
    await waiter.expect_nothing(within=0.2)

    response = await request("POST", url, content=good, headers={**auth, "Content-Type": "application/json; charset=utf-8"})
    assert response.status_code == 202
    body = response.json()
    assert body["stream"] == "events:critical"
    event = await waiter.expect("ROUND_READY")
    assert event["entity"] == {"round_id": 3}
    client = make_client(handle.settings.redis_url or "")
    async with client:
        entries = await client.xrange("events:critical")
    assert [text(e.identifier) for e in entries] == [body["id"]]


# --- CORS --------------------------------------------------------------------------------------


async def test_cors_preflight_from_an_allowed_origin(gateway: GatewayHandle) -> None:
    response = await request("OPTIONS", f"{gateway.url}/ws/catchup", headers={
        "Origin": ALLOWED_ORIGIN,
        "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "Authorization",
    })
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == ALLOWED_ORIGIN
    assert response.headers["access-control-allow-credentials"] == "true"
    methods = {m.strip() for m in response.headers["access-control-allow-methods"].split(",")}
    assert {"GET", "POST", "OPTIONS"} <= methods
    headers = {h.strip().lower() for h in response.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type", "x-table-token"} <= headers


async def test_cors_preflight_from_a_disallowed_origin(gateway: GatewayHandle) -> None:
    response = await request("OPTIONS", f"{gateway.url}/ws/catchup", headers={
        "Origin": "http://evil.example",
        "Access-Control-Request-Method": "GET",
    })
    assert response.status_code == 400
    assert "access-control-allow-origin" not in response.headers


@pytest.mark.parametrize("origin", [ALLOWED_ORIGIN, "https://localhost:5173"])
async def test_simple_request_from_an_allowed_origin_gets_allow_origin(gateway: GatewayHandle, origin: str) -> None:
    response = await get(f"{gateway.url}/ws/health", headers={"Origin": origin})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == origin


async def test_simple_request_from_a_disallowed_origin_gets_no_allow_origin(gateway: GatewayHandle) -> None:
    response = await get(f"{gateway.url}/ws/health", headers={"Origin": "http://evil.example"})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
