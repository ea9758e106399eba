"""Cluster-wide connection limits, the pure part (D23): key names, the rate window, lease books.

Every Redis key one limiter script touches carries one hash tag (``{gw:limits:user:1:7}`` and
``{gw:limits:user:1:7}:rate``), so on a Redis Cluster a script's keys are always in one slot.

**Rate window.** Connection attempts are counted in fixed windows of ``window`` seconds, and the
rate is estimated as a sliding window from the current and the previous one: ``prev × (share of
the previous window still inside the sliding window) + cur``. Two counters per key, no log of
attempts; an attempt is refused when the estimate has reached the limit, and refused attempts are
not counted (a hammering client cannot extend its own penalty). The Lua scripts apply the same
rule in Redis (cluster-wide); :class:`LocalRates` applies it in the process, in front of every
other check: a client over the limit on this instance alone is over it cluster-wide too, so it is
refused without a token check or a round trip.
"""

from __future__ import annotations

import math

from gateway.core.model import Principal

RATE_USER, RATE_IP = "rate_user", "rate_ip"


def limit_tag(principal: Principal) -> str:
    """The hash tag (and the lease key) of the limit ``principal`` counts in: its table session for
    a diner, its user for staff."""
    if principal.is_diner:
        return f"{{gw:limits:session:{principal.tenant_id}:{principal.session_id}}}"
    return f"{{gw:limits:user:{principal.tenant_id}:{principal.user_id}}}"


def ip_tag(client: str) -> str:
    return f"{{gw:limits:ip:{client}}}"


def rate_key(tag: str) -> str:
    return tag + ":rate"


def estimate(prev: int, cur: int, elapsed: float, window: float) -> float:
    """Attempts in the sliding window ending ``elapsed`` seconds into the current fixed window."""
    return prev * (window - elapsed) / window + cur


def retry_after(prev: int, cur: int, elapsed: float, limit: int, window: float) -> float:
    """Seconds until the estimate drops below ``limit`` with no further attempt counted."""
    if cur >= limit:
        # Only the next window can admit: there ``cur`` is the previous window's count.
        return (window - elapsed) + window * (1 - limit / cur)
    if prev <= 0:
        return 0.0
    # prev × (window - t) / window + cur < limit  <=>  t > window × (1 - (limit - cur) / prev)
    return max(0.0, window * (1 - (limit - cur) / prev) - elapsed)


def admits(prev: int, cur: int, elapsed: float, limit: int, window: float, attempts: int) -> int:
    """How many of ``attempts`` arriving together pass, one after the other (each one counted
    raises the estimate by 1)."""
    return max(0, min(attempts, math.ceil(limit - estimate(prev, cur, elapsed, window))))


def retry_seconds(delay: float) -> int:
    """A ``Retry-After`` value: whole seconds, at least 1."""
    return max(1, math.ceil(delay))


class LocalRates:
    """Per-key attempt rates of this process, and keys Redis refused until a known time.

    Keys idle for two windows are dropped when the window turns, so the table holds only the keys
    seen in the last two windows.
    """

    __slots__ = ("_blocked", "_counts", "_index", "limit", "window")

    def __init__(self, limit: int, window: float) -> None:
        if not window > 0:
            raise ValueError("window must be positive")
        self.limit = limit  # 0: off
        self.window = window
        self._index = 0
        #: key -> (window index, previous count, current count)
        self._counts: dict[str, tuple[int, int, int]] = {}
        self._blocked: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._counts) + len(self._blocked)

    def attempt(self, key: str, now: float) -> float:
        """Count an attempt of ``key`` at ``now``: 0.0 when allowed, else seconds until it would be."""
        if not self.limit:
            return 0.0
        index = int(now // self.window)
        if index != self._index:
            self._turn(index, now)
        until = self._blocked.get(key)
        if until is not None:
            if now < until:
                return until - now
            del self._blocked[key]
        idx, prev, cur = self._counts.get(key, (index, 0, 0))
        if idx != index:
            prev, cur = (cur if idx == index - 1 else 0), 0
        elapsed = now - index * self.window
        if estimate(prev, cur, elapsed, self.window) >= self.limit:
            self._counts[key] = (index, prev, cur)
            return max(retry_after(prev, cur, elapsed, self.limit, self.window), 1e-3)
        self._counts[key] = (index, prev, cur + 1)
        return 0.0

    def block(self, key: str, until: float) -> None:
        """Redis refused ``key`` until ``until``: refuse it here too, without asking again."""
        self._blocked[key] = max(until, self._blocked.get(key, 0.0))

    def _turn(self, index: int, now: float) -> None:
        self._index = index
        self._counts = {k: v for k, v in self._counts.items() if v[0] >= index - 1}
        self._blocked = {k: v for k, v in self._blocked.items() if v > now}


class LeaseBook:
    """The leases this process holds: lease key -> its members here (one per admitted socket)."""

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held: dict[str, set[str]] = {}

    def __len__(self) -> int:
        return sum(len(m) for m in self._held.values())

    def add(self, key: str, member: str) -> None:
        self._held.setdefault(key, set()).add(member)

    def discard(self, key: str, member: str) -> bool:
        """Forget a lease; whether it was held."""
        members = self._held.get(key)
        if members is None or member not in members:
            return False
        members.discard(member)
        if not members:
            del self._held[key]
        return True

    def keys(self) -> list[str]:
        """Every key with a lease held: what one renewal goes through."""
        return list(self._held)

    def members(self, key: str) -> list[str]:
        """The members held now under ``key`` (none once all were given back)."""
        return sorted(self._held.get(key, ()))
