"""The supervisor: one root nursery that owns every task of a gateway.

Nursery tree::

    run_gateway (root nursery)
    ├── embedded redis-server child            (only without REDIS_URL, D18)
    └── _serve (services nursery)
        ├── positioner                         (appends each batch to the store: v2 positions)
        ├── broadcast worker                   (memory channel of Jobs)
        ├── stream consumer                    (XREADGROUP, ack after routing)
        ├── pub/sub reader                     (PSUBSCRIBE)
        ├── revocation batcher                 (one write for concurrent handshakes: MGET + lease scripts)
        ├── lease renewer                      (all leases of this instance, every GATEWAY_LEASE_TTL/3)
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
import logging
import signal
from collections import Counter
from typing import Any

import attrs
import coredis
import trio

from gateway.access.admission import Admission, Limits
from gateway.access.limiter import ClusterLimiter
from gateway.access.refresh import Refresher
from gateway.access.revocation import Revocation
from gateway.access.sectors import SectorSettings, SectorSource
from gateway.catchup.positions import ASSIGN_CHUNK, PositionStore
from gateway.catchup.store import CatchupStore
from gateway.core.breaker import Backoff
from gateway.core.clientip import parse_networks
from gateway.core.dedup import Deduper
from gateway.core.index import ConnectionIndex
from gateway.core.origins import allowed_origins
from gateway.core.pending import PendingConnections
from gateway.fanout.broadcast import JOB_EVENTS, Broadcaster, Job
from gateway.fanout.positioner import Positioner
from gateway.ingest.pubsub import PubSubReader
from gateway.ingest.readers import StreamConsumer, StreamSettings
from gateway.metrics import Metrics
from gateway.redisio.embedded import run_embedded_redis
from gateway.redisio.guards import RedisGuards, RedisHealth
from gateway.redisio.topology import Standalone, Topology, topology_of
from gateway.serving import accept
from gateway.serving.appender import StreamAppender
from gateway.serving.catchup_http import CatchupRoutes
from gateway.serving.connection import Connection
from gateway.serving.http import HttpApp
from gateway.serving.listener import Listener, ServingSettings
from gateway.serving.protocol_v2 import ProtocolV2
from gateway.serving.registry import SocketRegistry
from gateway.serving.status import Status
from gateway.serving.sweepers import drain, heartbeat_sweeper, revalidator
from gateway.settings import Settings

log = logging.getLogger("gateway")

READY_TIMEOUT = 3.0


@attrs.define(eq=False)
class Gateway:
    """One running gateway: the components the supervisor built, kept for the daemon, the CLI and
    tests. No component holds or imports this record; each was given only what it uses."""

    settings: Settings
    redis: coredis.Redis[bytes]
    metrics: Metrics
    registry: SocketRegistry
    redis_health: RedisHealth
    guards: RedisGuards
    catchup: CatchupStore
    sectors: SectorSource
    revocation: Revocation
    broadcaster: Broadcaster
    admission: Admission
    stream_consumer: StreamConsumer
    pubsub: PubSubReader
    status: Status
    listener: Listener
    positions: PositionStore
    positioner: Positioner
    stop_requested: trio.Event = attrs.Factory(trio.Event)
    port: int = 0
    admin_port: int | None = None

    # --- read-only views for operators and tests ----------------------------------------------
    @property
    def index(self) -> ConnectionIndex[Connection]:
        return self.registry.index

    @property
    def sockets(self) -> set[Connection]:
        return self.registry.sockets

    @property
    def pending(self) -> PendingConnections:
        return self.registry.pending

    @property
    def draining(self) -> bool:
        return self.registry.draining

    @property
    def legacy(self) -> Counter[str]:
        return self.registry.legacy

    def stats(self) -> dict[str, Any]:
        return self.status.stats()

    def request_stop(self) -> None:
        self.stop_requested.set()


def build(settings: Settings, redis: coredis.Redis[bytes], topology: Topology | None = None) -> Gateway:
    """Wire every component of a gateway, each with only what it uses (``topology``: where the
    hot paths open their own Redis connections; None: everything through ``redis``)."""
    clustered = topology is not None and topology.clustered
    metrics = Metrics()
    trusted = parse_networks(settings.trusted_proxies)
    registry = SocketRegistry(PendingConnections(settings.max_pending_connections, settings.max_pending_per_ip,
                                                 exempt=trusted))
    health = RedisHealth(metrics)
    guards = RedisGuards.build(settings, health, trio.current_time)
    catchup = CatchupStore(redis, guards.catchup, settings.catchup_window, settings.catchup_max_events, clustered)
    # Every event is appended before fan-out (its v2 frame carries the entry's id), so the
    # broadcaster appends nothing itself; the store holds the larger of both windows.
    window = max(settings.resume_window, settings.catchup_window)
    positions = PositionStore(redis, guards.catchup, window, max(settings.resume_max_events, settings.catchup_max_events),
                              ttl=int(settings.resume_ttl), dedup_ttl=int(window) + 1, topology=topology)
    positioner = Positioner(positions, Deduper(settings.dedup_window, settings.dedup_ts_tolerance))
    broadcaster = Broadcaster(
        index=registry.index,
        metrics=metrics,
        deduper=Deduper(settings.dedup_window, settings.dedup_ts_tolerance),
    )
    sectors = SectorSource(redis, SectorSettings.of(settings))
    # Its MGET spans slots; on a cluster or behind sentinels coredis routes it and follows failovers.
    revocation = Revocation(redis, guards.auth, url=topology.url if isinstance(topology, Standalone) else None)
    # Only a development gateway falls back to the built-in list; the console it serves connects
    # from the gateway's own origin.
    origins = allowed_origins(settings.allowed_origins, settings.port if settings.environment == "development" else None)
    credentials = settings.credentials()
    limiter = ClusterLimiter.build(settings, metrics, revocation, trusted)
    admission = Admission(Limits.of(settings), credentials, origins, registry, metrics, revocation, sectors, limiter)
    stream_consumer = StreamConsumer(redis, guards.stream, StreamSettings.of(settings), metrics, topology=topology)
    pubsub = PubSubReader(redis, guards.pubsub, metrics, settings.max_message_size,
                          Backoff(base=settings.redis_backoff_base, cap=settings.redis_backoff_cap),
                          max_batch=min(JOB_EVENTS, settings.broadcast_queue_size), topology=topology,
                          linger=settings.ingest_linger_ms / 1000)
    status = Status(settings, registry, metrics, broadcaster, stream_consumer, guards, health, redis)
    http = HttpApp(settings, metrics, origins, registry, status,
                   CatchupRoutes(catchup, credentials, revocation, sectors.assign_cached),
                   StreamAppender(redis, guards.publish, settings.stream))
    protocol_v2 = ProtocolV2(positions, registry, Refresher(credentials, revocation, sectors),
                             replay_high_water=settings.send_queue_max_bytes // 2,
                             revalidation=(settings.jwt_revalidation_interval, settings.table_token_revalidation_interval))
    listener = Listener(ServingSettings.of(settings), registry, metrics, admission, http, trusted, protocol_v2)
    gw = Gateway(settings=settings, redis=redis, metrics=metrics, registry=registry, redis_health=health,
                 guards=guards, catchup=catchup, sectors=sectors, revocation=revocation, broadcaster=broadcaster,
                 admission=admission, stream_consumer=stream_consumer, pubsub=pubsub, status=status,
                 listener=listener, positions=positions, positioner=positioner)
    return gw


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
            both.start_soon(accept.serve_listeners, gw.listener.handle_tcp, listeners, conns)
            if admin:
                both.start_soon(accept.serve_listeners, functools.partial(gw.listener.handle_tcp, admin=True),
                                admin, conns)


async def _serve(settings: Settings, topology: Topology, task_status: trio.TaskStatus[Gateway]) -> None:
    async with topology.client() as client, trio.open_nursery() as services:
        # A job carries up to JOB_EVENTS events: the channel holds as many events as the setting says.
        per_job = min(JOB_EVENTS, settings.broadcast_queue_size)
        send, receive = trio.open_memory_channel[Job](max(1, settings.broadcast_queue_size // per_job))
        placed, to_dispatch = trio.open_memory_channel[Job](max(1, ASSIGN_CHUNK // per_job))
        gw = build(settings, client, topology)
        # Readers -> positioner (appends each batch to the store, one round trip) -> one
        # dispatcher: dispatch is synchronous CPU work, so a second task would add no
        # throughput, and two woken workers may run in either order, which would reorder events.
        services.start_soon(gw.positioner.run, receive, placed)
        services.start_soon(gw.broadcaster.worker, to_dispatch)
        services.start_soon(gw.stream_consumer.run, send.clone())
        services.start_soon(gw.pubsub.run, send.clone())
        services.start_soon(gw.revocation.batcher)
        services.start_soon(gw.admission.limiter.renewer)
        services.start_soon(functools.partial(heartbeat_sweeper, gw.registry, silence=settings.heartbeat_timeout,
                                              interval=settings.heartbeat_sweep_interval))
        services.start_soon(functools.partial(revalidator, gw.registry, gw.revocation,
                                              table_secret=settings.table_token_secret,
                                              staff_interval=settings.jwt_revalidation_interval,
                                              table_interval=settings.table_token_revalidation_interval))
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
                await gw.stream_consumer.ready.wait()
                await gw.pubsub.ready.wait()
            task_status.started(gw)
            await gw.stop_requested.wait()
            # The listener stays open during the drain so health checks see "draining" (503) and
            # proxies get 503 for new upgrades (and retry elsewhere); it closes once sockets are gone.
            await drain(gw.registry, gw.metrics, period=settings.drain_period, bound=settings.shutdown_timeout)
            listen_scope.cancel()
            conns.cancel_scope.cancel()
        services.cancel_scope.cancel()


async def run_gateway(settings: Settings, *, task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED) -> None:
    """Run a gateway until ``gateway.request_stop()``; reports the running Gateway via task_status."""
    async with trio.open_nursery() as root:
        url = settings.redis_url
        if url is None and not (settings.redis_sentinels or settings.redis_cluster_nodes):
            url = await root.start(functools.partial(run_embedded_redis, data_dir=settings.redis_data_dir))
            log.info("embedded redis-server started")
        topology = topology_of(settings, url)
        log.info("redis deployment", extra={"redis": topology.describe()})
        await _serve(settings, topology, task_status)
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
            gw.listener.freezer.enabled = True  # and so, from now on, are admitted sockets
            async for signum in signals:
                log.info("signal received", extra={"signal": signal.Signals(signum).name})
                if gw.stop_requested.is_set():
                    log.warning("second signal: stopping without waiting for the drain")
                    nursery.cancel_scope.cancel()
                    return
                gw.request_stop()
