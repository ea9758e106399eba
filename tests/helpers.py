"""Helpers shared by the test modules (``from helpers import ...``; tests/ is on sys.path)."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any

import trio
from trio_websocket import ConnectionClosed, ConnectionRejected, open_websocket_url

from gateway.core.model import Principal
from gateway.settings import Settings
from gateway_testing import DEFAULT_ORIGIN, staff_token


def dev_staff_token(user: int, **kwargs: Any) -> str:
    """A staff token signed with the development defaults, which a gateway started without any
    configuration (a subprocess, an nginx upstream) uses; keyword arguments as
    ``gateway_testing.staff_token`` (tenant 1, branch 2, WAITER by default)."""
    return staff_token(Settings.from_env({"ENVIRONMENT": "development"}), user, **kwargs)


def compact(env: Mapping[str, Any]) -> bytes:
    """An envelope as the gateway puts it on the wire: compact JSON, UTF-8 kept as is."""
    return json.dumps(env, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def client_frame(payload: bytes, *, first: int = 0x81, masked: bool = True) -> bytes:
    """A WebSocket frame as a client sends it, built by hand because client libraries refuse to
    send malformed ones. ``first`` is the first byte (FIN, RSV bits, opcode; 0x81 is a final text
    frame); clients must mask (RFC 6455 §5.3), ``masked=False`` breaks that rule on purpose."""
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = struct.pack("!BB", first, mask_bit | n)
    elif n < 0x10000:
        head = struct.pack("!BBH", first, mask_bit | 126, n)
    else:
        head = struct.pack("!BBQ", first, mask_bit | 127, n)
    if not masked:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


def metric_value(metric: Any, *labels: str) -> float:
    """Current value of a prometheus counter or gauge (or of one labelled child)."""
    child = metric.labels(*labels) if labels else metric
    return float(child._value.get())


def diner(tenant: int, branch: int, session: int) -> Principal:
    """A diner's principal as the gateway builds it: user id ``-session``, one branch, and a
    table (``session + 1000``) so that table and session stay distinct."""
    return Principal(
        endpoint="diner",
        tenant_id=tenant,
        user_id=-session,
        branch_ids=frozenset({branch}),
        session_id=session,
        table_id=session + 1000,
    )


async def attempt(port: int, endpoint: str, token: str, *, forwarded: str | None = None,
                  hold: trio.Event | None = None) -> tuple[int, str | None]:
    """One connection attempt: (101, None) once admitted and answering a ping (held open until
    ``hold`` is set), (close code, None) when closed after the upgrade, else the refusal's
    (status, Retry-After)."""
    param = "table_token" if endpoint == "diner" else "token"
    headers = [("Origin", DEFAULT_ORIGIN)] + ([("X-Forwarded-For", forwarded)] if forwarded else [])
    try:
        async with open_websocket_url(f"ws://127.0.0.1:{port}/ws/{endpoint}?{param}={token}",
                                      extra_headers=headers) as ws:
            # A close after the upgrade may arrive with the 101 itself, before the ping is sent.
            with trio.fail_after(10):
                try:
                    await ws.send_message("ping")
                    await ws.get_message()
                except ConnectionClosed as exc:
                    return (exc.reason.code if exc.reason else 1006), None
            if hold is not None:
                await hold.wait()
            return 101, None
    except ConnectionRejected as exc:
        retry = dict(exc.headers or ()).get(b"retry-after")
        return exc.status_code, retry.decode() if retry else None


async def until_admitted(port: int, endpoint: str, token: str, within: float) -> None:
    """Retry as a client backing off would (faster), until admitted."""
    with trio.fail_after(within):
        while (await attempt(port, endpoint, token))[0] != 101:  # noqa: ASYNC110 - a client retrying
            await trio.sleep(0.2)
