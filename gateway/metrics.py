"""Prometheus instruments, one registry per gateway (no globals), and the legacy metric block.

``/ws/metrics`` serves the registry followed by the existing gateway's metric names (§1.3 of the
protocol spec) computed from live state, so existing dashboards keep working while new ones use
the labelled ``wsgateway_*_total`` families.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class _Registry(CollectorRegistry):
    """A registry whose exposition has no ``*_created`` series.

    They double the exposition size and no dashboard here reads them. prometheus_client turns them
    off only for the whole process (``disable_created_metrics``), which would also change every
    other registry in it; this registry drops them from its own output alone.
    """

    def collect(self) -> Iterator[Metric]:
        for metric in super().collect():
            created = metric.name + "_created"
            metric.samples = [s for s in metric.samples if s.name != created]
            yield metric


class Metrics:
    def __init__(self) -> None:
        r = self.registry = _Registry(auto_describe=True)
        self.connections = Gauge(
            "wsgateway_open_connections", "Open WebSocket connections by endpoint", ["endpoint"], registry=r
        )
        self.connections_opened = Counter(
            "wsgateway_connections_opened", "Sockets that passed auth and were registered", ["endpoint"], registry=r
        )
        self.closes = Counter(
            "wsgateway_closes", "Sockets closed, by close code (sent by the gateway or echoed to the client)",
            ["code"], registry=r,
        )
        self.rejections = Counter(
            "wsgateway_rejections", "Sockets refused at connect time, by reason", ["reason"], registry=r
        )
        self.rate_refusals = Counter(
            "wsgateway_connect_rate_refusals",
            "Connection attempts refused by the cluster-wide attempt rates (D23), by scope (ip, user) and by "
            "where it was decided (process: from this instance's counts alone, before the token check or any "
            "Redis work; cluster: by Redis)", ["scope", "decided"], registry=r,
        )
        self.leases = Gauge(
            "wsgateway_cluster_leases", "Sockets of this instance holding a lease in the cluster-wide limits", registry=r
        )
        self.limits_local_only = Counter(
            "wsgateway_limits_local_only",
            "Sockets admitted on the per-process limits alone because Redis did not answer the lease request", registry=r,
        )
        self.frames_rejected = Counter(
            "wsgateway_inbound_rejected", "Inbound frames that closed their socket, by reason", ["reason"], registry=r
        )
        self.inbound_messages = Counter(
            "wsgateway_inbound_messages", "Inbound text messages accepted, by kind", ["kind"], registry=r
        )
        self.events_received = Counter(
            "wsgateway_events_received", "Events read from Redis or the publish API, by source", ["source"], registry=r
        )
        self.events_invalid = Counter(
            "wsgateway_events_invalid", "Events rejected by validation, by source and reason", ["source", "reason"],
            registry=r,
        )
        self.events_routed = Counter(
            "wsgateway_events_routed", "Events routed to their audience, by source", ["source"], registry=r
        )
        self.events_duplicate = Counter(
            "wsgateway_events_duplicate", "Copies of an already delivered logical event, by source (D10)",
            ["source"], registry=r,
        )
        self.events_unrouted = Counter(
            "wsgateway_events_no_audience", "Events that had no connected recipient here", registry=r
        )
        self.frames_delivered = Counter(
            "wsgateway_frames_delivered", "Event frames handed to sockets", registry=r
        )
        self.direct_writes = Counter(
            "wsgateway_direct_writes", "Event frames written straight to an idle socket", registry=r
        )
        self.slow_consumer_closes = Counter(
            "wsgateway_slow_consumer_closes", "Sockets closed 1013 because their send queue overflowed", registry=r
        )
        self.delivery_latency = Histogram(
            "wsgateway_delivery_latency_seconds", "Time from event receipt to the write of its frames",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.http_requests = Counter(
            "wsgateway_http_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.redis_errors = Counter(
            "wsgateway_redis_errors", "Redis operations that failed, by path", ["path"], registry=r
        )
        self.breaker_state = Gauge(
            "wsgateway_breaker_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open", ["name"], registry=r
        )
        self.breaker_transitions = Counter(
            "wsgateway_breaker_transitions", "Circuit breaker transitions, by breaker and new state", ["name", "state"],
            registry=r,
        )
        self.redis_up = Gauge("wsgateway_redis_up", "1 when the last Redis operation succeeded", registry=r)
        self.stream_acked = Counter(
            "wsgateway_stream_acked", "Stream entries acknowledged", registry=r
        )
        self.dlq = Counter("wsgateway_dlq", "Stream entries moved to the dead-letter stream", ["reason"], registry=r)
        self.draining = Gauge("wsgateway_draining", "1 while the gateway is shutting down", registry=r)

    def render(self, legacy: Mapping[str, object]) -> bytes:
        return prometheus_client.generate_latest(self.registry) + legacy_text(legacy).encode()


# (name, type, stats key, help) in the order the existing gateway emits them.
_LEGACY: tuple[tuple[str, str, str, str], ...] = (
    ("wsgateway_connections_total", "gauge", "total_connections", "Current number of active WebSocket connections"),
    ("wsgateway_connections_max", "gauge", "max_connections", "Maximum allowed WebSocket connections"),
    ("wsgateway_connections_utilization_percent", "gauge", "utilization_percent", "Connection utilization percentage"),
    ("wsgateway_users_connected", "gauge", "users_connected", "Number of unique users connected"),
    ("wsgateway_branches_with_connections", "gauge", "branches_with_connections",
     "Number of branches with active connections"),
    ("wsgateway_sectors_with_connections", "gauge", "sectors_with_connections",
     "Number of sectors with active connections"),
    ("wsgateway_sessions_with_connections", "gauge", "sessions_with_connections",
     "Number of table sessions with active connections"),
    ("wsgateway_admin_connections", "gauge", "admin_connections", "Number of admin/manager connections"),
    ("wsgateway_dead_connections_pending", "gauge", "dead_connections_pending", "Dead connections pending cleanup"),
    ("wsgateway_broadcasts_total", "counter", "metrics.broadcasts_total", "Total broadcast operations"),
    ("wsgateway_broadcasts_failed", "counter", "metrics.broadcasts_failed", "Failed broadcast operations"),
    ("wsgateway_broadcasts_failed_recipients", "counter", "metrics.broadcasts_failed_recipients",
     "Total failed recipients"),
    ("wsgateway_broadcasts_rate_limited", "counter", "metrics.broadcasts_rate_limited", "Rate-limited broadcasts"),
    ("wsgateway_connections_rejected_total", "counter", "", "Rejected connections by reason"),
    ("wsgateway_events_processed", "counter", "metrics.events_processed", "Events processed from Redis"),
    ("wsgateway_events_dropped", "counter", "metrics.events_dropped", "Events dropped due to queue overflow"),
    ("wsgateway_events_invalid_schema", "counter", "metrics.events_invalid_schema", "Events with invalid schema"),
    ("wsgateway_locks_cleaned", "counter", "metrics.locks_cleaned", "Total locks cleaned up"),
    ("wsgateway_branch_locks", "gauge", "branch_locks_count", "Current branch locks"),
    ("wsgateway_user_locks", "gauge", "user_locks_count", "Current user locks"),
    ("wsgateway_rate_limiter_tracked", "gauge", "rate_limiter_tracked", "Connections tracked by rate limiter"),
    ("wsgateway_heartbeat_tracked_connections", "gauge", "heartbeat_stats.tracked_connections",
     "Connections tracked by heartbeat"),
    ("wsgateway_heartbeat_timeout_seconds", "gauge", "heartbeat_stats.timeout_seconds", "Heartbeat timeout"),
    ("wsgateway_heartbeat_oldest_age_seconds", "gauge", "heartbeat_stats.oldest_heartbeat_age",
     "Oldest heartbeat age in seconds"),
)


def _lookup(stats: Mapping[str, object], dotted: str) -> object:
    value: object = stats
    for part in dotted.split("."):
        if not isinstance(value, Mapping):
            return 0
        value = value.get(part, 0)
    return value


def _num(value: object) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int | float):
        return repr(float(value)) if isinstance(value, float) else str(value)
    return "0"


def legacy_text(stats: Mapping[str, object]) -> str:
    """The existing gateway's metric block, exact names, types and HELP texts."""
    lines: list[str] = []
    for name, kind, key, help_text in _LEGACY:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        if name == "wsgateway_connections_rejected_total":
            for reason in ("limit", "rate_limit", "auth"):
                value = _lookup(stats, f"metrics.connections_rejected_{reason}")
                lines.append(f'{name}{{reason="{reason}"}} {_num(value)}')
        else:
            lines.append(f"{name} {_num(_lookup(stats, key))}")
    lines.append("# HELP wsgateway_scrape_timestamp Timestamp of metrics scrape")
    lines.append("# TYPE wsgateway_scrape_timestamp gauge")
    lines.append(f"wsgateway_scrape_timestamp {int(time.time())}")
    return "\n".join(lines) + "\n"
