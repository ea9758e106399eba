"""pytest plugin: run the real gateway inside a test suite (entry point ``pytest11``).

Install with ``pip install gateway[testing]``; the fixtures are then available everywhere:

- ``redis_server``: a private ``redis-server`` for the session (or ``GATEWAY_TEST_REDIS_URL``);
- ``redis_url``: its URL, with the database flushed before each test;
- ``gateway``: a running gateway on a free port (function scope), a :class:`GatewayHandle`;
- ``gateway_factory``: start gateways with custom settings, ``await gateway_factory(heartbeat_timeout=2)``;
- ``publisher``: writes events the way the backend does (stream and channels);
- token factories and a WebSocket client factory on the handle: ``await gw.connect("waiter", token)``.

Async tests run under Trio (``trio_mode = true`` in the pytest configuration).
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, connect_websocket_url

from gateway.app import Gateway, run_gateway
from gateway.core.events import encode_envelope, envelope
from gateway.core.tokens import mint_staff_token, mint_table_token
from gateway.ingest import make_client
from gateway.redis_config import RedisConfig
from gateway.redis_ops import STREAM_MAXLEN, xadd_capped
from gateway.redis_process import RedisProcess
from gateway.settings import Settings

DEFAULT_ORIGIN = "http://localhost:5173"


class NoMessage(AssertionError):
    pass


@attrs.define(eq=False)
class WSClient:
    """A test-side WebSocket with helpers; messages are parsed JSON when they are JSON."""

    ws: WebSocketConnection
    received: list[Any] = attrs.Factory(list)

    async def send(self, text: str) -> None:
        await self.ws.send_message(text)

    async def receive(self, within: float = 5.0) -> Any:
        with trio.move_on_after(within):
            raw = await self.ws.get_message()
            try:
                value: Any = json.loads(raw)
            except (ValueError, TypeError):
                value = raw
            self.received.append(value)
            return value
        raise NoMessage(f"no message within {within} s")

    async def expect(self, event_type: str, within: float = 5.0) -> dict[str, Any]:
        """Wait for the next event of ``event_type`` (other messages are kept in ``received``)."""
        deadline = trio.current_time() + within
        while True:
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                raise NoMessage(f"no {event_type} within {within} s")
            message = await self.receive(within=remaining)
            if isinstance(message, dict) and message.get("type") == event_type:
                return message

    async def expect_nothing(self, within: float = 0.5) -> None:
        with trio.move_on_after(within):
            message = await self.ws.get_message()
            raise AssertionError(f"unexpected message: {message!r}")

    async def collect(self, within: float) -> list[Any]:
        """Everything that arrives within ``within`` seconds."""
        out: list[Any] = []
        with trio.move_on_after(within):
            while True:
                out.append(await self.receive(within=within + 1))
        return out

    async def closed(self, within: float = 5.0) -> tuple[int | None, str | None]:
        """Wait until the server closes this socket; returns (code, reason)."""
        with trio.fail_after(within):
            try:
                while True:
                    await self.ws.get_message()
            except ConnectionClosed as exc:
                reason = exc.reason
                return (reason.code if reason else None, reason.reason if reason else None)

    async def still_served(self, within: float = 5.0) -> None:
        """Ping and get exactly the pong back: the socket is open and nothing else was queued."""
        await self.ws.send_message("ping")
        with trio.fail_after(within):
            assert await self.ws.get_message() == '{"type":"pong"}'

    async def aclose(self) -> None:
        await self.ws.aclose()


@attrs.define(eq=False)
class GatewayHandle:
    gw: Gateway
    nursery: trio.Nursery

    @property
    def settings(self) -> Settings:
        return self.gw.settings

    @property
    def port(self) -> int:
        return self.gw.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def staff_token(self, user: int = 7, tenant: int = 1, branches: Sequence[int] = (2,),
                    roles: Sequence[str] = ("WAITER",), **kwargs: Any) -> str:
        s = self.settings
        return mint_staff_token(secret=s.jwt_secret, issuer=s.jwt_issuer, audience=s.jwt_audience, user_id=user,
                                tenant_id=tenant, branch_ids=list(branches), roles=list(roles), **kwargs)

    def table_token(self, tenant: int = 1, branch: int = 2, table: int = 5, session: int = 9, **kwargs: Any) -> str:
        return mint_table_token(secret=self.settings.table_token_secret, tenant_id=tenant, branch_id=branch,
                                table_id=table, session_id=session, **kwargs)

    async def connect(self, endpoint: str, token: str | None = None, *, origin: str | None = DEFAULT_ORIGIN,
                      query: str | None = None, message_queue_size: int = 1000) -> WSClient:
        """Open a socket on ``/ws/<endpoint>``; it is closed with the test's nursery."""
        if query is None:
            param = "table_token" if endpoint == "diner" else "token"
            query = f"{param}={token}" if token is not None else ""
        headers = [(b"Origin", origin.encode())] if origin is not None else []
        ws = await connect_websocket_url(self.nursery, f"{self.ws_url}/ws/{endpoint}?{query}",
                                         extra_headers=headers, message_queue_size=message_queue_size)
        return WSClient(ws)

    async def connected(self, count: int, within: float = 5.0) -> None:
        """Wait until ``count`` sockets are registered (auth and limits passed)."""
        with trio.fail_after(within):
            while len(self.gw.index) != count:  # noqa: ASYNC110 - test helper, bounded by fail_after
                await trio.sleep(0.01)

    async def settled(self, open_sockets: int, within: float = 5.0) -> None:
        """Wait until exactly ``open_sockets`` sockets exist, all registered: nothing half-open."""
        gw = self.gw
        with trio.fail_after(within):
            # The gateway signals no event when a socket is gone, so poll, bounded by the deadline.
            while len(gw.sockets) != open_sockets or len(gw.index) != open_sockets:  # noqa: ASYNC110
                await trio.sleep(0.01)
        assert set(gw.index) == gw.sockets
        if open_sockets == 0:
            assert gw.index.is_empty_structurally()

    async def stop(self) -> None:
        self.gw.request_stop()


@attrs.define(eq=False)
class Publisher:
    """Writes events the way the backend does: XADD to the stream, PUBLISH to channels."""

    redis_url: str
    stream: str = "events:critical"

    async def _run(self, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        client = make_client(self.redis_url)
        async with client:
            return await fn(client)

    async def stream_event(self, env: Mapping[str, Any] | bytes) -> str:
        payload = env if isinstance(env, bytes) else encode_envelope(env)
        entry = await self._run(lambda c: xadd_capped(c, self.stream, {"data": payload}, STREAM_MAXLEN))
        return entry.decode() if isinstance(entry, bytes) else str(entry)

    async def channel_event(self, channel: str, env: Mapping[str, Any] | bytes) -> int:
        payload = env if isinstance(env, bytes) else encode_envelope(env)
        return int(await self._run(lambda c: c.publish(channel, payload)))

    async def many(self, items: Sequence[tuple[str | None, Mapping[str, Any] | bytes]]) -> None:
        """Several events in one pipelined round trip; channel None means the stream."""
        async def send(client: Any) -> None:
            async with client.pipeline(transaction=False) as pipe:
                for channel, env in items:
                    payload = env if isinstance(env, bytes) else encode_envelope(env)
                    if channel is None:
                        xadd_capped(pipe, self.stream, {"data": payload}, STREAM_MAXLEN)
                    else:
                        pipe.publish(channel, payload)
        await self._run(send)

    envelope = staticmethod(envelope)


def test_settings(redis_url: str, **overrides: Any) -> Settings:
    base: dict[str, Any] = {
        "redis_url": redis_url,
        # Tests mint tokens with the public development secrets.
        "environment": "development",
        "host": "127.0.0.1",
        "port": 0,
        "instance_id": f"test-{uuid.uuid4().hex[:8]}",
        "shutdown_timeout": 3.0,
    }
    base.update(overrides)
    return Settings.from_env({}, **base)


test_settings.__test__ = False  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A private redis-server for the test session (``GATEWAY_TEST_REDIS_URL`` uses an existing one)."""
    given = os.environ.get("GATEWAY_TEST_REDIS_URL")
    if given:
        yield given
        return
    with RedisProcess(RedisConfig(port=0)) as proc:
        yield proc.url


@pytest.fixture
async def redis_url(redis_server: str) -> AsyncIterator[str]:
    client = make_client(redis_server)
    async with client:
        await client.flushall()
    yield redis_server


@pytest.fixture
async def gateway_factory(
    nursery: trio.Nursery, redis_url: str
) -> AsyncIterator[Callable[..., Awaitable[GatewayHandle]]]:
    """Start gateways; at teardown each is stopped the way a deployment stops it (a drain)."""
    running: list[tuple[Gateway, trio.Event]] = []

    async def start(**overrides: Any) -> GatewayHandle:
        # A test may point its gateway at its own Redis (fault tests kill that one).
        settings = test_settings(overrides.pop("redis_url", redis_url), **overrides)
        done = trio.Event()

        async def run(task_status: trio.TaskStatus[Gateway] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                await run_gateway(settings, task_status=task_status)
            finally:
                done.set()

        gw: Gateway = await nursery.start(run)
        running.append((gw, done))
        return GatewayHandle(gw, nursery)

    yield start
    for gw, done in running:
        gw.request_stop()
        with trio.move_on_after(10):
            await done.wait()


@pytest.fixture
async def gateway(gateway_factory: Callable[..., Awaitable[GatewayHandle]]) -> GatewayHandle:
    return await gateway_factory()


@pytest.fixture
def publisher(redis_url: str) -> Publisher:
    return Publisher(redis_url)


@asynccontextmanager
async def running_gateway(settings: Settings) -> AsyncIterator[GatewayHandle]:
    """Run a gateway for the duration of the block (outside pytest fixtures)."""
    async with trio.open_nursery() as nursery:
        gw = await nursery.start(run_gateway, settings)
        try:
            yield GatewayHandle(gw, nursery)
        finally:
            gw.request_stop()


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
