"""A minimal RESP2 connection for the hot ingestion paths, straight on a Trio stream.

coredis (on anyio, on Trio) runs a reader and a writer task per connection and hands every reply
and every pub/sub message through memory streams and cancel scopes: about half the gateway's CPU
per routed event (see docs/performance.md). The pub/sub reader only ever reads pushes once it has
subscribed, so it needs none of that: this module opens a connection the way coredis would from the
same URL (``redis://`` and ``unix://``, password, user, database), writes commands and parses every
reply already received in one pass. Anything else (TLS, commands with options, the rest of the
gateway) stays on coredis.

Failures surface as the errors ``gateway.redisio.client.is_redis_failure`` knows: ``OSError`` and
Trio's resource errors for the transport, ``EOFError`` when Redis closes the connection, coredis'
``ResponseError`` for an error reply.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
import trio
from coredis.exceptions import AuthenticationError, RedisError, ResponseError
from coredis.parser import Parser
from coredis.tokens import PureToken

_RECV = 65536


#: coredis' own mapping of error replies to exception classes (NOGROUP, UNBLOCKED, BUSYGROUP, ...).
_ERRORS = Parser()


class _Incomplete(Exception):
    """The buffer ends inside a reply."""


def supported(url: str) -> bool:
    """Whether :func:`open_connection` can serve ``url`` (else coredis does)."""
    return urlsplit(url).scheme in ("redis", "unix")


def encode(*args: Any) -> bytes:
    """One command as a RESP array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _parse(buf: bytes, pos: int) -> tuple[Any, int]:
    """One reply starting at ``pos``: (value, position after it). Error replies are returned as
    ``ResponseError`` values, not raised."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind, line = buf[pos : pos + 1], buf[pos + 1 : end]
    pos = end + 2
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, pos
        if len(buf) < pos + size + 2:
            raise _Incomplete
        return buf[pos : pos + size], pos + size + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, pos
        items = []
        for _ in range(count):
            item, pos = _parse(buf, pos)
            items.append(item)
        return items, pos
    if kind == b":":
        return int(line), pos
    if kind == b"+":
        return line, pos
    if kind == b"-":
        return _ERRORS.parse_error(line.decode(errors="replace")), pos
    raise ResponseError(f"unexpected RESP reply type {kind!r}")


def text(value: Any) -> str:
    """A bulk or simple string reply as text."""
    return value.decode() if isinstance(value, bytes) else str(value)


def raise_errors(replies: Sequence[Any]) -> None:
    """Raise the first error reply among ``replies``."""
    for reply in replies:
        if isinstance(reply, RedisError):
            raise reply


@attrs.define(eq=False)
class RespConnection:
    stream: trio.abc.Stream
    _buf: bytes = b""

    async def send(self, *commands: bytes) -> None:
        await self.stream.send_all(b"".join(commands))

    async def call(self, *commands: bytes) -> list[Any]:
        """Send ``commands`` in one write and return their replies; the first error reply is raised
        once all are read (as a coredis pipeline does)."""
        await self.send(*commands)
        replies: list[Any] = []
        while len(replies) < len(commands):
            replies += await self.receive()
        raise_errors(replies)
        return replies

    def ready(self) -> list[Any]:
        """Every complete reply already received, in order."""
        buf, pos, out = self._buf, 0, []
        while pos < len(buf):
            try:
                value, pos = _parse(buf, pos)
            except _Incomplete:
                break
            out.append(value)
        self._buf = buf[pos:]
        return out

    async def receive(self) -> list[Any]:
        """At least one reply: everything complete after the next read that completes one."""
        while True:
            replies = self.ready()
            if replies:
                return replies
            data = await self.stream.receive_some(_RECV)
            if not data:
                raise EOFError("Redis closed the connection")
            self._buf += data

    async def aclose(self) -> None:
        await self.stream.aclose()


async def open_connection(url: str, *, connect_timeout: float = 5.0) -> RespConnection:
    """Connect and authenticate as coredis would for ``url`` (see :func:`supported`)."""
    parts = urlsplit(url)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    password = unquote(parts.password) if parts.password else query.get("password")
    username = unquote(parts.username) if parts.username else query.get("username")
    if parts.scheme not in ("unix", "redis"):
        raise ValueError(f"unsupported Redis URL scheme {parts.scheme!r}")
    db = int(query.get("db") or parts.path.strip("/") or 0) if parts.scheme == "redis" else int(query.get("db") or 0)
    with trio.fail_after(connect_timeout):
        stream: trio.abc.Stream
        if parts.scheme == "unix":
            stream = await trio.open_unix_socket(parts.path)
        else:
            stream = await trio.open_tcp_stream(parts.hostname or "localhost", parts.port or 6379)
        return await _set_up(RespConnection(stream), username, password, db)


async def connect_tcp(host: str, port: int, *, username: str | None = None, password: str | None = None,
                      db: int = 0, connect_timeout: float = 5.0) -> RespConnection:
    """Connect to ``host:port`` and authenticate (a node a sentinel or a cluster map named)."""
    with trio.fail_after(connect_timeout):
        stream = await trio.open_tcp_stream(host, port)
        return await _set_up(RespConnection(stream), username, password, db)


async def _set_up(conn: RespConnection, username: str | None, password: str | None, db: int) -> RespConnection:
    try:
        setup = []
        if password:
            setup.append(encode("AUTH", username, password) if username else encode("AUTH", password))
        if db:
            setup.append(encode("SELECT", db))
        if setup:
            try:
                await conn.call(*setup)
            except ResponseError as exc:
                raise AuthenticationError(str(exc)) from None
    except BaseException:
        await conn.aclose()
        raise
    return conn


@attrs.define
class Commands:
    """Commands queued for one :meth:`RespConnection.call`, spelled like coredis' pipeline methods
    for the few the stream reader queues (``xadd_capped``, ``xack``)."""

    queued: list[bytes] = attrs.Factory(list)

    def eval(self, script: str, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> None:
        self.queued.append(encode("EVAL", script, len(keys), *keys, *args))

    def xadd(self, key: str, fields: Mapping[Any, Any], *, trim_strategy: PureToken, threshold: int,
             trim_operator: PureToken) -> None:
        flat = [part for item in fields.items() for part in item]
        self.queued.append(encode("XADD", key, trim_strategy.value, trim_operator.value, threshold, "*", *flat))

    def xack(self, key: str, group: str, identifiers: Sequence[Any]) -> None:
        self.queued.append(encode("XACK", key, group, *identifiers))
