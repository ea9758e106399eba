"""Where the gateway sends a Redis command: the one place that knows the Redis deployment.

Three deployments, chosen by the settings (``topology_of``):

- ``Standalone``: one server at ``REDIS_URL`` (or the embedded one, D18).
- ``SentinelMaster``: the master a set of Redis Sentinels names (``REDIS_SENTINELS``,
  ``REDIS_SENTINEL_MASTER``). Every connection opened asks the sentinels for the current master
  and checks with ``ROLE`` that the server it reached is one, so a connection re-opened after a
  failover lands on the promoted replica.
- ``Cluster``: a Redis Cluster reached through some of its nodes (``REDIS_CLUSTER_NODES``). Every
  connection opened reads the slot map again (``CLUSTER SLOTS``) and goes to the master of the
  key's slot; a ``MOVED`` or ``ASK`` reply fails the connection, and its reopening re-resolves.

Each gives the gateway its coredis client (``client``, for everything but the hot paths, with
coredis' own Sentinel and Cluster support) and the hot paths their own RESP connections
(``connect``, ``gateway.redisio.resp``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any, Protocol, cast

import attrs
import coredis
import trio
from coredis.connection import TCPLocation

from gateway.core.cluster import format_node, key_slot
from gateway.redisio import resp
from gateway.redisio.client import is_redis_failure, make_client
from gateway.settings import Settings
from gateway.settings_values import redact_url_password

log = logging.getLogger("gateway.redis")

Node = tuple[str, int]

#: Seconds to reach one sentinel or one cluster node while resolving where to connect.
RESOLVE_TIMEOUT = 2.0
CONNECT_TIMEOUT = 5.0
STREAM_TIMEOUT = 10.0


class Topology(Protocol):
    @property
    def raw(self) -> bool:
        """Whether the hot paths may open RESP connections of their own (not with TLS: coredis then)."""
        ...

    @property
    def clustered(self) -> bool:
        """Whether keys used together need hash tags to share a slot."""
        ...

    def client(self) -> AbstractAsyncContextManager[coredis.Redis[bytes]]:
        """The gateway's coredis client for the duration of the block."""
        ...

    async def connect(self, key: str | None = None) -> resp.RespConnection:
        """A new connection to the master that serves ``key`` (None: any master; all of them
        receive every PUBLISH)."""
        ...

    async def node_of(self, key: str) -> str | None:
        """Which node serves ``key``: keys of one node can share a connection. None everywhere
        but on a cluster (one master serves every key)."""
        ...

    def describe(self) -> str:
        """Where Redis is, without credentials, for logs."""
        ...


@attrs.define(eq=False)
class Standalone:
    url: str
    clustered: bool = False

    @property
    def raw(self) -> bool:
        return resp.supported(self.url)

    @asynccontextmanager
    async def client(self) -> AsyncIterator[coredis.Redis[bytes]]:
        client = make_client(self.url)
        async with client:
            yield client

    async def connect(self, key: str | None = None) -> resp.RespConnection:
        return await resp.open_connection(self.url, connect_timeout=CONNECT_TIMEOUT)

    async def node_of(self, key: str) -> str | None:
        return None

    def describe(self) -> str:
        return redact_url_password(self.url)


async def _ask(node: Node, *command: Any, username: str | None, password: str | None) -> Any:
    """One command on a short-lived connection to ``node``."""
    with trio.fail_after(RESOLVE_TIMEOUT):
        conn = await resp.connect_tcp(*node, username=username, password=password, connect_timeout=RESOLVE_TIMEOUT)
        try:
            (reply,) = await conn.call(resp.encode(*command))
            return reply
        finally:
            await conn.aclose()


def _failure_names(errors: Sequence[BaseException]) -> str:
    # Types only: a message could quote a server's reply, never a secret, but stay terse.
    return ", ".join(sorted({type(e).__name__ for e in errors})) or "no answer"


@attrs.define(eq=False)
class SentinelMaster:
    sentinels: tuple[Node, ...]
    master: str
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    sentinel_password: str | None = attrs.field(default=None, repr=False)
    raw: bool = True
    clustered: bool = False
    #: The sentinel that answered last is asked first.
    _order: list[Node] = attrs.Factory(list)

    @asynccontextmanager
    async def client(self) -> AsyncIterator[coredis.Redis[bytes]]:
        sentinel_kwargs: dict[str, Any] = {"connect_timeout": RESOLVE_TIMEOUT, "stream_timeout": STREAM_TIMEOUT}
        if self.sentinel_password:
            sentinel_kwargs["password"] = self.sentinel_password
        sentinel = coredis.Sentinel([TCPLocation(h, p) for h, p in self.sentinels], sentinel_kwargs=sentinel_kwargs,
                                    connect_timeout=CONNECT_TIMEOUT, stream_timeout=STREAM_TIMEOUT,
                                    username=self.username, password=self.password)
        async with sentinel:
            primary = sentinel.primary_for(self.master)
            async with primary:
                yield primary

    async def master_address(self) -> Node:
        """The master the first sentinel that knows one names."""
        order = self._order or list(self.sentinels)
        errors: list[BaseException] = []
        for node in order:
            try:
                reply = await _ask(node, "SENTINEL", "get-master-addr-by-name", self.master, username=None,
                                   password=self.sentinel_password)
            except (OSError, EOFError, trio.TooSlowError, trio.BrokenResourceError, coredis.exceptions.RedisError) as exc:
                errors.append(exc)
                continue
            if not reply:
                continue
            self._order = [node, *(n for n in order if n != node)]
            return resp.text(reply[0]), int(reply[1])
        raise ConnectionError(f"no sentinel of {', '.join(map(format_node, self.sentinels))} names a master "
                              f"{self.master!r} ({_failure_names(errors)})")

    async def connect(self, key: str | None = None) -> resp.RespConnection:
        host, port = await self.master_address()
        conn = await resp.connect_tcp(host, port, username=self.username, password=self.password,
                                      connect_timeout=CONNECT_TIMEOUT)
        try:
            with trio.fail_after(RESOLVE_TIMEOUT):
                (role,) = await conn.call(resp.encode("ROLE"))
        except BaseException:
            await conn.aclose()
            raise
        if not role or role[0] != b"master":
            await conn.aclose()
            # The sentinels have not switched yet (a failover in progress): the caller retries.
            raise ConnectionError(f"{format_node((host, port))}, named master {self.master!r}, is a "
                                  f"{resp.text(role[0]) if role else 'server of no role'}")
        return conn

    async def node_of(self, key: str) -> str | None:
        return None

    def describe(self) -> str:
        return f"sentinels {', '.join(map(format_node, self.sentinels))}, master {self.master!r}"


@attrs.frozen
class SlotRange:
    start: int
    end: int
    master: Node


def parse_cluster_slots(reply: Sequence[Any]) -> tuple[list[SlotRange], list[Node]]:
    """``CLUSTER SLOTS``: the slot ranges with their masters, and every node named (replicas too)."""
    ranges: list[SlotRange] = []
    nodes: list[Node] = []
    for item in reply:
        start, end, *servers = item
        for host, port, *_rest in servers:
            node = (resp.text(host), int(port))
            if node not in nodes:
                nodes.append(node)
        ranges.append(SlotRange(int(start), int(end), (resp.text(servers[0][0]), int(servers[0][1]))))
    ranges.sort(key=lambda r: r.start)
    return ranges, nodes


@attrs.define(eq=False)
class Cluster:
    seeds: tuple[Node, ...]
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    raw: bool = True
    clustered: bool = True
    ranges: list[SlotRange] = attrs.Factory(list)
    #: Every node the last slot map named, asked before the seeds.
    _known: list[Node] = attrs.Factory(list)

    @asynccontextmanager
    async def client(self) -> AsyncIterator[coredis.Redis[bytes]]:
        # coredis reads the cluster's layout when the client is entered and fails when no node
        # answers: wait for one (the gateway is not listening yet, so not ready either).
        delay = 0.5
        async with AsyncExitStack() as stack:
            while True:
                client = coredis.RedisCluster(
                    startup_nodes=[TCPLocation(h, p) for h, p in self.seeds], username=self.username,
                    password=self.password, connect_timeout=CONNECT_TIMEOUT, stream_timeout=STREAM_TIMEOUT,
                    decode_responses=False)
                try:
                    await stack.enter_async_context(client)
                    break
                except BaseException as exc:
                    if not is_redis_failure(exc):
                        raise
                    log.warning("no Redis Cluster node answers yet; retrying",
                                extra={"redis": self.describe(), "retry_in": delay})
                await trio.sleep(delay)
                delay = min(delay * 2, 10.0)
            # RedisCluster answers the same command methods as Redis (it routes each by its keys);
            # the components are typed against Redis.
            yield cast("coredis.Redis[bytes]", client)

    async def refresh(self) -> None:
        """Read the slot map from the first node that answers."""
        errors: list[BaseException] = []
        for node in [*self._known, *(s for s in self.seeds if s not in self._known)]:
            try:
                reply = await _ask(node, "CLUSTER", "SLOTS", username=self.username, password=self.password)
            except (OSError, EOFError, trio.TooSlowError, trio.BrokenResourceError, coredis.exceptions.RedisError) as exc:
                errors.append(exc)
                continue
            ranges, known = parse_cluster_slots(reply)
            if ranges:
                self.ranges, self._known = ranges, known
                return
        raise ConnectionError(f"no cluster node of {', '.join(map(format_node, self.seeds))} answered with a "
                              f"slot map ({_failure_names(errors)})")

    def master_of(self, key: str | None) -> Node:
        if key is None:
            return random.choice(sorted({r.master for r in self.ranges}))
        slot = key_slot(key)
        for r in self.ranges:
            if r.start <= slot <= r.end:
                return r.master
        raise ConnectionError(f"no cluster node serves slot {slot}")

    async def connect(self, key: str | None = None) -> resp.RespConnection:
        await self.refresh()
        host, port = self.master_of(key)
        return await resp.connect_tcp(host, port, username=self.username, password=self.password,
                                      connect_timeout=CONNECT_TIMEOUT)

    async def node_of(self, key: str) -> str | None:
        if not self.ranges:
            await self.refresh()
        return format_node(self.master_of(key))

    def describe(self) -> str:
        return f"cluster nodes {', '.join(map(format_node, self.seeds))}"


def topology_of(settings: Settings, url: str | None) -> Topology:
    """The deployment the settings name; ``url`` is REDIS_URL or the embedded server's."""
    if settings.redis_sentinels:
        assert settings.redis_sentinel_master is not None
        return SentinelMaster(settings.redis_sentinels, settings.redis_sentinel_master, settings.redis_username,
                              settings.redis_password, settings.redis_sentinel_password)
    if settings.redis_cluster_nodes:
        return Cluster(settings.redis_cluster_nodes, settings.redis_username, settings.redis_password)
    assert url is not None
    return Standalone(url)
