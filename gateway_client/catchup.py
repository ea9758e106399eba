"""Catch-up after a reconnect: where it starts, and the request for what was missed."""

from __future__ import annotations

import ssl
from typing import Any

import trio

from gateway_client.http import HttpError, http_get
from gateway_client.listeners import log

__all__ = ["catchup_since", "fetch_missed"]


def catchup_since(last_open: float | None, last_event: float | None, margin: float) -> float | None:
    """Where catch-up starts after a reconnect; None on the first connection.

    The client's clock at the last event received (or at the previous open, if later), minus
    ``margin``: the gateway scores stored events with its own clock, so the margin absorbs a small
    skew, and de-duplication drops what the overlap returns twice.
    """
    if last_open is None:
        return None
    anchor = max(last_open, last_event or 0.0)
    return max(anchor - margin, 0.0)


async def fetch_missed(url: str, *, origin: str | None, within: float,
                       ssl_context: ssl.SSLContext | None) -> list[Any] | None:
    """The ``events`` list of a catch-up answer, oldest first; None when there is none to use.

    Best effort: a failed request, a status other than 200 or a malformed body
    is logged and skipped, and the client goes on with live events. ``within`` bounds the request.
    """
    headers = [("Origin", origin)] if origin is not None else []
    try:
        with trio.fail_after(within):
            response = await http_get(url, headers=headers, ssl_context=ssl_context)
    except (OSError, HttpError, trio.TooSlowError, trio.BrokenResourceError) as exc:
        log.warning("catch-up failed", extra={"error": repr(exc)})
        return None
    if response.status != 200:
        log.warning("catch-up refused", extra={"status": response.status})
        return None
    try:
        body = response.json()
    except ValueError:
        log.warning("catch-up: invalid JSON body")
        return None
    events = body.get("events") if isinstance(body, dict) else None
    return events if isinstance(events, list) else None
