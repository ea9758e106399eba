"""Limits across the cluster (D23): leases for the per-user and per-session socket limits, and
connection attempt rates per user and per client address, shared by every instance on one Redis.

**Leases.** Each admitted socket holds a lease: a member ``<instance>:<boot>:<n>`` of the sorted
set named after its user (staff) or table session (diners), scored by its expiry in Redis' own
clock. One Lua script per admission (:data:`ADMIT`) drops expired members, counts the rest against
the limit and adds the new one, atomically; it also counts the attempt in the user's rate. Every
``GATEWAY_LEASE_TTL / 3`` the instance renews all its leases: one script call per user or session,
pipelined, up to :data:`RENEW_CHUNK` of them per round trip (one round trip for up to 500 users or
sessions, however many sockets each has), and a closing socket's lease is removed in the next
round trip. A
killed instance renews nothing: its sockets stop counting within ``GATEWAY_LEASE_TTL``.

**Round trips.** Nothing here talks to Redis itself: the calls queue here and ride the revocation
batcher's next write (:class:`~gateway.access.scripts.Rider`), next to its ``MGET``, so a storm of
handshakes costs a handful of round trips, however many of them need a lease, a revocation check or
both.

**Rates.** An attempt is first counted in this process (:class:`~gateway.core.limits.LocalRates`,
before the token is even looked at): over the limit here means over it in the cluster, so a
hammering client is refused for a dictionary lookup. Attempts that pass are counted in Redis too
(the client address by :data:`RATE`, the user inside :data:`ADMIT`); a cluster-wide refusal is
remembered here until its Retry-After ends, so the next attempts stop at the first check again.

**Redis unavailable.** A lease request Redis did not answer admits the socket on the per-process
limits alone (D4, D17): the limiter never locks everyone out. Its lease is added by the next
renewal once Redis answers again, so it counts from then on.
"""

from __future__ import annotations

import itertools
import logging
import secrets
import time
from collections.abc import Iterator

import attrs
import trio

from gateway.access.revocation import Revocation
from gateway.access.scripts import Script, ScriptCall
from gateway.core.clientip import Network, is_trusted
from gateway.core.limits import (
    RATE_IP,
    RATE_USER,
    LeaseBook,
    LocalRates,
    ip_tag,
    limit_tag,
    rate_key,
    retry_after,
    retry_seconds,
)
from gateway.core.model import Principal
from gateway.metrics import Metrics
from gateway.settings import Settings

log = logging.getLogger("gateway.server")

#: Lease keys renewed per round trip: a renewal of many keys is spread over several round trips
#: so that it never holds the event loop for long (10,000 keys take about 50 ms to encode).
RENEW_CHUNK = 500

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
# The sliding-window estimate of gateway.core.limits (``admits``), in Redis: of ``n`` attempts
# arriving together, {how many pass (and are counted), previous count, current count after them,
# ms into the current window}.
_RATE = """
local function rate(key, limit, window, n)
  if limit <= 0 then return {n, 0, 0, 0} end
  local idx = math.floor(now / window)
  local cur = tonumber(redis.call('HGET', key, idx) or '0')
  local prev = tonumber(redis.call('HGET', key, idx - 1) or '0')
  local elapsed = now - idx * window
  local passed = math.max(0, math.min(n, math.ceil(limit - (prev * (window - elapsed) / window + cur))))
  if passed == 0 then return {0, prev, cur, elapsed} end
  redis.call('HINCRBY', key, idx, passed)
  if redis.call('HLEN', key) > 2 then
    for _, f in ipairs(redis.call('HKEYS', key)) do
      if tonumber(f) < idx - 1 then redis.call('HDEL', key, f) end
    end
  end
  redis.call('PEXPIRE', key, 2 * window)
  return {passed, prev, cur + passed, elapsed}
end
"""
#: KEYS: the lease set, the user's rate; ARGV: member, limit, ttl ms, rate limit, window ms.
#: Reply {0,...}: leased; {1,...}: at the limit; {2, prev, cur, elapsed}: over the rate.
ADMIT = Script(_NOW + _RATE + """
local r = rate(KEYS[2], tonumber(ARGV[4]), tonumber(ARGV[5]), 1)
if r[1] == 0 then return {2, r[2], r[3], r[4]} end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return {1, 0, 0, 0} end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {0, 0, 0, 0}
""")
#: KEYS: a client address' rate; ARGV: rate limit, window ms, attempts. The attempts of one address
#: in one round trip go as one call (many clients behind one NAT address reconnecting together).
#: Reply {attempts passed, prev, cur, elapsed}: the first ones queued pass.
RATE = Script(_NOW + _RATE + """
return rate(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]))
""")
#: KEYS: a lease set; ARGV: ttl ms, members. Adds members that are gone (a Redis that lost them).
RENEW = Script(_NOW + """
local expiry = now + tonumber(ARGV[1])
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], expiry, ARGV[i]) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 0
""")
#: KEYS: a lease set; ARGV: members.
RELEASE = Script("return redis.call('ZREM', KEYS[1], unpack(ARGV))")


@attrs.frozen
class LimitSettings:
    per_user: int
    per_session: int
    lease_ttl: float
    rate_user: int
    rate_ip: int
    rate_window: float

    @classmethod
    def of(cls, s: Settings) -> LimitSettings:
        return cls(s.max_connections_per_user, s.max_connections_per_session, s.lease_ttl,
                   s.connect_rate_per_user, s.connect_rate_per_ip, s.connect_rate_window)


@attrs.define(eq=False, slots=True)
class Lease:
    key: str
    member: str
    released: bool = False


@attrs.frozen
class Grant:
    """The limiter's answer to one admission: a refusal (with its Retry-After), or a lease (None
    when Redis did not answer: the per-process limits alone apply)."""

    refusal: str | None = None
    retry_after: int | None = None
    lease: Lease | None = None


@attrs.define(eq=False, slots=True)
class _AddressAttempts:
    """The attempts of one client address queued for the same round trip: one RATE call."""

    client: str
    count: int = 0
    call: ScriptCall | None = None

    def refused(self, position: int) -> tuple[int, int, int] | None:
        """(prev, cur, elapsed ms) if the attempt queued at ``position`` did not pass."""
        reply = self.call.reply if self.call is not None else None
        if isinstance(reply, list) and len(reply) == 4 and position >= int(reply[0]):
            return int(reply[1]), int(reply[2]), int(reply[3])
        return None


@attrs.define(eq=False, slots=True)
class Request:
    """A lease request queued for the next round trip."""

    tag: str
    client: str
    admit: ScriptCall | None
    address: _AddressAttempts | None
    position: int
    settled: trio.Event


def _refused(reply: object) -> tuple[int, int, int] | None:
    """(prev, cur, elapsed ms) of ADMIT's rate refusal reply."""
    if isinstance(reply, list) and len(reply) == 4 and reply[0] == 2:
        return int(reply[1]), int(reply[2]), int(reply[3])
    return None


@attrs.define(eq=False)
class ClusterLimiter:
    """The attempt rates and leases of one instance (see the module docstring)."""

    settings: LimitSettings
    metrics: Metrics
    #: Where calls ride (and whom to wake when some are queued).
    batcher: Revocation
    #: ``<instance id>:<nonce of this process>``; lease members are ``<instance>:<n>``, so a
    #: restarted instance never mistakes its previous life's leases for its own.
    instance: str
    trusted: tuple[Network, ...] = ()
    book: LeaseBook = attrs.Factory(LeaseBook)
    ip_rates: LocalRates = attrs.field(init=False)
    user_rates: LocalRates = attrs.field(init=False)
    _queued: list[ScriptCall] = attrs.Factory(list)
    _addresses: dict[str, _AddressAttempts] = attrs.Factory(dict)
    _releases: dict[str, list[str]] = attrs.Factory(dict)
    _renewing: list[str] = attrs.Factory(list)
    _settled: trio.Event = attrs.Factory(trio.Event)
    _taken: trio.Event = attrs.Factory(trio.Event)
    _ids: Iterator[int] = attrs.Factory(lambda: itertools.count(1))

    def __attrs_post_init__(self) -> None:
        s = self.settings
        self.ip_rates = LocalRates(s.rate_ip, s.rate_window)
        self.user_rates = LocalRates(s.rate_user, s.rate_window)

    @classmethod
    def build(cls, settings: Settings, metrics: Metrics, batcher: Revocation,
              trusted: tuple[Network, ...]) -> ClusterLimiter:
        limiter = cls(LimitSettings.of(settings), metrics, batcher, f"{settings.instance_id}:{secrets.token_hex(4)}",
                      trusted)
        batcher.rider = limiter
        return limiter

    # --- the checks of one admission, in order -------------------------------------------------
    def _counts_ip(self, client: str) -> bool:
        return bool(self.settings.rate_ip) and not (self.trusted and is_trusted(client, self.trusted))

    def check_ip(self, client: str) -> Grant | None:
        """This process' count of the client address' attempts: the first check of a handshake."""
        if not self._counts_ip(client):
            return None
        wait = self.ip_rates.attempt(client, time.monotonic())
        return self._rate_refusal(RATE_IP, "process", wait) if wait else None

    def check_user(self, principal: Principal) -> Grant | None:
        """This process' count of the user's (the table session's) attempts, once the token is known."""
        wait = self.user_rates.attempt(limit_tag(principal), time.monotonic())
        return self._rate_refusal(RATE_USER, "process", wait) if wait else None

    def request(self, principal: Principal, client: str) -> Request:
        """Queue the lease (and the cluster-wide rate counts) for the next round trip; never
        checkpoints, so a revocation check queued right after rides the same write."""
        s = self.settings
        tag = limit_tag(principal)
        window = int(s.rate_window * 1000)
        admit: ScriptCall | None = None
        address: _AddressAttempts | None = None
        position = 0
        if self.batcher.batching:
            limit = s.per_session if principal.is_diner else s.per_user
            admit = ScriptCall(ADMIT, (tag, rate_key(tag)),
                               (f"{self.instance}:{next(self._ids)}", limit, int(s.lease_ttl * 1000), s.rate_user, window))
            self._queued.append(admit)
            if self._counts_ip(client):
                address = self._addresses.get(client)
                if address is None:
                    address = self._addresses[client] = _AddressAttempts(client)
                position = address.count
                address.count += 1
            self.batcher.wake()
        return Request(tag, client, admit, address, position, self._settled)

    async def grant(self, request: Request) -> Grant:
        """The outcome of a queued request, once its round trip is over."""
        if request.admit is None:
            self.metrics.limits_local_only.inc()
            return Grant()
        await request.settled.wait()
        now = time.monotonic()
        lease: Lease | None = None
        refusal: Grant | None = None
        reply = request.admit.reply
        if isinstance(reply, list) and reply and reply[0] == 0:
            lease = Lease(request.tag, str(request.admit.args[0]))
            self.book.add(lease.key, lease.member)
            self.metrics.leases.inc()
        elif isinstance(reply, list) and reply and reply[0] == 1:
            refusal = Grant(refusal="limit_session" if ":session:" in request.tag else "limit_user")
        elif (counts := _refused(reply)) is not None:
            refusal = self._cluster_rate_refusal(RATE_USER, request.tag, counts, self.settings.rate_user, now)
        else:
            # Redis did not answer: admitted on the per-process limits; the lease is in the book,
            # so the next renewal that Redis answers adds it.
            self.metrics.limits_local_only.inc()
            lease = Lease(request.tag, str(request.admit.args[0]))
            self.book.add(lease.key, lease.member)
            self.metrics.leases.inc()
        counts = request.address.refused(request.position) if request.address is not None else None
        if counts is not None:
            refusal = self._cluster_rate_refusal(RATE_IP, request.client, counts, self.settings.rate_ip, now)
        if refusal is not None:
            self.release(lease)
            return refusal
        return Grant(lease=lease)

    def _cluster_rate_refusal(self, scope: str, key: str, counts: tuple[int, int, int], limit: int,
                              now: float) -> Grant:
        prev, cur, elapsed_ms = counts
        window = self.settings.rate_window
        wait = max(retry_after(prev, cur, elapsed_ms / 1000, limit, window), 1e-3)
        (self.ip_rates if scope == RATE_IP else self.user_rates).block(key, now + wait)
        return self._rate_refusal(scope, "cluster", wait)

    def _rate_refusal(self, scope: str, decided: str, wait: float) -> Grant:
        self.metrics.rate_refusals.labels("ip" if scope == RATE_IP else "user", decided).inc()
        return Grant(refusal=scope, retry_after=retry_seconds(wait))

    def release(self, lease: Lease | None) -> None:
        """The socket is gone (or was never admitted): its lease goes in the next round trip."""
        if lease is None or lease.released:
            return
        lease.released = True
        if self.book.discard(lease.key, lease.member):
            self.metrics.leases.dec()
        self._releases.setdefault(lease.key, []).append(lease.member)
        self.batcher.wake()

    async def renewer(self) -> None:
        """Renew every lease of this instance, one round trip per third of the lease TTL."""
        while True:
            await trio.sleep(self.settings.lease_ttl / 3)
            if len(self.book) and not self._renewing:
                self._renewing = self.book.keys()
                self.batcher.wake()

    # --- the Rider interface (the revocation batcher) -------------------------------------------
    def pending(self) -> bool:
        return bool(self._queued or self._releases or self._renewing)

    def take(self) -> list[ScriptCall]:
        # Releases first: a slot given back is free for an admission in the same write.
        calls = [ScriptCall(RELEASE, (key,), members) for key, members in self._releases.items()]
        self._releases = {}
        calls += self._queued
        self._queued = []
        if self._addresses:
            window = int(self.settings.rate_window * 1000)
            for address in self._addresses.values():
                address.call = ScriptCall(RATE, (rate_key(ip_tag(address.client)),),
                                          (self.settings.rate_ip, window, address.count))
                calls.append(address.call)
            self._addresses = {}
        if self._renewing:
            # The members are read now, not when the renewal began: a lease given back meanwhile
            # is not added again.
            keys, self._renewing = self._renewing[:RENEW_CHUNK], self._renewing[RENEW_CHUNK:]
            ttl = int(self.settings.lease_ttl * 1000)
            for key in keys:
                members = self.book.members(key)
                if members:
                    calls.append(ScriptCall(RENEW, (key,), (ttl, *members)))
        self._taken, self._settled = self._settled, trio.Event()
        return calls

    def settled(self) -> None:
        self._taken.set()
