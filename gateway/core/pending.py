"""The bound on connections that are not admitted yet (sans-I/O).

A TCP connection holds memory and a task from accept until it is either an admitted socket or
gone: HTTP requests, handshakes still arriving, refusals and closes in progress. Those are
counted here, in total and per peer address, and a connection over either bound is refused
before any HTTP or WebSocket state is allocated for it. Peers that are trusted proxies count
only in the total (everyone behind a proxy shares its address; the proxy limits them itself).
"""

from __future__ import annotations

from gateway.core.clientip import Network, is_trusted

TOTAL, PER_IP = "pending_total", "pending_ip"


class PendingConnections:
    __slots__ = ("_by_ip", "_exempt", "count", "per_ip", "total")

    def __init__(self, total: int, per_ip: int, exempt: tuple[Network, ...] = ()) -> None:
        self.total = total
        self.per_ip = per_ip
        self._exempt = exempt
        self._by_ip: dict[str, int] = {}
        self.count = 0

    def enter(self, peer: str) -> str | None:
        """Count a new connection from ``peer``; the reason it is refused, or None."""
        if self.count >= self.total:
            return TOTAL
        exempt = is_trusted(peer, self._exempt)
        if not exempt:
            held = self._by_ip.get(peer, 0)
            if held >= self.per_ip:
                return PER_IP
            self._by_ip[peer] = held + 1
        self.count += 1
        return None

    def leave(self, peer: str) -> None:
        """A counted connection was admitted as a socket, or is gone."""
        self.count -= 1
        held = self._by_ip.get(peer)
        if held is None:
            return
        if held <= 1:
            del self._by_ip[peer]
        else:
            self._by_ip[peer] = held - 1

    def held_by(self, peer: str) -> int:
        return self._by_ip.get(peer, 0)
