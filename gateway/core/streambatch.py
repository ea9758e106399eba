"""The stream consumer's decisions, without I/O: what to route, acknowledge, dead-letter or retry.

``gateway.ingest.readers.StreamConsumer`` reads ``events:critical`` through this instance's consumer group
and does the Redis round trips; every choice it makes about the entries is taken here, over plain
values (entry ids and ``data`` fields as Redis returned them, delivery counts, clocks passed in):

- a read batch splits into valid events, routed and then acknowledged, and invalid entries,
  acknowledged and moved to the dead-letter stream at once (:func:`sort_batch`);
- reclaimed entries delivered ``MAX_DELIVERIES`` times go to the dead-letter stream, the others
  are routed again (:func:`split_claimed`);
- a dead letter's stream fields (:func:`dlq_fields`);
- where a consumer group recreated after NOGROUP starts reading (:func:`restart_id`);
- which other instances' groups are stale and may be destroyed (:class:`StaleGroups`, D14).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from gateway.core.events import InvalidEvent, parse_event
from gateway.core.model import Event

#: Deliveries after which a reclaimed entry goes to the dead-letter stream instead of routing.
MAX_DELIVERIES = 3

#: A stream entry id as Redis returned it: ``bytes`` from the gateway's client, ``str`` elsewhere.
EntryId = Any
#: One stream entry: its id and its ``data`` field (``b""`` when the field is missing).
Entry = tuple[EntryId, Any]


def text(value: Any) -> str:
    """A Redis reply value as text: bytes are decoded (bad UTF-8 replaced), anything else str()."""
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def entry_ms(entry_id: str) -> int:
    """The millisecond part of a stream id; 0 when it has none."""
    try:
        return int(entry_id.split("-", 1)[0])
    except ValueError:
        return 0


@attrs.frozen
class DeadLetter:
    """A stream entry bound for the dead-letter stream."""

    entry_id: EntryId
    data: Any
    #: The dead letter's ``error`` field.
    error: str
    #: Its ``retry_count`` field: how often the entry was delivered.
    deliveries: int


@attrs.frozen
class InvalidEntry:
    """An entry validation rejected: counted and logged by ``reason``, then dead-lettered."""

    letter: DeadLetter
    reason: str


@attrs.frozen
class SortedBatch:
    """One read batch, sorted: events to route (with their entry ids) and invalid entries."""

    valid: list[tuple[EntryId, Event]]
    invalid: list[InvalidEntry]

    @property
    def dead(self) -> list[DeadLetter]:
        return [i.letter for i in self.invalid]


def sort_batch(entries: Iterable[Entry], *, max_size: int) -> SortedBatch:
    """Validate every entry of a batch, in order; invalid ones become dead letters (1 delivery)."""
    valid: list[tuple[EntryId, Event]] = []
    invalid: list[InvalidEntry] = []
    for entry_id, raw in entries:
        try:
            event = parse_event(raw, max_size=max_size)
        except InvalidEvent as exc:
            data = raw if isinstance(raw, bytes) else b""
            invalid.append(InvalidEntry(DeadLetter(entry_id, data, f"invalid: {exc.reason}", 1), exc.reason))
            continue
        valid.append((entry_id, event))
    return SortedBatch(valid, invalid)


def last_entry_id(entries: Sequence[Entry]) -> str | None:
    """The id of a batch's last entry as text (where the group resumes after NOGROUP); None if empty."""
    return text(entries[-1][0]) if entries else None


def ack_ids(acked: Sequence[EntryId], dead: Sequence[DeadLetter]) -> list[EntryId]:
    """The ids one XACK acknowledges after a batch: the routed entries, then the dead letters."""
    return list(acked) + [d.entry_id for d in dead]


def split_claimed(
    claimed: Iterable[Entry], deliveries: Mapping[str, int], *, max_deliveries: int = MAX_DELIVERIES
) -> tuple[list[Entry], list[DeadLetter]]:
    """Reclaimed entries → (route again, dead-letter), in order.

    ``deliveries`` maps entry ids (as text) to their delivery counts from XPENDING; an entry not in
    it counts as delivered once.
    """
    retry: list[Entry] = []
    dead: list[DeadLetter] = []
    for entry_id, raw in claimed:
        count = deliveries.get(text(entry_id))
        if (1 if count is None else count) >= max_deliveries:
            dead.append(DeadLetter(entry_id, raw, f"routing failed {max_deliveries} times", count or 0))
        else:
            retry.append((entry_id, raw))
    return retry, dead


def dlq_fields(letter: DeadLetter, *, stream: str, consumer: str, failed_at: float) -> dict[str, Any]:
    """The fields of ``letter``'s entry in the dead-letter stream, in their order on the wire."""
    return {
        "original_id": text(letter.entry_id),
        "original_stream": stream,
        "data": letter.data,
        "retry_count": str(letter.deliveries),
        "failed_at": repr(failed_at),
        "consumer": consumer,
        "error": letter.error,
    }


def restart_id(last_id: str | None, *, now: float, catchup_window: float) -> str:
    """Where a group recreated after NOGROUP starts: after the last entry this instance processed,
    but never before the catch-up window (``now`` is wall-clock seconds)."""
    window_start_ms = int((now - catchup_window) * 1000)
    if last_id is not None and entry_ms(last_id) >= window_start_ms:
        return last_id
    return f"{window_start_ms}-0"


def group_name(group: Mapping[Any, Any]) -> str:
    """A group's name from one XINFO GROUPS entry (bytes or text keys)."""
    return text(group.get(b"name", group.get("name", b"")))


def idle_times(consumers: Iterable[Mapping[Any, Any]]) -> list[int]:
    """Every consumer's idle time in ms from an XINFO CONSUMERS reply (bytes or text keys)."""
    return [int(c.get(b"idle", c.get("idle", 0)) or 0) for c in consumers]


def other_instance_group(name: str, *, prefix: str, own: str) -> bool:
    """True for the groups of this gateway's other instances (``<prefix>:...``), never our own."""
    return name.startswith(prefix + ":") and name != own


@attrs.define
class StaleGroups:
    """Which other instances' consumer groups have been idle too long (D14).

    A group is stale when all its consumers have been idle for ``stale_after`` seconds. A group
    with no consumer (created, never read) has no idle time: it is timed from when it was first
    seen without one, which is the state kept here.
    """

    _consumerless: dict[str, float] = attrs.Factory(dict)

    def stale(self, name: str, idle_ms: Sequence[int], *, now: float, stale_after: float) -> bool:
        """Whether group ``name``, whose consumers have idled ``idle_ms``, is stale at ``now``
        (a monotonic clock, in seconds). A stale group is forgotten here."""
        if idle_ms:
            stale = min(idle_ms) >= stale_after * 1000
        else:
            first_seen = self._consumerless.setdefault(name, now)
            stale = now - first_seen >= stale_after
        if stale:
            self._consumerless.pop(name, None)
        return stale
