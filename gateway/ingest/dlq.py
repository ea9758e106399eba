"""Inspecting and replaying the dead-letter stream (``gateway dlq list|replay``).

An entry lands in ``events:dlq`` when it failed validation, or when its routing failed on three
deliveries. Replaying appends its original ``data`` to the critical stream again (the gateways
then deliver it as a new entry) and removes it from the dead-letter stream in the same round trip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from gateway.redisio.client import STREAM_MAXLEN, xadd_capped


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


@attrs.frozen
class DeadLetter:
    id: str
    fields: dict[str, str]

    @property
    def data(self) -> str:
        return self.fields.get("data", "")

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.id, **self.fields}


async def list_dead_letters(client: Any, dlq: str, *, count: int = 100, start: str = "-") -> list[DeadLetter]:
    entries = await client.xrange(dlq, start, "+", count=count)
    return [
        DeadLetter(_text(e.identifier), {_text(k): _text(v) for k, v in e.field_values.items()}) for e in entries
    ]


async def replay_dead_letters(client: Any, dlq: str, stream: str, ids: Sequence[str] | None) -> list[str]:
    """Re-append the given entries (all when ``ids`` is None) to ``stream``; returns the replayed ids."""
    letters = await list_dead_letters(client, dlq, count=100000)
    chosen = [d for d in letters if ids is None or d.id in ids]
    chosen = [d for d in chosen if d.data]
    if not chosen:
        return []
    async with client.pipeline(transaction=False) as pipe:
        for letter in chosen:
            xadd_capped(pipe, stream, {"data": letter.data.encode()}, STREAM_MAXLEN)
        pipe.xdel(dlq, [d.id for d in chosen])
    return [d.id for d in chosen]
