"""The crash test of test_faults.py for protocol v2: the gateway process killed with SIGKILL at
about event 300 and started again at about 600, of 1,000 events at 200/s. A v2 client that keeps
the last offset per stream and resumes on reconnect must see every event exactly once and in
order, with no de-duplication of its own (D20)."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from test_faults import (
    GatewayProcess,
    _is_disconnect,
    crash_env,
    private_redis,
    run_through_a_crash,
)
from trio_websocket import open_websocket_url

from gateway.redisio.client import make_client
from gateway.redisio.embedded import RedisProcess
from gateway.redisio.embedded_config import free_port
from gateway.settings import Settings
from gateway_testing import DEFAULT_ORIGIN, staff_token

__all__ = ["private_redis"]


@attrs.define(eq=False)
class V2Recorder:
    """Everything a v2 client saw, in arrival order: nothing merged, nothing dropped."""

    total: int
    seqs: list[int] = attrs.Factory(list)
    resumed: list[dict[str, Any]] = attrs.Factory(list)
    positions: dict[str, str] = attrs.Factory(dict)
    unpositioned: int = 0
    connections: int = 0
    complete: trio.Event = attrs.Factory(trio.Event)

    def record(self, frame: dict[str, Any]) -> None:
        if frame.get("type") == "resumed":
            self.resumed.append(frame)
            return
        self.seqs.append(int(frame["entity"]["seq"]))
        pos = frame.get("_pos")
        if pos is None:
            self.unpositioned += 1
        else:
            self.positions[pos["stream"]] = pos["offset"]
        if len(set(self.seqs)) == self.total:
            self.complete.set()


async def v2_client(rec: V2Recorder, port: int, token: str, connected: trio.Event) -> None:
    url = f"ws://127.0.0.1:{port}/ws/admin?token={token}"
    delay = 0.05
    while True:
        try:
            async with open_websocket_url(url, extra_headers=[(b"Origin", DEFAULT_ORIGIN.encode())],
                                          subprotocols=["integrador.v2"], message_queue_size=5000) as ws:
                welcome = json.loads(await ws.get_message())
                assert welcome["type"] == "welcome", welcome
                await ws.send_message(json.dumps({"type": "resume", "positions": rec.positions}))
                rec.connections += 1
                delay = 0.05
                connected.set()
                while True:
                    rec.record(json.loads(await ws.get_message()))
        except BaseException as exc:
            if not _is_disconnect(exc):
                raise
        await trio.sleep(delay)
        delay = min(delay * 2, 0.25)


@pytest.mark.slow
async def test_v2_client_gets_every_event_once_in_order_across_a_gateway_crash(
    private_redis: Callable[..., RedisProcess], tmp_path: Path
) -> None:
    total, rate, kill_at, restart_at = 1000, 200.0, 300, 600
    redis = private_redis()
    await trio.to_thread.run_sync(redis.start)
    port = free_port()
    settings = Settings.from_env({}, serving=False)
    env = crash_env(redis.url, port, "crash-test-v2")
    proc = GatewayProcess(env, tmp_path / "gateway.log")
    token = staff_token(settings, 1, roles=("ADMIN",), ttl=3600)
    group = f"{settings.group_prefix}:crash-test-v2"
    rec = V2Recorder(total)
    client = make_client(redis.url)
    try:
        proc.start()
        await run_through_a_crash(client, proc, group, functools.partial(v2_client, rec, port, token), rec.complete,
                                  total=total, rate=rate, kill_at=kill_at, restart_at=restart_at, settle=0.5)
    finally:
        proc.stop()

    duplicates = len(rec.seqs) - len(set(rec.seqs))
    lost = total - len(set(rec.seqs))
    replayed = sum(int(r["streams"].get("1:2", {}).get("replayed", 0)) for r in rec.resumed)
    print(f"\nv2 crash test: published={total} delivered={len(rec.seqs)} duplicates={duplicates} lost={lost} "
          f"connections={rec.connections} resumes={len(rec.resumed)} replayed={replayed} "
          f"unpositioned={rec.unpositioned} gateway_starts={proc.starts}")
    assert proc.starts == 2 and rec.connections >= 2
    assert all(s["recovered"] for r in rec.resumed for s in r["streams"].values()), rec.resumed
    assert rec.seqs == list(range(total)), (duplicates, lost, [s for s in range(total) if s not in rec.seqs][:20])
    assert rec.unpositioned == 0
