"""The sockets of one gateway: every accepted one, the admitted ones by principal, the
connections not admitted yet, and whether the gateway is draining.

One object, created by the supervisor and handed to the listener, the fan-out, the sweepers and
the health pages; it holds state and answers questions about it, and does no I/O.
"""

from __future__ import annotations

from collections import Counter

import attrs

from gateway.core.health import legacy_rejection
from gateway.core.index import ConnectionIndex
from gateway.core.pending import PendingConnections
from gateway.serving.connection import Connection


@attrs.define(eq=False)
class SocketRegistry:
    pending: PendingConnections
    #: Admitted sockets, by principal: the routing index.
    index: ConnectionIndex[Connection] = attrs.Factory(ConnectionIndex)
    #: Every accepted socket, admitted or still being admitted or closed.
    sockets: set[Connection] = attrs.Factory(set)
    draining: bool = False
    #: The existing gateway's ``connections_rejected_{limit,auth}`` counters.
    legacy: Counter[str] = attrs.Factory(Counter)

    def count_rejection(self, reason: str) -> None:
        counter = legacy_rejection(reason)
        if counter is not None:
            self.legacy[counter] += 1

    def heartbeat_ages(self, now: float) -> list[float]:
        return [now - c.last_seen for c in self.index]
