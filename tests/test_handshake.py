"""The gateway's opening handshake answers exactly as wsproto's would, and refuses what it refuses."""

from __future__ import annotations

import h11
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import AcceptConnection, Request
from wsproto.utilities import RemoteProtocolError

from gateway.serving.handshake import accept_upgrade

KEY = (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ==")
GOOD = [(b"host", b"gw.example"), (b"upgrade", b"websocket"), (b"connection", b"Upgrade"), KEY,
        (b"sec-websocket-version", b"13")]


def wsproto_answer(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    ws = WSConnection(ConnectionType.SERVER)
    try:
        ws.initiate_upgrade_connection(headers, b"/ws/waiter?token=x")
    except (RemoteProtocolError, h11.LocalProtocolError):  # the listener answers both with 400
        return None
    first = next(ws.events(), None)
    if not isinstance(first, Request):
        return None
    return ws.send(AcceptConnection())


VARIANTS = {
    "plain": GOOD,
    "keep-alive, Upgrade": [(n, b"keep-alive, Upgrade" if n == b"connection" else v) for n, v in GOOD],
    "WebSocket upper case": [(n, b"WebSocket" if n == b"upgrade" else v) for n, v in GOOD],
    "extensions and protocols offered": [*GOOD, (b"sec-websocket-extensions", b"permessage-deflate"),
                                         (b"sec-websocket-protocol", b"chat, superchat")],
    "two keys": [*GOOD, (b"sec-websocket-key", b"second")],
    "origin and more": [*GOOD, (b"origin", b"https://app.example"), (b"user-agent", b"x")],
    "no connection": [h for h in GOOD if h[0] != b"connection"],
    "connection close": [(n, b"close" if n == b"connection" else v) for n, v in GOOD],
    "version 8": [(n, b"8" if n == b"sec-websocket-version" else v) for n, v in GOOD],
    "no version": [h for h in GOOD if h[0] != b"sec-websocket-version"],
    "no key": [h for h in GOOD if h[0] != b"sec-websocket-key"],
    "upgrade h2c": [(n, b"h2c" if n == b"upgrade" else v) for n, v in GOOD],
    "no host": [h for h in GOOD if h[0] != b"host"],
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_same_answer_as_wsproto(name: str) -> None:
    headers = VARIANTS[name]
    expected = wsproto_answer(headers)
    if expected is None:
        with pytest.raises(RemoteProtocolError):
            accept_upgrade(b"GET", headers)
        return
    accept, protocol = accept_upgrade(b"GET", headers)
    assert accept == expected
    assert protocol.state is ConnectionState.OPEN


def test_only_get() -> None:
    with pytest.raises(RemoteProtocolError):
        accept_upgrade(b"POST", GOOD)


def test_undecodable_host_fails_as_in_wsproto() -> None:
    headers = [(n, b"xn--zz.example" if n == b"host" else v) for n, v in GOOD]
    with pytest.raises(UnicodeError):
        wsproto_answer(headers)
    with pytest.raises(UnicodeError):
        accept_upgrade(b"GET", headers)


# --- the quick parse of the upgrade request (gateway.core.httphead) ---------------------------------

from typing import Any  # noqa: E402

import trio  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gateway.core.httphead import parse_get_head  # noqa: E402
from gateway_testing import DEFAULT_ORIGIN, GatewayHandle  # noqa: E402

MAX_HEAD = 8192
UPGRADE = (
    b"GET /ws/waiter?token=abc.def-ghi_jkl HTTP/1.1\r\nHost: 127.0.0.1:8001\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    b"Origin: http://localhost:5173\r\n\r\n"
)
BROWSER = (
    b"GET /ws/diner?table_token=x.y.z HTTP/1.1\r\nHost: gw.example\r\nConnection: keep-alive, Upgrade\r\n"
    b"Pragma: no-cache\r\nCache-Control: no-cache\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64) Chrome/120\r\n"
    b"Upgrade: websocket\r\nOrigin: https://app.example\r\nSec-WebSocket-Version: 13\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\nAccept-Language: es-AR,es;q=0.9\r\n"
    b"Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    b"Sec-WebSocket-Protocol: integrador.v2\r\n\r\n"
)


def h11_parse(data: bytes) -> object:
    """What the h11 path makes of ``data``: (method, target, headers, bytes after the head)."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    conn.receive_data(data)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return "refused"
    if not isinstance(event, h11.Request):
        return type(event).__name__
    return (event.method, event.target, list(event.headers), conn.trailing_data[0])


def quick_parse(data: bytes) -> object:
    parsed = parse_get_head(data, MAX_HEAD)
    if parsed is None:
        return None
    head, trailing = parsed
    return (head.method, head.target, head.headers, trailing)


def agrees(data: bytes) -> bool:
    """The quick parse either declines or gives exactly what h11 gives."""
    quick = quick_parse(data)
    return quick is None or quick == h11_parse(data)


@pytest.mark.parametrize("data", [UPGRADE, BROWSER, UPGRADE + b"\x81\x84abcd\x11\x08\x0d\x04"])
def test_the_usual_upgrade_requests_are_parsed_quickly_as_h11_parses_them(data: bytes) -> None:
    assert quick_parse(data) is not None
    assert quick_parse(data) == h11_parse(data)


HEAD_VARIANTS = {
    "lower-case method": UPGRADE.replace(b"GET", b"get", 1),
    "POST": UPGRADE.replace(b"GET", b"POST", 1),
    "HTTP/1.0": UPGRADE.replace(b"HTTP/1.1", b"HTTP/1.0", 1),
    "HTTP/2.0": UPGRADE.replace(b"HTTP/1.1", b"HTTP/2.0", 1),
    "no host": UPGRADE.replace(b"Host: 127.0.0.1:8001\r\n", b""),
    "two hosts": UPGRADE.replace(b"Host: 127.0.0.1:8001\r\n", b"Host: a\r\nHost: b\r\n"),
    "content-length": UPGRADE.replace(b"\r\n\r\n", b"\r\nContent-Length: 4\r\n\r\nabcd"),
    "content-length 0": UPGRADE.replace(b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n"),
    "transfer-encoding": UPGRADE.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    "folded line": UPGRADE.replace(b"Upgrade: websocket\r\n", b"Upgrade:\r\n websocket\r\n"),
    "no colon": UPGRADE.replace(b"Upgrade: websocket", b"Upgrade websocket"),
    "space before colon": UPGRADE.replace(b"Upgrade: websocket", b"Upgrade : websocket"),
    "empty value": UPGRADE.replace(b"Origin: http://localhost:5173", b"Origin:"),
    "empty value, spaces": UPGRADE.replace(b"Origin: http://localhost:5173", b"Origin:   \t"),
    "tabs around the value": UPGRADE.replace(b"Upgrade: websocket", b"Upgrade:\t websocket \t"),
    "inner spaces": UPGRADE.replace(b"Origin: http://localhost:5173", b"X-Thing: a  b\tc"),
    "byte 0x80 in a value": UPGRADE.replace(b"Origin: http://localhost:5173", b"X-Thing: caf\xc3\xa9"),
    "NUL in a value": UPGRADE.replace(b"Origin: http://localhost:5173", b"X-Thing: a\x00b"),
    "DEL in a value": UPGRADE.replace(b"Origin: http://localhost:5173", b"X-Thing: a\x7fb"),
    "bare LF line ends": UPGRADE.replace(b"\r\n", b"\n"),
    "one bare LF": UPGRADE.replace(b"Upgrade: websocket\r\n", b"Upgrade: websocket\n"),
    "CR inside a line": UPGRADE.replace(b"Upgrade: websocket", b"Upgrade: web\rsocket"),
    "leading CRLF": b"\r\n" + UPGRADE,
    "space in the target": UPGRADE.replace(b"/ws/waiter?", b"/ws/wai ter?"),
    "non-ASCII target": UPGRADE.replace(b"/ws/waiter?", b"/ws/w\xe4iter?"),
    "two spaces after GET": UPGRADE.replace(b"GET /", b"GET  /"),
    "bad name character": UPGRADE.replace(b"Upgrade: websocket", b"Up(grade): websocket"),
    "name with a dot and digits": UPGRADE.replace(b"Origin: http://localhost:5173", b"X.Y-9_z~: 1"),
    "upper-case names": UPGRADE.replace(b"Upgrade:", b"UPGRADE:"),
    "incomplete": UPGRADE[:-2],
    "only the end": b"\r\n\r\n",
    "too long": UPGRADE.replace(b"\r\n\r\n", b"\r\nX-Pad: " + b"p" * MAX_HEAD + b"\r\n\r\n"),
    "trailing frame bytes": UPGRADE + b"\x81\x80abcd",
    "two requests": UPGRADE + UPGRADE,
}


@pytest.mark.parametrize("name", list(HEAD_VARIANTS))
def test_the_quick_parse_declines_or_agrees_with_h11(name: str) -> None:
    assert agrees(HEAD_VARIANTS[name])


def test_the_quick_parse_declines_what_h11_refuses_or_reads_differently() -> None:
    for name in ("lower-case method", "HTTP/1.0", "no host", "two hosts", "content-length", "folded line",
                 "no colon", "space before colon", "byte 0x80 in a value", "NUL in a value", "bare LF line ends",
                 "leading CRLF", "space in the target", "incomplete", "too long"):
        assert quick_parse(HEAD_VARIANTS[name]) is None, name


_MUTATION = st.tuples(st.integers(0, len(UPGRADE) - 1), st.sampled_from(["insert", "delete", "replace"]),
                      st.sampled_from(list(b" \t\r\n:\x00\x7f\x80\xff,;=/?Aa0-_")))


@settings(max_examples=2000, deadline=None)
@given(st.lists(_MUTATION, min_size=1, max_size=4))
def test_mutated_heads_are_declined_or_read_as_h11_reads_them(mutations: list[tuple[int, str, int]]) -> None:
    data = bytearray(BROWSER if mutations[0][0] % 2 else UPGRADE)
    for at, kind, byte in mutations:
        at %= len(data) or 1
        if kind == "insert":
            data[at:at] = bytes([byte])
        elif kind == "delete":
            del data[at:at + 1]
        else:
            data[at:at + 1] = bytes([byte])
    assert agrees(bytes(data))


async def _answer(port: int, parts: list[bytes]) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    out = b""
    async with stream:
        for part in parts:
            await stream.send_all(part)
            await trio.sleep(0.05)  # separate reads: the first part alone is an incomplete head
        with trio.fail_after(10):
            while b"\r\n\r\n" not in out:
                data = await stream.receive_some(65536)
                if not data:
                    break
                out += data
    return out[: out.find(b"\r\n\r\n") + 4] if b"\r\n\r\n" in out else out


CASES = {"accepted": b"HTTP/1.1 101 ", "bad handshake": b"HTTP/1.1 400 ", "not a WebSocket path": b"HTTP/1.1 404 ",
         "refused before the upgrade": b"HTTP/1.1 429 "}


@pytest.mark.parametrize("case", list(CASES))
async def test_the_quick_and_the_h11_path_answer_the_same_bytes(gateway_factory: Any, case: str) -> None:
    """The same request whole in one read (quick parse) and cut in two (h11): the same answer."""
    gateway: GatewayHandle = await gateway_factory(max_connections_per_user=1)
    refused = case == "refused before the upgrade"
    if refused:
        await gateway.connect("waiter", gateway.staff_token(user=1))
        await gateway.connected(1)

    def request(user: int) -> bytes:
        # Distinct users, so an accepted first socket does not count against the second.
        head = (
            f"GET /ws/waiter?token={gateway.staff_token(user=1 if refused else user)} HTTP/1.1\r\nHost: x\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nOrigin: {DEFAULT_ORIGIN}\r\nSec-WebSocket-Version: 13\r\n"
        ).encode()
        if case != "bad handshake":
            head += b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        if case == "not a WebSocket path":
            head = head.replace(b"/ws/waiter", b"/ws/nowhere")
        return head + b"\r\n"

    quick = await _answer(gateway.port, [request(2)])
    data = request(3)
    split = await _answer(gateway.port, [data[:20], data[20:]])
    assert quick == split
    assert quick.startswith(CASES[case])
