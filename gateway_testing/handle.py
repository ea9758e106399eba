"""A gateway running inside the test: ``GatewayHandle``, the settings tests start it with, and the
token factories that use its secrets."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
from trio_websocket import connect_websocket_url

from gateway.app import Gateway, run_gateway
from gateway.core.model import credential_param
from gateway.core.tokens import mint_staff_token, mint_table_token
from gateway.settings import Settings
from gateway_testing.sockets import DEFAULT_ORIGIN, WSClient

__all__ = ["GatewayHandle", "running_gateway", "staff_token", "table_token", "test_settings"]


def staff_token(settings: Settings, user: int = 7, tenant: int = 1, branches: Sequence[int] = (2,),
                roles: Sequence[str] = ("WAITER",), **kwargs: Any) -> str:
    """A staff JWT signed with ``settings``' secrets (extra keyword arguments go to
    ``gateway.core.tokens.mint_staff_token``, e.g. ``sector_ids=[3]``, ``ttl=5``)."""
    s = settings
    return mint_staff_token(secret=s.jwt_secret, issuer=s.jwt_issuer, audience=s.jwt_audience, user_id=user,
                            tenant_id=tenant, branch_ids=list(branches), roles=list(roles), **kwargs)


def table_token(settings: Settings, tenant: int = 1, branch: int = 2, table: int = 5, session: int = 9,
                **kwargs: Any) -> str:
    """A table JWT signed with ``settings``' table-token secret."""
    return mint_table_token(secret=settings.table_token_secret, tenant_id=tenant, branch_id=branch,
                            table_id=table, session_id=session, **kwargs)


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
        return staff_token(self.settings, user, tenant, branches, roles, **kwargs)

    def table_token(self, tenant: int = 1, branch: int = 2, table: int = 5, session: int = 9, **kwargs: Any) -> str:
        return table_token(self.settings, tenant, branch, table, session, **kwargs)

    async def connect(self, endpoint: str, token: str | None = None, *, origin: str | None = DEFAULT_ORIGIN,
                      query: str | None = None, message_queue_size: int = 1000,
                      subprotocols: Sequence[str] = ()) -> WSClient:
        """Open a socket on ``/ws/<endpoint>``; it is closed with the test's nursery."""
        if query is None:
            query = f"{credential_param(endpoint)}={token}" if token is not None else ""
        headers = [(b"Origin", origin.encode())] if origin is not None else []
        ws = await connect_websocket_url(self.nursery, f"{self.ws_url}/ws/{endpoint}?{query}",
                                         extra_headers=headers, message_queue_size=message_queue_size,
                                         subprotocols=list(subprotocols) or None)
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


@asynccontextmanager
async def running_gateway(settings: Settings) -> AsyncIterator[GatewayHandle]:
    """Run a gateway for the duration of the block (outside pytest fixtures)."""
    async with trio.open_nursery() as nursery:
        gw = await nursery.start(run_gateway, settings)
        try:
            yield GatewayHandle(gw, nursery)
        finally:
            gw.request_stop()
