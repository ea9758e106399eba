"""Lua scripts sent with the admission round trip: ``EVALSHA``, and ``EVAL`` for those Redis does
not know (``NOSCRIPT``: a restarted or flushed Redis, a new node), in one write each.

A :class:`ScriptCall` is one script invocation waiting for its reply. Whoever queues calls (the
cluster-wide limiter) hands them to the revocation batcher through the :class:`Rider` interface,
and the batcher puts them in the same write as its ``MGET``: concurrent handshakes share one round
trip whatever they ask Redis.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Protocol

import attrs
import coredis
from coredis.exceptions import NoScriptError

from gateway.redisio import resp


@attrs.frozen
class Script:
    body: str
    sha: str = attrs.field(init=False)

    @sha.default
    def _sha(self) -> str:
        return hashlib.sha1(self.body.encode()).hexdigest()


@attrs.define(eq=False, slots=True)
class ScriptCall:
    """One invocation; ``reply`` is set when its round trip is over (None: Redis did not answer,
    or an error reply)."""

    script: Script
    keys: Sequence[str]
    args: Sequence[Any]
    reply: Any = None

    def encode(self, *, by_sha: bool = True) -> bytes:
        head = ("EVALSHA", self.script.sha) if by_sha else ("EVAL", self.script.body)
        return resp.encode(*head, len(self.keys), *self.keys, *self.args)


class Rider(Protocol):
    """Script calls that ride the revocation batcher's round trips."""

    def pending(self) -> bool:
        """Whether calls are waiting (the batcher then sends even without a principal to check)."""
        ...

    def take(self) -> list[ScriptCall]:
        """The calls to send now; :meth:`settled` follows once their replies are set."""
        ...

    def settled(self) -> None: ...


async def read_replies(conn: resp.RespConnection, count: int) -> list[Any]:
    """``count`` replies, error replies as values."""
    replies: list[Any] = []
    while len(replies) < count:
        replies += await conn.receive()
    return replies


async def call_scripts(conn: resp.RespConnection, head: Sequence[bytes], calls: Sequence[ScriptCall]) -> list[Any]:
    """Send ``head`` (plain commands) and ``calls`` in one write; the replies of ``head`` are
    returned, each call's reply is set on it. Calls Redis answered ``NOSCRIPT`` go again as
    ``EVAL`` in a second write."""
    await conn.send(*head, *(c.encode() for c in calls))
    replies = await read_replies(conn, len(head) + len(calls))
    again = []
    for call, reply in zip(calls, replies[len(head):], strict=True):
        if isinstance(reply, NoScriptError):
            again.append(call)
        else:
            call.reply = reply
    if again:
        await conn.send(*(c.encode(by_sha=False) for c in again))
        for call, reply in zip(again, await read_replies(conn, len(again)), strict=True):
            call.reply = reply
    return replies[: len(head)]


async def call_scripts_coredis(redis: coredis.Redis[bytes], calls: Sequence[ScriptCall]) -> None:
    """The same on coredis (URLs the RESP connection does not serve, e.g. TLS): one command each."""
    for call in calls:
        try:
            call.reply = await redis.evalsha(call.script.sha, list(call.keys), list(call.args))
        except NoScriptError:
            call.reply = await redis.eval(call.script.body, list(call.keys), list(call.args))
