"""A Python client for the gateway, with the behaviour the audit demands of every front end.

``GatewayClient`` connects to ``/ws/<endpoint>`` and keeps the socket alive: its own pong timer
per ping, backoff between attempts (1 s doubling to 30 s, plus 0–30 %, at most 50 reconnect
attempts, then ``on_max_reconnect()``), final close codes 4001/4003/4029 (``on_final_close``),
listeners per event type or ``"*"`` (plain and throttled), and ``update_token()``. It speaks
protocol v2 by default (``protocol=2``): it keeps the last position per stream and resumes from it
on every reconnect (each event exactly once, in order; ``on_recovery_failed(streams)`` when the
gateway could not recover a stream), and refreshes a callable token in-band before it expires.
Against a gateway that does not select v2 it catches up over HTTP after every reconnect, with
de-duplication. See docs/client.md.

The decision-making parts are plain classes without I/O (``Backoff``, ``ReconnectPolicy``,
``Listeners``, ``Throttle``, ``RecentKeys``); ``GatewayClient`` wires them to Trio. Catch-up uses
``http_get`` (httpx).

Usage (structured: ``run()`` lives in the caller's nursery)::

    async with trio.open_nursery() as nursery:
        client = GatewayClient("ws://localhost:8001", "waiter", token, branch_id=2,
                               origin="http://localhost:5173")
        unsubscribe = client.on("ROUND_READY", lambda event: print(event["entity"]))
        nursery.start_soon(client.run)
        ...
        await client.close()
"""

from gateway_client.client import GatewayClient
from gateway_client.dedup import RecentKeys, event_key
from gateway_client.http import HttpError, HttpResponse, http_get
from gateway_client.listeners import Event, Listener, Listeners, Throttle
from gateway_client.policy import (
    FINAL_CLOSE_CODES,
    HEARTBEAT_TIMEOUT,
    Backoff,
    CloseAction,
    CloseInfo,
    ConnectionState,
    Decision,
    ReconnectPolicy,
)
from gateway_client.urls import session_id_from_table_token
from gateway_client.v2 import V2Session

__all__ = [
    "FINAL_CLOSE_CODES",
    "HEARTBEAT_TIMEOUT",
    "Backoff",
    "CloseAction",
    "CloseInfo",
    "ConnectionState",
    "Decision",
    "Event",
    "GatewayClient",
    "HttpError",
    "HttpResponse",
    "Listener",
    "Listeners",
    "RecentKeys",
    "ReconnectPolicy",
    "Throttle",
    "V2Session",
    "event_key",
    "http_get",
    "session_id_from_table_token",
]
