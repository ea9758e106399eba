"""The Redis client and what every Redis path shares: the client factory, capped appends and
the one rule for telling a Redis outage from a bug."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import anyio
import coredis
import trio
from coredis.exceptions import (
    RedisError,
    StreamConsumerGroupError,
    StreamDuplicateConsumerGroupError,
    UnblockedError,
)
from coredis.tokens import PureToken

#: Cap of the critical stream, as the backend writes it (``XADD ... MAXLEN ~ 50000``).
STREAM_MAXLEN = 50000
DLQ_MAXLEN = 1000


def xadd_capped(target: Any, key: str, fields: Mapping[str, Any], maxlen: int, *, approximate: bool = True) -> Any:
    """``XADD key MAXLEN [~|=] maxlen * field value ...`` on a client or a pipeline."""
    return target.xadd(
        key,
        fields,
        trim_strategy=PureToken.MAXLEN,
        threshold=maxlen,
        trim_operator=PureToken.APPROXIMATELY if approximate else PureToken.EQUAL,
    )


def is_redis_failure(exc: BaseException) -> bool:
    """True for errors that mean "Redis is unreachable or misbehaving", also inside groups."""
    if isinstance(exc, BaseExceptionGroup):
        return all(is_redis_failure(e) for e in exc.exceptions)
    # coredis runs on anyio: a connection dropped under it surfaces as anyio's resource errors.
    return isinstance(
        exc,
        RedisError | OSError | TimeoutError | trio.BrokenResourceError | EOFError
        | anyio.ClosedResourceError | anyio.BrokenResourceError | anyio.EndOfStream,
    )


def strip_redis_failures(exc: BaseException) -> BaseException | None:
    """``exc`` without its Redis-failure leaves; None when nothing else is left.

    Cancelling a task inside coredis' pub/sub context can raise a group that holds both the
    cancellation and a connection error from coredis' own clean-up: the cancellation must go on,
    the connection error is noise.
    """
    if isinstance(exc, BaseExceptionGroup):
        _, rest = exc.split(lambda e: not isinstance(e, BaseExceptionGroup) and is_redis_failure(e))
        return rest
    return None if is_redis_failure(exc) else exc


def group_missing(exc: BaseException) -> bool:
    """NOGROUP (the stream or the group was deleted), or a blocked XREADGROUP cut short because
    its stream was deleted (UNBLOCKED). Redis answered: this is not an outage.

    coredis maps these replies to their own classes, which are not ``ResponseError`` and whose
    message no longer carries the error code.
    """
    if isinstance(exc, StreamDuplicateConsumerGroupError):
        return False
    return isinstance(exc, StreamConsumerGroupError | UnblockedError)


def raise_unless_redis_failure(exc: BaseException) -> None:
    """Return when ``exc`` is only a Redis failure (the caller backs off); raise anything else."""
    rest = strip_redis_failures(exc)
    if rest is exc:
        raise exc
    if rest is not None:
        raise rest from None


def ready_messages(pubsub: Any, limit: int) -> list[Any]:
    """Up to ``limit`` pub/sub messages coredis has already received, without waiting.

    coredis hands messages over one ``get_message`` (a cancel scope and a checkpoint) at a time and
    has no call for "everything that is there"; this takes them from the same memory stream
    ``get_message`` reads, so they come in the same order. A closed stream yields nothing here; the
    next ``get_message`` reports it.
    """
    stream = getattr(pubsub, "_receive_stream", None)
    out: list[Any] = []
    while stream is not None and len(out) < limit:
        try:
            out.append(stream.receive_nowait())
        except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            break
    return out


def make_client(url: str) -> coredis.Redis[bytes]:
    return coredis.Redis.from_url(url, decode_responses=False, connect_timeout=5.0, stream_timeout=10.0)
