"""Revocation checks of staff principals: one ``MGET`` per batch, behind the auth guard (D3, D4).

Handshakes that arrive together share one round trip: :meth:`Revocation.check_one` queues its
principal and :meth:`Revocation.batcher` (a task of the services nursery) sends everything queued
since the last ``MGET`` as one. While one ``MGET`` is in flight the next batch fills, so a storm of
N staff sockets costs a handful of round trips instead of N, and a lone handshake still pays
exactly one. Without the batcher running (a component used on its own), ``check_one`` is a
direct ``check``.

The cluster-wide limiter's script calls (lease acquisitions, releases, renewals, attempt rates)
ride the same round trips as a :class:`~gateway.access.scripts.Rider`: the batcher puts them in the
same write as its ``MGET``, so a handshake that needs both still waits for one round trip.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import attrs
import coredis
import trio
from coredis.exceptions import RedisError

from gateway.access.scripts import Rider, ScriptCall, call_scripts, call_scripts_coredis
from gateway.core.auth import is_revoked, revocation_keys
from gateway.core.model import Principal
from gateway.redisio import resp
from gateway.redisio.client import is_redis_failure
from gateway.redisio.guards import RedisGuard

REVOCATION_TIMEOUT = 2.0
#: Principals per ``MGET`` (each is one or two keys); a larger backlog goes in several.
MAX_BATCH = 512
#: Round trips start at most this often: under load, the handshakes that arrive meanwhile share
#: the next one (each round trip costs the gateway a send, a wake-up and a receive). A lone
#: handshake, with no round trip in the last interval, is sent at once.
MIN_INTERVAL = 0.005


@attrs.define(eq=False)
class _Batch:
    """Principals waiting for the same ``MGET``, and its outcome once it is known."""

    principals: list[Principal] = attrs.Factory(list)
    done: trio.Event = attrs.Factory(trio.Event)
    #: Per principal: revoked, or None when Redis could not answer. None: never sent.
    result: list[bool | None] | None = None
    error: BaseException | None = None


@attrs.define(eq=False)
class Revocation:
    redis: coredis.Redis[bytes]
    guard: RedisGuard
    _open: _Batch = attrs.Factory(_Batch)
    _wakeup: trio.Event = attrs.Factory(trio.Event)
    _batching: bool = False
    #: Where the batcher sends its ``MGET``s on a RESP connection of its own (no coredis tasks per
    #: round trip); None, or a URL ``gateway.redisio.resp`` does not serve (TLS): coredis.
    url: str | None = None
    _conn: resp.RespConnection | None = None
    #: Script calls that ride the batcher's round trips (the cluster-wide limiter), if any.
    rider: Rider | None = None

    @property
    def batching(self) -> bool:
        return self._batching

    def wake(self) -> None:
        """Have the batcher send what its rider queued, with or without principals to check."""
        self._wakeup.set()

    async def check(self, principals: Sequence[Principal], *, own_connection: bool = False,
                    calls: Sequence[ScriptCall] = ()) -> list[bool] | None:
        """Whether each principal is revoked; None when Redis cannot answer (D4). Only the batcher
        uses ``own_connection`` (its RESP connection, used by one task at a time) and ``calls``
        (sent in the same write; their replies stay None when Redis cannot answer)."""
        keys: list[str] = []
        spans: list[tuple[int, int]] = []
        for p in principals:
            ks = revocation_keys(p)
            spans.append((len(keys), len(keys) + len(ks)))
            keys.extend(ks)
        if not keys and not calls:
            return [False] * len(principals)
        if not self.guard.allow():
            return None
        values: Sequence[bytes | str | None]
        try:
            with trio.fail_after(REVOCATION_TIMEOUT):
                values = await self._mget(keys, calls) if own_connection else await self.redis.mget(keys)
        except Exception as exc:
            if own_connection:
                await self._drop_connection()
            if not is_redis_failure(exc) and not isinstance(exc, trio.TooSlowError):
                raise
            self.guard.failed(exc)
            return None
        self.guard.ok()
        return [is_revoked(p, list(values[a:b])) for p, (a, b) in zip(principals, spans, strict=True)]

    async def _mget(self, keys: list[str], calls: Sequence[ScriptCall] = ()) -> Sequence[bytes | None]:
        if self.url is None or not resp.supported(self.url):
            values = await self.redis.mget(keys) if keys else ()
            await call_scripts_coredis(self.redis, calls)
            return values
        if self._conn is None:
            self._conn = await resp.open_connection(self.url)
        replies = await call_scripts(self._conn, [resp.encode("MGET", *keys)] if keys else [], calls)
        if not keys:
            return ()
        if isinstance(replies[0], RedisError):
            raise replies[0]
        return list(replies[0])

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with trio.CancelScope(shield=True):
                await conn.aclose()

    async def check_one(self, principal: Principal) -> bool | None:
        """:meth:`check` of one principal, sharing a round trip with concurrent callers."""
        if self._batching and revocation_keys(principal):
            batch = self._open
            position = len(batch.principals)
            batch.principals.append(principal)
            self._wakeup.set()
            await batch.done.wait()
            if batch.error is not None:
                raise batch.error
            if batch.result is not None:
                return batch.result[position]
            # The batcher stopped before sending this batch: ask Redis directly.
        revoked = await self.check([principal])
        return None if revoked is None else revoked[0]

    async def batcher(self) -> None:
        """Send the queued principals' keys, one ``MGET`` at a time, for as long as the gateway runs."""
        self._batching = True
        batch = self._open
        last = float("-inf")
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup = trio.Event()
                rider = self.rider
                while self._open.principals or (rider is not None and rider.pending()):
                    pause = last + MIN_INTERVAL - trio.current_time()
                    if pause > 0:
                        await trio.sleep(pause)
                    last = trio.current_time()
                    batch, self._open = self._open, _Batch()
                    calls = rider.take() if rider is not None else []
                    try:
                        batch.result = await self._check_chunked(batch.principals, calls)
                    except Exception as exc:
                        # A bug, not an outage: each waiting handshake raises it, as it would have
                        # without batching, and the batcher goes on.
                        batch.error = exc
                    finally:
                        if rider is not None:
                            rider.settled()
                    batch.done.set()
        finally:
            self._batching = False
            if self.rider is not None:
                # The leases of the sockets closed last in a drain are given back now rather than
                # left to lapse, so their users can reconnect elsewhere at once (bounded: a stop
                # never waits on Redis for long).
                calls = self.rider.take()
                with trio.CancelScope(shield=True), trio.move_on_after(1.0), contextlib.suppress(Exception):
                    await self.check((), own_connection=True, calls=calls)
                self.rider.settled()
            await self._drop_connection()
            batch.done.set()
            self._open.done.set()

    async def _check_chunked(self, principals: Sequence[Principal], calls: Sequence[ScriptCall]) -> list[bool | None]:
        out: list[bool | None] = []
        if not principals and calls:
            await self.check((), own_connection=True, calls=calls)
        for start in range(0, len(principals), MAX_BATCH):
            chunk = principals[start : start + MAX_BATCH]
            # The script calls go with the first chunk: one round trip for every waiting handshake.
            revoked = await self.check(chunk, own_connection=True, calls=calls if start == 0 else ())
            out.extend([None] * len(chunk) if revoked is None else revoked)
        return out
