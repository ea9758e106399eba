"""Per-socket inbound message limit (D6, §6.3)."""

from __future__ import annotations

from collections import deque


class SlidingWindow:
    """Allow at most ``limit`` messages within any ``window`` seconds.

    Only accepted messages are kept, and only the last ``limit`` of them: a new message is allowed
    exactly when the oldest of those has left the window, so each call is O(1).
    """

    __slots__ = ("_stamps", "limit", "window")

    def __init__(self, limit: int, window: float) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if not window > 0:
            raise ValueError("window must be positive")
        self.limit = limit
        self.window = window
        self._stamps: deque[float] = deque(maxlen=limit)

    def allow(self, now: float) -> bool:
        stamps = self._stamps
        if len(stamps) == self.limit and now - stamps[0] < self.window:
            # Rejected messages are not recorded, so a flood cannot extend its own penalty.
            return False
        stamps.append(now)
        return True
