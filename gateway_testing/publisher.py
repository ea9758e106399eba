"""``Publisher``: writes events to Redis the way Integrador's backend does."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import attrs

from gateway.core.events import encode_envelope, envelope
from gateway.redisio.client import STREAM_MAXLEN, make_client, xadd_capped

__all__ = ["Publisher", "now_iso"]


@attrs.define(eq=False)
class Publisher:
    """Writes events the way the backend does: XADD to the stream, PUBLISH to channels."""

    redis_url: str
    stream: str = "events:critical"

    async def _run(self, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        client = make_client(self.redis_url)
        async with client:
            return await fn(client)

    async def stream_event(self, env: Mapping[str, Any] | bytes) -> str:
        payload = env if isinstance(env, bytes) else encode_envelope(env)
        entry = await self._run(lambda c: xadd_capped(c, self.stream, {"data": payload}, STREAM_MAXLEN))
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    async def channel_event(self, channel: str, env: Mapping[str, Any] | bytes) -> int:
        payload = env if isinstance(env, bytes) else encode_envelope(env)
        return int(await self._run(lambda c: c.publish(channel, payload)))

    async def many(self, items: Sequence[tuple[str | None, Mapping[str, Any] | bytes]]) -> None:
        """Several events in one pipelined round trip; channel None means the stream."""
        async def send(client: Any) -> None:
            async with client.pipeline(transaction=False) as pipe:
                for channel, env in items:
                    payload = env if isinstance(env, bytes) else encode_envelope(env)
                    if channel is None:
                        xadd_capped(pipe, self.stream, {"data": payload}, STREAM_MAXLEN)
                    else:
                        pipe.publish(channel, payload)
        await self._run(send)

    envelope = staticmethod(envelope)


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
