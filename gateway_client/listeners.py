"""Listeners per event type, and the throttle of ``on_throttled``; no I/O."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Final

__all__ = ["WILDCARD", "Event", "Listener", "Listeners", "Throttle", "safe_call"]

# The client's one logger, under the name it has always had (logging set-ups filter on it).
log = logging.getLogger("gateway.client")

#: An event as delivered to listeners: the parsed JSON envelope.
Event = dict[str, Any]
#: A listener is a plain (synchronous) callable; exceptions are logged and swallowed.
Listener = Callable[[Event], None]

WILDCARD: Final = "*"


def safe_call(callback: Callable[..., object], *args: object) -> None:
    """Call an application callback; an exception is logged, never raised into the client."""
    try:
        callback(*args)
    except Exception:
        log.exception("client callback failed", extra={"callback": getattr(callback, "__qualname__", repr(callback))})


class Listeners:
    """Callbacks per event type (or ``"*"`` for all); ``add`` returns the unsubscribe function.

    Each subscription has its own key, so the same callable may be added twice and each
    unsubscribe removes only its own entry. An event type whose last listener goes is removed from
    the map (audit CLIENT-LOW-02). Dispatch order: the type's listeners, then ``"*"``, each in
    subscription order; a listener that raises is logged and the others still run.
    """

    def __init__(self) -> None:
        self._by_type: dict[str, dict[int, Listener]] = {}
        self._next_id = 0

    def add(self, event_type: str, callback: Listener) -> Callable[[], None]:
        if not isinstance(event_type, str) or not event_type:
            raise ValueError("event_type must be a non-empty string")
        key = self._next_id
        self._next_id += 1
        self._by_type.setdefault(event_type, {})[key] = callback

        def unsubscribe() -> None:
            group = self._by_type.get(event_type)
            if group is None:
                return
            group.pop(key, None)
            if not group:
                del self._by_type[event_type]

        return unsubscribe

    def __len__(self) -> int:
        return sum(len(group) for group in self._by_type.values())

    def __bool__(self) -> bool:
        return bool(self._by_type)

    @property
    def event_types(self) -> frozenset[str]:
        return frozenset(self._by_type)

    def count(self, event_type: str) -> int:
        return len(self._by_type.get(event_type, ()))

    def dispatch(self, event: Event) -> int:
        """Call the listeners of ``event["type"]`` and of ``"*"``; returns how many were called."""
        event_type = event.get("type")
        callbacks: list[Listener] = []
        if isinstance(event_type, str) and event_type != WILDCARD:
            callbacks.extend(self._by_type.get(event_type, {}).values())
        callbacks.extend(self._by_type.get(WILDCARD, {}).values())
        for callback in callbacks:  # a snapshot: listeners may (un)subscribe while dispatching
            safe_call(callback, event)
        return len(callbacks)


class Throttle:
    """Leading-edge throttle with one trailing call carrying the *latest* suppressed event.

    Sans-I/O: the caller passes the time and arms a timer when ``offer`` returns a deadline, then
    calls ``fire`` at that time. A trailing call opens a new interval, like a leading one.
    """

    def __init__(self, callback: Listener, interval: float = 0.1) -> None:
        if not interval >= 0:
            raise ValueError("interval must be >= 0")
        self.callback = callback
        self.interval = interval
        self.last_call: float | None = None
        self.pending: Event | None = None
        self.deadline: float | None = None
        self.cancelled = False

    def offer(self, event: Event, now: float) -> float | None:
        """An event arrived; returns a deadline when a trailing timer must be armed."""
        if self.cancelled:
            return None
        if self.deadline is None and (self.last_call is None or now - self.last_call >= self.interval):
            self.last_call = now
            safe_call(self.callback, event)
            return None
        self.pending = event
        if self.deadline is not None:
            return None  # a timer is armed already; it will carry this (latest) event
        assert self.last_call is not None
        self.deadline = self.last_call + self.interval
        return self.deadline

    def fire(self, now: float) -> None:
        """The trailing timer expired: deliver the latest pending event, if any."""
        self.deadline = None
        event, self.pending = self.pending, None
        if event is not None and not self.cancelled:
            self.last_call = now
            safe_call(self.callback, event)

    def cancel(self) -> None:
        self.cancelled = True
        self.pending = None
        self.deadline = None
