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
