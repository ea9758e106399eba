"""What both client implementations share: the stdout protocol, frames, per-socket state."""

from __future__ import annotations

import json
import os
import resource
import socket
import sys
from typing import Any

ORIGIN = "http://localhost:5173"
MAX_CONNECTING = 64
PROGRESS_INTERVAL = 0.25
PONG = b'{"type":"pong"}'
#: The subprotocol of protocol v2 (D20): event frames then carry ``_pos``.
SUBPROTOCOL_V2 = "integrador.v2"


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Decoder:
    """Payload bytes -> event sequence number (None: not a benchmark event), cached.

    With ``v2`` each event's ``_pos`` is kept by sequence number (``positions``, as one string
    ``stream offset``): the benchmark checks that every event frame carried one, that all sockets
    saw the same one for an event and that no two events share one. ``unpositioned`` counts event
    payloads without it, ``conflicts`` payloads whose position differs from the one seen before.
    """

    def __init__(self, v2: bool = False) -> None:
        self.cache: dict[bytes, int | None] = {}
        self.v2 = v2
        self.positions: dict[int, str] = {}
        self.unpositioned = 0
        self.conflicts = 0

    def seq(self, payload: bytes) -> int | None:
        try:
            return self.cache[payload]
        except KeyError:
            pass
        value: int | None = None
        try:
            data = json.loads(payload)
            entity = data.get("entity") if isinstance(data, dict) else None
            if isinstance(entity, dict) and isinstance(entity.get("seq"), int):
                value = entity["seq"]
                if self.v2:
                    self._position(value, data.get("_pos"))
        except ValueError:
            value = None
        if len(self.cache) < 200_000:
            self.cache[payload] = value
        return value

    def _position(self, seq: int, pos: object) -> None:
        # Called once per distinct payload: every socket of the process got the same bytes.
        if not (isinstance(pos, dict) and isinstance(pos.get("stream"), str) and isinstance(pos.get("offset"), str)):
            self.unpositioned += 1
            return
        key = f"{pos['stream']} {pos['offset']}"
        if self.positions.setdefault(seq, key) != key:
            self.conflicts += 1

    def v2_report(self) -> dict[str, Any]:
        return {
            "positions": {str(k): v for k, v in self.positions.items()},
            "unpositioned": self.unpositioned,
            "conflicts": self.conflicts,
        }


class Sock:
    __slots__ = (
        "buf",
        "close_code",
        "error",
        "handshake",
        "i",
        "next_ping",
        "other",
        "pongs",
        "seqs",
        "settled",
        "sock",
        "state",
        "t_open",
        "t_pong",
        "t_start",
        "times",
        "want",
        "welcome",
    )

    def __init__(self, i: int) -> None:
        self.i = i
        self.sock: socket.socket | None = None
        self.state = "new"  # new, connecting, handshake, open, closed, failed
        self.handshake = b""
        self.buf = b""
        self.seqs: list[int] = []
        self.times: list[float] = []
        self.other = 0
        self.close_code: int | None = None
        self.error: str | None = None
        self.want = 0  # event frames expected; 0: complete as soon as open
        self.settled = False  # open (and ponged, with ping_on_open), closed or failed
        self.pongs = 0
        #: v2: 1 when the first frame was the welcome, -1 when another frame came first.
        self.welcome = 0
        self.next_ping = 0.0
        self.t_start: float | None = None  # time.monotonic() before connect()
        self.t_open: float | None = None  # after the recv that completed the 101
        self.t_pong: float | None = None  # after the recv that returned the first pong


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame with a short payload (close, pong)."""
    assert len(payload) < 126
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + key + masked


def errors_of(conns: list[Sock]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in conns:
        if c.state == "failed":
            out[c.error or "?"] = out.get(c.error or "?", 0) + 1
    return out
