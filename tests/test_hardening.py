"""Attacks from outside against a real gateway process: what one socket can make it hold is
bounded, and everyone else keeps being served during and after.

Each test starts ``gateway serve`` as a child process (its RSS is the gateway's alone), attacks it
over raw TCP the way the probe did, and checks the bound, the close code and the metrics.
``HARDENING_ATTACK_MIB`` scales the floods (default 24 MiB) to reproduce the full-size probe.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import httpx
import pytest
import trio
from helpers import client_frame, dev_staff_token
from trio_websocket import open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request

from gateway.redisio.embedded_config import free_port
from gateway.settings import Settings, settings_fields
from gateway_testing import DEFAULT_ORIGIN

ROOT = Path(__file__).resolve().parent.parent
ATTACK_BYTES = int(os.environ.get("HARDENING_ATTACK_MIB", "24")) * 1024 * 1024
DEV = Settings.from_env({"ENVIRONMENT": "development"}, serving=False)


PING = client_frame(first=0x89, payload=b"p" * 125)


@attrs.define
class Gateway:
    process: trio.Process
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        match = re.search(r"VmRSS:\s+(\d+) kB", status)
        assert match
        return int(match.group(1))

    async def metric(self, name: str, **labels: str) -> float:
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"{self.url}/ws/metrics")).text
        want = ",".join(f'{k}="{v}"' for k, v in labels.items())
        line = f"{name}{{{want}}} " if labels else f"{name} "
        for row in text.splitlines():
            if row.startswith(line):
                return float(row[len(line):])
        return 0.0


@asynccontextmanager
async def gateway_process(tmp_path: Path, redis_url: str, **env: str) -> AsyncIterator[Gateway]:
    names = {f.metadata["env"] for f in settings_fields()} | {"GATEWAY_TEST_REDIS_URL"}
    environ = {k: v for k, v in os.environ.items() if k not in names}
    port = free_port()
    environ.update(ENVIRONMENT="development", REDIS_URL=redis_url, WS_GATEWAY_HOST="127.0.0.1",
                   WS_GATEWAY_PORT=str(port), GATEWAY_INSTANCE_ID=f"hardening-{uuid.uuid4().hex[:8]}",
                   LOG_FORMAT="json", **env)
    log = tmp_path / "gateway.log"
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process([sys.executable, "-m", "gateway", "serve"], env=environ,
                                                   stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    handle = Gateway(process, port, log)
    try:
        with trio.fail_after(60):
            while True:
                assert process.poll() is None, log.read_text()
                try:
                    async with httpx.AsyncClient() as http:
                        if (await http.get(f"{handle.url}/ws/health")).status_code == 200:
                            break
                except httpx.HTTPError:
                    pass
                await trio.sleep(0.1)
        yield handle
        assert process.poll() is None, "the gateway died"
        assert "Traceback" not in log.read_text(errors="replace")
    finally:
        if process.poll() is None:
            process.terminate()
            with trio.move_on_after(15):
                await process.wait()
            if process.poll() is None:
                process.kill()
                await process.wait()


async def raw_socket(gw: Gateway, user: int) -> trio.SocketStream:
    """An admitted waiter socket over raw TCP, so the test can send frames no library would."""
    stream = await trio.open_tcp_stream("127.0.0.1", gw.port)
    ws = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(ws.send(Request(host="127.0.0.1", target=f"/ws/waiter?token={dev_staff_token(user)}",
                                          extra_headers=[(b"origin", DEFAULT_ORIGIN.encode())])))
    with trio.fail_after(10):
        while True:
            ws.receive_data(await stream.receive_some(65536))
            if any(isinstance(e, AcceptConnection) for e in ws.events()):
                break
    return stream


async def flood(stream: trio.SocketStream, chunk: bytes, total: int) -> int:
    """Send ``chunk`` repeatedly, never reading, until ``total`` bytes or the gateway hangs up."""
    sent = 0
    with trio.move_on_after(120):
        try:
            while sent < total:
                await stream.send_all(chunk)
                sent += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
    return sent


async def assert_served(gw: Gateway, user: int) -> None:
    """A bystander on its own socket still gets its pong."""
    url = f"ws://127.0.0.1:{gw.port}/ws/waiter?token={dev_staff_token(user)}"
    async with open_websocket_url(url, extra_headers=[("Origin", DEFAULT_ORIGIN)]) as ws:
        with trio.fail_after(10):
            await ws.send_message('{"type":"ping"}')
            assert await ws.get_message() == '{"type":"pong"}'


def report(name: str, before: int, after: int, sent: int) -> None:
    # Shown with -s; the figures for the closing note of the hardening work.
    print(f"\n{name}: sent {sent / 2**20:.1f} MiB, gateway RSS {before / 1024:.1f} -> {after / 1024:.1f} MiB")


#: The highest rate limit the settings allow: 100,000 frames per 10 ms.
NO_RATE_LIMIT = {"WS_MESSAGE_RATE_LIMIT": "100000", "WS_MESSAGE_RATE_WINDOW": "0.01"}


@pytest.mark.parametrize("rate_limit", ["30", "100000"])
async def test_ping_flood_that_never_reads_holds_nothing(tmp_path: Path, redis_url: str, rate_limit: str) -> None:
    # With the default limit every Ping counts and the flood is closed 4029 within a second.
    # With the limit out of the way, the bound is the outbox: at most one Pong pending.
    limits = NO_RATE_LIMIT if rate_limit == "100000" else {}
    async with gateway_process(tmp_path, redis_url, **limits) as gw:
        await assert_served(gw, user=2)
        before = gw.rss_kib()
        attacker = await raw_socket(gw, user=1)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(assert_served, gw, 3)
            sent = await flood(attacker, PING * 8000, ATTACK_BYTES)
        after = gw.rss_kib()
        report(f"ping flood, rate limit {rate_limit}", before, after, sent)
        assert after - before < 16 * 1024
        if rate_limit == "30":
            assert await gw.metric("wsgateway_closes_total", code="4029") == 1
            assert await gw.metric("wsgateway_inbound_rejected_total", reason="rate_limited") == 1
        else:
            assert sent >= ATTACK_BYTES  # it was read all along, and answered with one Pong at a time
        await assert_served(gw, user=4)
        await attacker.aclose()


async def test_endless_fragmented_message_is_closed(tmp_path: Path, redis_url: str) -> None:
    # Empty continuation frames add nothing to the size count; interleaved Pings used to keep the
    # heartbeat happy. The frame cap ends the message whatever the rate limit allows.
    async with gateway_process(tmp_path, redis_url, **NO_RATE_LIMIT) as gw:
        before = gw.rss_kib()
        attacker = await raw_socket(gw, user=1)
        start = client_frame(first=0x01, payload=b"{")
        fragments = (client_frame(first=0x00, payload=b"") * 50 + PING) * 2000
        async with trio.open_nursery() as nursery:
            nursery.start_soon(assert_served, gw, 3)
            await attacker.send_all(start)
            sent = await flood(attacker, fragments, ATTACK_BYTES)
        after = gw.rss_kib()
        report("endless fragments", before, after, sent)
        assert after - before < 16 * 1024
        assert await gw.metric("wsgateway_inbound_rejected_total", reason="too_many_fragments") == 1
        assert await gw.metric("wsgateway_closes_total", code="1009") == 1
        await assert_served(gw, user=4)


async def test_fragments_count_in_the_rate_limit(tmp_path: Path, redis_url: str) -> None:
    async with gateway_process(tmp_path, redis_url) as gw:
        attacker = await raw_socket(gw, user=1)
        await attacker.send_all(client_frame(first=0x01, payload=b"{") + client_frame(first=0x00, payload=b"") * 40)
        with trio.fail_after(10):
            closes = 0.0
            while closes != 1:  # polling another process's metrics: no event to wait on
                await trio.sleep(0.1)
                closes = await gw.metric("wsgateway_closes_total", code="4029")
        await assert_served(gw, user=2)


async def test_deeply_nested_json_ping_is_just_another_message(tmp_path: Path, redis_url: str) -> None:
    async with gateway_process(tmp_path, redis_url) as gw:
        url = f"ws://127.0.0.1:{gw.port}/ws/waiter?token={dev_staff_token(1)}"
        async with open_websocket_url(url, extra_headers=[("Origin", DEFAULT_ORIGIN)]) as ws:
            await ws.send_message('{"type":"ping","x":' + "[" * 1000)
            await ws.send_message('{"type":"ping"}')
            with trio.fail_after(10):
                assert await ws.get_message() == '{"type":"pong"}'
        assert await gw.metric("wsgateway_inbound_messages_total", kind="other") == 1
        assert await gw.metric("wsgateway_http_requests_total", route="-", status="500") == 0


def test_attack_size_is_meaningful() -> None:
    # Guards the environment knob: a flood smaller than the send budget would prove nothing.
    assert 2 * DEV.send_queue_max_bytes < ATTACK_BYTES
    assert time.time() > 0
