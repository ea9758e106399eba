"""The health pages and the legacy statistics, as pure functions over snapshots.

The shell takes a :class:`Snapshot` of counters and states (no I/O here), and these functions
shape it into the existing gateway's ``/ws/health`` keys (§1.3), the detailed page and the legacy
metric block, so each rule (when "degraded", what "dead connections" are) lives in one place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

SERVICE = "ws-gateway"


@attrs.frozen
class Snapshot:
    """What the health pages need of a running gateway, read at one moment."""

    index: Mapping[str, int]
    max_connections: int
    accepted_sockets: int
    heartbeat_ages: Sequence[float]
    heartbeat_timeout: float
    delivered_events: int
    duplicate_events: int
    slow_consumer_closes: int
    rejected: Mapping[str, int]
    rate_limited: int
    heartbeat_closes: int
    invalid_events: int


def heartbeat_stats(ages: Sequence[float], timeout: float) -> dict[str, Any]:
    return {
        "tracked_connections": len(ages),
        "timeout_seconds": timeout,
        "oldest_heartbeat_age": round(max(ages), 1) if ages else 0,
        "newest_heartbeat_age": round(min(ages), 1) if ages else 0,
        "average_heartbeat_age": round(sum(ages) / len(ages), 1) if ages else 0,
    }


def stats(snap: Snapshot) -> dict[str, Any]:
    """The existing gateway's statistics block (``/ws/health`` and the legacy metrics)."""
    total = snap.index["total_connections"]
    return {
        **snap.index,
        "max_connections": snap.max_connections,
        "utilization_percent": round(total / snap.max_connections * 100, 1),
        "rate_limiter_tracked": total,
        "branch_locks_count": 0,
        "user_locks_count": 0,
        "dead_connections_pending": snap.accepted_sockets - total,
        "heartbeat_stats": heartbeat_stats(snap.heartbeat_ages, snap.heartbeat_timeout),
        "metrics": {
            "broadcasts_total": snap.delivered_events,
            "broadcasts_failed": 0,
            "broadcasts_failed_recipients": snap.slow_consumer_closes,
            "broadcasts_rate_limited": 0,
            "connections_rejected_limit": snap.rejected.get("limit", 0),
            "connections_rejected_rate_limit": snap.rate_limited,
            "connections_rejected_auth": snap.rejected.get("auth", 0),
            "connections_timeouts": snap.heartbeat_closes,
            "events_processed": snap.delivered_events,
            "events_dropped": snap.duplicate_events,
            "events_invalid_schema": snap.invalid_events,
            "events_callback_timeouts": 0,
            "locks_cleaned": 0,
        },
    }


def legacy_rejection(reason: str) -> str | None:
    """Which legacy counter (``limit``, ``auth``) a rejection reason counts in, if any."""
    if reason == "limit_total":
        return "limit"
    if reason in ("limit_user", "limit_session", "draining", "redis_unavailable", "pending_total", "pending_ip",
                  "rate_ip", "rate_user"):
        return None
    return "auth"


def status(*, draining: bool, degraded: bool = False) -> tuple[int, str]:
    """HTTP status and ``status`` value of a health page."""
    if draining:
        return 503, "draining"
    if degraded:
        return 503, "degraded"
    return 200, "healthy"


def redis_ok(*, answered: bool, healthy: bool, pubsub_open: bool) -> bool:
    """D17: Redis counts as up when it answered the probe, and, after a failure, once the pub/sub
    breaker no longer holds events back."""
    return answered and (healthy or not pubsub_open)
