"""Property tests: random and mutated bytes on the HTTP and WebSocket paths of a running gateway.

Whatever arrives, the answer is a status below 500 or a close code, no traceback is logged, the
per-connection state is given back, and the gateway keeps serving a well-behaved client.
"""

from __future__ import annotations

import logging

import pytest
import trio
from helpers import client_frame
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway_testing import DEFAULT_ORIGIN, GatewayHandle, running_gateway, test_settings

# Each example gets a fresh gateway (about 0.2 s to start): Hypothesis drives examples from a
# plain function, and pytest-trio's fixtures do not span examples.
FUZZ = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def with_gateway(redis_server: str, caplog: pytest.LogCaptureFixture, data: bytes, *, socket: bool) -> None:
    async def main() -> None:
        async with running_gateway(test_settings(redis_server)) as handle:
            prefix = b""
            if socket:
                token = handle.staff_token()
                prefix = (
                    f"GET /ws/waiter?token={token} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                    f"Connection: Upgrade\r\nOrigin: {DEFAULT_ORIGIN}\r\n"
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                ).encode()
            answer = await exchange(handle, data, prefix=prefix)
            assert not answer.startswith(b"HTTP/1.1 5") or answer.startswith(b"HTTP/1.1 503")
            # Still serving a well-behaved client, with the attacker's state given back.
            client = await handle.connect("waiter", handle.staff_token(user=99))
            await handle.connected(1)
            await client.still_served()
            with trio.fail_after(10):
                while handle.gw.pending.count:  # noqa: ASYNC110 - the listener's counter has no event
                    await trio.sleep(0.01)
            assert_clean(handle, caplog)

    caplog.clear()
    trio.run(main)

REQUESTS = [
    b"GET /ws/health HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /ws/catchup?branch_id=2&since=1&token=abc HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /ws/publish HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nAuthorization: Bearer x\r\n\r\n{}",
    b"OPTIONS /ws/catchup HTTP/1.1\r\nHost: x\r\nOrigin: http://localhost:5173\r\n"
    b"Access-Control-Request-Method: GET\r\n\r\n",
    b"GET /ws/waiter?token=x HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET /ws/catchup/session?session_id=9&since=1e306&table_token=1:2:3:4:5:ab HTTP/1.1\r\nHost: x\r\n\r\n",
]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(1, 8))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "repeat"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "delete" and data:
            del data[at : at + draw(st.integers(1, 16))]
        else:
            data[at:at] = data[at : at + 8] * draw(st.integers(1, 200))
    return bytes(data)


FRAMES = [
    client_frame(b'{"type":"ping"}'),
    client_frame(b"ping"),
    client_frame(b'{"type":"ping","x":' + b"[" * 900),
    client_frame(b"p" * 125, first=0x89),
    client_frame(b"{", first=0x01) + client_frame(b"}", first=0x80),
    client_frame(b"\x03\xe8bye", first=0x88),
    client_frame(b"refresh_sectors"),
]


async def exchange(handle: GatewayHandle, data: bytes, *, prefix: bytes = b"") -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", handle.port)
    received = b""
    try:
        await stream.send_all(prefix)
        if prefix:
            with trio.fail_after(10):
                while b"\r\n\r\n" not in received:
                    received += await stream.receive_some(65536)
            received = b""
        await stream.send_all(data)
        with trio.move_on_after(0.3):
            while chunk := await stream.receive_some(65536):
                received += chunk
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()
    return received


def assert_clean(handle: GatewayHandle, caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    for route in ("-", "/ws/health", "/ws/catchup", "/ws/catchup/session", "/ws/publish", "websocket"):
        assert handle.gw.metrics.http_requests.labels(route, "500")._value.get() == 0
    assert handle.gw.metrics.closes.labels("1011")._value.get() == 0


@FUZZ
@given(data=st.one_of(st.binary(max_size=4096), mutated(REQUESTS)))
def test_random_bytes_on_the_http_path(redis_server: str, caplog: pytest.LogCaptureFixture, data: bytes) -> None:
    with_gateway(redis_server, caplog, data, socket=False)


@FUZZ
@given(data=st.one_of(st.binary(max_size=4096), mutated(FRAMES)))
def test_random_bytes_on_an_admitted_socket(redis_server: str, caplog: pytest.LogCaptureFixture,
                                            data: bytes) -> None:
    with_gateway(redis_server, caplog, data, socket=True)
