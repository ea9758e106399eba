"""The closing handshake of one socket as plain state (RFC 6455 §7), apart from any I/O.

The socket shell asks it what to do when it wants to close, when the client's close frame or a
malformed frame arrives, and when the transport is lost; it answers with the close to send (if
any) and keeps the four facts the shell needs afterwards: which close we sent, whether the
client's close arrived, whether the TCP connection is gone, and whether the byte stream can still
be parsed.
"""

from __future__ import annotations

from gateway.core import closecodes
from gateway.core.closecodes import Close

#: Codes a client may not put in a close frame (RFC 6455 §7.4.1): answered with 1000.
_RESERVED = frozenset({1005, 1006, 1015})


def echo_code(code: int) -> int:
    """The code that answers a client's close: its own, or 1000 when it sent none usable."""
    return code if 1000 <= code < 5000 and code not in _RESERVED else 1000


class Closing:
    __slots__ = ("peer_closed", "sent", "transport_dead", "unparseable")

    def __init__(self) -> None:
        #: The close we queued, once we did.
        self.sent: Close | None = None
        self.peer_closed = False
        self.transport_dead = False
        self.unparseable = False

    @property
    def started(self) -> bool:
        """A close is under way (ours, or the transport is gone): no more frames go out."""
        return self.sent is not None or self.transport_dead

    @property
    def finished(self) -> bool:
        """Nothing more will come from the client."""
        return self.peer_closed or self.transport_dead or self.unparseable

    def close(self, close: Close) -> bool:
        """We want to close with ``close``; True when this is the first close, so its frame goes out."""
        if self.started:
            return False
        self.sent = close
        return True

    def peer_started(self, code: int) -> Close:
        """The client's close frame arrived first: the close that answers it."""
        self.peer_closed = True
        return Close(echo_code(code), "")

    def peer_answered(self) -> None:
        """The client's close frame arrived after ours."""
        self.peer_closed = True

    def malformed(self, code: int) -> tuple[Close, str]:
        """The parser failed the stream with ``code``: the close to send and its metric label.
        Nothing after a malformed frame is parsed (RFC 6455 §7.1.7)."""
        self.unparseable = True
        if code == closecodes.INVALID_UTF8.code:
            return closecodes.INVALID_UTF8, "invalid_utf8"
        if code == closecodes.MESSAGE_TOO_LARGE.code:
            return closecodes.MESSAGE_TOO_LARGE, "too_large"
        return closecodes.PROTOCOL_ERROR, "protocol"

    def lost(self) -> bool:
        """The transport failed; True when no close was under way (it counts as 1006)."""
        first = not self.started
        self.transport_dead = True
        return first
