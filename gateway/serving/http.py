"""Plain HTTP routes on the gateway's port: health, metrics, catch-up, publish, CORS.

Errors use the existing gateway's ``{"detail": ...}`` body so front ends parse them unchanged.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import trio

from gateway import __version__
from gateway.core import health as pages
from gateway.core.events import InvalidEvent, parse_event
from gateway.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from gateway.metrics import Metrics
from gateway.serving import webassets
from gateway.serving.appender import StreamAppender
from gateway.serving.catchup_http import CatchupRoutes
from gateway.serving.http_types import HttpRequest, Response, json_response, text_response
from gateway.serving.registry import SocketRegistry
from gateway.serving.status import Status
from gateway.settings import Settings

log = logging.getLogger("gateway.http")

Handler = Callable[[HttpRequest], Awaitable[Response]]

#: Path -> method -> the HttpApp method that answers it.
ROUTES: Mapping[str, Mapping[str, str]] = {
    "/ws/health": {"GET": "health"},
    "/ws/health/detailed": {"GET": "health_detailed"},
    "/ws/metrics": {"GET": "render_metrics"},
    "/ws/catchup": {"GET": "catchup_staff"},
    "/ws/catchup/session": {"GET": "catchup_session"},
    "/ws/publish": {"POST": "publish"},
    "/ws/dev/token": {"POST": "dev_token"},
    **{path: {"GET": "web_asset"} for path in webassets.PATHS},
}
#: Operations routes: only on the internal listener when GATEWAY_ADMIN_PORT is set.
ADMIN_ROUTES = frozenset({"/ws/metrics", "/ws/health/detailed", "/ws/publish"})
_WS_ENDPOINTS = frozenset({"/ws/waiter", "/ws/kitchen", "/ws/admin", "/ws/diner"})
_CORS_METHODS = b"GET, POST, OPTIONS"
_CORS_HEADERS = b"Authorization, Content-Type, X-Table-Token"


@attrs.define(eq=False)
class HttpApp:
    settings: Settings
    metrics: Metrics
    origins: frozenset[str]
    registry: SocketRegistry
    status: Status
    catchup: CatchupRoutes
    appender: StreamAppender
    routes: dict[str, dict[str, Handler]] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.routes = {path: {method: getattr(self, name) for method, name in methods.items()}
                       for path, methods in ROUTES.items()}

    async def catchup_staff(self, req: HttpRequest) -> Response:
        return await self.catchup.staff(req)

    async def catchup_session(self, req: HttpRequest) -> Response:
        return await self.catchup.session(req)

    def _page(self, draining: bool, degraded: bool = False) -> tuple[int, dict[str, Any]]:
        status, state = pages.status(draining=draining, degraded=degraded)
        return status, {"status": state, "service": pages.SERVICE, "version": __version__,
                        "environment": self.settings.environment}

    async def health(self, req: HttpRequest) -> Response:
        """The existing gateway's keys (§1.3); 503 with status "draining" during a drain."""
        status, body = self._page(self.registry.draining)
        return json_response(status, {**body, **self.status.stats()})

    async def health_detailed(self, req: HttpRequest) -> Response:
        redis = await self.status.probe_redis()
        draining = self.registry.draining
        status, body = self._page(draining, degraded=not redis["ok"])
        stats = self.status.stats()
        body.update({
            "instance_id": self.settings.instance_id,
            "uptime_seconds": round(time.monotonic() - self.status.started_at, 1),
            "connections": {**stats, "heartbeat_stats": stats["heartbeat_stats"]},
            "dependencies": {"redis": redis},
            "subscriber_metrics": self.status.subscriber_stats(),
        })
        return json_response(status, body)

    async def render_metrics(self, req: HttpRequest) -> Response:
        return Response(200, self.metrics.render(self.status.stats()), METRICS_CONTENT_TYPE)

    async def publish(self, req: HttpRequest) -> Response:
        """D19: validate an envelope and append it to the critical stream (bearer token required)."""
        token = self.settings.publish_token
        if token is None:
            # In development a gateway with no publish token takes events from its own machine,
            # so `gateway publish` reaches the embedded Redis with no set-up (D18, D19).
            if not (self.settings.environment == "development" and _is_loopback(req.peer)):
                return text_response(404, "Not Found")
        else:
            auth = req.headers.get(b"authorization", b"")
            scheme, _, given = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), token.encode()):
                return text_response(401, "Invalid publish token")
        ctype = req.headers.get(b"content-type", b"application/json").split(b";")[0].strip().lower()
        if ctype != b"application/json":
            return text_response(415, "Content-Type must be application/json")
        self.metrics.events_received.labels("publish").inc()
        try:
            parse_event(req.body, max_size=self.settings.max_message_size)
        except InvalidEvent as exc:
            self.metrics.events_invalid.labels("publish", exc.reason).inc()
            return text_response(422, f"Invalid event: {exc.reason}")
        entry_id = await self.appender.append(req.body)
        if entry_id is None:
            return text_response(503, "Redis unavailable")
        return json_response(202, {"id": entry_id, "stream": self.settings.stream})

    async def web_asset(self, req: HttpRequest) -> Response:
        """The browser client library and the live console (``browser/``)."""
        found = webassets.lookup(req.path, console=webassets.console_enabled(self.settings))
        if found is None:
            return text_response(404, "Not Found")
        return Response(200, found[1], found[0], ((b"cache-control", b"no-cache"),))

    async def dev_token(self, req: HttpRequest) -> Response:
        """Development only: a token minted with this gateway's secrets, for the console."""
        if self.settings.environment != "development":
            return text_response(404, "Not Found")
        try:
            return json_response(200, webassets.dev_token(self.settings, req.body))
        except webassets.DevTokenError as exc:
            return text_response(422, str(exc))

    # --- dispatch -----------------------------------------------------------------------------
    def _route(self, path: str, admin: bool) -> dict[str, Handler] | None:
        if self.settings.admin_port is not None:
            internal = path in ADMIN_ROUTES or (self._console_is_internal and webassets.is_console(path))
            if admin and not internal and path != "/ws/health":
                return None
            if not admin and internal:
                return None
        return self.routes.get(path)

    @property
    def _console_is_internal(self) -> bool:
        # Outside development an enabled console is an operator's tool: with an admin listener it
        # is served there only.
        return self.settings.environment != "development"

    def _cors_headers(self, origin: bytes | None) -> tuple[tuple[bytes, bytes], ...]:
        if origin is None or origin.decode("latin-1") not in self.origins:
            return ()
        return (
            (b"access-control-allow-origin", origin),
            (b"access-control-allow-credentials", b"true"),
            (b"vary", b"Origin"),
        )

    async def handle(self, request: h11.Request, path: str, target: str, body: bytes, *,
                     admin: bool = False, peer: str = "-") -> Response:
        headers = {k: v for k, v in request.headers}
        method = request.method.decode("ascii", "replace")
        cors = self._cors_headers(headers.get(b"origin"))
        route = self._route(path, admin)
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
            self.metrics.http_requests.labels(path if route else "-", str(response.status)).inc()
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
                response = attrs.evolve(text_response(405, "Method Not Allowed"),
                                        headers=((b"allow", allow.encode()),))
            else:
                req = HttpRequest(method, path, parse_qs(urlsplit(target).query, keep_blank_values=True), headers,
                                  body, peer)
                response = await self._call(handler, req, path)
        self.metrics.http_requests.labels(label, str(response.status)).inc()
        if cors:
            response = attrs.evolve(response, headers=(*response.headers, *cors))
        if method == "HEAD":
            # h11 refuses to send a body in reply to HEAD (LocalProtocolError), whatever the status.
            response = attrs.evolve(response, body=b"")
        return response

    async def _call(self, handler: Handler, req: HttpRequest, path: str) -> Response:
        try:
            return await handler(req)
        except trio.Cancelled:
            raise
        except (ValueError, OverflowError, RecursionError, UnicodeError) as exc:
            # Input no handler check anticipated: still the client's, so a 400 and one line.
            log.info("unprocessable HTTP request", extra={"route": path, "error": type(exc).__name__})
            return text_response(400, "Bad request")
        except Exception:
            log.exception("HTTP handler failed", extra={"route": path})
            return text_response(500, "Internal Server Error")


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
