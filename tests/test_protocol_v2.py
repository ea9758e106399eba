"""Protocol v2 (D20): negotiation, the welcome, positions on event frames, and v1 byte for byte.

Real gateway, real redis-server, real sockets.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from helpers import client_frame

from gateway.core.events import envelope
from gateway_testing import DEFAULT_ORIGIN, GatewayHandle, Publisher, WSClient

Factory = Callable[..., Awaitable[GatewayHandle]]
V2 = ("integrador.v2",)

# What a v1 socket got before protocol v2 existed (captured from the previous commit): the 101,
# the pong to "ping", and one event frame. A v1 client must keep getting exactly these bytes.
GOLDEN_ENV = {"type": "ROUND_READY", "tenant_id": 1, "branch_id": 2, "table_id": 5, "session_id": 9,
              "entity": {"round_id": 3, "note": "ñandú"}, "ts": "2026-01-01T00:00:00+00:00"}
GOLDEN_HEAD = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")
GOLDEN_FRAMES = bytes.fromhex(
    "810f7b2274797065223a22706f6e67227d817e00987b2274797065223a22524f554e445f5245414459222c2274656e616e"
    "745f6964223a312c226272616e63685f6964223a322c227461626c655f6964223a352c2273657373696f6e5f6964223a39"
    "2c22656e74697479223a7b22726f756e645f6964223a332c226e6f7465223a22c3b1616e64c3ba227d2c227473223a2232"
    "3032362d30312d30315430303a30303a30302b30303a3030227d"
)


async def _read_at_least(stream: trio.SocketStream, buf: bytes, n: int) -> bytes:
    while len(buf) < n:
        chunk = await stream.receive_some(65536)
        assert chunk, "socket closed"
        buf += chunk
    return buf


async def test_v1_socket_gets_the_same_bytes_as_before(gateway: GatewayHandle, publisher: Publisher) -> None:
    token = gateway.staff_token(roles=("ADMIN",))
    stream = await trio.open_tcp_stream("127.0.0.1", gateway.port)
    request = (f"GET /ws/admin?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
               f"Origin: {DEFAULT_ORIGIN}\r\n\r\n")
    async with stream:
        await stream.send_all(request.encode())
        with trio.fail_after(5):
            buf = b""
            while b"\r\n\r\n" not in buf:
                buf += await stream.receive_some(65536)
            head, _, rest = buf.partition(b"\r\n\r\n")
            assert head + b"\r\n\r\n" == GOLDEN_HEAD
            await gateway.connected(1)
            await stream.send_all(client_frame(b"ping"))
            rest = await _read_at_least(stream, rest, 17)
            await publisher.stream_event(GOLDEN_ENV)
            rest = await _read_at_least(stream, rest, len(GOLDEN_FRAMES))
        assert rest == GOLDEN_FRAMES


async def test_v2_is_selected_and_the_welcome_comes_first(gateway: GatewayHandle) -> None:
    now = int(time.time())
    client = await gateway.connect("waiter", gateway.staff_token(now=now, ttl=600), subprotocols=V2)
    assert client.ws.subprotocol == "integrador.v2"
    assert await client.receive() == {"type": "welcome", "protocol": 2, "exp": now + 600}
    await client.send("ping")
    assert await client.receive() == {"type": "pong"}
    diner = await gateway.connect("diner", gateway.table_token(), subprotocols=("other", "integrador.v2"))
    welcome = await diner.receive()
    assert welcome["type"] == "welcome" and isinstance(welcome["exp"], int)
    plain = await gateway.connect("waiter", gateway.staff_token(user=8), subprotocols=("something.else",))
    assert plain.ws.subprotocol is None
    await plain.send("ping")
    assert await plain.receive() == {"type": "pong"}


async def v2_socket(gateway: GatewayHandle, endpoint: str = "admin", token: str | None = None) -> WSClient:
    client = await gateway.connect(endpoint, token or gateway.staff_token(roles=("ADMIN",)), subprotocols=V2)
    assert (await client.receive())["type"] == "welcome"
    return client


def numbered(seq: int, branch: int = 2, kind: str = "ROUND_PENDING", **fields: Any) -> dict[str, object]:
    return envelope(kind, 1, branch, entity={"seq": seq}, **fields)


async def test_v2_frames_carry_positions_and_v1_frames_do_not(gateway: GatewayHandle, publisher: Publisher) -> None:
    v2 = await v2_socket(gateway)
    v1 = await gateway.connect("admin", gateway.staff_token(user=8, roles=("ADMIN",)))
    await gateway.connected(2)
    await publisher.stream_event(numbered(1))
    await publisher.channel_event("tenant:1:admin", numbered(2, branch=0, kind="ENTITY_UPDATED"))
    await publisher.stream_event(numbered(3))
    got = [await v2.receive() for _ in range(3)]
    plain = [await v1.receive() for _ in range(3)]
    assert [f["entity"]["seq"] for f in got] == [1, 2, 3]
    assert all("_pos" not in f for f in plain)
    assert [{k: v for k, v in f.items() if k != "_pos"} for f in got] == plain
    streams = [f["_pos"]["stream"] for f in got]
    assert streams == ["1:2", "1:0", "1:2"]
    offsets = [f["_pos"]["offset"] for f in got]
    assert len(set(offsets)) == 3 and all(isinstance(o, str) for o in offsets)
    # The tenant-wide event is stored too, in its own stream.
    keys = await publisher._run(lambda c: c.keys("gw:catchup:1:*"))
    assert {k.decode() for k in keys} == {"gw:catchup:1:0", "gw:catchup:1:2"}


async def test_positions_are_appended_by_sha_and_survive_a_flushed_script_cache(
    gateway: GatewayHandle, publisher: Publisher
) -> None:
    v2 = await v2_socket(gateway)
    await gateway.connected(1)
    await publisher.stream_event(numbered(1))
    first = await v2.receive()
    await publisher._run(lambda c: c.script_flush())  # as after a restart or a failover
    await publisher.stream_event(numbered(2))
    await publisher.stream_event(numbered(3))
    later = [await v2.receive(), await v2.receive()]
    await publisher.stream_event(numbered(4))  # the script is cached again by now
    later.append(await v2.receive())
    assert [f["entity"]["seq"] for f in [first, *later]] == [1, 2, 3, 4]
    assert all("_pos" in f for f in [first, *later])
    stats = await publisher._run(lambda c: c.info("commandstats"))
    assert stats["cmdstat_evalsha"]["calls"] >= 1  # the script's text is not sent with every batch


# --- resume (D20) ------------------------------------------------------------------------------


async def receive_events(client: WSClient, n: int, within: float = 5.0) -> list[dict[str, Any]]:
    out = []
    with trio.fail_after(within):
        while len(out) < n:
            frame = await client.receive(within)
            assert frame is not None, f"only {len(out)} of {n} frames"
            out.append(frame)
    return out


def seqs(frames: list[dict[str, Any]]) -> list[int]:
    return [f["entity"]["seq"] for f in frames if "entity" in f]


async def test_resume_replays_what_was_missed_then_goes_live(gateway: GatewayHandle, publisher: Publisher) -> None:
    waiter_token = gateway.staff_token(sector_ids=[3])
    first = await v2_socket(gateway, "waiter", waiter_token)
    await gateway.connected(1)
    for seq in range(3):
        await publisher.stream_event(numbered(seq))
    seen = await receive_events(first, 3)
    positions = {seen[-1]["_pos"]["stream"]: seen[-1]["_pos"]["offset"]}
    await first.aclose()
    await gateway.settled(0)
    # Missed while away: two for it, one for another sector (D11), one for another branch, one
    # admin-only; and a tenant-wide event nobody but admins get.
    await publisher.stream_event(numbered(3))
    await publisher.stream_event(numbered(100, sector_id=4, kind="SERVICE_CALL_CREATED"))
    await publisher.stream_event(numbered(101, branch=7))
    await publisher.stream_event(numbered(102, kind="ENTITY_UPDATED"))
    await publisher.stream_event(numbered(4, sector_id=3, kind="SERVICE_CALL_CREATED"))
    await publisher.channel_event("tenant:1:admin", numbered(103, branch=0, kind="TABLE_CLEARED"))
    await trio.sleep(0.3)
    again = await v2_socket(gateway, "waiter", waiter_token)
    await again.send(json_text({"type": "resume", "positions": positions}))
    replay = await receive_events(again, 3)
    assert seqs(replay) == [3, 4]
    assert replay[2] == {"type": "resumed", "streams": {"1:2": {"recovered": True, "replayed": 2}}}
    await publisher.stream_event(numbered(5))
    assert seqs(await receive_events(again, 1)) == [5]


def json_text(value: object) -> str:
    import json
    return json.dumps(value)


async def test_resume_while_events_are_published_skips_and_repeats_nothing(
    gateway: GatewayHandle, publisher: Publisher
) -> None:
    token = gateway.staff_token(roles=("ADMIN",))
    first = await v2_socket(gateway, "admin", token)
    await gateway.connected(1)
    await publisher.stream_event(numbered(0))
    last = (await receive_events(first, 1))[0]["_pos"]
    await first.aclose()
    await gateway.settled(0)
    for seq in range(1, 400):
        await publisher.many([(None, numbered(seq))])
    total = 1200
    async with trio.open_nursery() as nursery:

        async def publish_more() -> None:
            for seq in range(400, total, 10):
                await publisher.many([(None, numbered(s)) for s in range(seq, seq + 10)])
                await trio.sleep(0.005)

        nursery.start_soon(publish_more)
        again = await v2_socket(gateway, "admin", token)
        await again.send(json_text({"type": "resume", "positions": {last["stream"]: last["offset"]}}))
        frames = await receive_events(again, total, within=30)
    got = seqs(frames)
    resumed = [f for f in frames if f.get("type") == "resumed"]
    assert len(resumed) == 1 and resumed[0]["streams"]["1:2"]["recovered"] is True
    assert got == list(range(1, total)), (len(got), [s for s in range(1, total) if s not in got][:10])
    offsets = [f["_pos"]["offset"] for f in frames if "_pos" in f]
    assert len(offsets) == len(set(offsets))


async def test_unrecoverable_positions_say_so_and_never_close(gateway: GatewayHandle, publisher: Publisher) -> None:
    token = gateway.staff_token(roles=("ADMIN",))
    first = await v2_socket(gateway, "admin", token)
    await gateway.connected(1)
    await publisher.stream_event(numbered(0))
    pos = (await receive_events(first, 1))[0]["_pos"]
    await first.aclose()
    await gateway.settled(0)
    # The store is lost (a flush); the next event recreates it under a new epoch.
    await publisher._run(lambda c: c.delete([k for k in ["gw:catchup:1:2", "gw:catchup:epoch:1:2"]]))
    await publisher.stream_event(numbered(1))
    await trio.sleep(0.3)
    again = await v2_socket(gateway, "admin", token)
    garbage: dict[str, Any] = {pos["stream"]: pos["offset"], "1:9": "zz:1-0", "2:2": pos["offset"],
                               "nonsense": 5, "1:3": {"x": 1}, "1:4": "abc:99999999999999-0"}
    await again.send(json_text({"type": "resume", "positions": garbage}))
    resumed = await again.receive()
    assert resumed["type"] == "resumed"
    assert all(v == {"recovered": False, "replayed": 0} for v in resumed["streams"].values()), resumed
    assert set(resumed["streams"]) == set(garbage)
    await publisher.stream_event(numbered(2))
    assert seqs(await receive_events(again, 1)) == [2]
    await again.send("ping")
    assert await again.receive() == {"type": "pong"}


async def test_a_position_older_than_the_window_is_not_recovered(
    gateway_factory: Factory, publisher: Publisher
) -> None:
    gateway = await gateway_factory(resume_max_events=5, resume_window=1, catchup_max_events=5, catchup_window=1)
    token = gateway.staff_token(roles=("ADMIN",))
    first = await v2_socket(gateway, "admin", token)
    await gateway.connected(1)
    await publisher.stream_event(numbered(0))
    pos = (await receive_events(first, 1))[0]["_pos"]
    for seq in range(1, 10):
        await publisher.stream_event(numbered(seq))
    await receive_events(first, 9)
    # Trimmed only once both older than the window and not among the newest 5: 0-9 go.
    await trio.sleep(1.2)
    for seq in range(10, 20):
        await publisher.stream_event(numbered(seq))
    await receive_events(first, 10)
    assert await publisher._run(lambda c: c.xlen("gw:catchup:1:2")) == 10
    again = await v2_socket(gateway, "admin", token)
    await again.send(json_text({"type": "resume", "positions": {pos["stream"]: pos["offset"]}}))
    assert await again.receive() == {"type": "resumed", "streams": {"1:2": {"recovered": False, "replayed": 0}}}


# --- in-band refresh (D21) ---------------------------------------------------------------------


async def test_a_refreshed_socket_outlives_its_first_token(gateway: GatewayHandle) -> None:
    now = int(time.time())
    client = await gateway.connect("waiter", gateway.staff_token(now=now, ttl=5), subprotocols=V2)
    assert (await client.receive())["exp"] == now + 5
    fresh = gateway.staff_token(now=now, ttl=60)
    await client.send(json_text({"type": "refresh", "token": fresh}))
    assert await client.receive() == {"type": "refreshed", "exp": now + 60}
    await trio.sleep(max(0.0, now + 10 - time.time()))
    await client.send("ping")
    assert await client.receive() == {"type": "pong"}


async def test_a_bad_refresh_keeps_the_old_deadline(gateway: GatewayHandle) -> None:
    now = int(time.time())
    client = await gateway.connect("waiter", gateway.staff_token(now=now, ttl=3), subprotocols=V2)
    await client.receive()
    refused = {
        "other_principal": gateway.staff_token(user=8, now=now, ttl=60),
        "role": gateway.staff_token(roles=("KITCHEN",), now=now, ttl=60),
        "bad_signature": gateway.staff_token(now=now, ttl=60)[:-3] + "AAA",
        "malformed": "not a token",
        "missing_token": "",
    }
    for reason, token in refused.items():
        await client.send(json_text({"type": "refresh", "token": token}))
        assert await client.receive() == {"type": "refresh_failed", "reason": reason}
    other_tenant = gateway.staff_token(tenant=2, now=now, ttl=60)
    await client.send(json_text({"type": "refresh", "token": other_tenant}))
    assert (await client.receive())["reason"] == "other_principal"
    assert await client.closed(within=now + 5 - time.time()) == (4001, "Token expired or revoked")
    assert time.time() >= now + 3


async def test_a_revoked_refresh_is_refused(gateway: GatewayHandle, publisher: Publisher) -> None:
    client = await gateway.connect("waiter", gateway.staff_token(), subprotocols=V2)
    await client.receive()
    token = gateway.staff_token(jti="revoked-jti")
    await publisher._run(lambda c: c.set("auth:token:blacklist:revoked-jti", "1"))
    await client.send(json_text({"type": "refresh", "token": token}))
    assert await client.receive() == {"type": "refresh_failed", "reason": "revoked"}
    await client.still_served()


async def test_a_refresh_that_adds_a_branch_delivers_it_at_once(gateway: GatewayHandle, publisher: Publisher) -> None:
    client = await gateway.connect("waiter", gateway.staff_token(branches=(2,)), subprotocols=V2)
    await client.receive()
    await gateway.connected(1)
    await publisher.stream_event(numbered(1, branch=3))
    await publisher.stream_event(numbered(2, branch=2))
    assert seqs(await receive_events(client, 1)) == [2]
    await client.send(json_text({"type": "refresh", "token": gateway.staff_token(branches=(2, 3))}))
    assert (await client.receive())["type"] == "refreshed"
    await publisher.stream_event(numbered(3, branch=3))
    frame = (await receive_events(client, 1))[0]
    assert frame["entity"]["seq"] == 3 and frame["_pos"]["stream"] == "1:3"
    # And a refresh that drops it stops it at once.
    await client.send(json_text({"type": "refresh", "token": gateway.staff_token(branches=(2,))}))
    assert (await client.receive())["type"] == "refreshed"
    await publisher.stream_event(numbered(4, branch=3))
    await publisher.stream_event(numbered(5, branch=2))
    assert seqs(await receive_events(client, 1)) == [5]


async def test_a_diner_refreshes_with_a_table_token_of_its_session(gateway: GatewayHandle) -> None:
    client = await gateway.connect("diner", gateway.table_token(session=9, ttl=30), subprotocols=V2)
    await client.receive()
    await client.send(json_text({"type": "refresh", "token": gateway.table_token(session=10, ttl=300)}))
    assert await client.receive() == {"type": "refresh_failed", "reason": "other_principal"}
    await client.send(json_text({"type": "refresh", "token": gateway.table_token(session=9, ttl=300)}))
    reply = await client.receive()
    assert reply["type"] == "refreshed" and reply["exp"] >= time.time() + 250


async def test_refresh_messages_count_in_the_rate_limit(gateway_factory: Factory) -> None:
    gateway = await gateway_factory(message_rate_limit=5)
    client = await gateway.connect("waiter", gateway.staff_token(), subprotocols=V2)
    await client.receive()
    for _ in range(6):
        await client.send(json_text({"type": "refresh", "token": "x"}))
    assert (await client.closed())[0] == 4029


async def test_every_instance_gives_an_event_the_same_position(
    gateway_factory: Factory, publisher: Publisher
) -> None:
    a = await gateway_factory()
    b = await gateway_factory()
    token = a.staff_token(roles=("ADMIN",))
    on_a, on_b = await v2_socket(a, "admin", token), await v2_socket(b, "admin", token)
    for client in (on_a, on_b):
        await client.send("ping")
        assert await client.receive() == {"type": "pong"}
    for seq in range(5):
        await publisher.stream_event(numbered(seq))
    got_a, got_b = await receive_events(on_a, 5), await receive_events(on_b, 5)
    # Only once both delivered the stream's: Redis does not order a pub/sub message against stream
    # entries, so an instance may place it anywhere among them (docs/protocol.md §10).
    await publisher.channel_event("branch:2:admin", numbered(5))
    got_a += await receive_events(on_a, 1)
    got_b += await receive_events(on_b, 1)
    positions_a = {f["entity"]["seq"]: f["_pos"] for f in got_a}
    positions_b = {f["entity"]["seq"]: f["_pos"] for f in got_b}
    assert sorted(positions_a) == list(range(6))
    assert positions_a == positions_b
    assert await publisher._run(lambda c: c.xlen("gw:catchup:1:2")) == 6  # stored once
    # A position from one instance resumes on the other.
    await on_a.aclose()
    await publisher.stream_event(numbered(6))
    await receive_events(on_b, 1)
    moved = await v2_socket(b, "admin", token)
    await moved.send(json_text({"type": "resume", "positions": {"1:2": got_a[2]["_pos"]["offset"]}}))
    replay = await receive_events(moved, 5)
    assert seqs(replay) == [3, 4, 5, 6] and replay[-1]["streams"]["1:2"] == {"recovered": True, "replayed": 4}
