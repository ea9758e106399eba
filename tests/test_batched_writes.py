"""One write per socket per job: a socket's frames of one job go out together, in order, and the
send queue, its budget and the slow-consumer close behave exactly as with one write per frame.

Real sockets (a connected pair over the kernel) for ``Connection.deliver_many``; a real gateway and
Redis for the fan-out of a burst read in one ``XREADGROUP``.
"""

from __future__ import annotations

import json
import socket
from typing import Any

import trio
from test_fanout import OP_CLOSE, OP_TEXT, RawClient, counter, eventually, publish_stream
from wsproto import ConnectionType
from wsproto.connection import Connection as WsProtocol

from gateway.core import closecodes
from gateway.core.frames import text_frame
from gateway.metrics import Metrics
from gateway.serving.connection import Connection
from gateway_testing import GatewayHandle, Publisher, WSClient


def _pair(*, budget: int = 1 << 20, small_buffers: bool = False) -> tuple[Connection, socket.socket]:
    ours, theirs = socket.socketpair()
    if small_buffers:
        # The kernel rounds these up, but far below what the frames below need.
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    ours.setblocking(False)
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(ours))
    conn = Connection(stream, WsProtocol(ConnectionType.SERVER, []), "waiter", conn_id=1, metrics=Metrics(),
                      max_queue_bytes=budget, max_message=65536, max_frames=16, rate_limit=1000,
                      rate_window=1.0, direct_write=True)
    return conn, theirs


def _frames(count: int, size: int) -> list[bytes]:
    return [text_frame(json.dumps({"seq": i, "pad": "x" * size}).encode()) for i in range(count)]


async def _read_exactly(sock: socket.socket, n: int) -> bytes:
    sock.setblocking(False)
    out = bytearray()
    with trio.fail_after(30):
        while len(out) < n:
            await trio.lowlevel.wait_readable(sock)
            out += sock.recv(1 << 20)
    return bytes(out)


async def test_an_idle_socket_gets_all_its_frames_of_a_job_at_once_in_order() -> None:
    conn, peer = _pair()
    frames = _frames(20, 100)
    assert conn.deliver_many(frames) == (20, 20)
    assert not conn.outbox
    assert await _read_exactly(peer, sum(map(len, frames))) == b"".join(frames)
    peer.close()


async def test_what_the_kernel_does_not_take_is_queued_behind_and_flushed_in_order() -> None:
    conn, peer = _pair(small_buffers=True)
    frames = _frames(50, 3000)
    handed, whole = conn.deliver_many(frames)
    assert handed == 50
    assert whole < 50 and conn.outbox  # a partial writev: the rest waits in the queue
    # More frames now go behind the queue, never around it.
    later = _frames(3, 10)
    assert conn.deliver_many(later) == (3, 0)
    expected = b"".join(frames + later)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(conn.writer)
        assert await _read_exactly(peer, len(expected)) == expected
        await eventually(lambda: not conn.outbox, 10)
        nursery.cancel_scope.cancel()
    peer.close()


async def test_a_job_over_the_budget_closes_the_socket_as_a_slow_consumer() -> None:
    conn, peer = _pair(budget=20_000, small_buffers=True)
    frames = _frames(50, 3000)
    handed, whole = conn.deliver_many(frames)
    assert handed == whole < 50
    assert conn.closing and conn.close_code == closecodes.SLOW_CONSUMER
    assert conn.out_bytes < 20_000  # pending frames dropped: at most a partial frame and the close
    assert conn.deliver_many(_frames(2, 10)) == (0, 0)
    peer.close()


async def test_a_closing_socket_takes_nothing() -> None:
    conn, peer = _pair()
    conn.begin_close(closecodes.NORMAL)
    assert conn.deliver_many(_frames(3, 10)) == (0, 0)
    peer.close()


BURST = 1200
#: Far above one job's worth of frames (100 events of 10 KB), so only the socket that never reads
#: goes over it; 12 MB in all is more than it and the kernel's buffers hold for that socket.
BUDGET = 4 << 20
PIPELINE = 100


async def test_a_burst_reaches_every_socket_once_and_in_order_and_the_slow_one_is_closed(
    gateway_factory: Any, publisher: Publisher
) -> None:
    """Events written to the stream in one pipeline are read in batches (jobs of many events): the
    readers get every one in order, the socket that never reads is closed 1013 and what it can
    still read is a gapless prefix."""
    handle: GatewayHandle = await gateway_factory(send_queue_max_bytes=BUDGET)
    slow = await RawClient.open(handle.port, f"/ws/waiter?token={handle.staff_token(user=1, roles=('WAITER',))}")
    await handle.connected(1)
    (slow_conn,) = list(handle.gw.index)
    v1 = await handle.connect("waiter", handle.staff_token(user=2, roles=("WAITER",)))
    v2 = await handle.connect("admin", handle.staff_token(user=3, roles=("ADMIN",)), subprotocols=("integrador.v2",))
    await handle.connected(3)
    assert json.loads(await v2.ws.get_message())["type"] == "welcome"
    closes = counter(handle, "wsgateway_slow_consumer_closes_total")
    positions: list[str] = []
    received: dict[str, list[int]] = {"v1": [], "v2": []}

    async def read(name: str, client: WSClient) -> None:
        while len(received[name]) < BURST:
            message = json.loads(await client.ws.get_message())
            received[name].append(message["entity"]["seq"])
            if name == "v2":
                positions.append(message["_pos"]["offset"])

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read, "v1", v1)
            nursery.start_soon(read, "v2", v2)
            # Pipelines of PIPELINE entries: the gateway reads each as one or a few jobs of many
            # events. The readers share this process with the gateway, so the next pipeline waits
            # for them; the socket that never reads falls behind regardless.
            for start in range(0, BURST, PIPELINE):
                await publish_stream(publisher.redis_url, [
                    publisher.envelope("ROUND_READY", 1, 2, table_id=5, session_id=9,
                                       entity={"seq": i, "pad": "y" * 10_000})
                    for i in range(start, start + PIPELINE)
                ])
                await eventually(lambda n=start + PIPELINE: min(map(len, received.values())) >= n, 60)
    assert received == {"v1": list(range(BURST)), "v2": list(range(BURST))}
    assert len(set(positions)) == BURST
    await eventually(lambda: counter(handle, "wsgateway_slow_consumer_closes_total") == closes + 1, 30)
    assert slow_conn.close_code == closecodes.SLOW_CONSUMER
    seqs = []
    with trio.fail_after(30):
        try:
            while (frame := await slow.read_frame()) is not None and frame.opcode != OP_CLOSE:
                assert frame.opcode == OP_TEXT
                seqs.append(json.loads(frame.payload)["entity"]["seq"])
        except trio.BrokenResourceError:
            pass
    assert seqs == list(range(len(seqs))) and len(seqs) < BURST
    await slow.drop()


async def test_jobs_of_one_wake_up_share_one_write_per_socket_and_report_job_by_job() -> None:
    from gateway.core.dedup import Deduper
    from gateway.core.events import encode_envelope, envelope, parse_event
    from gateway.core.index import ConnectionIndex
    from gateway.core.model import Principal
    from gateway.fanout.broadcast import Broadcaster, Job

    index: ConnectionIndex[Connection] = ConnectionIndex()
    pairs = [_pair() for _ in range(3)]
    for n, (conn, _peer) in enumerate(pairs):
        index.add(conn, Principal("waiter", 1, 100 + n, frozenset({2})))
    broadcaster = Broadcaster(index, Metrics(), Deduper(5.0, 5.0))

    made: dict[tuple[int, int], Any] = {}

    def event(seq: int, branch: int = 2) -> Any:
        if (seq, branch) not in made:
            made[seq, branch] = parse_event(encode_envelope(envelope("ROUND_PENDING", 1, branch, table_id=5, entity={"seq": seq})),
                                            max_size=65536)
        return made[seq, branch]

    reports: list[tuple[str, list[bool]]] = []
    jobs = [
        Job([event(0), event(1)], "stream", trio.current_time(), lambda o: reports.append(("a", o))),
        Job([event(2), event(1), event(3, branch=9)], "pubsub", trio.current_time(), lambda o: reports.append(("b", o))),
        Job([event(4)], "stream", trio.current_time(), lambda o: reports.append(("c", o))),
    ]
    broadcaster.run_jobs(jobs)
    # Each job reports once, in order, one flag per event (a duplicate or an event nobody gets
    # was still handled: True).
    assert reports == [("a", [True, True]), ("b", [True, True, True]), ("c", [True])]
    expected = b"".join(text_frame(event(i).frame_payload) for i in (0, 1, 2, 4))
    for conn, peer in pairs:
        assert await _read_exactly(peer, len(expected)) == expected
        assert not conn.outbox
        peer.close()
    assert broadcaster.metrics.frames_delivered._value.get() == 12


async def test_the_writer_task_exists_only_once_a_write_would_block() -> None:
    conn, peer = _pair(small_buffers=True)
    async with trio.open_nursery() as nursery:
        conn.attach(nursery)
        small = _frames(3, 10)
        assert conn.deliver_many(small) == (3, 3)
        assert not nursery.child_tasks  # an idle socket: written directly, no task
        big = _frames(50, 3000)
        conn.deliver_many(big)
        assert len(nursery.child_tasks) == 1  # the kernel did not take it all: the writer runs
        conn.deliver_many(_frames(2, 3000))
        assert len(nursery.child_tasks) == 1  # and only one
        expected = b"".join(small + big + _frames(2, 3000))
        assert await _read_exactly(peer, len(expected)) == expected
        nursery.cancel_scope.cancel()
    peer.close()


async def test_closing_an_idle_socket_starts_a_writer_for_the_close_frame() -> None:
    conn, peer = _pair()
    async with trio.open_nursery() as nursery:
        conn.attach(nursery)
        assert conn.deliver_many(_frames(2, 10)) == (2, 2)
        conn.begin_close(closecodes.NORMAL)
        assert len(nursery.child_tasks) == 1
        data = await _read_exactly(peer, sum(map(len, _frames(2, 10))) + 4)
        assert data.endswith(b"\x88\x02\x03\xe8")  # the close frame, 1000, after the events
        with trio.fail_after(10):
            await conn.finish_close(timeout=0.2)  # the client never answers: bounded
        nursery.cancel_scope.cancel()
    peer.close()
