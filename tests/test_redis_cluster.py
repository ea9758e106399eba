"""The gateway on a Redis Cluster of three real masters: stream and pub/sub events reach their
sockets, v2 positions and catch-up are stored under hash-tagged keys, invalid entries go to a
dead-letter stream in the stream's slot, a deleted stream is recovered (NOGROUP), and the pub/sub
reader subscribes again on another node when its node is killed."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import trio
from helpers import attempt, until_admitted
from test_cli import clean_env, run_async

from gateway.core.cluster import key_slot
from gateway.core.events import encode_envelope, envelope
from gateway.ingest.dlq import list_dead_letters
from gateway.redisio.client import STREAM_MAXLEN, xadd_capped
from gateway.redisio.topology import Cluster
from gateway_testing import GatewayHandle, WSClient
from gateway_testing.topologies import ClusterSet, command

STREAM = "events:critical"
V2 = ("integrador.v2",)
FAST = {"redis_backoff_base": 0.05, "redis_backoff_cap": 0.5, "breaker_recovery": 0.5, "stream_block_ms": 200,
        "reclaim_idle": 0.5, "reclaim_interval": 0.5}


def numbered(seq: int, branch: int = 2, kind: str = "ROUND_PENDING") -> dict[str, object]:
    return envelope(kind, 1, branch, entity={"seq": seq})


def topology(rc: ClusterSet) -> Cluster:
    return Cluster(tuple(("127.0.0.1", p) for p in rc.ports))


async def xadd(rc: ClusterSet, data: bytes) -> None:
    async with topology(rc).client() as client:
        await xadd_capped(client, STREAM, {"data": data}, STREAM_MAXLEN)


async def start(gateway_factory: Any, rc: ClusterSet) -> GatewayHandle:
    handle: GatewayHandle = await gateway_factory(redis_url=None, redis_cluster_nodes=rc.node_list, **FAST)
    return handle


async def subscribed_port(rc: ClusterSet) -> int:
    """The node the gateway's pub/sub connection is on (the client with 6 patterns)."""
    with trio.fail_after(10):
        while True:
            for port in rc.ports:
                try:
                    clients = await command(port, "CLIENT", "LIST")
                except OSError:
                    continue
                if b" psub=6 " in clients:
                    return port
            await trio.sleep(0.05)


async def test_stream_and_pubsub_events_reach_sockets_with_positions_in_tagged_keys(
    redis_cluster: ClusterSet, gateway_factory: Any
) -> None:
    rc = redis_cluster
    handle = await start(gateway_factory, rc)
    v2 = await handle.connect("admin", handle.staff_token(roles=("ADMIN",), branches=(2, 3)), subprotocols=V2)
    assert (await v2.receive())["type"] == "welcome"
    v1 = await handle.connect("admin", handle.staff_token(user=8, roles=("ADMIN",), branches=(2, 3)))
    await handle.connected(2)
    await xadd(rc, encode_envelope(numbered(1)))
    # PUBLISH on every node in turn: each reaches the one node the gateway subscribed on.
    for n, port in enumerate(rc.ports):
        await command(port, "PUBLISH", "tenant:1:admin", encode_envelope(numbered(2 + n, branch=0, kind="ENTITY_UPDATED")))
    await xadd(rc, encode_envelope(numbered(5, branch=3)))
    got = await receive(v2, 5)
    plain = await receive(v1, 5)
    assert sorted(f["entity"]["seq"] for f in got) == [1, 2, 3, 4, 5]
    assert [f["entity"]["seq"] for f in plain] == [f["entity"]["seq"] for f in got]
    assert all("_pos" in f for f in got)
    assert {f["_pos"]["stream"] for f in got} == {"1:2", "1:0", "1:3"}
    # Each stream and its epoch live under one hash tag, on the node of that slot.
    for tenant_branch in ("1:2", "1:0", "1:3"):
        key = "gw:catchup:{" + tenant_branch + "}"
        port = await rc.port_of(key)
        assert await command(port, "EXISTS", key, "gw:catchup:epoch:{" + tenant_branch + "}") == 2
    # Catch-up (v1 HTTP) reads the same tagged stream through the cluster client.
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{handle.url}/ws/catchup",
                                  params={"branch_id": 2, "since": 0, "token": handle.staff_token(roles=("ADMIN",))})
    assert response.status_code == 200
    assert [e["entity"]["seq"] for e in response.json()["events"]] == [1]


async def receive(client: WSClient, n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with trio.move_on_after(10):
        while len(out) < n:
            frame = await client.receive(10)
            if isinstance(frame, dict) and "entity" in frame:
                out.append(frame)
    assert len(out) == n, out
    return out


async def until_one_arrives(client: WSClient, publish: Callable[[int], Awaitable[None]], *, first: int,
                            wait: float) -> None:
    """Publish numbered events (``publish(seq)``) until one reaches ``client``."""
    with trio.fail_after(20):
        seq = first
        while True:
            await publish(seq)
            frame = await client.receive(wait)
            if isinstance(frame, dict) and "entity" in frame:
                return
            seq += 1


async def test_invalid_entries_go_to_a_dead_letter_stream_in_the_streams_slot_and_nogroup_recovers(
    redis_cluster: ClusterSet, gateway_factory: Any
) -> None:
    rc = redis_cluster
    handle = await start(gateway_factory, rc)
    assert handle.settings.dead_letter_stream == "{events:critical}:dlq"
    assert key_slot(handle.settings.dead_letter_stream) == key_slot(STREAM)
    admin = await handle.connect("admin", handle.staff_token(roles=("ADMIN",)))
    await handle.connected(1)
    await xadd(rc, b"not json at all")
    async with topology(rc).client() as client:
        with trio.fail_after(10):
            while not (letters := await list_dead_letters(client, "{events:critical}:dlq")):  # noqa: ASYNC110 - written asynchronously
                await trio.sleep(0.05)
        assert [d.fields["error"] for d in letters] == ["invalid: not_json"]
        # The stream deleted under the reader: NOGROUP, the group is recreated, delivery goes on.
        await client.delete([STREAM])
        with trio.fail_after(10):
            while True:
                await xadd_capped(client, STREAM, {"data": encode_envelope(numbered(7))}, STREAM_MAXLEN)
                frame = await admin.receive(0.5)
                if isinstance(frame, dict) and frame.get("entity", {}).get("seq") == 7:
                    break
    assert handle.gw.stream_consumer.ready.is_set()


async def test_pubsub_subscribes_again_on_another_node_when_its_node_is_killed(
    redis_cluster: ClusterSet, gateway_factory: Any
) -> None:
    rc = redis_cluster
    handle = await start(gateway_factory, rc)
    admin = await handle.connect("admin", handle.staff_token(roles=("ADMIN",)))
    await handle.connected(1)
    port = await subscribed_port(rc)
    victim = next(n for n in rc.nodes if n.port == port)
    await trio.to_thread.run_sync(victim.kill)
    others = [p for p in rc.ports if p != port]
    assert await subscribed_port(rc) in others

    async def publish(seq: int) -> None:
        await command(others[seq % 2], "PUBLISH", "tenant:1:admin",
                      encode_envelope(numbered(seq, branch=0, kind="ENTITY_UPDATED")))

    # The reader subscribes again after a backoff: published until one arrives.
    await until_one_arrives(admin, publish, first=100, wait=0.3)


async def test_a_gateway_started_while_the_cluster_is_down_starts_once_a_node_answers(
    redis_cluster: ClusterSet, gateway_factory: Any
) -> None:
    rc = redis_cluster
    for node in rc.nodes:
        await trio.to_thread.run_sync(node.kill)

    async def restart_after_the_gateway_tried() -> None:
        await trio.sleep(1.0)
        for node in rc.nodes:  # same ports; each keeps its cluster configuration (nodes.conf)
            await trio.to_thread.run_sync(node.restart)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(restart_after_the_gateway_tried)
        handle = await start(gateway_factory, rc)  # returns once the gateway is up
    await rc.wait_ok()
    admin = await handle.connect("admin", handle.staff_token(roles=("ADMIN",)))
    await handle.connected(1)
    await until_one_arrives(admin, lambda seq: xadd(rc, encode_envelope(numbered(seq))), first=200, wait=0.5)


async def test_the_stream_reader_follows_its_slot_to_another_master(
    redis_cluster: ClusterSet, gateway_factory: Any
) -> None:
    """Resharding: the slot of ``events:critical`` (with the stream, its consumer groups and its
    dead letters) moves to another master; the reader's next command gets MOVED, and its new
    connection goes where the slot map now says."""
    rc = redis_cluster
    handle = await start(gateway_factory, rc)
    admin = await handle.connect("admin", handle.staff_token(roles=("ADMIN",)))
    await handle.connected(1)
    await xadd(rc, encode_envelope(numbered(1)))
    assert (await receive(admin, 1))[0]["entity"]["seq"] == 1
    slot = key_slot(STREAM)
    source = await rc.port_of(STREAM)
    target = next(p for p in rc.ports if p != source)
    ids = {p: resp_text(await command(p, "CLUSTER", "MYID")) for p in rc.ports}
    await command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", ids[source])
    await command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", ids[target])
    keys = await command(source, "CLUSTER", "GETKEYSINSLOT", slot, 100)
    assert STREAM.encode() in keys
    await command(source, "MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
    for port in rc.ports:
        await command(port, "CLUSTER", "SETSLOT", slot, "NODE", ids[target])
    assert await command(target, "XLEN", STREAM) >= 1
    with trio.fail_after(20):
        seq = 2
        while True:
            await xadd(rc, encode_envelope(numbered(seq)))
            frame = await admin.receive(0.5)
            if isinstance(frame, dict) and "entity" in frame:
                break
            seq += 1
    # The instance's group moved with the stream and goes on there.
    groups = await command(target, "XINFO", "GROUPS", STREAM)
    assert handle.settings.consumer_group in [resp_text(g[1]) for g in groups]


def resp_text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def test_limits_and_attempt_rates_hold_across_instances_on_a_cluster(
    redis_cluster: ClusterSet, gateway_factory: Any
) -> None:
    """D23 on a cluster: each limiter script's keys share one hash tag, so the per-user and
    per-session leases work wherever their slot is; the revocation MGET spans slots."""
    rc = redis_cluster
    a, b = await start(gateway_factory, rc), await start(gateway_factory, rc)
    token = a.staff_token(user=7)
    held = [await a.connect("waiter", token) for _ in range(2)] + [await b.connect("waiter", token)]
    for client in held:
        await client.still_served()
    for handle in (a, b):
        assert await attempt(handle.port, "waiter", token) == (429, "5")
    # Leases of users and sessions in several slots, hence on several masters.
    users = [a.staff_token(user=u) for u in range(20, 26)]
    assert len({await rc.port_of(f"{{gw:limits:user:1:{u}}}") for u in range(20, 26)}) > 1
    for user_token in users:
        assert (await attempt(b.port, "waiter", user_token))[0] == 101
    table = a.table_token(session=9)
    diners = [await a.connect("diner", table) for _ in range(6)] + [await b.connect("diner", table) for _ in range(4)]
    for client in diners:
        await client.still_served()
    assert await attempt(b.port, "diner", table) == (429, "5")
    # A slot freed on one instance is used on the other.
    await held[0].aclose()
    await a.settled(1 + 6)  # one waiter and six diners left on a
    await until_admitted(b.port, "waiter", token, within=10)
    key = "{gw:limits:user:1:7}"
    assert await command(await rc.port_of(key), "EXISTS", key) == 1


async def test_operator_commands_use_the_cluster_the_settings_name(
    redis_cluster: ClusterSet, gateway_factory: Any
) -> None:
    """``gateway publish`` and ``gateway dlq`` reach a cluster through REDIS_CLUSTER_NODES, as the
    gateway does: an event published by the command reaches a socket, and a dead letter is listed."""
    rc = redis_cluster
    handle = await start(gateway_factory, rc)
    admin = await handle.connect("admin", handle.staff_token(roles=("ADMIN",)))
    await handle.connected(1)
    env = clean_env(REDIS_CLUSTER_NODES=rc.node_list)
    published = await run_async("publish", "--type", "ROUND_PENDING", "--tenant", "1", "--branch", "2",
                                "--entity", '{"seq": 41}', env=env)
    assert published.returncode == 0, published.stderr
    assert (await receive(admin, 1))[0]["entity"]["seq"] == 41
    await xadd(rc, b"not json at all")
    with trio.fail_after(20):
        while True:
            listed = await run_async("dlq", "list", env=env)
            assert listed.returncode == 0, listed.stderr
            if listed.stdout.strip():
                break
            await trio.sleep(0.2)
    assert json.loads(listed.stdout.splitlines()[0])["error"] == "invalid: not_json"
    unreachable = await run_async("dlq", "list", env=clean_env(REDIS_CLUSTER_NODES="127.0.0.1:1"))
    assert unreachable.returncode == 1
    assert b"cannot reach cluster nodes 127.0.0.1:1" in unreachable.stderr
