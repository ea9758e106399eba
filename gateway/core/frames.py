"""Server-to-client WebSocket frames (RFC 6455), encoded once and shared by every recipient.

Server frames are never masked, so one ``bytes`` object can be queued to any number of sockets.
"""

from __future__ import annotations

import struct

_FIN_TEXT = 0x81
_FIN_CLOSE = 0x88
_FIN_PONG = 0x8A
_MAX_CONTROL_PAYLOAD = 125
#: A close payload is the 2-byte code plus the reason, within the control-frame limit.
MAX_CLOSE_REASON_BYTES = _MAX_CONTROL_PAYLOAD - 2

_short = struct.Struct("!BB").pack
_medium = struct.Struct("!BBH").pack
_long = struct.Struct("!BBQ").pack


def _frame(first: int, payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return _short(first, n) + payload
    if n < 0x10000:
        return _medium(first, 126, n) + payload
    return _long(first, 127, n) + payload


def text_frame(payload: bytes) -> bytes:
    """A final text frame carrying ``payload`` (already UTF-8)."""
    return _frame(_FIN_TEXT, payload)


def close_frame(code: int, reason: str = "") -> bytes:
    """A close frame; the reason is cut on a character boundary so it stays valid UTF-8."""
    if not 1000 <= code <= 4999:
        raise ValueError(f"close code {code} is outside 1000-4999")
    encoded = reason.encode("utf-8")
    if len(encoded) > MAX_CLOSE_REASON_BYTES:
        # A prefix of valid UTF-8 can only be broken at its end; "ignore" drops that partial char.
        encoded = encoded[:MAX_CLOSE_REASON_BYTES].decode("utf-8", "ignore").encode("utf-8")
    return _frame(_FIN_CLOSE, code.to_bytes(2, "big") + encoded)


def pong_frame(payload: bytes = b"") -> bytes:
    """A control pong echoing a client's protocol-level ping."""
    if len(payload) > _MAX_CONTROL_PAYLOAD:
        raise ValueError("control frame payload exceeds 125 bytes")
    return _frame(_FIN_PONG, payload)


#: The application-level answer to ``ping`` and ``{"type":"ping"}`` (D6).
PONG_TEXT: bytes = text_frame(b'{"type":"pong"}')
