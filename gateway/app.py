"""The supervisor: one root nursery that owns every task of a gateway.

Nursery tree::

    run_gateway (root nursery)
    ├── embedded redis-server child            (only without REDIS_URL, D18)
    └── _serve (services nursery)
        ├── broadcast worker                   (memory channel of Jobs)
        ├── stream consumer                    (XREADGROUP, ack after routing)
        ├── pub/sub reader                     (PSUBSCRIBE)
        ├── catch-up writer                    (pipelined stream appends)
        ├── heartbeat sweeper, revalidator
        ├── listener                           (accept loop, own cancel scope)
        └── connections nursery                (one task per TCP connection)

Shutdown (D7) is: mark the gateway draining (health answers 503 "draining", new upgrades get 503
so a proxy retries them on another instance), queue 1012 closes spread over ``drain_period``, wait
until the sockets are gone (bounded by ``shutdown_timeout``), close the listener, then cancel the
root scope. Stream entries that were read but
not yet acknowledged simply stay pending for the next start.
"""

from __future__ import annotations

import functools
import gc
import itertools
import logging
import signal
import time
from collections.abc import Iterator, Sequence
from typing import Any

import attrs
import coredis
import trio

from gateway.broadcast import Broadcaster, Job
from gateway.catchup import CatchupStore
from gateway.connection import Connection
from gateway.core import closecodes
from gateway.core.breaker import Backoff, BreakerState, CircuitBreaker
from gateway.core.clientip import Network, parse_networks
from gateway.core.dedup import Deduper
from gateway.core.index import ConnectionIndex
from gateway.core.model import Principal
from gateway.core.origins import allowed_origins
from gateway.core.pending import PendingConnections
from gateway.ingest import PubSubReader, StreamConsumer, is_redis_failure, make_client
from gateway.logs import RateLimitedLog
from gateway.metrics import Metrics
from gateway.redis_ops import STREAM_MAXLEN, xadd_capped
from gateway.redis_process import run_embedded_redis
from gateway.sectors import SectorSource
from gateway.server import check_revoked, handle_tcp, pending_refusal_log
from gateway.settings import Settings

log = logging.getLogger("gateway")

READY_TIMEOUT = 3.0
BREAKER_NAMES = ("stream", "pubsub", "auth", "catchup", "publish")
_BREAKER_LEVEL = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


@attrs.define(eq=False)
class Gateway:
    """Shared state of one running gateway, wired by the supervisor (no globals)."""

    settings: Settings
    redis: coredis.Redis[bytes]
    metrics: Metrics = attrs.Factory(Metrics)
    index: ConnectionIndex[Connection] = attrs.Factory(ConnectionIndex)
    sockets: set[Connection] = attrs.Factory(set)
    origins: frozenset[str] = frozenset()
    trusted_proxies: tuple[Network, ...] = ()
    draining: bool = False
    redis_healthy: bool = False
    started_at: float = attrs.Factory(time.monotonic)
    port: int = 0
    stop_requested: trio.Event = attrs.Factory(trio.Event)
    #: Set once the consumer group exists and the pub/sub patterns are subscribed.
    stream_ready: trio.Event = attrs.Factory(trio.Event)
    pubsub_ready: trio.Event = attrs.Factory(trio.Event)
    legacy: dict[str, int] = attrs.Factory(lambda: {"limit": 0, "rate_limit": 0, "auth": 0})
    #: One breaker per Redis path, so an outage seen by one path (a revocation check, say) does
    #: not pause another (the stream) that may already work again.
    breakers: dict[str, CircuitBreaker] = attrs.field(init=False)
    broadcaster: Broadcaster = attrs.field(init=False)
    catchup: CatchupStore = attrs.field(init=False)
    sectors: SectorSource = attrs.field(init=False)
    stream_consumer: StreamConsumer = attrs.field(init=False)
    jobs: trio.MemorySendChannel[Job] = attrs.field(init=False)
    pending: PendingConnections = attrs.field(init=False)
    pending_log: RateLimitedLog = attrs.Factory(pending_refusal_log)
    #: Ids of this gateway's sockets, in accept order (they appear in its logs).
    connection_ids: Iterator[int] = attrs.Factory(lambda: itertools.count(1))
    admin_port: int | None = None

    def __attrs_post_init__(self) -> None:
        self.origins = allowed_origins(self.settings.allowed_origins)
        self.trusted_proxies = parse_networks(self.settings.trusted_proxies)
        self.pending = PendingConnections(self.settings.max_pending_connections, self.settings.max_pending_per_ip,
                                          exempt=self.trusted_proxies)
        self.breakers = {name: self._breaker(name) for name in BREAKER_NAMES}
        self.catchup = CatchupStore(self)
        self.broadcaster = Broadcaster(
            index=self.index,
            metrics=self.metrics,
            deduper=Deduper(self.settings.dedup_window, self.settings.dedup_ts_tolerance),
            on_delivered=self.catchup.add,
        )
        self.sectors = SectorSource(self)
        self.stream_consumer = StreamConsumer(self)

    def _breaker(self, name: str) -> CircuitBreaker:
        def transition(name: str, old: BreakerState, new: BreakerState) -> None:
            self.metrics.breaker_state.labels(name).set(_BREAKER_LEVEL[new])
            self.metrics.breaker_transitions.labels(name, new.value).inc()
            log.warning("circuit breaker %s: %s -> %s", name, old.value, new.value)

        self.metrics.breaker_state.labels(name).set(0)
        s = self.settings
        return CircuitBreaker(
            name=name,
            clock=trio.current_time,
            on_transition=transition,
            failure_threshold=s.breaker_failures,
            recovery_timeout=s.breaker_recovery,
            half_open_max_calls=s.breaker_trial_calls,
        )

    def backoff(self) -> Backoff:
        return Backoff(base=self.settings.redis_backoff_base, cap=self.settings.redis_backoff_cap)

    # --- Redis health (D17) -------------------------------------------------------------------
    def redis_ok(self, breaker: CircuitBreaker) -> None:
        breaker.record_success()
        if not self.redis_healthy:
            log.info("redis reachable")
        self.redis_healthy = True
        self.metrics.redis_up.set(1)

    def redis_failed(self, breaker: CircuitBreaker, path: str, exc: BaseException) -> None:
        breaker.record_failure()
        self.metrics.redis_errors.labels(path).inc()
        if self.redis_healthy:
            log.warning("redis unreachable", extra={"path": path, "error": type(exc).__name__})
        self.redis_healthy = False
        self.metrics.redis_up.set(0)

    async def probe_redis(self) -> dict[str, Any]:
        """A PING plus the consumer group's lag and pending count, for the detailed health page."""
        out: dict[str, Any] = {"ok": False, "breakers": {n: b.stats() for n, b in self.breakers.items()}}
        try:
            with trio.fail_after(2.0):
                started = trio.current_time()
                await self.redis.ping()
                out["latency_ms"] = round((trio.current_time() - started) * 1000, 2)
                out["ok"] = True
                groups = await self.redis.xinfo_groups(self.settings.stream)
                ours = self.settings.consumer_group.encode()
                for group in groups:
                    if group.get(b"name") == ours:
                        out["consumer_group"] = self.settings.consumer_group
                        out["pending"] = group.get(b"pending")
                        out["lag"] = group.get(b"lag")
        except Exception as exc:
            if not (is_redis_failure(exc) or isinstance(exc, trio.TooSlowError)):
                raise
            out["error"] = type(exc).__name__
        if not self.redis_healthy and out["ok"]:
            out["ok"] = self.breakers["pubsub"].state is not BreakerState.OPEN
        return out

    async def append_to_stream(self, payload: bytes) -> str | None:
        breaker = self.breakers["publish"]
        if not breaker.allow():
            return None
        try:
            entry_id = await xadd_capped(self.redis, self.settings.stream, {"data": payload}, STREAM_MAXLEN)
        except Exception as exc:
            if not is_redis_failure(exc):
                raise
            self.redis_failed(breaker, "publish", exc)
            return None
        self.redis_ok(breaker)
        return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)

    # --- statistics ---------------------------------------------------------------------------
    def count_rejection(self, reason: str) -> None:
        if reason == "limit_total":
            self.legacy["limit"] += 1
        elif reason not in ("limit_user", "limit_session", "draining", "redis_unavailable"):
            self.legacy["auth"] += 1

    def stats(self) -> dict[str, Any]:
        s = self.index.stats()
        total = s["total_connections"]
        cap = self.settings.max_total_connections
        rate_limited = int(self.metrics.frames_rejected.labels("rate_limited")._value.get())
        return {
            **s,
            "max_connections": cap,
            "utilization_percent": round(total / cap * 100, 1),
            "rate_limiter_tracked": total,
            "branch_locks_count": 0,
            "user_locks_count": 0,
            "dead_connections_pending": len(self.sockets) - total,
            "heartbeat_stats": self.heartbeat_stats(),
            "metrics": {
                "broadcasts_total": self.broadcaster.delivered_events,
                "broadcasts_failed": 0,
                "broadcasts_failed_recipients": int(self.metrics.slow_consumer_closes._value.get()),
                "broadcasts_rate_limited": 0,
                "connections_rejected_limit": self.legacy["limit"],
                "connections_rejected_rate_limit": rate_limited,
                "connections_rejected_auth": self.legacy["auth"],
                "connections_timeouts": int(self.metrics.closes.labels("1001")._value.get()),
                "events_processed": self.broadcaster.delivered_events,
                "events_dropped": self.broadcaster.duplicate_events,
                "events_invalid_schema": self._invalid_events(),
                "events_callback_timeouts": 0,
                "locks_cleaned": 0,
            },
        }

    def _invalid_events(self) -> int:
        total = 0.0
        for metric in self.metrics.events_invalid.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):  # not the *_created series
                    total += sample.value
        return int(total)

    def heartbeat_stats(self) -> dict[str, Any]:
        now = trio.current_time()
        ages = [now - c.last_seen for c in self.index]
        return {
            "tracked_connections": len(ages),
            "timeout_seconds": self.settings.heartbeat_timeout,
            "oldest_heartbeat_age": round(max(ages), 1) if ages else 0,
            "newest_heartbeat_age": round(min(ages), 1) if ages else 0,
            "average_heartbeat_age": round(sum(ages) / len(ages), 1) if ages else 0,
        }

    def subscriber_stats(self) -> dict[str, Any]:
        return {
            "events_delivered": self.broadcaster.delivered_events,
            "events_duplicate": self.broadcaster.duplicate_events,
            "stream_processed": self.stream_consumer.processed,
            "stream_last_id": self.stream_consumer.last_id,
            "circuit_breakers": {n: b.stats() for n, b in self.breakers.items()},
        }

    # --- sector refresh -----------------------------------------------------------------------
    async def refresh_sectors(self, conn: Connection) -> str:
        """``refresh_sectors`` on /ws/waiter: look again (no cache), re-target at once, reply (§3.2)."""
        principal = conn.principal
        if principal is None or conn not in self.index:
            return "sectors_updated:"
        updated = await self.sectors.assign(principal, refresh=True)
        if conn in self.index:
            self.index.update_sectors(conn, updated.sector_ids)
            conn.principal = updated
        return "sectors_updated:" + ",".join(str(s) for s in sorted(updated.sector_ids))

    # --- lifecycle ----------------------------------------------------------------------------
    def request_stop(self) -> None:
        self.stop_requested.set()

    async def drain(self) -> None:
        """Stop taking sockets and close every one with 1012, spread over ``drain_period`` so the
        clients' reconnects are spread too; wait (bounded by ``shutdown_timeout``) until all are gone."""
        self.draining = True
        self.metrics.draining.set(1)
        settings = self.settings
        conns = list(self.sockets)
        log.info("draining", extra={"sockets": len(conns), "drain_period": settings.drain_period})
        with trio.move_on_after(settings.shutdown_timeout):
            period = min(settings.drain_period, settings.shutdown_timeout * 0.8)
            step = period / len(conns) if conns else 0.0
            start = trio.current_time()
            for i, conn in enumerate(conns):
                if step:
                    await trio.sleep_until(start + i * step)
                conn.begin_close(closecodes.SERVER_RESTART)
            for conn in list(self.sockets):  # sockets that arrived while draining
                conn.begin_close(closecodes.SERVER_RESTART)
            # Polling keeps the shared socket set free of wake-up bookkeeping; it runs only here.
            while self.sockets:  # noqa: ASYNC110
                await trio.sleep(0.02)


async def heartbeat_sweeper(gw: Gateway) -> None:
    """Close sockets that sent nothing for ``heartbeat_timeout`` seconds (1001, D6)."""
    timeout = gw.settings.heartbeat_timeout
    while True:
        await trio.sleep(gw.settings.heartbeat_sweep_interval)
        cutoff = trio.current_time() - timeout
        for conn in [c for c in gw.index if c.last_seen < cutoff]:
            log.info("heartbeat timeout: closing", extra=conn.log_context())
            conn.begin_close(closecodes.HEARTBEAT_TIMEOUT)


async def revalidator(gw: Gateway) -> None:
    """Re-check credentials of open sockets when due (D3): staff revocation keys in one MGET per
    round, diner table tokens re-verified. A Redis failure leaves sockets open (D4)."""
    from gateway.core.auth import AuthError, recheck_table_principal

    settings = gw.settings
    tick = min(5.0, settings.jwt_revalidation_interval, settings.table_token_revalidation_interval)
    while True:
        await trio.sleep(tick)
        now = trio.current_time()
        due = [c for c in gw.index if c.next_check <= now and not c.closing]
        staff = [c for c in due if c.principal is not None and not c.principal.is_diner]
        for conn in due:
            principal = conn.principal
            if principal is None or not principal.is_diner:
                continue
            conn.next_check = now + settings.table_token_revalidation_interval
            try:
                recheck_table_principal(principal, conn.token, secret=settings.table_token_secret, now=time.time())
            except AuthError as exc:
                log.info("table token no longer valid: closing", extra=conn.log_context())
                conn.begin_close(exc.close)
        for start in range(0, len(staff), 1000):
            chunk = staff[start : start + 1000]
            principals: Sequence[Principal] = [c.principal for c in chunk if c.principal is not None]
            revoked = await check_revoked(gw, principals)
            if revoked is None:
                continue
            for conn, is_revoked in zip(chunk, revoked, strict=True):
                conn.next_check = trio.current_time() + settings.jwt_revalidation_interval
                if is_revoked and not conn.closing:
                    log.info("token revoked: closing", extra=conn.log_context())
                    conn.begin_close(closecodes.TOKEN_EXPIRED_OR_REVOKED)


async def _listen(gw: Gateway, conns: trio.Nursery, scope: trio.CancelScope,
                  task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    settings = gw.settings
    with scope:
        listeners = await trio.open_tcp_listeners(settings.port, host=settings.host or None)
        port = listeners[0].socket.getsockname()[1]
        admin: list[trio.SocketListener] = []
        if settings.admin_port is not None:
            # Metrics, detailed health and publish on an internal address only (never proxied).
            admin = await trio.open_tcp_listeners(settings.admin_port, host=settings.admin_host or None)
            gw.admin_port = admin[0].socket.getsockname()[1]
        task_status.started(port)
        async with trio.open_nursery() as both:
            both.start_soon(functools.partial(trio.serve_listeners, functools.partial(handle_tcp, gw), listeners,
                                              handler_nursery=conns))
            if admin:
                both.start_soon(functools.partial(trio.serve_listeners, functools.partial(handle_tcp, gw, admin=True),
                                                  admin, handler_nursery=conns))


async def _serve(settings: Settings, url: str, task_status: trio.TaskStatus[Gateway]) -> None:
    client = make_client(url)
    async with client, trio.open_nursery() as services:
        send, receive = trio.open_memory_channel[Job](settings.broadcast_queue_size)
        gw = Gateway(settings=settings, redis=client)
        gw.jobs = send
        # One dispatcher: dispatch is synchronous CPU work, so a second task would add no
        # throughput, and two woken workers may run in either order, which would reorder events.
        services.start_soon(gw.broadcaster.worker, receive)
        services.start_soon(gw.stream_consumer.run, send.clone())
        services.start_soon(PubSubReader(gw).run, send.clone())
        services.start_soon(gw.catchup.writer)
        services.start_soon(heartbeat_sweeper, gw)
        services.start_soon(revalidator, gw)
        if settings.environment == "development" and settings.default_secrets_in_use:
            log.warning("development mode: %s at the public default; anyone can mint tokens for this gateway",
                        " and ".join(settings.default_secrets_in_use))
        if settings.origin_bypass_active:
            log.warning("development mode: sockets without an Origin header are accepted (set PRODUCTION_CHECK=1 "
                        "or ENVIRONMENT to disable)")
        async with trio.open_nursery() as conns:
            listen_scope = trio.CancelScope()
            gw.port = await services.start(_listen, gw, conns, listen_scope)
            log.info("listening", extra={"host": settings.host, "port": gw.port, "admin_port": gw.admin_port,
                                         "instance": settings.instance_id})
            # Report ready once Redis ingestion is in place, but never wait long: a gateway whose
            # Redis is down starts degraded and catches up when Redis appears (D17).
            with trio.move_on_after(READY_TIMEOUT):
                await gw.stream_ready.wait()
                await gw.pubsub_ready.wait()
            task_status.started(gw)
            await gw.stop_requested.wait()
            # The listener stays open during the drain so health checks see "draining" (503) and
            # proxies get 503 for new upgrades (and retry elsewhere); it closes once sockets are gone.
            await gw.drain()
            listen_scope.cancel()
            conns.cancel_scope.cancel()
        services.cancel_scope.cancel()


async def run_gateway(settings: Settings, *, task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED) -> None:
    """Run a gateway until ``gateway.request_stop()``; reports the running Gateway via task_status."""
    async with trio.open_nursery() as root:
        url = settings.redis_url
        if url is None:
            url = await root.start(functools.partial(run_embedded_redis, data_dir=settings.redis_data_dir))
            log.info("embedded redis-server started")
        await _serve(settings, url, task_status)
        root.cancel_scope.cancel()


async def run_until_signalled(settings: Settings) -> None:
    """The daemon: SIGTERM/SIGINT drains (D7); a second signal stops at once."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def serve(task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED) -> None:
                await run_gateway(settings, task_status=task_status)
                nursery.cancel_scope.cancel()  # drained: the signal watcher goes too

            gw: Gateway = await nursery.start(serve)
            # Start-up objects (modules, settings, registries) live as long as the process: keep
            # them out of every later full collection, which otherwise stalls admission in a storm.
            gc.freeze()
            async for signum in signals:
                log.info("signal received", extra={"signal": signal.Signals(signum).name})
                if gw.stop_requested.is_set():
                    log.warning("second signal: stopping without waiting for the drain")
                    nursery.cancel_scope.cancel()
                    return
                gw.request_stop()
