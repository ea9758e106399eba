"""Protocol v2 positions (D20): what a resumable event carries, and one socket's resume state.

A *stream* is the catch-up store of one branch, or of a whole tenant (``branch_id`` 0), named
``"<tenant>:<branch>"``. An *offset* is ``"<epoch>:<ms>-<seq>"``: the store's epoch (changed
whenever the store of that stream is created anew, so a lost or flushed store is detected) and the
entry's Redis stream id, which every instance agrees on. Clients never parse either.

Everything here is pure: the store (``gateway.catchup.positions``) assigns positions, the fan-out
and the v2 socket handler (``gateway.serving.protocol_v2``) use these values and decisions.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

#: A Redis stream id, ``(milliseconds, sequence)``; ordered like the stream itself.
StreamId = tuple[int, int]

_MAX_PART = 2**64 - 1


def stream_name(tenant_id: int, branch_id: int) -> str:
    return f"{tenant_id}:{max(branch_id, 0)}"


def parse_stream_name(name: object) -> tuple[int, int] | None:
    """``(tenant, branch)`` of a stream name, or None when it is not one of ours."""
    if not isinstance(name, str) or len(name) > 41:
        return None
    tenant, sep, branch = name.partition(":")
    if not sep or not tenant.isdigit() or not branch.isdigit() or not tenant.isascii() or not branch.isascii():
        return None
    t, b = int(tenant), int(branch)
    return (t, b) if t > 0 and b <= _MAX_PART else None


def parse_stream_id(raw: str) -> StreamId | None:
    ms, sep, seq = raw.partition("-")
    if not sep or not ms.isdigit() or not seq.isdigit() or not ms.isascii() or not seq.isascii():
        return None
    a, b = int(ms), int(seq)
    return (a, b) if a <= _MAX_PART and b <= _MAX_PART else None


def format_stream_id(sid: StreamId) -> str:
    return f"{sid[0]}-{sid[1]}"


def make_offset(epoch: str, sid: StreamId) -> str:
    return f"{epoch}:{sid[0]}-{sid[1]}"


def parse_offset(offset: object) -> tuple[str, StreamId] | None:
    """``(epoch, stream id)`` of an offset this gateway made, or None for anything else."""
    if not isinstance(offset, str) or len(offset) > 80:
        return None
    epoch, sep, raw = offset.rpartition(":")
    if not sep or not epoch or not epoch.isalnum() or not epoch.isascii():
        return None
    sid = parse_stream_id(raw)
    return None if sid is None else (epoch, sid)


@attrs.frozen
class Position:
    """Where one stored event sits: its stream, its id there, and the offset clients keep."""

    stream: str
    sid: StreamId
    offset: str


def positioned_payload(payload: bytes, position: Position) -> bytes:
    """The v2 frame payload: the envelope exactly as published plus ``"_pos"`` as its last key."""
    pos = b'"_pos":{"stream":"' + position.stream.encode() + b'","offset":"' + position.offset.encode() + b'"}}'
    body = payload.rstrip()
    if body == b"{}":
        return b"{" + pos
    return body[:-1] + b"," + pos


# --- server messages of v2 ---------------------------------------------------------------------


def _exp(expires_at: float) -> int | float | None:
    if expires_at == float("inf"):
        return None
    return int(expires_at) if expires_at == int(expires_at) else expires_at


def _compact(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def welcome_message(expires_at: float) -> bytes:
    return _compact({"type": "welcome", "protocol": 2, "exp": _exp(expires_at)})


def refreshed_message(expires_at: float) -> bytes:
    return _compact({"type": "refreshed", "exp": _exp(expires_at)})


def refresh_failed_message(reason: str) -> bytes:
    return _compact({"type": "refresh_failed", "reason": reason})


def resumed_message(streams: dict[str, tuple[bool, int]]) -> bytes:
    return _compact({"type": "resumed",
                     "streams": {s: {"recovered": ok, "replayed": n} for s, (ok, n) in streams.items()}})


#: Streams one resume may name; the rest are answered ``recovered:false``.
MAX_RESUME_STREAMS = 64


def parse_client_message(text: str) -> tuple[str, Any] | None:
    """``("resume", {stream: offset})`` or ``("refresh", token)``; None for anything else."""
    if not text.startswith("{") or ('"resume"' not in text and '"refresh"' not in text):
        return None
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    if not isinstance(value, dict):
        return None
    kind = value.get("type")
    if kind == "resume":
        positions = value.get("positions")
        return ("resume", positions if isinstance(positions, dict) else {})
    if kind == "refresh":
        token = value.get("token")
        return ("refresh", token if isinstance(token, str) else "")
    return None


# --- one v2 socket's resume state ------------------------------------------------------------------

Held = tuple["Position | None", bytes]


class ResumeState:
    """Which live events a v2 socket gets while and after it resumes.

    A new v2 socket holds its live events until its first message (or a short grace period): a
    client that resumes sends ``resume`` first, and whatever arrived meanwhile is then checked
    against the replay instead of being sent twice. During a replay live events are held too; at
    its end the held ones are released except those at or below what the replay covered, and the
    same rule keeps holding for late copies (entries this instance re-delivers after a restart).
    Until it resumes a socket records the first position delivered live per stream, so a later
    resume replays only what came before it.
    """

    __slots__ = ("first_live", "fresh", "held", "skip")

    def __init__(self) -> None:
        self.fresh = True
        self.first_live: dict[str, StreamId] = {}
        self.held: list[Held] | None = []
        self.skip: dict[str, StreamId] = {}

    @property
    def waiting(self) -> bool:
        """Still holding for the first message (not replaying)."""
        return self.fresh and self.held is not None

    def offer(self, position: Position | None, frame: bytes) -> bool:
        """True: deliver ``frame`` now. False: held for later, or already replayed."""
        if self.held is not None:
            self.held.append((position, frame))
            return False
        if position is None:
            return True
        if self.fresh:
            self.first_live.setdefault(position.stream, position.sid)
            return True
        upto = self.skip.get(position.stream)
        return upto is None or position.sid > upto

    def release(self) -> list[bytes]:
        """The first message was not a resume (or none came in time): deliver what was held."""
        return self.end_replay({}) if self.waiting else []

    def begin_replay(self) -> None:
        self.fresh = False
        if self.held is None:
            self.held = []

    def end_replay(self, covered: dict[str, StreamId]) -> list[bytes]:
        """Stop holding; ``covered`` is the highest position replayed (or claimed) per stream.
        Returns the held frames still to deliver, in order."""
        for stream, sid in covered.items():
            if sid > self.skip.get(stream, (-1, -1)):
                self.skip[stream] = sid
        held, self.held = self.held or [], None
        return [frame for position, frame in held if self.offer(position, frame)]
