"""The client's address: the TCP peer, or ``X-Forwarded-For`` when the peer is a trusted proxy.

A client could put anything in ``X-Forwarded-For``, so the header is only believed when the TCP
peer is one of ``GATEWAY_TRUSTED_PROXIES``; then the right-most address that is not itself a trusted
proxy is the client (proxies append, so that is the first hop we do not control).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Iterable[str]) -> tuple[Network, ...]:
    """``10.0.0.0/8``, ``127.0.0.1`` (a single host) ...; raises ValueError naming the bad entry."""
    out: list[Network] = []
    for entry in entries:
        try:
            out.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an address or network: {entry.strip()!r}") from None
    return tuple(out)


def is_trusted(address: str, trusted: tuple[Network, ...]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in trusted)


def client_ip(peer: str, forwarded_for: bytes | None, trusted: tuple[Network, ...]) -> str:
    if forwarded_for is None or not trusted or not is_trusted(peer, trusted):
        return peer
    hops = [h.strip() for h in forwarded_for.decode("latin-1").split(",") if h.strip()]
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            return peer  # a malformed header from a trusted proxy: fall back to what we know
        if not is_trusted(hop, trusted):
            return hop
    # Every hop is a proxy of ours, or there is none: the left-most one is whatever the client
    # wrote, so it proves nothing. The peer is the last address we know.
    return peer
