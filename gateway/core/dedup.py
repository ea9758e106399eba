"""Delivering a logical event once when it arrives by several paths (D10).

Publishers send some events on more than one pub/sub channel and on the stream, so one logical
event can reach the gateway several times within milliseconds. The key is a digest of the envelope
without ``ts``; the publisher's ``ts`` then tells a copy (same ``ts``, give or take clock skew
between paths) from a genuine repeat of an identical event later on (e.g. a second service call).
"""

from __future__ import annotations

from collections import deque


class Deduper:
    """Remembers recent first sightings and answers whether a new arrival is one.

    A sighting lives for ``window`` seconds from when it was first seen; copies do not extend it,
    so a stream of copies cannot keep a key alive forever. At most ``max_entries`` sightings are
    kept; past that the oldest is forgotten, which can only ever let a late copy through, never
    drop a distinct event.
    """

    def __init__(self, window: float, ts_tolerance: float, max_entries: int = 200_000) -> None:
        if window < 0:
            raise ValueError("window must be >= 0")
        if ts_tolerance < 0:
            raise ValueError("ts_tolerance must be >= 0")
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self._window = window
        self._tolerance = ts_tolerance
        self._max = max_entries
        # Insertion order is time order, so expiry and eviction only ever look at the left end.
        self._order: deque[tuple[float, bytes]] = deque()
        # Per key, its live sightings' publisher ts, oldest first (matching ``_order``). Almost
        # always one element; more only when distinct events share a key.
        self._sightings: dict[bytes, list[float | None]] = {}

    def __len__(self) -> int:
        return len(self._order)

    def first_sighting(self, key: bytes, ts_epoch: float | None, now: float) -> bool:
        """True if this is the first arrival of the logical event; False for a copy.

        ``now`` is a monotonic time in seconds.
        """
        if self._window == 0:
            return True
        self._expire(now)
        seen = self._sightings.get(key)
        if seen is not None:
            if ts_epoch is None:
                return False
            for ts in seen:
                if ts is None or abs(ts - ts_epoch) <= self._tolerance:
                    return False
            seen.append(ts_epoch)
        else:
            self._sightings[key] = [ts_epoch]
        self._order.append((now, key))
        if len(self._order) > self._max:
            self._forget_oldest()
        return True

    def retract(self, key: bytes) -> None:
        """Take back the sighting just recorded for ``key``: its delivery failed, so the retry
        (a reclaimed stream entry) must count as a first sighting again."""
        if not self._order or self._order[-1][1] != key:
            return
        self._order.pop()
        seen = self._sightings[key]
        seen.pop()
        if not seen:
            del self._sightings[key]

    def _expire(self, now: float) -> None:
        horizon = now - self._window
        order = self._order
        while order and order[0][0] <= horizon:
            self._forget_oldest()

    def _forget_oldest(self) -> None:
        _, key = self._order.popleft()
        seen = self._sightings[key]
        # The oldest sighting overall is also the oldest of its key.
        del seen[0]
        if not seen:
            del self._sightings[key]
