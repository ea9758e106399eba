"""End-to-end WebSocket protocol tests: ping/pong, credentials (D1-D4), Origin (D2), frames (D6),
heartbeat, token lifetime and revocation, refresh_sectors and the client-initiated close.

Every test runs a real gateway on a real redis-server and talks to it over loopback. A rejected
or closed socket is always checked together with a bystander socket that was open before it, so
a failure on one socket is shown not to disturb the others.
"""

from __future__ import annotations

import base64
import json
import time
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import coredis
import httpx
import pytest
import trio
from helpers import client_frame, metric_value
from trio_websocket import ConnectionRejected, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Event, Request

from gateway.core.tokens import mint_legacy_table_token, mint_staff_token, mint_table_token
from gateway.redisio.embedded import RedisProcess
from gateway.redisio.embedded_config import RedisConfig
from gateway_testing import (
    DEFAULT_ORIGIN,
    GatewayHandle,
    Publisher,
    WSClient,
    running_gateway,
    test_settings,
)

Factory = Callable[..., Awaitable[GatewayHandle]]

PONG = '{"type":"pong"}'


# --- helpers -----------------------------------------------------------------------------------


async def bystander(handle: GatewayHandle) -> WSClient:
    """A registered waiter socket (user 900) that must keep being served."""
    client = await handle.connect("waiter", handle.staff_token(user=900))
    await handle.connected(1)
    return client


async def expect_rejected(handle: GatewayHandle, client: WSClient, code: int, reason: str,
                          *, open_sockets: int = 1) -> None:
    assert await client.closed() == (code, reason)
    await handle.settled(open_sockets)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(signed: str) -> str:
    """The same claims under ``alg: none`` with an empty signature."""
    _header, payload, _signature = signed.split(".")
    return f"{b64(json.dumps({'alg': 'none', 'typ': 'JWT'}).encode())}.{payload}."


def with_payload(signed: str, **changes: Any) -> str:
    """The token with some claims changed but the original signature kept (a forgery)."""
    header, payload, signature = signed.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims.update(changes)
    return f"{header}.{b64(json.dumps(claims).encode())}.{signature}"


async def redis_set(url: str, key: str, val: str) -> None:
    client: coredis.Redis[bytes] = coredis.Redis.from_url(url)
    async with client:
        await client.set(key, val)


async def metrics_text(handle: GatewayHandle) -> str:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{handle.url}/ws/metrics")
    assert response.status_code == 200
    return response.text


class RawSocket:
    """A WebSocket client on wsproto over a plain trio stream, for frames trio-websocket won't send."""

    def __init__(self, stream: trio.SocketStream, ws: WSConnection) -> None:
        self.stream = stream
        self.ws = ws
        self.pending: deque[Event] = deque()

    @classmethod
    async def open(cls, handle: GatewayHandle, target: str) -> RawSocket:
        stream = await trio.open_tcp_stream("127.0.0.1", handle.port)
        ws = WSConnection(ConnectionType.CLIENT)
        request = Request(host=f"127.0.0.1:{handle.port}", target=target,
                          extra_headers=[(b"origin", DEFAULT_ORIGIN.encode())])
        raw = cls(stream, ws)
        await stream.send_all(ws.send(request))
        assert isinstance(await raw.next_event(), AcceptConnection)
        return raw

    async def next_event(self) -> Event:
        with trio.fail_after(5):
            while not self.pending:
                data = await self.stream.receive_some(65536)
                assert data, "server hung up without a close frame"
                self.ws.receive_data(data)
                self.pending.extend(self.ws.events())
            return self.pending.popleft()

    async def send_raw(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def close_reply(self) -> CloseConnection:
        """Wait for the server's close frame and answer it, as a well-behaved client does."""
        event = await self.next_event()
        assert isinstance(event, CloseConnection)
        await self.stream.send_all(self.ws.send(event.response()))
        return event


# --- ping / pong (§3.1, D6) --------------------------------------------------------------------


async def test_every_ping_form_gets_exactly_the_pong(gateway: GatewayHandle) -> None:
    client = await gateway.connect("waiter", gateway.staff_token())
    await gateway.connected(1)
    forms = ["ping", '{"type":"ping"}', '{"type":"ping","ts":123}', '{"type": "ping"}']
    for form in forms:
        await client.send(form)
        with trio.fail_after(5):
            assert await client.ws.get_message() == PONG
    assert metric_value(gateway.gw.metrics.inbound_messages, "ping") == len(forms)


@pytest.mark.parametrize("endpoint", ["kitchen", "admin", "diner"])
async def test_ping_is_answered_on_every_endpoint(gateway: GatewayHandle, endpoint: str) -> None:
    token = gateway.table_token() if endpoint == "diner" else gateway.staff_token(roles=("ADMIN",))
    client = await gateway.connect(endpoint, token)
    await gateway.connected(1)
    await client.still_served()
    await client.send('{"type":"ping"}')
    with trio.fail_after(5):
        assert await client.ws.get_message() == PONG


async def test_other_text_gets_no_reply_and_keeps_the_socket(gateway: GatewayHandle) -> None:
    client = await gateway.connect("waiter", gateway.staff_token())
    await gateway.connected(1)
    others = ["hello", "PING", " ping", '{"type":"pong"}', '{"type":"PING"}', '"ping"', '["ping"]',
              '{"type":"ping"', "{}", "", "refresh_sector", "pïng ✓"]
    for text in others:
        await client.send(text)
    await client.still_served()
    assert metric_value(gateway.gw.metrics.inbound_messages, "other") == len(others)
    assert len(gateway.gw.index) == 1


async def test_protocol_ping_gets_protocol_pong(gateway: GatewayHandle) -> None:
    client = await gateway.connect("waiter", gateway.staff_token())
    await gateway.connected(1)
    with trio.fail_after(5):
        # trio-websocket returns only when the pong with this payload arrived.
        await client.ws.ping(b"are-you-there")
    await client.still_served()


# --- authentication (D1) -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "query"),
    [
        ("waiter", ""),
        ("kitchen", "token="),
        ("admin", "other=1"),
        ("diner", ""),
        ("diner", "table_token="),
        # Each endpoint reads only its own parameter name.
        ("diner", "token=abc"),
        ("waiter", "table_token=abc"),
    ],
)
async def test_missing_token_closes_4001(gateway: GatewayHandle, endpoint: str, query: str) -> None:
    other = await bystander(gateway)
    client = await gateway.connect(endpoint, query=query)
    await expect_rejected(gateway, client, 4001, "Missing token")
    assert metric_value(gateway.gw.metrics.rejections, "missing_token") == 1
    await other.still_served()


def _garbage(_: GatewayHandle) -> str:
    return "not-a-jwt"


def _three_garbage_parts(_: GatewayHandle) -> str:
    return "a.b.c"


def _undecodable(_: GatewayHandle) -> str:
    # The query decoder replaces invalid UTF-8, which must still end as a plain auth failure.
    return "%FF%FE.%00.x"


def _expired(h: GatewayHandle) -> str:
    return h.staff_token(now=time.time() - 3600, ttl=60)


def _bad_signature(h: GatewayHandle) -> str:
    s = h.settings
    return mint_staff_token(secret=s.jwt_secret + "-not-it", issuer=s.jwt_issuer, audience=s.jwt_audience,
                            user_id=7, tenant_id=1, branch_ids=[2], roles=["WAITER"])


def _forged_claims(h: GatewayHandle) -> str:
    return with_payload(h.staff_token(), roles=["ADMIN"])


def _refresh(h: GatewayHandle) -> str:
    return h.staff_token(token_type="refresh")


def _alg_none(h: GatewayHandle) -> str:
    return unsigned_token(h.staff_token())


def _table_token_as_staff(h: GatewayHandle) -> str:
    return h.table_token()


@pytest.mark.parametrize(
    ("make_token", "metric_reason"),
    [
        (_garbage, "malformed"),
        (_three_garbage_parts, "malformed"),
        (_undecodable, "malformed"),
        (_expired, "expired"),
        (_bad_signature, "bad_signature"),
        (_forged_claims, "bad_signature"),
        (_refresh, "refresh_token"),
        (_alg_none, "bad_algorithm"),
        (_table_token_as_staff, "bad_signature"),
    ],
)
async def test_bad_staff_token_closes_4001(
    gateway: GatewayHandle, make_token: Callable[[GatewayHandle], str], metric_reason: str
) -> None:
    other = await bystander(gateway)
    client = await gateway.connect("waiter", make_token(gateway))
    await expect_rejected(gateway, client, 4001, "Authentication failed")
    assert metric_value(gateway.gw.metrics.rejections, metric_reason) == 1
    assert metric_value(gateway.gw.metrics.closes, "4001") == 1
    assert 'wsgateway_connections_rejected_total{reason="auth"} 1' in await metrics_text(gateway)
    await other.still_served()


@pytest.mark.parametrize(
    ("endpoint", "roles"),
    [
        ("admin", ("KITCHEN",)),
        ("admin", ("WAITER",)),
        ("kitchen", ("WAITER",)),
        ("waiter", ("KITCHEN",)),
        ("waiter", ()),
        ("kitchen", ("waiter", "kitchen", "manager")),
    ],
)
async def test_role_missing_for_endpoint_closes_4003(
    gateway: GatewayHandle, endpoint: str, roles: tuple[str, ...]
) -> None:
    other = await bystander(gateway)
    client = await gateway.connect(endpoint, gateway.staff_token(user=1, roles=roles))
    await expect_rejected(gateway, client, 4003, "Access denied")
    assert metric_value(gateway.gw.metrics.rejections, "role") == 1
    await other.still_served()


@pytest.mark.parametrize(
    ("endpoint", "roles"),
    [
        ("waiter", ("WAITER",)),
        ("waiter", ("MANAGER",)),
        ("waiter", ("ADMIN",)),
        ("kitchen", ("KITCHEN",)),
        ("kitchen", ("MANAGER",)),
        ("admin", ("MANAGER",)),
        ("admin", ("ADMIN",)),
        ("admin", ("WAITER", "ADMIN")),
    ],
)
async def test_role_table_accepts(gateway: GatewayHandle, endpoint: str, roles: tuple[str, ...]) -> None:
    client = await gateway.connect(endpoint, gateway.staff_token(roles=roles))
    await gateway.connected(1)
    await client.still_served()
    assert metric_value(gateway.gw.metrics.connections_opened, endpoint) == 1


def _table_forged(h: GatewayHandle) -> str:
    return with_payload(h.table_token(), session_id=10)


def _table_wrong_secret(h: GatewayHandle) -> str:
    return mint_table_token(secret=h.settings.table_token_secret + "-not-it", tenant_id=1, branch_id=2,
                            table_id=5, session_id=9)


def _table_expired(h: GatewayHandle) -> str:
    return h.table_token(now=time.time() - 7200, ttl=3600)


def _legacy_forged(h: GatewayHandle) -> str:
    token = mint_legacy_table_token(secret=h.settings.table_token_secret, tenant_id=1, branch_id=2,
                                    table_id=5, session_id=9)
    return "1:2:5:10:" + token.split(":", 4)[4]


def _legacy_expired(h: GatewayHandle) -> str:
    return mint_legacy_table_token(secret=h.settings.table_token_secret, tenant_id=1, branch_id=2,
                                   table_id=5, session_id=9, now=time.time() - 7200, ttl=3600)


def _staff_token_as_table(h: GatewayHandle) -> str:
    return h.staff_token()


@pytest.mark.parametrize(
    ("make_token", "metric_reason"),
    [
        (_table_forged, "bad_signature"),
        (_table_wrong_secret, "bad_signature"),
        (_table_expired, "expired"),
        (_legacy_forged, "bad_signature"),
        (_legacy_expired, "expired"),
        (_staff_token_as_table, "bad_signature"),
        (_garbage, "malformed"),
    ],
)
async def test_bad_table_token_closes_4001(
    gateway: GatewayHandle, make_token: Callable[[GatewayHandle], str], metric_reason: str
) -> None:
    other = await bystander(gateway)
    client = await gateway.connect("diner", make_token(gateway))
    await expect_rejected(gateway, client, 4001, "Authentication failed")
    assert metric_value(gateway.gw.metrics.rejections, metric_reason) == 1
    await other.still_served()


async def test_legacy_table_token_is_accepted(gateway: GatewayHandle) -> None:
    token = mint_legacy_table_token(secret=gateway.settings.table_token_secret, tenant_id=1, branch_id=2,
                                    table_id=5, session_id=9)
    client = await gateway.connect("diner", token)
    await gateway.connected(1)
    await client.still_served()
    assert gateway.gw.index.count_session(1, 9) == 1
    assert metric_value(gateway.gw.metrics.connections_opened, "diner") == 1


# --- Origin (D2) -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    ["http://evil.test", "http://LOCALHOST:5173", "http://localhost:5173/", "http://localhost:5174", "null"],
)
async def test_unlisted_origin_closes_4003(gateway: GatewayHandle, origin: str) -> None:
    other = await bystander(gateway)
    client = await gateway.connect("waiter", gateway.staff_token(user=1), origin=origin)
    await expect_rejected(gateway, client, 4003, "Origin not allowed")
    assert metric_value(gateway.gw.metrics.rejections, "origin") == 1
    await other.still_served()


async def test_origin_is_checked_before_the_token(gateway: GatewayHandle) -> None:
    client = await gateway.connect("waiter", "not-a-jwt", origin="http://evil.test")
    await expect_rejected(gateway, client, 4003, "Origin not allowed", open_sockets=0)


@pytest.mark.parametrize("origin", [None, "http://localhost:5173", "https://192.168.1.106:5180"])
async def test_default_origins_and_missing_origin_allowed_in_development(
    gateway: GatewayHandle, origin: str | None
) -> None:
    assert gateway.settings.environment == "development"
    client = await gateway.connect("waiter", gateway.staff_token(), origin=origin)
    await gateway.connected(1)
    await client.still_served()


async def test_missing_origin_refused_with_production_check(gateway_factory: Factory) -> None:
    handle = await gateway_factory(production_check=True)
    other = await bystander(handle)
    client = await handle.connect("waiter", handle.staff_token(user=1), origin=None)
    await expect_rejected(handle, client, 4003, "Origin not allowed")
    assert metric_value(handle.gw.metrics.rejections, "origin") == 1
    # An empty header counts as missing.
    empty = await handle.connect("waiter", handle.staff_token(user=2), origin="")
    await expect_rejected(handle, empty, 4003, "Origin not allowed")
    await other.still_served()


async def test_allowed_origins_setting_replaces_the_defaults(gateway_factory: Factory) -> None:
    handle = await gateway_factory(allowed_origins=("http://a.test",))
    client = await handle.connect("waiter", handle.staff_token(), origin="http://a.test")
    await handle.connected(1)
    default = await handle.connect("waiter", handle.staff_token(user=2), origin=DEFAULT_ORIGIN)
    await expect_rejected(handle, default, 4003, "Origin not allowed")
    https = await handle.connect("waiter", handle.staff_token(user=3), origin="https://a.test")
    await expect_rejected(handle, https, 4003, "Origin not allowed")
    assert metric_value(handle.gw.metrics.rejections, "origin") == 2
    await client.still_served()


# --- frames (D6) -------------------------------------------------------------------------------


async def test_binary_frame_closes_1003(gateway: GatewayHandle) -> None:
    other = await bystander(gateway)
    client = await gateway.connect("waiter", gateway.staff_token(user=1))
    await gateway.connected(2)
    await client.ws.send_message(b"ping")
    await expect_rejected(gateway, client, 1003, "Binary frames are not supported")
    assert metric_value(gateway.gw.metrics.frames_rejected, "binary") == 1
    assert metric_value(gateway.gw.metrics.closes, "1003") == 1
    await other.still_served()


@pytest.mark.parametrize("char", ["a", "é", "€"])
async def test_text_limit_counts_characters(gateway: GatewayHandle, char: str) -> None:
    other = await bystander(gateway)
    client = await gateway.connect("waiter", gateway.staff_token(user=1))
    await gateway.connected(2)
    # 65536 characters is the largest allowed message, however many bytes it takes in UTF-8.
    await client.send(char * 65536)
    await client.still_served()
    await client.send(char * 65537)
    await expect_rejected(gateway, client, 1009, "Message too large")
    assert metric_value(gateway.gw.metrics.frames_rejected, "too_large") == 1
    assert metric_value(gateway.gw.metrics.inbound_messages, "other") == 1
    await other.still_served()


@pytest.mark.parametrize(
    ("frame", "code", "reason", "metric_reason"),
    [
        (client_frame(b"ping \xc3\x28"), 1007, "Invalid UTF-8", "invalid_utf8"),
        (client_frame(b"\xff\xfe"), 1007, "Invalid UTF-8", "invalid_utf8"),
        (client_frame(b"ping", masked=False), 1002, "Protocol error", "protocol"),
        # RSV1 without a negotiated extension.
        (client_frame(b"ping", first=0xC1), 1002, "Protocol error", "protocol"),
        # A reserved opcode.
        (client_frame(b"ping", first=0x83), 1002, "Protocol error", "protocol"),
    ],
    ids=["bad-continuation", "bad-start-byte", "unmasked", "rsv1", "reserved-opcode"],
)
async def test_malformed_frame_fails_the_connection(
    gateway: GatewayHandle, frame: bytes, code: int, reason: str, metric_reason: str
) -> None:
    other = await bystander(gateway)
    raw = await RawSocket.open(gateway, f"/ws/waiter?token={gateway.staff_token(user=1)}")
    await gateway.connected(2)
    await raw.send_raw(frame)
    close = await raw.close_reply()
    assert (close.code, close.reason) == (code, reason)
    # The server hangs up once the client answered, without waiting for its close timeout.
    await gateway.settled(1)
    assert metric_value(gateway.gw.metrics.frames_rejected, metric_reason) == 1
    assert metric_value(gateway.gw.metrics.closes, str(code)) == 1
    await other.still_served()


async def test_well_formed_hand_made_frame_is_served(gateway: GatewayHandle) -> None:
    # Guards the raw-frame helper above: the same path with a valid frame gets the pong.
    raw = await RawSocket.open(gateway, f"/ws/waiter?token={gateway.staff_token()}")
    await gateway.connected(1)
    await raw.send_raw(client_frame(b"ping"))
    event = await raw.next_event()
    assert getattr(event, "data", None) == PONG


async def test_more_than_30_messages_in_the_window_closes_4029(gateway_factory: Factory) -> None:
    # The long window makes "within the window" independent of how fast this machine is.
    handle = await gateway_factory(message_rate_window=60)
    assert handle.settings.message_rate_limit == 30
    other = await bystander(handle)
    client = await handle.connect("waiter", handle.staff_token(user=1))
    await handle.connected(2)
    for _ in range(30):
        await client.send("ping")
    for _ in range(30):
        with trio.fail_after(5):
            assert await client.ws.get_message() == PONG
    await client.send("ping")
    await expect_rejected(handle, client, 4029, "Rate limit exceeded")
    assert metric_value(handle.gw.metrics.frames_rejected, "rate_limited") == 1
    assert 'wsgateway_connections_rejected_total{reason="rate_limit"} 1' in await metrics_text(handle)
    await other.still_served()


async def test_burst_beyond_default_rate_closes_4029(gateway: GatewayHandle) -> None:
    client = await gateway.connect("waiter", gateway.staff_token())
    await gateway.connected(1)
    for _ in range(100):
        try:
            await client.send("x")
        except Exception:
            break
    assert await client.closed() == (4029, "Rate limit exceeded")
    await gateway.settled(0)


# --- heartbeat (D6) ----------------------------------------------------------------------------


async def test_silent_socket_closed_1001_while_pinging_ones_stay(gateway_factory: Factory) -> None:
    handle = await gateway_factory(heartbeat_timeout=1, heartbeat_sweep_interval=0.2)
    # Both pingers connect before the silent socket: had their pings not counted, the sweep
    # that closes the silent one would have closed them first.
    text_pinger = await handle.connect("waiter", handle.staff_token(user=1))
    protocol_pinger = await handle.connect("kitchen", handle.staff_token(user=2, roles=("KITCHEN",)))
    await handle.connected(2)
    silent = await handle.connect("waiter", handle.staff_token(user=3))
    await handle.connected(3)
    stop = trio.Event()

    async def keep_pinging() -> None:
        while not stop.is_set():
            await text_pinger.send("ping")
            with trio.fail_after(5):
                assert await text_pinger.ws.get_message() == PONG
                await protocol_pinger.ws.ping()
            with trio.move_on_after(0.2):
                await stop.wait()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(keep_pinging)
        result = await silent.closed()
        stop.set()
    assert result == (1001, "Heartbeat timeout")
    await handle.settled(2)
    assert metric_value(handle.gw.metrics.closes, "1001") == 1
    await text_pinger.still_served()
    await protocol_pinger.still_served()


# --- token lifetime (D3) -----------------------------------------------------------------------


async def test_staff_socket_closed_at_token_expiry(gateway: GatewayHandle) -> None:
    other = await bystander(gateway)
    client = await gateway.connect("waiter", gateway.staff_token(user=1, ttl=1.5))
    await gateway.connected(2)
    # No message is sent: the expiry is enforced by the server's own deadline.
    await expect_rejected(gateway, client, 4001, "Token expired or revoked")
    assert metric_value(gateway.gw.metrics.closes, "4001") == 1
    await other.still_served()


@pytest.mark.parametrize("legacy", [False, True])
async def test_diner_socket_closed_at_table_token_expiry(gateway: GatewayHandle, legacy: bool) -> None:
    other = await bystander(gateway)
    secret = gateway.settings.table_token_secret
    mint = mint_legacy_table_token if legacy else mint_table_token
    token = mint(secret=secret, tenant_id=1, branch_id=2, table_id=5, session_id=9, ttl=1.5)
    client = await gateway.connect("diner", token)
    await gateway.connected(2)
    await expect_rejected(gateway, client, 4001, "Token expired")
    assert metric_value(gateway.gw.metrics.closes, "4001") == 1
    await other.still_served()


# --- revocation (D3) ---------------------------------------------------------------------------


async def test_blacklisted_jti_closes_open_socket(gateway_factory: Factory, redis_url: str) -> None:
    handle = await gateway_factory(jwt_revalidation_interval=1)
    other = await bystander(handle)
    client = await handle.connect("waiter", handle.staff_token(user=1, jti="jti-to-revoke"))
    await handle.connected(2)
    await client.still_served()
    await redis_set(redis_url, "auth:token:blacklist:jti-to-revoke", "1")
    await expect_rejected(handle, client, 4001, "Token expired or revoked")
    assert metric_value(handle.gw.metrics.closes, "4001") == 1
    await other.still_served()


async def test_user_revocation_after_iat_closes_open_socket(gateway_factory: Factory, redis_url: str) -> None:
    handle = await gateway_factory(jwt_revalidation_interval=1)
    other = await bystander(handle)
    issued = int(time.time())
    client = await handle.connect("waiter", handle.staff_token(user=1, now=issued))
    await handle.connected(2)
    revoked_at = datetime.fromtimestamp(issued + 1, UTC).isoformat()
    await redis_set(redis_url, "auth:user:revoked:1", revoked_at)
    await expect_rejected(handle, client, 4001, "Token expired or revoked")
    assert metric_value(handle.gw.metrics.closes, "4001") == 1
    await other.still_served()


async def test_user_revocation_before_iat_leaves_new_tokens_alone(
    gateway_factory: Factory, redis_url: str
) -> None:
    handle = await gateway_factory(jwt_revalidation_interval=1)
    issued = int(time.time())
    await redis_set(redis_url, "auth:user:revoked:1", datetime.fromtimestamp(issued - 60, UTC).isoformat())
    client = await handle.connect("waiter", handle.staff_token(user=1, now=issued))
    await handle.connected(1)
    # A revocation older than the token closes only the user's older sockets.
    sentinel = await handle.connect("waiter", handle.staff_token(user=2, jti="sentinel"))
    await handle.connected(2)
    await redis_set(redis_url, "auth:token:blacklist:sentinel", "1")
    # The revalidation round that closes the sentinel also re-checked the first socket.
    assert await sentinel.closed() == (4001, "Token expired or revoked")
    await handle.settled(1)
    await client.still_served()


@pytest.mark.parametrize("revocation", ["jti", "user"])
async def test_revoked_token_refused_at_connect(gateway: GatewayHandle, redis_url: str, revocation: str) -> None:
    other = await bystander(gateway)
    issued = int(time.time())
    token = gateway.staff_token(user=1, jti="revoked-jti", now=issued)
    if revocation == "jti":
        await redis_set(redis_url, "auth:token:blacklist:revoked-jti", "1")
    else:
        await redis_set(redis_url, "auth:user:revoked:1", datetime.fromtimestamp(issued + 1, UTC).isoformat())
    client = await gateway.connect("waiter", token)
    await expect_rejected(gateway, client, 4001, "Token expired or revoked")
    assert metric_value(gateway.gw.metrics.rejections, "revoked") == 1
    assert gateway.gw.legacy["auth"] == 1
    await other.still_served()


# --- Redis outage (D4) -------------------------------------------------------------------------


async def test_redis_down_at_connect_is_refused_503_and_open_sockets_stay() -> None:
    # A Redis of its own, so that killing it leaves the session's Redis to the other tests.
    with RedisProcess(RedisConfig(port=0)) as proc:
        async with running_gateway(test_settings(proc.url, drain_period=0)) as handle:
            other = await bystander(handle)
            proc.kill()
            # Refused before the upgrade (D22): recoverable, and no open socket resets a
            # client's backoff.
            url = f"{handle.ws_url}/ws/waiter?token={handle.staff_token(user=1)}"
            with pytest.raises(ConnectionRejected) as info:
                async with open_websocket_url(url, extra_headers=[("Origin", DEFAULT_ORIGIN)]):
                    pass
            assert info.value.status_code == 503
            assert dict(info.value.headers)[b"retry-after"] == b"2"
            assert metric_value(handle.gw.metrics.rejections, "redis_unavailable") == 1
            # An outage is not a credential problem: the legacy auth counter stays put.
            assert handle.gw.legacy["auth"] == 0
            assert metric_value(handle.gw.metrics.closes, "4001") == 0
            await other.still_served()
            # Diners need no revocation check, so they still get in.
            diner = await handle.connect("diner", handle.table_token())
            await handle.connected(2)
            await diner.still_served()


# --- refresh_sectors (§3.2) --------------------------------------------------------------------


async def test_refresh_sectors_on_waiter_replies_with_sectors(gateway: GatewayHandle) -> None:
    client = await gateway.connect("waiter", gateway.staff_token(sector_ids=[7, 3]))
    await gateway.connected(1)
    await client.send("refresh_sectors")
    with trio.fail_after(5):
        assert await client.ws.get_message() == "sectors_updated:3,7"
    assert metric_value(gateway.gw.metrics.inbound_messages, "refresh_sectors") == 1
    await client.still_served()


async def test_refresh_sectors_without_assignment_replies_empty(gateway: GatewayHandle) -> None:
    client = await gateway.connect("waiter", gateway.staff_token(roles=("MANAGER",)))
    await gateway.connected(1)
    await client.send("refresh_sectors")
    with trio.fail_after(5):
        assert await client.ws.get_message() == "sectors_updated:"


@pytest.mark.parametrize("endpoint", ["kitchen", "admin", "diner"])
async def test_refresh_sectors_ignored_elsewhere(gateway: GatewayHandle, endpoint: str) -> None:
    token = (gateway.table_token() if endpoint == "diner"
             else gateway.staff_token(roles=("WAITER", "KITCHEN", "ADMIN"), sector_ids=[3, 7]))
    client = await gateway.connect(endpoint, token)
    await gateway.connected(1)
    await client.send("refresh_sectors")
    await client.still_served()
    assert metric_value(gateway.gw.metrics.inbound_messages, "refresh_sectors") == 0


# --- client-initiated close --------------------------------------------------------------------


async def test_client_close_1000_is_echoed_and_unregistered(gateway: GatewayHandle) -> None:
    other = await bystander(gateway)
    raw = await RawSocket.open(gateway, f"/ws/waiter?token={gateway.staff_token(user=1)}")
    await gateway.connected(2)
    await raw.send_raw(raw.ws.send(CloseConnection(code=1000, reason="Soft disconnect")))
    echo = await raw.next_event()
    assert isinstance(echo, CloseConnection)
    assert echo.code == 1000
    await gateway.settled(1)
    assert gateway.gw.index.count_user(1, 1) == 0
    await other.still_served()
    await other.aclose()
    await gateway.settled(0)


async def test_client_close_with_app_code_is_echoed(gateway: GatewayHandle) -> None:
    raw = await RawSocket.open(gateway, f"/ws/waiter?token={gateway.staff_token()}")
    await gateway.connected(1)
    # The TS client closes with 4000 when its ping goes unanswered.
    await raw.send_raw(raw.ws.send(CloseConnection(code=4000, reason="")))
    echo = await raw.next_event()
    assert isinstance(echo, CloseConnection)
    assert echo.code == 4000
    await gateway.settled(0)


async def test_publisher_event_still_reaches_socket_after_neighbour_rejections(
    gateway: GatewayHandle, publisher: Publisher
) -> None:
    waiter = await bystander(gateway)
    for token in ("not-a-jwt", gateway.staff_token(token_type="refresh")):
        rejected = await gateway.connect("waiter", token)
        await expect_rejected(gateway, rejected, 4001, "Authentication failed")
    await publisher.stream_event(publisher.envelope("ROUND_PENDING", 1, 2, table_id=5, session_id=9))
    event = await waiter.expect("ROUND_PENDING")
    assert event["branch_id"] == 2


# --- the pytest plugin -------------------------------------------------------------------------


async def test_plugin_gateway_factory_accepts_a_private_redis(
    gateway_factory: Callable[..., Awaitable[GatewayHandle]],
) -> None:
    with RedisProcess(RedisConfig(port=0)) as proc:
        handle = await gateway_factory(redis_url=proc.url)
        assert handle.settings.redis_url == proc.url
