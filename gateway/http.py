"""Plain HTTP routes on the gateway's port: health, metrics, catch-up, publish, CORS.

Errors use the existing gateway's ``{"detail": ...}`` body so front ends parse them unchanged.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import trio

from gateway import __version__, webassets
from gateway.broadcast import Job
from gateway.events import InvalidEvent, parse_event
from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("gateway.http")

JSON = "application/json"


@attrs.frozen
class Response:
    status: int
    body: bytes
    content_type: str = JSON
    headers: tuple[tuple[bytes, bytes], ...] = ()

    @property
    def reason(self) -> bytes:
        return _REASONS.get(self.status, b"")


_REASONS = {
    200: b"OK", 202: b"Accepted", 204: b"No Content", 400: b"Bad Request", 401: b"Unauthorized",
    403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout",
    413: b"Content Too Large", 415: b"Unsupported Media Type", 422: b"Unprocessable Content",
    426: b"Upgrade Required", 431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    503: b"Service Unavailable",
}


def json_response(status: int, payload: Any, headers: tuple[tuple[bytes, bytes], ...] = ()) -> Response:
    return Response(status, json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode(), JSON, headers)


def text_response(status: int, detail: str) -> Response:
    return json_response(status, {"detail": detail})


@attrs.frozen
class HttpRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[bytes, bytes]
    body: bytes

    def param(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[0] if values else None


Handler = Callable[["Gateway", HttpRequest], Awaitable[Response]]


async def health(gw: Gateway, req: HttpRequest) -> Response:
    """The existing gateway's keys (§1.3); 503 with status "draining" during a drain."""
    body: dict[str, Any] = {
        "status": "draining" if gw.draining else "healthy",
        "service": "ws-gateway",
        "version": __version__,
        "environment": gw.settings.environment,
        **gw.stats(),
    }
    return json_response(503 if gw.draining else 200, body)


async def health_detailed(gw: Gateway, req: HttpRequest) -> Response:
    redis = await gw.probe_redis()
    degraded = not redis["ok"] or gw.draining
    body: dict[str, Any] = {
        "status": "draining" if gw.draining else ("degraded" if degraded else "healthy"),
        "service": "ws-gateway",
        "version": __version__,
        "environment": gw.settings.environment,
        "instance_id": gw.settings.instance_id,
        "uptime_seconds": round(time.monotonic() - gw.started_at, 1),
        "connections": {**gw.stats(), "heartbeat_stats": gw.heartbeat_stats()},
        "dependencies": {"redis": redis},
        "subscriber_metrics": gw.subscriber_stats(),
    }
    return json_response(503 if degraded else 200, body)


async def metrics(gw: Gateway, req: HttpRequest) -> Response:
    return Response(200, gw.metrics.render(gw.stats()), METRICS_CONTENT_TYPE)


async def publish(gw: Gateway, req: HttpRequest) -> Response:
    """D19: validate an envelope and append it to the critical stream (bearer token required)."""
    token = gw.settings.publish_token
    if token is None:
        return text_response(404, "Not Found")
    auth = req.headers.get(b"authorization", b"")
    scheme, _, given = auth.partition(b" ")
    if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), token.encode()):
        return text_response(401, "Invalid publish token")
    ctype = req.headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower()
    if ctype != b"application/json":
        return text_response(415, "Content-Type must be application/json")
    gw.metrics.events_received.labels("publish").inc()
    try:
        parse_event(req.body, max_size=gw.settings.max_message_size)
    except InvalidEvent as exc:
        gw.metrics.events_invalid.labels("publish", exc.reason).inc()
        return text_response(422, f"Invalid event: {exc.reason}")
    entry_id = await gw.append_to_stream(req.body)
    if entry_id is None:
        return text_response(503, "Redis unavailable")
    return json_response(202, {"id": entry_id, "stream": gw.settings.stream})


async def catchup(gw: Gateway, req: HttpRequest) -> Response:
    return await gw.catchup.staff(req)


async def catchup_session(gw: Gateway, req: HttpRequest) -> Response:
    return await gw.catchup.session(req)


async def web_asset(gw: Gateway, req: HttpRequest) -> Response:
    found = webassets.lookup(req.path, console=webassets.console_enabled(gw.settings))
    return Response(200, found[1], found[0], ((b"cache-control", b"no-cache"),)) if found else text_response(404, "Not Found")


async def dev_token(gw: Gateway, req: HttpRequest) -> Response:
    if gw.settings.environment != "development":
        return text_response(404, "Not Found")
    try:
        return json_response(200, webassets.dev_token(gw.settings, req.body))
    except webassets.DevTokenError as exc:
        return text_response(422, str(exc))


ROUTES: dict[str, dict[str, Handler]] = {
    "/ws/health": {"GET": health},
    "/ws/health/detailed": {"GET": health_detailed},
    "/ws/metrics": {"GET": metrics},
    "/ws/catchup": {"GET": catchup},
    "/ws/catchup/session": {"GET": catchup_session},
    "/ws/publish": {"POST": publish},
    "/ws/dev/token": {"POST": dev_token},
    **{path: {"GET": web_asset} for path in webassets.PATHS},
}
_WS_ENDPOINTS = frozenset({"/ws/waiter", "/ws/kitchen", "/ws/admin", "/ws/diner"})
_CORS_METHODS = b"GET, POST, OPTIONS"
_CORS_HEADERS = b"Authorization, Content-Type, X-Table-Token"


def _cors_headers(gw: Gateway, origin: bytes | None) -> tuple[tuple[bytes, bytes], ...]:
    if origin is None or origin.decode("latin-1") not in gw.origins:
        return ()
    return (
        (b"access-control-allow-origin", origin),
        (b"access-control-allow-credentials", b"true"),
        (b"vary", b"Origin"),
    )


async def handle_http(gw: Gateway, request: h11.Request, path: str, target: str, body: bytes) -> Response:
    headers = {k: v for k, v in request.headers}
    method = request.method.decode("ascii", "replace")
    origin = headers.get(b"origin")
    cors = _cors_headers(gw, origin)
    route = ROUTES.get(path)
    if method == "OPTIONS" and b"access-control-request-method" in headers:
        if not cors:
            response = text_response(400, "Disallowed CORS origin")
        else:
            response = Response(200, b"", "text/plain", (
                *cors,
                (b"access-control-allow-methods", _CORS_METHODS),
                (b"access-control-allow-headers", _CORS_HEADERS),
                (b"access-control-max-age", b"600"),
            ))
        gw.metrics.http_requests.labels(path if route else "-", str(response.status)).inc()
        return response
    if route is None:
        if path in _WS_ENDPOINTS:
            # RFC 9110 §15.5.22: a 426 names the protocol to upgrade to.
            response = attrs.evolve(text_response(426, "WebSocket upgrade required"),
                                    headers=((b"upgrade", b"websocket"),))
        else:
            response = text_response(404, "Not Found")
        label = path if path in _WS_ENDPOINTS else "-"
    else:
        label = path
        handler = route.get(method) or (route.get("GET") if method == "HEAD" else None)
        if handler is None:
            allow = ", ".join(sorted({*route, "HEAD"} if "GET" in route else route))
            response = attrs.evolve(text_response(405, "Method Not Allowed"), headers=((b"allow", allow.encode()),))
        else:
            req = HttpRequest(method, path, parse_qs(urlsplit(target).query, keep_blank_values=True), headers, body)
            try:
                response = await handler(gw, req)
            except trio.Cancelled:
                raise
            except Exception:
                log.exception("HTTP handler failed", extra={"route": path})
                response = text_response(500, "Internal Server Error")
    gw.metrics.http_requests.labels(label, str(response.status)).inc()
    if cors:
        response = attrs.evolve(response, headers=(*response.headers, *cors))
    if method == "HEAD":
        # h11 refuses to send a body in reply to HEAD (LocalProtocolError), whatever the status.
        response = attrs.evolve(response, body=b"")
    return response


def make_publish_job(gw: Gateway, body: bytes) -> Job:
    event = parse_event(body, max_size=gw.settings.max_message_size)
    return Job(event=event, source="publish", received_at=trio.current_time())
