"""The stream's recovery paths behind Redis Sentinel and on a Redis Cluster, with real processes:
entries left pending by another consumer are reclaimed (XAUTOCLAIM) and stored for catch-up,
invalid entries go to the dead-letter stream, and a deleted stream is recovered (NOGROUP)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import attrs
import coredis
import httpx
import pytest
import trio
from coredis.response.types import StreamPending

from gateway.core.events import encode_envelope, envelope
from gateway.ingest.dlq import list_dead_letters
from gateway.redisio.client import STREAM_MAXLEN, xadd_capped
from gateway.redisio.topology import Cluster, SentinelMaster, Topology
from gateway_testing import GatewayHandle
from gateway_testing.topologies import MASTER_NAME, ClusterSet, SentinelSet

STREAM = "events:critical"
FAST = {"redis_backoff_base": 0.05, "redis_backoff_cap": 0.5, "breaker_recovery": 0.5, "stream_block_ms": 200,
        "reclaim_idle": 0.5, "reclaim_interval": 0.5}


@attrs.frozen
class Deployment:
    settings: dict[str, Any]
    topology: Topology
    dlq: str


@pytest.fixture(params=["sentinel", "cluster"])
async def deployment(request: pytest.FixtureRequest) -> AsyncIterator[Deployment]:
    if request.param == "sentinel":
        rs = await SentinelSet.start()
        try:
            yield Deployment({"redis_sentinels": rs.sentinel_list, "redis_sentinel_master": MASTER_NAME},
                             SentinelMaster(tuple(("127.0.0.1", s.port) for s in rs.sentinels), MASTER_NAME),
                             "events:dlq")
        finally:
            await trio.to_thread.run_sync(rs.close)
    else:
        rc = await ClusterSet.start()
        try:
            yield Deployment({"redis_cluster_nodes": rc.node_list}, Cluster(tuple(("127.0.0.1", p) for p in rc.ports)),
                             "{events:critical}:dlq")
        finally:
            await trio.to_thread.run_sync(rc.close)


def numbered(seq: int) -> bytes:
    return encode_envelope(envelope("ROUND_PENDING", 1, 2, entity={"seq": seq}))


async def pending(client: coredis.Redis[bytes], group: str) -> int:
    summary = await client.xpending(STREAM, group)
    assert isinstance(summary, StreamPending)
    return int(summary.pending)


async def test_pending_entries_of_another_consumer_are_reclaimed_and_stored_for_catch_up(
    deployment: Deployment, gateway_factory: Any
) -> None:
    instance = f"topo-{uuid.uuid4().hex[:6]}"
    group = f"ws_gateway_group:{instance}"
    async with deployment.topology.client() as client:
        # A consumer of this instance's group that read an entry and vanished before acknowledging.
        await xadd_capped(client, STREAM, {"data": numbered(1)}, STREAM_MAXLEN)
        await client.xgroup_create(STREAM, group, "0", mkstream=True)
        await client.xreadgroup(group, "vanished", count=1, streams={STREAM: ">"})
        assert await pending(client, group) == 1
        handle: GatewayHandle = await gateway_factory(redis_url=None, instance_id=instance,
                                                      **deployment.settings, **FAST)
        with trio.fail_after(20):
            while await pending(client, group):  # noqa: ASYNC110 - reclaimed by the gateway's own pass
                await trio.sleep(0.1)
    token = handle.staff_token(roles=("ADMIN",))
    async with httpx.AsyncClient() as http:
        with trio.fail_after(10):
            while True:
                response = await http.get(f"{handle.url}/ws/catchup", params={"branch_id": 2, "since": 0, "token": token})
                assert response.status_code == 200
                if response.json()["events"]:
                    break
                await trio.sleep(0.1)
    assert [e["entity"]["seq"] for e in response.json()["events"]] == [1]


async def test_dead_letters_and_a_deleted_stream(deployment: Deployment, gateway_factory: Any) -> None:
    handle: GatewayHandle = await gateway_factory(redis_url=None, **deployment.settings, **FAST)
    assert handle.settings.dead_letter_stream == deployment.dlq
    admin = await handle.connect("admin", handle.staff_token(roles=("ADMIN",)))
    await handle.connected(1)
    async with deployment.topology.client() as client:
        await xadd_capped(client, STREAM, {"data": b"not json at all"}, STREAM_MAXLEN)
        with trio.fail_after(10):
            while not (letters := await list_dead_letters(client, deployment.dlq)):  # noqa: ASYNC110
                await trio.sleep(0.05)
        assert [d.fields["error"] for d in letters] == ["invalid: not_json"]
        await client.delete([STREAM])  # NOGROUP: the group is recreated and delivery goes on
        with trio.fail_after(20):
            seq = 10
            while True:
                await xadd_capped(client, STREAM, {"data": numbered(seq)}, STREAM_MAXLEN)
                frame = await admin.receive(0.5)
                if isinstance(frame, dict) and "entity" in frame:
                    break
                seq += 1
