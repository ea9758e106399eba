"""The one table of WebSocket close codes and reasons: those the gateway sends, and those its
clients send or record (the Python client ``gateway_client`` takes them from here).

Codes 4001, 4003 and 4029 are final for the existing clients (no reconnect); every other code
makes them reconnect with backoff. Reasons are short, fixed and never carry input or secrets.
"""

from __future__ import annotations

from typing import NamedTuple


class Close(NamedTuple):
    code: int
    reason: str


NORMAL = Close(1000, "")
HEARTBEAT_TIMEOUT = Close(1001, "Heartbeat timeout")
PROTOCOL_ERROR = Close(1002, "Protocol error")
BINARY_NOT_SUPPORTED = Close(1003, "Binary frames are not supported")
INVALID_UTF8 = Close(1007, "Invalid UTF-8")
INVALID_MESSAGE = Close(1007, "Invalid message")
TOO_MANY_CONNECTIONS = Close(1008, "Too many connections")
MESSAGE_TOO_LARGE = Close(1009, "Message too large")
TOO_MANY_FRAGMENTS = Close(1009, "Too many fragments")
SERVER_RESTART = Close(1012, "Server restart")
TRY_AGAIN_LATER = Close(1013, "Try again later")
SLOW_CONSUMER = Close(1013, "Slow consumer")

MISSING_TOKEN = Close(4001, "Missing token")
AUTH_FAILED = Close(4001, "Authentication failed")
TOKEN_EXPIRED_OR_REVOKED = Close(4001, "Token expired or revoked")
TABLE_TOKEN_EXPIRED = Close(4001, "Token expired")
SESSION_MISMATCH = Close(4001, "Session mismatch")
ORIGIN_NOT_ALLOWED = Close(4003, "Origin not allowed")
ACCESS_DENIED = Close(4003, "Access denied")
RATE_LIMITED = Close(4029, "Rate limit exceeded")

#: Codes after which the existing clients stop reconnecting.
FINAL_CODES = frozenset({4001, 4003, 4029})

# --- sent by clients, never by the gateway (docs/client.md) ---
#: No pong within the pong timeout; not final, the client reconnects with backoff.
CLIENT_HEARTBEAT_TIMEOUT = Close(4000, "Heartbeat timeout")
#: The client replaces its socket to use a refreshed token, and reconnects at once.
SOFT_DISCONNECT = Close(1000, "Soft disconnect")
#: The application closed the client.
CLIENT_CLOSED = Close(1000, "Client closed")
#: Never on the wire (RFC 6455 §7.1.5): what a client records when no close frame arrived.
ABNORMAL_CLOSURE = 1006
