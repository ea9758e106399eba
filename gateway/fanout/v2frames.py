"""The v2 frame of one event (D20): encoded once, shared by every v2 recipient like the v1 frame."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.core.frames import text_frame
from gateway.core.positions import Position, positioned_payload
from gateway.serving.connection import DROPPED

if TYPE_CHECKING:
    from gateway.serving.connection import Connection


class V2Frames:
    __slots__ = ("_frame", "_payload", "_position")

    def __init__(self, payload: bytes, position: Position | None) -> None:
        self._payload = payload
        self._position = position
        self._frame: bytes | None = None

    def deliver(self, conn: Connection) -> int:
        """Hand the v2 frame to a v2 socket, unless its resume holds or already replayed it."""
        frame = self.frame_for(conn)
        return DROPPED if frame is None else conn.deliver(frame)

    def frame_for(self, conn: Connection) -> bytes | None:
        """The frame to send to this v2 socket now; None when its resume holds or replayed it."""
        frame = self._frame
        if frame is None:
            position = self._position
            frame = self._frame = text_frame(
                self._payload if position is None else positioned_payload(self._payload, position))
        state = conn.v2
        if state is not None and not state.offer(self._position, frame):
            return None
        return frame
