"""The serving layer: one TCP listener, h11 for every request, wsproto for WebSocket upgrades.

Each accepted TCP connection gets one task (in the connections nursery). It reads request heads
with h11 under a deadline (a cancel scope), answers plain HTTP routes with keep-alive, and hands an
``Upgrade: websocket`` request for one of the four endpoints to :func:`serve_websocket`, which
accepts the handshake and only then checks credentials, so that failures reach the client as
close codes 4001/4003 (D1) instead of an opaque HTTP 403.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import attrs
import h11
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection as WsProtocol
from wsproto.events import AcceptConnection, Request
from wsproto.utilities import RemoteProtocolError as WsRemoteProtocolError

from gateway.connection import Connection
from gateway.core import closecodes
from gateway.core.auth import (
    AuthError,
    diner_principal,
    is_revoked,
    revocation_keys,
    staff_principal,
    verify_staff_token,
    verify_table_token,
)
from gateway.core.clientip import client_ip
from gateway.core.closecodes import Close
from gateway.core.model import ENDPOINTS, Endpoint, Principal
from gateway.core.origins import origin_allowed
from gateway.http import Response, handle_http, text_response
from gateway.logs import RateLimitedLog, redact_target

if TYPE_CHECKING:
    from gateway.app import Gateway

log = logging.getLogger("gateway.server")

_RECV = 65536
_WS_PATHS: dict[str, Endpoint] = {f"/ws/{e}": e for e in ENDPOINTS}
REVOCATION_TIMEOUT = 2.0


class _ClientGone(Exception):
    pass


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def _has_token(value: bytes | None, token: bytes) -> bool:
    return value is not None and token in (part.strip().lower() for part in value.split(b","))


async def _next_event(conn: h11.Connection, stream: trio.SocketStream) -> object:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive_some(_RECV)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                raise _ClientGone from None
            conn.receive_data(data)
            continue
        return event


async def _send_response(
    conn: h11.Connection,
    stream: trio.SocketStream,
    response: Response,
    *,
    route: str = "-",
    gw: Gateway | None = None,
    head: bool = False,
) -> None:
    """Send one response; counts it when ``gw`` is given. A HEAD request gets the head only."""
    if gw is not None:
        gw.metrics.http_requests.labels(route, str(response.status)).inc()
    headers = [
        (b"content-type", response.content_type.encode()),
        (b"content-length", str(len(response.body)).encode()),
        (b"server", b"integrador-ws-gateway"),
        *response.headers,
    ]
    if conn.their_state is not h11.DONE and response.status >= 400:
        headers.append((b"connection", b"close"))
    data = conn.send(h11.Response(status_code=response.status, headers=headers, reason=response.reason)) or b""
    if response.body and not head:
        data += conn.send(h11.Data(data=response.body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


def _head_size(request: h11.Request) -> int:
    return len(request.target) + sum(len(k) + len(v) + 4 for k, v in request.headers) + 16


@attrs.frozen
class Upgrade:
    """An accepted WebSocket handshake: all the socket phase needs of the HTTP phase (the h11
    state and the request are dropped, which an idle socket would otherwise carry for its life)."""

    protocol: WsProtocol
    endpoint: Endpoint
    target: str
    origin: str | None
    client: str
    trailing: bytes


#: The answer to a connection over the pending bound: fixed bytes, no parser state allocated.
_PENDING_BODY = b'{"detail":"Too many pending connections"}'
_PENDING_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: "
    + str(len(_PENDING_BODY)).encode() + b"\r\nretry-after: 1\r\nconnection: close\r\n\r\n" + _PENDING_BODY
)


def pending_refusal_log() -> RateLimitedLog:
    """The rate-limited log of refusals over the pending bound, one per gateway (``Gateway.pending_log``)."""
    return RateLimitedLog(log, interval=60.0)


class _PendingSlot:
    """This connection's place in the pending bound, given back once admitted or gone."""

    __slots__ = ("_gw", "_peer")

    def __init__(self, gw: Gateway, peer: str) -> None:
        self._gw: Gateway | None = gw
        self._peer = peer

    def release(self) -> None:
        if self._gw is not None:
            self._gw.pending.leave(self._peer)
            self._gw = None


async def handle_tcp(gw: Gateway, stream: trio.SocketStream, *, admin: bool = False) -> None:
    """One TCP connection: HTTP requests with keep-alive, or one WebSocket.

    Nothing raised while serving one connection may reach the connections nursery (it would stop
    the gateway): unexpected errors are logged and that connection alone drops.
    """
    peer = _peer_address(stream)
    refused = gw.pending.enter(peer)
    if refused is not None:
        await _refuse_pending(gw, stream, peer, refused)
        return
    slot = _PendingSlot(gw, peer)
    try:
        upgrade = await _serve_http(gw, stream, peer, admin=admin)
        if upgrade is not None:
            await serve_websocket(gw, stream, upgrade, slot)
    except (_ClientGone, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    except Exception:
        gw.metrics.http_requests.labels("-", "500").inc()
        log.exception("connection handler failed; dropping that connection")
    finally:
        slot.release()
        with trio.CancelScope(shield=True):
            await stream.aclose()


async def _refuse_pending(gw: Gateway, stream: trio.SocketStream, peer: str, reason: str) -> None:
    gw.metrics.rejections.labels(reason).inc()
    gw.metrics.http_requests.labels("-", "503").inc()
    gw.pending_log.warning("connection refused: too many pending connections", reason=reason, client=peer)
    with trio.move_on_after(1.0), contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await stream.send_all(_PENDING_REFUSAL)
        # Closing with the request unread would reset the connection and lose the answer: half
        # close, then discard what the client still sends, for at most a second and 64 KiB.
        await stream.send_eof()
        discarded = 0
        while discarded < 65536 and (chunk := await stream.receive_some(16384)):
            discarded += len(chunk)
    with trio.CancelScope(shield=True):
        await stream.aclose()


async def _serve_http(gw: Gateway, stream: trio.SocketStream, peer: str, *, admin: bool) -> Upgrade | None:
    """HTTP requests until the client goes, or an accepted WebSocket handshake to hand over."""
    settings = gw.settings
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=settings.max_header_bytes)
    try:
        while True:
            with trio.move_on_after(settings.handshake_timeout) as head_scope:
                event = await _next_event(conn, stream)
            if head_scope.cancelled_caught:
                if conn.their_state is h11.SEND_BODY or _partial(conn):
                    await _send_response(conn, stream, text_response(408, "Request head not received in time"), gw=gw)
                return None
            if isinstance(event, h11.ConnectionClosed) or not isinstance(event, h11.Request):
                return None
            # h11 limits only a head still incomplete in its buffer; a complete one is checked here.
            if _head_size(event) > settings.max_header_bytes:
                await _send_response(conn, stream, text_response(431, "Request header fields too large"), gw=gw)
                return None
            target = event.target.decode("latin-1")
            path = urlsplit(target).path
            client = client_ip(peer, _header(event.headers, b"x-forwarded-for"), gw.trusted_proxies)
            if not admin and _has_token(_header(event.headers, b"upgrade"), b"websocket") and path in _WS_PATHS:
                if event.method != b"GET":
                    response = attrs.evolve(text_response(405, "Method Not Allowed"), headers=((b"allow", b"GET"),))
                    await _send_response(conn, stream, response, route="websocket", gw=gw,
                                         head=event.method == b"HEAD")
                    return None
                if gw.draining:
                    # A proxy retries this on another instance (nginx: proxy_next_upstream http_503).
                    response = attrs.evolve(text_response(503, "Draining"), headers=((b"retry-after", b"1"),))
                    await _send_response(conn, stream, response, route="websocket", gw=gw)
                    return None
                return await _accept_websocket(gw, stream, conn, event, _WS_PATHS[path], client)
            body = b""
            with trio.move_on_after(settings.handshake_timeout) as body_scope:
                while True:
                    part = await _next_event(conn, stream)
                    if isinstance(part, h11.Data):
                        body += part.data
                        if len(body) > settings.max_body_bytes:
                            await _send_response(conn, stream, text_response(413, "Request body too large"), gw=gw)
                            return None
                    elif isinstance(part, h11.EndOfMessage):
                        break
                    else:
                        return None
            if body_scope.cancelled_caught:
                await _send_response(conn, stream, text_response(408, "Request body not received in time"), gw=gw)
                return None
            response = await handle_http(gw, event, path, target, body, admin=admin)
            await _send_response(conn, stream, response, head=event.method == b"HEAD")
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
                return None
            try:
                conn.start_next_cycle()
            except h11.LocalProtocolError:
                return None
    except h11.RemoteProtocolError as exc:
        status = exc.error_status_hint
        reason = "Request header fields too large" if status == 431 else "Bad request"
        log.info("bad HTTP request", extra={"status": status})
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                                     h11.LocalProtocolError):
                await _send_response(conn, stream, text_response(status, reason), gw=gw)
        return None


def _peer_address(stream: trio.SocketStream) -> str:
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return "-"
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


def _partial(conn: h11.Connection) -> bool:
    # h11 keeps unparsed bytes of an incomplete head in its buffer.
    return bool(conn.trailing_data[0])


async def _accept_websocket(
    gw: Gateway, stream: trio.SocketStream, h11conn: h11.Connection, request: h11.Request, endpoint: Endpoint,
    client: str,
) -> Upgrade | None:
    ws = WSConnection(ConnectionType.SERVER)
    try:
        ws.initiate_upgrade_connection(list(request.headers), request.target)
        first = next(ws.events(), None)
        if not isinstance(first, Request):
            raise WsRemoteProtocolError("not a WebSocket request", event_hint=None)
        accept = ws.send(AcceptConnection())
    except (WsRemoteProtocolError, h11.RemoteProtocolError, h11.LocalProtocolError):
        await _send_response(h11conn, stream, text_response(400, "Bad WebSocket handshake"), route="websocket", gw=gw)
        return None
    await stream.send_all(accept)
    origin = _header(request.headers, b"origin")
    # After the handshake only the frame-level protocol object is needed.
    assert ws.connection is not None
    return Upgrade(
        protocol=ws.connection,
        endpoint=endpoint,
        target=request.target.decode("latin-1"),
        origin=origin.decode("latin-1") if origin is not None else None,
        client=client,
        trailing=h11conn.trailing_data[0],
    )


async def serve_websocket(gw: Gateway, stream: trio.SocketStream, upgrade: Upgrade, slot: _PendingSlot) -> None:
    settings = gw.settings
    endpoint = upgrade.endpoint
    conn = Connection(
        stream,
        upgrade.protocol,
        endpoint,
        conn_id=next(gw.connection_ids),
        metrics=gw.metrics,
        max_queue_bytes=settings.send_queue_max_bytes,
        max_message=settings.max_message_size,
        max_frames=settings.max_frames_per_message,
        rate_limit=settings.message_rate_limit,
        rate_window=settings.message_rate_window,
        direct_write=settings.direct_write,
        client=upgrade.client,
    )
    if upgrade.trailing:
        upgrade.protocol.receive_data(upgrade.trailing)
    target, origin = upgrade.target, upgrade.origin
    del upgrade
    gw.sockets.add(conn)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(conn.writer)
            rejection = await admit(gw, conn, target, origin)
            if rejection is None:
                slot.release()  # an admitted socket counts in the connection limits instead
                await run_connection(gw, conn)
            else:
                conn.begin_close(rejection)
            await conn.finish_close()
            nursery.cancel_scope.cancel()
    finally:
        gw.sockets.discard(conn)
        if conn in gw.index:
            gw.index.remove(conn)
            gw.metrics.connections.labels(endpoint).dec()
        log.debug("socket closed", extra={**conn.log_context(), "code": conn.close_code and conn.close_code.code})


def _reject(gw: Gateway, conn: Connection, close: Close, reason: str, target: str, **who: object) -> Close:
    gw.metrics.rejections.labels(reason).inc()
    gw.count_rejection(reason)
    log.info("socket rejected", extra={**conn.log_context(), **who, "reason": reason, "code": close.code,
                                        "target": redact_target(target)})
    return close


async def admit(gw: Gateway, conn: Connection, target: str, origin: str | None) -> Close | None:
    """Check the credentials of an accepted socket and register it, or say how to close it."""
    settings = gw.settings
    endpoint = conn.endpoint
    if gw.draining:
        return _reject(gw, conn, closecodes.SERVER_RESTART, "draining", target)
    if not origin_allowed(origin, gw.origins, bypass_missing=settings.origin_bypass_active):
        return _reject(gw, conn, closecodes.ORIGIN_NOT_ALLOWED, "origin", target)
    query = parse_qs(urlsplit(target).query, keep_blank_values=True)
    param = "table_token" if endpoint == "diner" else "token"
    values = query.get(param) or [""]
    token = values[0]
    if not token:
        return _reject(gw, conn, closecodes.MISSING_TOKEN, "missing_token", target)
    now = time.time()
    try:
        principal: Principal
        if endpoint == "diner":
            table = verify_table_token(token, secret=settings.table_token_secret, now=now,
                                       max_lifetime=settings.max_token_lifetime)
            principal = diner_principal(table)
        else:
            claims = verify_staff_token(
                token, secret=settings.jwt_secret, issuer=settings.jwt_issuer, audience=settings.jwt_audience, now=now,
                max_lifetime=settings.max_token_lifetime,
            )
            try:
                principal = staff_principal(endpoint, claims)
            except AuthError as exc:  # valid token, wrong role: say whose it was
                return _reject(gw, conn, exc.close, exc.reason, target, tenant=claims.tenant_id,
                               branches=sorted(claims.branch_ids), user=claims.user_id)
    except AuthError as exc:
        return _reject(gw, conn, exc.close, exc.reason, target)
    conn.principal = principal
    if not principal.is_diner:
        revoked = await check_revoked(gw, [principal])
        if revoked is None:
            return _reject(gw, conn, closecodes.TRY_AGAIN_LATER, "redis_unavailable", target)
        if revoked[0]:
            return _reject(gw, conn, closecodes.TOKEN_EXPIRED_OR_REVOKED, "revoked", target)
        if principal.is_plain_waiter or endpoint == "waiter":
            principal = await gw.sectors.assign(principal, refresh=False)
            conn.principal = principal
    # From here to index.add there is no checkpoint: the limits cannot be raced.
    index = gw.index
    if gw.draining:
        return _reject(gw, conn, closecodes.SERVER_RESTART, "draining", target)
    if len(index) >= settings.max_total_connections:
        return _reject(gw, conn, closecodes.TRY_AGAIN_LATER, "limit_total", target)
    if principal.is_diner:
        assert principal.session_id is not None
        if index.count_session(principal.tenant_id, principal.session_id) >= settings.max_connections_per_session:
            return _reject(gw, conn, closecodes.TOO_MANY_CONNECTIONS, "limit_session", target)
    elif index.count_user(principal.tenant_id, principal.user_id) >= settings.max_connections_per_user:
        return _reject(gw, conn, closecodes.TOO_MANY_CONNECTIONS, "limit_user", target)
    conn.token = token
    index.add(conn, principal)
    gw.metrics.connections.labels(endpoint).inc()
    gw.metrics.connections_opened.labels(endpoint).inc()
    interval = settings.table_token_revalidation_interval if principal.is_diner else settings.jwt_revalidation_interval
    conn.next_check = trio.current_time() + interval
    if endpoint == "waiter":
        conn.refresh_sectors = gw.refresh_sectors
    log.debug("socket registered", extra=conn.log_context())
    return None


async def run_connection(gw: Gateway, conn: Connection) -> None:
    """Serve a registered socket until it closes; its token's expiry is the read loop's deadline."""
    principal = conn.principal
    assert principal is not None
    remaining = principal.expires_at - time.time()
    conn.scope.deadline = trio.current_time() + remaining if remaining != float("inf") else float("inf")
    with conn.scope:
        await conn.read_loop()
    if not conn.closing:
        expired = closecodes.TABLE_TOKEN_EXPIRED if principal.is_diner else closecodes.TOKEN_EXPIRED_OR_REVOKED
        log.info("token expired: closing", extra=conn.log_context())
        conn.begin_close(expired)


async def check_revoked(gw: Gateway, principals: Sequence[Principal]) -> list[bool] | None:
    """One MGET for all the principals' revocation keys; None when Redis cannot answer (D4)."""
    keys: list[str] = []
    spans: list[tuple[int, int]] = []
    for p in principals:
        ks = revocation_keys(p)
        spans.append((len(keys), len(keys) + len(ks)))
        keys.extend(ks)
    if not keys:
        return [False] * len(principals)
    breaker = gw.breakers["auth"]
    if not breaker.allow():
        return None
    values: Sequence[bytes | str | None]
    try:
        with trio.fail_after(REVOCATION_TIMEOUT):
            values = await gw.redis.mget(keys)
    except Exception as exc:
        from gateway.ingest import is_redis_failure

        if not is_redis_failure(exc) and not isinstance(exc, trio.TooSlowError):
            raise
        gw.redis_failed(breaker, "revocation", exc)
        return None
    gw.redis_ok(breaker)
    return [is_revoked(p, list(values[a:b])) for p, (a, b) in zip(principals, spans, strict=True)]
