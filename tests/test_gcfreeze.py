"""Admitted sockets are frozen out of full collections, and still freed when they close."""

from __future__ import annotations

import gc
import socket
import struct
import weakref
from collections.abc import Iterator

import pytest
import trio
from helpers import client_frame
from test_fanout import eventually

from gateway_testing import GatewayHandle


@pytest.fixture
def unfreeze() -> Iterator[None]:
    # The test process is shared: give frozen objects back to the collector afterwards.
    yield
    gc.unfreeze()


async def assert_freed_without_the_collector(gateway: GatewayHandle, refs: list[weakref.ref[object]]) -> None:
    """Once every socket is gone, nothing ``refs`` watch is left with the collector off: no cycle
    holds a closed socket, so reference counting alone frees the frozen objects."""
    await eventually(lambda: not gateway.gw.index and not gateway.gw.sockets, 20)
    await trio.sleep(0.1)
    gc.disable()
    try:
        assert [ref for ref in refs if ref() is not None] == []
    finally:
        gc.enable()


async def test_admitted_sockets_are_frozen_and_freed_when_closed(gateway: GatewayHandle, unfreeze: None) -> None:
    freezer = gateway.gw.listener.freezer
    assert not freezer.enabled  # only the daemon turns it on
    freezer.enabled, freezer.every = True, 5
    frozen_before = gc.get_freeze_count()
    clients = [await gateway.connect("waiter", gateway.staff_token(user=100 + n)) for n in range(10)]
    await gateway.connected(10)
    assert gc.get_freeze_count() > frozen_before
    # Connection has __slots__ without weak references: watch what each one owns instead.
    conns = [weakref.ref(part) for conn in gateway.gw.index for part in (conn.ws, conn.stream)]
    assert len(conns) == 20 and all(ref() is not None for ref in conns)
    for client in clients:
        await client.ws.aclose()
    del clients
    await assert_freed_without_the_collector(gateway, conns)


async def test_off_unless_enabled(gateway: GatewayHandle) -> None:
    frozen_before = gc.get_freeze_count()
    gateway.gw.listener.freezer.every = 1
    await gateway.connect("waiter", gateway.staff_token())
    await gateway.connected(1)
    assert gc.get_freeze_count() == frozen_before


async def test_sockets_closed_abnormally_are_freed_without_the_collector(gateway: GatewayHandle, unfreeze: None) -> None:
    """A TCP reset, a protocol error (1002) and a close right after a bad message leave no cycle
    either: frozen sockets ended any of these ways are freed by reference counting."""
    freezer = gateway.gw.listener.freezer
    freezer.enabled, freezer.every = True, 2
    clients = [await gateway.connect("waiter", gateway.staff_token(user=100 + n)) for n in range(6)]
    await gateway.connected(6)
    conns = [weakref.ref(part) for conn in gateway.gw.index for part in (conn.ws, conn.stream)]
    for client in clients[:2]:  # reset: SO_LINGER 0 makes close() send RST
        sock = client.ws._stream.socket
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    for client in clients[2:4]:  # an unmasked frame: 1002
        await client.ws._stream.send_all(client_frame(b"x", masked=False))
    for client in clients[4:]:  # a message that is not JSON, then a close frame and EOF
        await client.ws._stream.send_all(client_frame(b"{") + client_frame(b"", first=0x88))
        await client.ws._stream.aclose()
    del clients
    await assert_freed_without_the_collector(gateway, conns)
