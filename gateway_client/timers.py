"""The client's Trio timers: one pong timer per ping, and the trailing calls of throttled listeners."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Final

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

from gateway_client.listeners import Throttle, log

__all__ = ["PING_FRAME", "LiveSocket", "TrailingCalls"]

PING_FRAME: Final = '{"type":"ping"}'


class LiveSocket:
    """An open socket, the nursery of its tasks, and one pong timer per ping sent on it.

    Each ping arms its own timer (a cancel scope in the socket's nursery, so none can outlive the
    socket); each pong cancels the oldest one. A timer that fires calls ``on_timeout`` and cancels
    the socket's nursery.
    """

    def __init__(self, ws: WebSocketConnection, nursery: trio.Nursery, *, pong_timeout: float,
                 on_timeout: Callable[[], None]) -> None:
        self.ws = ws
        self.nursery = nursery
        self.pong_timeout = pong_timeout
        self.on_timeout = on_timeout
        #: One pong timer per ping, oldest first.
        self.outstanding: list[trio.CancelScope] = []

    async def heartbeat(self, interval: float) -> None:
        while True:
            await trio.sleep(interval)
            await self.ping()

    async def ping(self) -> None:
        scope = trio.CancelScope()
        self.outstanding.append(scope)  # before sending: a fast pong must find its timer
        self.nursery.start_soon(self._pong_timer, scope)
        with contextlib.suppress(ConnectionClosed):  # the reader sees the close
            await self.ws.send_message(PING_FRAME)

    def pong(self) -> None:
        if self.outstanding:
            self.outstanding.pop(0).cancel()

    async def _pong_timer(self, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep(self.pong_timeout)
            log.warning("no pong: closing", extra={"pong_timeout": self.pong_timeout})
            self.on_timeout()
            self.nursery.cancel_scope.cancel()
        if scope in self.outstanding:
            self.outstanding.remove(scope)


class TrailingCalls:
    """Times the trailing call of each throttled listener that has one pending."""

    def __init__(self) -> None:
        self.scopes: dict[Throttle, trio.CancelScope] = {}

    def arm(self, throttle: Throttle, deadline: float, nursery: trio.Nursery | None) -> None:
        if nursery is None:  # not running: nothing can time the trailing call, deliver it now
            throttle.fire(trio.current_time())
            return
        scope = trio.CancelScope(deadline=deadline)
        self.scopes[throttle] = scope
        nursery.start_soon(self._trailing, throttle, scope)

    def cancel(self, throttle: Throttle) -> None:
        scope = self.scopes.pop(throttle, None)
        if scope is not None:
            scope.cancel()

    async def _trailing(self, throttle: Throttle, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep_forever()
        # Still ours (not unsubscribed, not flushed by the end of run()): the interval is over.
        if self.scopes.get(throttle) is scope:
            del self.scopes[throttle]
            throttle.fire(trio.current_time())

    def flush(self) -> None:
        """run() ends: deliver every pending trailing event now instead of dropping it."""
        timers, self.scopes = self.scopes, {}
        for throttle, scope in timers.items():
            scope.cancel()
            throttle.fire(trio.current_time())
