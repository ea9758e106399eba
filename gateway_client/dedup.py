"""De-duplication of catch-up and live events: a key per envelope and a bounded memory of keys."""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict

from gateway_client.listeners import Event

__all__ = ["RecentKeys", "event_key"]


class RecentKeys:
    """A bounded memory of recently seen keys (insertion order; the oldest is forgotten first)."""

    def __init__(self, maxlen: int = 2048) -> None:
        if maxlen < 1:
            raise ValueError("maxlen must be >= 1")
        self.maxlen = maxlen
        self._keys: OrderedDict[bytes, None] = OrderedDict()

    def add(self, key: bytes) -> bool:
        """Remember ``key``; returns False when it was already known."""
        if key in self._keys:
            self._keys.move_to_end(key)
            return False
        self._keys[key] = None
        if len(self._keys) > self.maxlen:
            self._keys.popitem(last=False)
        return True

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)


def event_key(event: Event) -> bytes:
    """The de-duplication key of an envelope: a digest of its compact JSON.

    Keys are sorted and top-level fields starting with ``_`` are left out, so a copy that went
    through another path (the existing gateway added ``_enqueued_at`` to pub/sub frames) still
    matches.
    """
    body = {k: v for k, v in event.items() if not k.startswith("_")}
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
