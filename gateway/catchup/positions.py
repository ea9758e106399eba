"""The positions of protocol v2 (D20): each event appended once to its stream *before* fan-out.

Every delivered event is appended to ``gw:catchup:<tenant>:<branch>`` (``branch`` 0 for events to
a whole tenant) by one Lua call per batch, before its frames are encoded: the v2 frame carries
the entry's id. A guard key per event (``SET`` once, holding the id) makes every instance get the
same id for the same event whoever appended it. Each stream has an epoch key, replaced whenever
the stream is created anew (first append, after a flush or an expiry, or after this gateway
failed to append to it), so a position from a store that was lost since is recognised.

Retention: an entry is trimmed only once it is both older than ``window`` seconds and not among
the newest ``max_events`` of its stream, so the store holds whichever of the two is more. A stream
and its epoch key expire ``ttl`` seconds after the last append.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import secrets
from collections.abc import Sequence
from typing import Any

import attrs
import coredis
import trio
from coredis.exceptions import NoScriptError

from gateway.catchup.store import catchup_key
from gateway.core.model import Event
from gateway.core.positions import (
    Position,
    StreamId,
    format_stream_id,
    make_offset,
    parse_stream_id,
    stream_name,
)
from gateway.redisio import resp
from gateway.redisio.client import is_redis_failure
from gateway.redisio.guards import RedisGuard
from gateway.redisio.topology import Topology

log = logging.getLogger("gateway.positions")

# KEYS: guard, stream, epoch per event. ARGV: guard ttl, stream ttl, max_events, window ms,
# a fresh epoch, then per event: its payload and "1" when its stream must start a new epoch.
# Returns the id and the epoch of each event, in order.
_ASSIGN = """
local guard_ttl, ttl, keep, window = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local fresh, out = ARGV[5], {}
local now = redis.call('TIME')
local cutoff = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - window
for i = 1, #KEYS, 3 do
  local n = (i + 2) / 3
  local payload, reset = ARGV[4 + 2 * n], ARGV[5 + 2 * n]
  local guard, stream, epochkey = KEYS[i], KEYS[i + 1], KEYS[i + 2]
  local id = redis.call('GET', guard)
  if not id then
    if reset == '1' or redis.call('EXISTS', stream) == 0 then
      redis.call('SET', epochkey, fresh)
    end
    id = redis.call('XADD', stream, '*', 'data', payload)
    redis.call('SET', guard, id, 'EX', guard_ttl)
    local len = redis.call('XLEN', stream)
    if len > keep then
      local old = redis.call('XRANGE', stream, '-', tostring(cutoff - 1), 'COUNT', math.min(len - keep, 64))
      if #old > 0 then
        redis.call('XTRIM', stream, 'MAXLEN', len - #old)
        -- XTRIM leaves max-deleted-entry-id alone; readers judge a position by it.
        redis.call('XSETID', stream, id, 'MAXDELETEDID', old[#old][1])
      end
    end
    redis.call('EXPIRE', stream, ttl)
  end
  local epoch = redis.call('GET', epochkey)
  if not epoch then
    epoch = fresh
    redis.call('SET', epochkey, fresh)
  end
  redis.call('EXPIRE', epochkey, ttl)
  out[#out + 1] = id
  out[#out + 1] = epoch
end
return out
"""

# KEYS: stream, epoch. ARGV: epoch, after (exclusive), before (exclusive, or "+"), count.
# Returns {status, max deleted id, last id, entries}; status "ok", "epoch" or "gone".
_READ = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return {'epoch'} end
if redis.call('EXISTS', KEYS[1]) == 0 then return {'gone'} end
local info = redis.call('XINFO', 'STREAM', KEYS[1])
local maxdel, last = '0-0', '0-0'
for i = 1, #info, 2 do
  if info[i] == 'max-deleted-entry-id' then maxdel = info[i + 1] end
  if info[i] == 'last-generated-id' then last = info[i + 1] end
end
local stop = ARGV[3]
if stop ~= '+' then stop = '(' .. stop end
return {'ok', maxdel, last, redis.call('XRANGE', KEYS[1], '(' .. ARGV[2], stop, 'COUNT', ARGV[4])}
"""

@functools.cache
def _sha(script: str) -> str:
    """The script's SHA1, as ``EVALSHA`` names it: the script's text (1.3 kB for the append) is
    sent once per server, not with every batch of every instance."""
    return hashlib.sha1(script.encode()).hexdigest()


#: Events per assignment call: bounds the time Redis spends in one script.
ASSIGN_CHUNK = 200
#: How long one assignment may take before its events go out without positions.
ASSIGN_TIMEOUT = 1.0
READ_TIMEOUT = 2.0


def epoch_key(tenant_id: int, branch_id: int, *, tagged: bool = False) -> str:
    return f"gw:catchup:epoch:{{{tenant_id}:{branch_id}}}" if tagged else f"gw:catchup:epoch:{tenant_id}:{branch_id}"


def guard_key(tenant_id: int, branch_id: int, digest: str, *, tagged: bool = False) -> str:
    # Untagged, the guard names no branch: an event goes to one stream, so the name is unique anyway.
    return f"gw:catchup:pos:{{{tenant_id}:{branch_id}}}:{digest}" if tagged else f"gw:catchup:pos:{tenant_id}:{digest}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@attrs.frozen
class Page:
    """One read of a stream after a position: ``status`` "ok", "epoch" (the store was lost
    since) or "gone"; the oldest position still held is after ``max_deleted``."""

    status: str
    max_deleted: StreamId = (0, 0)
    last: StreamId = (0, 0)
    entries: tuple[tuple[StreamId, bytes], ...] = ()


@attrs.define(eq=False)
class PositionStore:
    redis: coredis.Redis[bytes]
    guard: RedisGuard
    window: float
    max_events: int
    ttl: int
    dedup_ttl: int
    #: Streams whose appends failed: their next append starts a new epoch.
    gaps: set[tuple[int, int]] = attrs.Factory(set)
    #: Where appends go on connections of the store's own (``gateway.redisio.resp``: one append
    #: round trip per batch and node on the hot path); None, or a deployment that module does not
    #: serve (TLS): through coredis. On a cluster (``topology.clustered``) every stream's keys
    #: share a hash tag, and a batch is one script call per stream, sent to its node.
    topology: Topology | None = None
    #: Open connections by node (None: the one master).
    _conns: dict[str | None, resp.RespConnection] = attrs.Factory(dict)

    @property
    def tagged(self) -> bool:
        return self.topology is not None and self.topology.clustered

    async def assign(self, events: Sequence[Event]) -> list[Position | None]:
        """Append ``events`` (once across instances) and return their positions, in order.

        Never raises for Redis trouble: the events then get no position (their v2 frames are not
        resumable) and their streams start a new epoch at the next append, so a position from
        before the gap answers ``recovered:false`` rather than silently missing them.
        """
        if not events:
            return []
        streams = {(e.tenant_id, max(e.branch_id, 0)) for e in events}
        if not self.guard.allow():
            self.gaps |= streams
            return [None] * len(events)
        out: list[Position | None] = []
        try:
            with trio.fail_after(ASSIGN_TIMEOUT):
                for start in range(0, len(events), ASSIGN_CHUNK):
                    out += await self._assign_chunk(events[start : start + ASSIGN_CHUNK])
        except Exception as exc:
            # A call cut short leaves its reply unread on the connection: never reuse it.
            await self._drop_connection()
            if not (is_redis_failure(exc) or isinstance(exc, trio.TooSlowError)):
                raise
            self.guard.failed(exc)
            self.gaps |= streams
            log.warning("positions not assigned: those events are not resumable",
                        extra={"events": len(events), "error": type(exc).__name__})
            return out + [None] * (len(events) - len(out))
        self.guard.ok()
        return out

    async def _assign_chunk(self, events: Sequence[Event]) -> list[Position | None]:
        # One script call per group of events whose keys share a slot: all of them on one server,
        # one per stream on a cluster.
        tagged = self.tagged
        groups: dict[tuple[int, int] | None, list[int]] = {}
        for i, event in enumerate(events):
            groups.setdefault((event.tenant_id, max(event.branch_id, 0)) if tagged else None, []).append(i)
        fresh = secrets.token_hex(4)
        resets: list[tuple[int, int]] = []
        calls: list[tuple[list[int], list[str], list[str | bytes | int]]] = []
        for indexes in groups.values():
            keys: list[str] = []
            args: list[str | bytes | int] = [self.dedup_ttl, self.ttl, self.max_events, int(self.window * 1000), fresh]
            for i in indexes:
                event = events[i]
                tenant, branch = event.tenant_id, max(event.branch_id, 0)
                digest = hashlib.blake2b(event.frame_payload, digest_size=16).hexdigest()
                keys += [guard_key(tenant, branch, digest, tagged=tagged), catchup_key(tenant, branch, tagged=tagged),
                         epoch_key(tenant, branch, tagged=tagged)]
                reset = (tenant, branch) in self.gaps
                if reset:
                    resets.append((tenant, branch))
                args += [event.frame_payload, "1" if reset else "0"]
            calls.append((indexes, keys, args))
        replies = await self._eval_all(_ASSIGN, [(keys, args) for _i, keys, args in calls])
        self.gaps.difference_update(resets)
        out: list[Position | None] = [None] * len(events)
        for (indexes, _k, _a), reply in zip(calls, replies, strict=True):
            assert isinstance(reply, list)
            for n, i in enumerate(indexes):
                sid = parse_stream_id(_text(reply[2 * n]))
                if sid is not None:
                    event = events[i]
                    epoch = _text(reply[2 * n + 1])
                    out[i] = Position(stream_name(event.tenant_id, event.branch_id), sid, make_offset(epoch, sid))
        return out

    async def _eval_all(self, script: str, calls: list[tuple[list[str], list[str | bytes | int]]]) -> list[Any]:
        """Run ``script`` once per (keys, args), in one write per node; the replies in order."""
        topology = self.topology
        if topology is None or not topology.raw:
            return [await self.redis.eval(script, keys=keys, args=args) for keys, args in calls]
        by_node: dict[str | None, list[int]] = {}
        for n, (keys, _args) in enumerate(calls):
            by_node.setdefault(await topology.node_of(keys[1]), []).append(n)
        replies: list[Any] = [None] * len(calls)
        for node, numbers in by_node.items():
            conn = self._conns.get(node)
            if conn is None:
                key = calls[numbers[0]][0][1]
                conn = await topology.connect(key)
                # Named after the map the connection was opened with (a cluster's map is read
                # again at every connection), not the older one the batch was grouped with.
                fresh = await topology.node_of(key)
                if fresh in self._conns:
                    await conn.aclose()
                    conn = self._conns[fresh]
                else:
                    self._conns[fresh] = conn
            try:
                answers = await conn.call(*(resp.encode("EVALSHA", _sha(script), len(calls[n][0]), *calls[n][0],
                                                        *calls[n][1]) for n in numbers))
            except NoScriptError:
                # Not in this server's script cache (a restart, a failover, another node): EVAL
                # runs it and caches it. Nothing ran: every call of the write was refused alike.
                answers = await conn.call(*(resp.encode("EVAL", script, len(calls[n][0]), *calls[n][0], *calls[n][1])
                                            for n in numbers))
            for n, answer in zip(numbers, answers, strict=True):
                replies[n] = answer
        return replies

    async def close(self) -> None:
        await self._drop_connection()

    async def _drop_connection(self) -> None:
        conns, self._conns = list(self._conns.values()), {}
        with trio.CancelScope(shield=True):
            for conn in conns:
                await conn.aclose()

    async def read_after(self, tenant_id: int, branch_id: int, epoch: str, after: StreamId,
                         before: StreamId | None, count: int) -> Page:
        """Up to ``count`` entries after ``after`` (and before ``before``), if the epoch holds."""
        with trio.fail_after(READ_TIMEOUT):
            reply = await self.redis.eval(
                _READ, keys=[catchup_key(tenant_id, branch_id, tagged=self.tagged),
                             epoch_key(tenant_id, branch_id, tagged=self.tagged)],
                args=[epoch, format_stream_id(after), "+" if before is None else format_stream_id(before), count])
        assert isinstance(reply, list)
        status = _text(reply[0])
        if status != "ok":
            return Page(status)
        entries: list[tuple[StreamId, bytes]] = []
        for entry in reply[3]:
            sid = parse_stream_id(_text(entry[0]))
            fields = entry[1]
            data = next((fields[i + 1] for i in range(0, len(fields) - 1, 2) if fields[i] == b"data"), None)
            if sid is not None and isinstance(data, bytes):
                entries.append((sid, data))
        return Page(status, parse_stream_id(_text(reply[1])) or (0, 0), parse_stream_id(_text(reply[2])) or (0, 0),
                    tuple(entries))
