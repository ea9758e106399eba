"""What Redis Cluster and Sentinel settings mean, without any I/O: node lists and hash slots.

A Redis Cluster keeps each key in one of 16384 slots, ``CRC16(key) mod 16384``; when the key holds
a non-empty ``{...}`` the slot is that of the text between the first braces only (a hash tag).
Keys one Lua script or one pipelined write uses together must share a slot; the gateway's own
keys carry hash tags on a cluster for that (``gateway.catchup.positions``), and the backend's
names (``events:critical``, the pub/sub channels) never change.
"""

from __future__ import annotations

SLOTS = 16384


def _crc16_table() -> tuple[int, ...]:
    # CRC-16/XMODEM (polynomial 0x1021), the one Redis Cluster uses.
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return tuple(table)


_TABLE = _crc16_table()


def crc16(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _TABLE[((crc >> 8) ^ byte) & 0xFF]
    return crc


def hash_tag(key: bytes) -> bytes:
    """The part of ``key`` that decides its slot."""
    start = key.find(b"{")
    if start >= 0:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            return key[start + 1 : end]
    return key


def key_slot(key: str | bytes) -> int:
    data = key.encode() if isinstance(key, str) else key
    return crc16(hash_tag(data)) % SLOTS


def tagged(key: str) -> str:
    """A key whose slot is that of ``key`` itself, to build companions of a key whose name cannot
    change: ``tagged("events:critical") + ":dlq"`` lives in the slot of ``events:critical``."""
    return "{" + key + "}"


def parse_node(raw: str) -> tuple[str, int]:
    """``host:port`` (``[v6 address]:port`` for IPv6) as (host, port)."""
    text = raw.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not host:port")
    if host.startswith("["):
        if not host.endswith("]") or len(host) < 3:
            raise ValueError(f"{text!r} is not [address]:port")
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, [address]:port")
    if any(c.isspace() for c in host):
        raise ValueError(f"{text!r}: a host name has no spaces")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: the port must be a number from 1 to 65535")
    return host, int(port_text)


def parse_nodes(raw: str) -> tuple[tuple[str, int], ...]:
    """A comma-separated list of ``host:port``; empty means none. Duplicates are refused: they are
    a typo for another node."""
    nodes = tuple(parse_node(part) for part in raw.split(",") if part.strip())
    if len(set(nodes)) != len(nodes):
        raise ValueError("a node is listed twice")
    return nodes


def format_node(node: tuple[str, int]) -> str:
    host, port = node
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
