"""Fan-out end to end: slow consumers, ordering, index hygiene and encode-once.

Where a test needs to see the bytes the gateway wrote, or to misbehave at the TCP level (never
read, hang up without a close frame), it uses :class:`RawClient`: a plain TCP socket that does the
WebSocket handshake with wsproto and then parses the server's frames itself.
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Callable
from typing import Any

import attrs
import trio
from helpers import client_frame, compact
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, Request

from gateway.core.events import envelope
from gateway.redisio.client import STREAM_MAXLEN, make_client, xadd_capped
from gateway.serving.connection import CLOSE_TIMEOUT
from gateway_testing import DEFAULT_ORIGIN, GatewayHandle, Publisher, WSClient

PONG = '{"type":"pong"}'
OP_TEXT = 0x1
OP_CLOSE = 0x8


@attrs.frozen
class Frame:
    opcode: int
    payload: bytes
    #: The frame exactly as it came off the wire, header included.
    raw: bytes

    @property
    def close_code(self) -> int:
        return int.from_bytes(self.payload[:2], "big")

    @property
    def close_reason(self) -> str:
        return self.payload[2:].decode("utf-8")


@attrs.define(eq=False)
class RawClient:
    stream: trio.SocketStream
    buffer: bytearray = attrs.Factory(bytearray)
    eof: bool = False

    @classmethod
    async def open(cls, port: int, target: str, *, origin: str = DEFAULT_ORIGIN) -> RawClient:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        client = cls(stream)
        await client.handshake(port, target, origin)
        return client

    async def handshake(self, port: int, target: str, origin: str) -> None:
        ws = WSConnection(ConnectionType.CLIENT)
        request = Request(host=f"127.0.0.1:{port}", target=target,
                          extra_headers=[(b"origin", origin.encode())])
        await self.stream.send_all(ws.send(request))
        while b"\r\n\r\n" not in self.buffer:
            data = await self.stream.receive_some(65536)
            if not data:
                raise AssertionError("connection closed during the handshake")
            self.buffer += data
        end = self.buffer.index(b"\r\n\r\n") + 4
        ws.receive_data(bytes(self.buffer[:end]))
        del self.buffer[:end]
        events = list(ws.events())
        if not any(isinstance(e, AcceptConnection) for e in events):
            raise AssertionError(f"handshake refused: {[e for e in events if isinstance(e, RejectConnection)]}")

    async def _fill(self, need: int) -> bool:
        while len(self.buffer) < need:
            data = await self.stream.receive_some(65536)
            if not data:
                self.eof = True
                return False
            self.buffer += data
        return True

    async def read_frame(self) -> Frame | None:
        """The next server frame; None at end of stream (a truncated frame counts as the end)."""
        if not await self._fill(2):
            return None
        length = self.buffer[1] & 0x7F
        header = 2
        if length == 126:
            header = 4
        elif length == 127:
            header = 10
        if not await self._fill(header):
            return None
        assert not self.buffer[1] & 0x80, "server frames are never masked"
        if length == 126:
            length = struct.unpack_from("!H", self.buffer, 2)[0]
        elif length == 127:
            length = struct.unpack_from("!Q", self.buffer, 2)[0]
        if not await self._fill(header + length):
            return None
        raw = bytes(self.buffer[: header + length])
        del self.buffer[: header + length]
        assert raw[0] & 0x80, "the gateway sends only final frames"
        return Frame(raw[0] & 0x0F, raw[header:], raw)

    async def send(self, opcode: int, payload: bytes) -> None:
        await self.stream.send_all(client_frame(payload, first=0x80 | opcode))

    async def drop(self) -> None:
        """Hang up at the TCP level without a close frame (a lost network, a killed tab)."""
        await self.stream.aclose()


async def publish_stream(redis_url: str, envelopes: list[dict[str, Any]]) -> None:
    client = make_client(redis_url)
    async with client, client.pipeline(transaction=False) as pipe:
        for env in envelopes:
            xadd_capped(pipe, "events:critical", {"data": json.dumps(env, ensure_ascii=False)}, STREAM_MAXLEN)


async def read_until_pong(client: WSClient) -> list[str]:
    out: list[str] = []
    await client.ws.send_message("ping")
    with trio.fail_after(15):
        while (message := await client.ws.get_message()) != PONG:
            out.append(message)
    return out


async def eventually(predicate: Callable[[], bool], within: float, poll: float = 0.01) -> None:
    """Wait for gateway state that has no event to wait on; ``within`` only guards against hangs."""
    with trio.fail_after(within):
        while True:
            if predicate():
                return
            await trio.sleep(poll)


def counter(handle: GatewayHandle, name: str, **labels: str) -> float:
    value = handle.gw.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


# --- slow consumer -------------------------------------------------------------------------------

EVENTS = 300
BLOB = 50_000
SLOW_CLOSES = "wsgateway_slow_consumer_closes_total"


@attrs.define(eq=False)
class Flood:
    """One waiter socket that stops reading after the handshake, and readers that keep up."""

    handle: GatewayHandle
    redis_url: str
    slow: RawClient
    slow_conn: Any
    fast: dict[str, WSClient]
    received: dict[str, list[int]] = attrs.Factory(dict)

    @classmethod
    async def start(cls, gateway_factory: Any, redis_url: str) -> Flood:
        handle: GatewayHandle = await gateway_factory(send_queue_max_bytes=65536)
        token = handle.staff_token(user=1, roles=("WAITER",))
        slow = await RawClient.open(handle.port, f"/ws/waiter?token={token}")
        await handle.connected(1)
        (slow_conn,) = list(handle.gw.index)
        fast = {
            "admin": await handle.connect("admin", handle.staff_token(user=2, roles=("ADMIN",))),
            "waiter": await handle.connect("waiter", handle.staff_token(user=3, roles=("WAITER",))),
            "kitchen": await handle.connect("kitchen", handle.staff_token(user=4, roles=("KITCHEN",))),
        }
        await handle.connected(4)
        return cls(handle, redis_url, slow, slow_conn, fast, {name: [] for name in fast})

    async def publish(self, count: int, *, stop: Callable[[], bool] = lambda: False) -> int:
        """Publish up to ``count`` large events to the stream; returns how many were published."""
        received = self.received

        async def read(name: str, client: WSClient) -> None:
            while True:
                message = json.loads(await client.ws.get_message())
                assert len(message["entity"]["blob"]) == BLOB
                received[name].append(message["entity"]["seq"])

        client = make_client(self.redis_url)
        published = 0
        async with trio.open_nursery() as nursery, client:
            for name, ws in self.fast.items():
                nursery.start_soon(read, name, ws)
            while published < count and not stop():
                env = envelope("ROUND_READY", 1, 2, table_id=5, session_id=9,
                               entity={"seq": published, "blob": "x" * BLOB})
                data = json.dumps(env)
                assert len(data) < 65536
                await xadd_capped(client, "events:critical", {"data": data}, STREAM_MAXLEN)
                published += 1
                # The readers share this process and its scheduler with the gateway; pacing the
                # publisher on them keeps their own lag below the queue limit, while the socket
                # that never reads falls behind regardless.
                await eventually(lambda n=published: min(len(r) for r in received.values()) >= n, 30, poll=0.001)
            nursery.cancel_scope.cancel()
        return published

    async def read_slow(self) -> tuple[list[int], Frame | None]:
        """Everything the slow socket can still read: event sequence numbers and the last frame."""
        seqs: list[int] = []
        last: Frame | None = None
        with trio.fail_after(CLOSE_TIMEOUT + 15):
            try:
                while (frame := await self.slow.read_frame()) is not None:
                    last = frame
                    if frame.opcode == OP_CLOSE:
                        break
                    assert frame.opcode == OP_TEXT
                    seqs.append(json.loads(frame.payload)["entity"]["seq"])
            except trio.BrokenResourceError:
                # A reset is as final as an orderly end of stream.
                self.slow.eof = True
        return seqs, last

    async def slow_gone(self) -> None:
        gw = self.handle.gw
        await eventually(lambda: self.slow_conn not in gw.index and self.slow_conn not in gw.sockets,
                         CLOSE_TIMEOUT + 5)
        assert len(gw.index) == len(self.fast)


async def test_slow_consumer_is_closed_without_delaying_the_others(
    gateway_factory: Any, publisher: Publisher
) -> None:
    flood = await Flood.start(gateway_factory, publisher.redis_url)
    handle = flood.handle
    closes_before = counter(handle, SLOW_CLOSES)

    with trio.fail_after(120):
        assert await flood.publish(EVENTS) == EVENTS

    assert flood.received == {name: list(range(EVENTS)) for name in flood.fast}
    assert counter(handle, SLOW_CLOSES) == closes_before + 1
    assert flood.slow_conn.closing
    # Dropped, not kept: at most the rest of a partly written frame and the close frame remain.
    assert flood.slow_conn.out_bytes < 65536
    assert not any(c.closing for c in handle.gw.index if c is not flood.slow_conn)

    # The slow socket reads at last. Its queued frames were dropped, so what it gets is a gapless
    # prefix of the events, then the 1013 close if the gateway's close frame is still waiting to
    # be written, or the end of the stream if the close timeout already passed.
    seqs, last = await flood.read_slow()
    assert seqs == list(range(len(seqs)))
    assert len(seqs) < EVENTS
    if last is not None and last.opcode == OP_CLOSE:
        assert (last.close_code, last.close_reason) == (1013, "Slow consumer")
        await flood.slow.send(OP_CLOSE, last.payload[:2])
        with trio.fail_after(CLOSE_TIMEOUT + 5):
            assert await flood.slow.read_frame() is None
    else:
        assert flood.slow.eof
    await flood.slow_gone()
    await flood.slow.drop()

    # The others were never disturbed: nothing is left over and they still answer.
    for ws in flood.fast.values():
        assert await read_until_pong(ws) == []


async def test_slow_consumer_that_never_reads_again_is_dropped(
    gateway_factory: Any, publisher: Publisher
) -> None:
    """The close frame cannot be written into a full socket: after the close timeout the
    gateway hangs up, so a stalled client cannot pin its connection in the index."""
    flood = await Flood.start(gateway_factory, publisher.redis_url)
    handle = flood.handle
    closes_before = counter(handle, SLOW_CLOSES)

    with trio.fail_after(120):
        published = await flood.publish(EVENTS, stop=lambda: counter(handle, SLOW_CLOSES) > closes_before)
    assert published < EVENTS
    assert flood.received == {name: list(range(published)) for name in flood.fast}
    assert counter(handle, SLOW_CLOSES) == closes_before + 1
    assert flood.slow_conn.out_bytes < 65536

    await flood.slow_gone()
    seqs, last = await flood.read_slow()
    assert seqs == list(range(len(seqs)))
    assert last is None or last.opcode == OP_TEXT
    assert flood.slow.eof
    await flood.slow.drop()
    for ws in flood.fast.values():
        assert await read_until_pong(ws) == []


# --- ordering ------------------------------------------------------------------------------------


async def test_stream_events_arrive_in_publish_order(gateway: GatewayHandle, publisher: Publisher) -> None:
    waiter = await gateway.connect("waiter", gateway.staff_token(user=5, roles=("WAITER",)))
    diner = await gateway.connect("diner", gateway.table_token(session=9))
    await gateway.connected(2)
    count = 200
    await publish_stream(publisher.redis_url, [
        publisher.envelope("ROUND_SERVED", 1, 2, table_id=5, session_id=9, entity={"seq": i})
        for i in range(count)
    ])
    for client in (waiter, diner):
        seqs: list[int] = []
        with trio.fail_after(30):
            while len(seqs) < count:
                seqs.append(json.loads(await client.ws.get_message())["entity"]["seq"])
        assert seqs == list(range(count))
    for client in (waiter, diner):
        assert await read_until_pong(client) == []


# --- index hygiene -------------------------------------------------------------------------------

CYCLES = 1000
CONCURRENCY = 8


async def test_connect_disconnect_cycles_leave_no_trace(gateway: GatewayHandle) -> None:
    """Many short-lived sockets of every kind and every way of ending; the index ends up empty."""
    registered = 0

    def staff(i: int, roles: tuple[str, ...], **kwargs: Any) -> str:
        # One user per cycle keeps the per-user limit out of the way.
        return gateway.staff_token(user=1000 + i, branches=(2, 3), roles=roles, **kwargs)

    async def ping_pong(ws: WSClient) -> None:
        nonlocal registered
        await ws.send("ping")
        assert await ws.receive(within=10) == {"type": "pong"}
        registered += 1

    async def cycle(i: int) -> None:
        nonlocal registered
        kind = i % 10
        if kind == 0:  # waiter with sectors; client closes
            ws = await gateway.connect("waiter", staff(i, ("WAITER",), sector_ids=[i % 5 + 1]))
            await ping_pong(ws)
            await ws.aclose()
        elif kind == 1:  # kitchen; dropped without a close frame after registration
            client = await RawClient.open(gateway.port, f"/ws/kitchen?token={staff(i, ('KITCHEN',))}")
            await client.send(OP_TEXT, b"ping")
            frame = await client.read_frame()
            assert frame is not None and frame.payload == PONG.encode()
            registered += 1
            await client.drop()
        elif kind == 2:  # admin; client closes at once, racing admission
            ws = await gateway.connect("admin", staff(i, ("ADMIN",)))
            await ws.aclose()
        elif kind == 3:  # diner; client closes
            ws = await gateway.connect("diner", gateway.table_token(session=10_000 + i, table=i + 1))
            await ping_pong(ws)
            await ws.aclose()
        elif kind == 4:  # bad staff token
            ws = await gateway.connect("waiter", "not-a-jwt")
            assert (await ws.closed(within=10))[0] == 4001
        elif kind == 5:  # bad table token
            ws = await gateway.connect("diner", gateway.table_token(session=20_000 + i)[:-4] + "AAAA")
            assert (await ws.closed(within=10))[0] == 4001
        elif kind == 6:  # dropped right after the handshake, racing admission
            client = await RawClient.open(gateway.port, f"/ws/waiter?token={staff(i, ('WAITER',))}")
            await client.drop()
        elif kind == 7:  # manager on the waiter endpoint; dropped after registration
            client = await RawClient.open(gateway.port, f"/ws/waiter?token={staff(i, ('MANAGER',))}")
            await client.send(OP_TEXT, b'{"type":"ping","ts":1}')
            frame = await client.read_frame()
            assert frame is not None and frame.payload == PONG.encode()
            registered += 1
            await client.drop()
        elif kind == 8:  # role missing for the endpoint
            ws = await gateway.connect("admin", staff(i, ("WAITER",)))
            assert (await ws.closed(within=10))[0] == 4003
        else:  # diner dropped mid-handshake: the request head never completes
            with trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                await sock.connect(("127.0.0.1", gateway.port))
                await sock.send(b"GET /ws/diner?table_token=x HTTP/1.1\r\nHost: 127.0.0.1\r\n")

    async def worker(start: int) -> None:
        for i in range(start, CYCLES, CONCURRENCY):
            await cycle(i)

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for start in range(CONCURRENCY):
                nursery.start_soon(worker, start)
    await eventually(lambda: not gateway.gw.sockets, 15)
    assert registered == 4 * (CYCLES // 10)
    opened = sum(counter(gateway, "wsgateway_connections_opened_total", endpoint=e)
                 for e in ("waiter", "kitchen", "admin", "diner"))
    # Sockets closed while admission was still running may or may not have been registered.
    assert registered <= opened <= registered + 2 * (CYCLES // 10)
    assert not gateway.gw.sockets
    assert len(gateway.gw.index) == 0
    assert gateway.gw.index.is_empty_structurally()


# --- encode once ---------------------------------------------------------------------------------


async def test_every_recipient_gets_the_same_bytes(gateway: GatewayHandle, publisher: Publisher) -> None:
    targets = {
        "admin": "/ws/admin?token=" + gateway.staff_token(user=1, roles=("ADMIN",)),
        "manager_waiter": "/ws/waiter?token=" + gateway.staff_token(user=2, roles=("MANAGER",)),
        "waiter_s3": "/ws/waiter?token=" + gateway.staff_token(user=3, roles=("WAITER",), sector_ids=[3]),
        "waiter_none": "/ws/waiter?token=" + gateway.staff_token(user=4, roles=("WAITER",)),
        "kitchen": "/ws/kitchen?token=" + gateway.staff_token(user=5, roles=("KITCHEN",)),
        "manager_kitchen": "/ws/kitchen?token=" + gateway.staff_token(user=6, roles=("MANAGER",)),
        "diner_a": "/ws/diner?table_token=" + gateway.table_token(session=9),
        "diner_b": "/ws/diner?table_token=" + gateway.table_token(session=9),
    }
    clients = {name: await RawClient.open(gateway.port, target) for name, target in targets.items()}
    await gateway.connected(len(clients))
    env = publisher.envelope("ROUND_READY", 1, 2, table_id=5, session_id=9, sector_id=3,
                             entity={"round_id": 41, "note": "Ñandú ☕ " * 40})
    await publisher.channel_event("branch:2:kitchen", {**env, "_enqueued_at": 1769860800.5})
    frames: dict[str, Frame] = {}
    with trio.fail_after(15):
        for name, client in clients.items():
            frame = await client.read_frame()
            assert frame is not None
            frames[name] = frame
    assert {f.raw for f in frames.values()} == {frames["admin"].raw}
    assert frames["admin"].opcode == OP_TEXT
    assert frames["admin"].payload == compact(env)
    for client in clients.values():
        await client.drop()
