"""One HTTP GET for the catch-up request, with httpx (on Trio through anyio)."""

from __future__ import annotations

import json
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

__all__ = ["HttpError", "HttpResponse", "http_get"]

#: What every catch-up request says about itself; the rest of the request is httpx's.
_HEADERS = (("Accept", "application/json"), ("Connection", "close"), ("User-Agent", "gateway.client"))


class HttpError(Exception):
    """The HTTP exchange failed (connection, protocol error, oversized body, unsupported URL)."""


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def http_get(url: str, *, headers: Sequence[tuple[str, str]] = (), max_body: int = 8 << 20,
                   ssl_context: ssl.SSLContext | None = None) -> HttpResponse:
    """One ``GET`` over a fresh connection (``Connection: close``); no redirects, no decoding, no
    proxy from the environment.

    Time limits are the caller's (wrap in ``trio.fail_after``).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HttpError(f"unsupported URL: {parts.scheme}://{parts.hostname or ''}")
    verify: ssl.SSLContext | bool = ssl_context if ssl_context is not None else True
    try:
        async with httpx.AsyncClient(verify=verify, trust_env=False, timeout=None, follow_redirects=False) as client:
            del client.headers["Accept-Encoding"]  # the body is read as sent: ask for no encoding
            async with client.stream("GET", url, headers=[*_HEADERS, *headers]) as response:
                body = bytearray()
                async for chunk in response.aiter_raw():
                    body += chunk
                    if len(body) > max_body:
                        raise HttpError(f"response body over {max_body} bytes")
                return HttpResponse(response.status_code, tuple(response.headers.raw), bytes(body))
    except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError) as exc:
        raise HttpError(f"{type(exc).__name__}: {exc}") from exc
