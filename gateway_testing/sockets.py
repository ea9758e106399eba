"""The test side of a gateway WebSocket: ``WSClient`` waits for, collects and checks messages."""

from __future__ import annotations

import json
from typing import Any

import attrs
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection

__all__ = ["DEFAULT_ORIGIN", "NoMessage", "WSClient"]

#: An origin in the development allow-list; ``GatewayHandle.connect`` sends it unless told otherwise.
DEFAULT_ORIGIN = "http://localhost:5173"


class NoMessage(AssertionError):
    pass


@attrs.define(eq=False)
class WSClient:
    """A test-side WebSocket with helpers; messages are parsed JSON when they are JSON."""

    ws: WebSocketConnection
    received: list[Any] = attrs.Factory(list)

    async def send(self, text: str) -> None:
        await self.ws.send_message(text)

    async def receive(self, within: float = 5.0) -> Any:
        with trio.move_on_after(within):
            raw = await self.ws.get_message()
            try:
                value: Any = json.loads(raw)
            except (ValueError, TypeError):
                value = raw
            self.received.append(value)
            return value
        raise NoMessage(f"no message within {within} s")

    async def expect(self, event_type: str, within: float = 5.0) -> dict[str, Any]:
        """Wait for the next event of ``event_type`` (other messages are kept in ``received``)."""
        deadline = trio.current_time() + within
        while True:
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                raise NoMessage(f"no {event_type} within {within} s")
            message = await self.receive(within=remaining)
            if isinstance(message, dict) and message.get("type") == event_type:
                return message

    async def expect_nothing(self, within: float = 0.5) -> None:
        with trio.move_on_after(within):
            message = await self.ws.get_message()
            raise AssertionError(f"unexpected message: {message!r}")

    async def collect(self, within: float) -> list[Any]:
        """Everything that arrives within ``within`` seconds."""
        out: list[Any] = []
        with trio.move_on_after(within):
            while True:
                out.append(await self.receive(within=within + 1))
        return out

    async def closed(self, within: float = 5.0) -> tuple[int | None, str | None]:
        """Wait until the server closes this socket; returns (code, reason)."""
        with trio.fail_after(within):
            try:
                while True:
                    await self.ws.get_message()
            except ConnectionClosed as exc:
                reason = exc.reason
                return (reason.code if reason else None, reason.reason if reason else None)

    async def still_served(self, within: float = 5.0) -> None:
        """Ping and get exactly the pong back: the socket is open and nothing else was queued."""
        await self.ws.send_message("ping")
        with trio.fail_after(within):
            assert await self.ws.get_message() == '{"type":"pong"}'

    async def aclose(self) -> None:
        await self.ws.aclose()
