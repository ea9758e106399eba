"""Per-socket inbound message limit (D6, §6.3)."""

from __future__ import annotations


class SlidingWindow:
    """Allow at most ``limit`` messages within any ``window`` seconds.

    Only accepted messages still inside the window are kept, in a plain list: a socket that pings
    every 30 s holds one timestamp, not a preallocated ring (every idle socket has one of these).
    A flooding socket holds at most ``limit``, so pruning the front stays cheap.
    """

    __slots__ = ("_stamps", "limit", "window")

    def __init__(self, limit: int, window: float) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        if not window > 0:
            raise ValueError("window must be positive")
        self.limit = limit
        self.window = window
        self._stamps: list[float] = []

    def allow(self, now: float) -> bool:
        stamps = self._stamps
        horizon = now - self.window
        expired = 0
        for stamp in stamps:
            if stamp > horizon:
                break
            expired += 1
        if expired:
            del stamps[:expired]
        if len(stamps) >= self.limit:
            # Rejected messages are not recorded, so a flood cannot extend its own penalty.
            return False
        stamps.append(now)
        return True
