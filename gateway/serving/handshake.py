"""The server side of the WebSocket opening handshake (RFC 6455 §4.2), from the request h11 parsed.

wsproto's own handshake re-serialises the request through a client-side h11 connection and parses
it again with a second server-side one: a fifth of the CPU of admitting a socket in a reconnect
storm. The checks and the 101 here are wsproto's (``H11Handshake._process_connection_request`` and
``_accept`` without extensions, which this gateway never accepts), applied to the
headers once; the frame-level ``wsproto.connection.Connection`` is then built directly. The test
suite compares both byte for byte.
"""

from __future__ import annotations

from collections.abc import Sequence

from wsproto import ConnectionType
from wsproto.connection import Connection as WsProtocol
from wsproto.events import RejectConnection
from wsproto.utilities import RemoteProtocolError, generate_accept_token, split_comma_header

_VERSION = b"13"
_UPGRADE = b"websocket"
_ACCEPT_HEAD = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: "


def _refused(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(message, event_hint=RejectConnection())


def accept_upgrade(method: bytes, headers: Sequence[tuple[bytes, bytes]], *,
                   subprotocol: str | None = None) -> tuple[bytes, WsProtocol]:
    """The 101 response to a WebSocket upgrade request and the protocol object for its frames.

    ``headers`` are h11's (lower-case names); ``subprotocol`` is the one selected (D20), if any.
    Raises ``wsproto.utilities.RemoteProtocolError`` for a request that is not a valid opening
    handshake, where wsproto would.
    """
    if method != b"GET":
        raise _refused("Request method must be GET")
    connection_tokens: list[str] | None = None
    host: str | None = None
    keys: list[bytes] = []
    upgrade = b""
    version: bytes | None = None
    for name, value in headers:
        if name == b"connection":
            connection_tokens = split_comma_header(value)
        elif name == b"host":
            host = value.decode("idna")
        elif name == b"sec-websocket-extensions" or name == b"sec-websocket-protocol":
            split_comma_header(value)  # offered, never accepted; undecodable is refused as by wsproto
        elif name == b"sec-websocket-key":
            keys.append(value)
        elif name == b"sec-websocket-version":
            version = value
        elif name == b"upgrade":
            upgrade = value
    if connection_tokens is None or not any(token.lower() == "upgrade" for token in connection_tokens):
        raise _refused("Missing header, 'Connection: Upgrade'")
    if version != _VERSION:
        raise _refused("Missing header, 'Sec-WebSocket-Version'")
    if not keys:
        raise _refused("Missing header, 'Sec-WebSocket-Key'")
    if upgrade.lower() != _UPGRADE:
        raise _refused("Missing header, 'Upgrade: websocket'")
    if host is None:
        raise _refused("Missing header, 'Host'")
    accept = _ACCEPT_HEAD + generate_accept_token(b", ".join(keys)) + b"\r\n"
    if subprotocol is not None:
        accept += b"Sec-WebSocket-Protocol: " + subprotocol.encode("ascii") + b"\r\n"
    accept += b"\r\n"
    return accept, WsProtocol(ConnectionType.SERVER, [])
