"""The accept loop (gateway.serving.accept): many waiting connections per wake-up, each served by
its own task; cancelled, it stops listening."""

from __future__ import annotations

import contextlib
import socket

import pytest
import trio

from gateway.serving import accept

CONNECTIONS = 300


async def _echo_once(stream: trio.SocketStream) -> None:
    # As the gateway's handler does, a connection that breaks ends quietly.
    async with stream:
        with contextlib.suppress(trio.BrokenResourceError):
            data = await stream.receive_some(100)
            await stream.send_all(data.upper())


async def test_a_burst_of_connections_is_accepted_and_each_gets_its_handler() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as handlers:
        handlers.start_soon(accept.serve_listeners, _echo_once, listeners, handlers)
        # Connected before the loop runs: they wait in the kernel's queue, more than one batch.
        clients = []
        for _ in range(CONNECTIONS):
            s = socket.create_connection(("127.0.0.1", port))
            s.setblocking(False)
            clients.append(trio.SocketStream(trio.socket.from_stdlib_socket(s)))
        with trio.fail_after(30):
            for n, client in enumerate(clients):
                await client.send_all(f"hello {n}".encode())
            for n, client in enumerate(clients):
                assert await client.receive_some(100) == f"HELLO {n}".encode()
                await client.aclose()
        handlers.cancel_scope.cancel()
    # The listener is closed once the loop ends: nothing accepts on the port any more.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


async def test_a_peer_gone_before_accept_is_skipped() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    # A connection reset while still in the queue: accept may return it (reads then fail) or
    # skip it; either way the loop goes on serving the next one.
    gone = socket.create_connection(("127.0.0.1", port))
    gone.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    gone.close()
    async with trio.open_nursery() as handlers:
        handlers.start_soon(accept.serve_listeners, _echo_once, listeners, handlers)
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        with trio.fail_after(10):
            await stream.send_all(b"still here")
            assert await stream.receive_some(100) == b"STILL HERE"
        await stream.aclose()
        handlers.cancel_scope.cancel()
