"""HTTP requests and responses as plain values, shared by the routes and the listener."""

from __future__ import annotations

import json
from typing import Any

import attrs

JSON = "application/json"

_REASONS = {
    200: b"OK", 202: b"Accepted", 204: b"No Content", 400: b"Bad Request", 401: b"Unauthorized",
    403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout",
    413: b"Content Too Large", 415: b"Unsupported Media Type", 422: b"Unprocessable Content",
    426: b"Upgrade Required", 429: b"Too Many Requests", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 503: b"Service Unavailable",
}


@attrs.frozen
class Response:
    status: int
    body: bytes
    content_type: str = JSON
    headers: tuple[tuple[bytes, bytes], ...] = ()

    @property
    def reason(self) -> bytes:
        return _REASONS.get(self.status, b"")


def json_response(status: int, payload: Any, headers: tuple[tuple[bytes, bytes], ...] = ()) -> Response:
    return Response(status, json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode(), JSON, headers)


def text_response(status: int, detail: str) -> Response:
    """The existing gateway's error body, ``{"detail": ...}``, so front ends parse it unchanged."""
    return json_response(status, {"detail": detail})


@attrs.frozen
class HttpRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[bytes, bytes]
    body: bytes
    #: The TCP peer's address (not X-Forwarded-For): who is really on the other end.
    peer: str = "-"

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None
