"""The serving layer: one TCP listener, h11 for every request, wsproto for WebSocket upgrades.

Each accepted TCP connection gets one task (in the connections nursery). It reads request heads
with h11 under a deadline (a cancel scope), answers plain HTTP routes with keep-alive, and for an
``Upgrade: websocket`` request to one of the four endpoints asks :class:`~gateway.access.admission.
Admission` first: a recoverable refusal is an HTTP 429/503 (D22), anything else is accepted and
served by :meth:`Listener.serve_websocket`, where credential failures reach the client as close
codes 4001/4003 (D1) instead of an opaque HTTP 403.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import time
from collections.abc import Iterator, Sequence
from urllib.parse import urlsplit

import attrs
import h11
import trio
from wsproto.connection import Connection as WsProtocol
from wsproto.utilities import RemoteProtocolError as WsRemoteProtocolError

from gateway.access.admission import Admission, Verdict
from gateway.core import closecodes
from gateway.core.clientip import Network, client_ip
from gateway.core.httphead import RequestHead, parse_get_head
from gateway.core.model import ENDPOINTS, Endpoint
from gateway.core.pending import PendingConnections
from gateway.logs import RateLimitedLog
from gateway.metrics import Metrics
from gateway.serving.connection import Connection
from gateway.serving.gcfreeze import AdmissionFreezer
from gateway.serving.handshake import accept_upgrade
from gateway.serving.http import HttpApp
from gateway.serving.http_types import Response, text_response
from gateway.serving.protocol_v2 import SUBPROTOCOL_V2, ProtocolV2, negotiated_version
from gateway.serving.registry import SocketRegistry
from gateway.settings import Settings

log = logging.getLogger("gateway.server")

_RECV = 65536
_WS_PATHS: dict[str, Endpoint] = {f"/ws/{e}": e for e in ENDPOINTS}


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
    metrics: Metrics | None = None,
    head: bool = False,
) -> None:
    """Send one response; counts it when ``metrics`` is given. A HEAD request gets the head only."""
    if metrics is not None:
        metrics.http_requests.labels(route, str(response.status)).inc()
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


async def _receive_first(stream: trio.SocketStream) -> bytes:
    """The first bytes of a connection: read at once when they are there (no scheduler round
    trip), else when the socket becomes readable."""
    fd = stream.socket.fileno()
    while True:
        try:
            return os.read(fd, _RECV)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(stream.socket)
        except OSError:
            raise _ClientGone from None


async def _send_now(stream: trio.SocketStream, data: bytes) -> None:
    """``send_all`` that first tries one plain write: a 101 nearly always fits the socket buffer."""
    try:
        sent = os.write(stream.socket.fileno(), data)
    except BlockingIOError:
        sent = 0
    except OSError:
        raise trio.BrokenResourceError from None
    if sent < len(data):
        await stream.send_all(data[sent:])


def _h11_catch_up(conn: h11.Connection, quick: tuple[bytes, bytes] | None) -> None:
    """Let h11 parse a head the quick parser read, so it can write the answer (same request)."""
    if quick is not None:
        conn.receive_data(quick[0])
        event = conn.next_event()
        assert isinstance(event, h11.Request), event


def _head_size(request: h11.Request | RequestHead) -> int:
    return len(request.target) + sum(len(k) + len(v) + 4 for k, v in request.headers) + 16


@attrs.frozen
class Upgrade:
    """An accepted WebSocket handshake: all the socket phase needs of the HTTP phase (the h11
    state and the request are dropped, which an idle socket would otherwise carry for its life)."""

    protocol: WsProtocol
    endpoint: Endpoint
    target: str
    verdict: Verdict
    client: str
    trailing: bytes
    #: The protocol version negotiated by subprotocol (D20): 1, or 2 for ``integrador.v2``.
    version: int = 1


#: The answer to a connection over the pending bound: fixed bytes, no parser state allocated.
_PENDING_BODY = b'{"detail":"Too many pending connections"}'
_PENDING_REFUSAL = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: "
    + str(len(_PENDING_BODY)).encode() + b"\r\nretry-after: 1\r\nconnection: close\r\n\r\n" + _PENDING_BODY
)


def _peer_address(stream: trio.SocketStream) -> str:
    try:
        peer = stream.socket.getpeername()
    except OSError:
        return "-"
    return str(peer[0]) if isinstance(peer, tuple) else str(peer)


def _partial(conn: h11.Connection) -> bool:
    # h11 keeps unparsed bytes of an incomplete head in its buffer.
    return bool(conn.trailing_data[0])


class _PendingSlot:
    """This connection's place in the pending bound, given back once admitted or gone."""

    __slots__ = ("_peer", "_pending")

    def __init__(self, pending: PendingConnections, peer: str) -> None:
        self._pending: PendingConnections | None = pending
        self._peer = peer

    def release(self) -> None:
        if self._pending is not None:
            self._pending.leave(self._peer)
            self._pending = None


@attrs.frozen
class ServingSettings:
    """The settings the listener and its sockets use."""

    handshake_timeout: float
    max_header_bytes: int
    max_body_bytes: int
    send_queue_max_bytes: int
    max_message_size: int
    max_frames_per_message: int
    message_rate_limit: int
    message_rate_window: float
    direct_write: bool

    @classmethod
    def of(cls, s: Settings) -> ServingSettings:
        return cls(s.handshake_timeout, s.max_header_bytes, s.max_body_bytes, s.send_queue_max_bytes,
                   s.max_message_size, s.max_frames_per_message, s.message_rate_limit, s.message_rate_window,
                   s.direct_write)


@attrs.define(eq=False)
class Listener:
    """Serves every accepted TCP connection: HTTP routes, or one WebSocket."""

    settings: ServingSettings
    registry: SocketRegistry
    metrics: Metrics
    admission: Admission
    http: HttpApp
    trusted_proxies: tuple[Network, ...]
    protocol_v2: ProtocolV2
    #: Keeps admitted sockets out of full garbage collections (the daemon turns it on).
    freezer: AdmissionFreezer = attrs.Factory(AdmissionFreezer)
    _pending_log: RateLimitedLog = attrs.Factory(lambda: RateLimitedLog(log, interval=60.0))
    #: Ids of this listener's sockets, in accept order (they appear in its logs).
    _ids: Iterator[int] = attrs.Factory(lambda: itertools.count(1))


    async def handle_tcp(self, stream: trio.SocketStream, *, admin: bool = False) -> None:
        """One TCP connection: HTTP requests with keep-alive, or one WebSocket.

        Nothing raised while serving one connection may reach the connections nursery (it would stop
        the gateway): unexpected errors are logged and that connection alone drops.
        """
        peer = _peer_address(stream)
        refused = self.registry.pending.enter(peer)
        if refused is not None:
            await self._refuse_pending(stream, peer, refused)
            return
        slot = _PendingSlot(self.registry.pending, peer)
        try:
            upgrade = await self._serve_http(stream, peer, admin=admin)
            if upgrade is not None:
                await self.serve_websocket(stream, upgrade, slot)
        except (_ClientGone, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except Exception:
            self.metrics.http_requests.labels("-", "500").inc()
            log.exception("connection handler failed; dropping that connection")
        finally:
            slot.release()
            with trio.CancelScope(shield=True):
                await stream.aclose()


    async def _refuse_pending(self, stream: trio.SocketStream, peer: str, reason: str) -> None:
        self.metrics.rejections.labels(reason).inc()
        self.metrics.http_requests.labels("-", "503").inc()
        self._pending_log.warning("connection refused: too many pending connections", reason=reason, client=peer)
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


    async def _serve_http(self, stream: trio.SocketStream, peer: str, *, admin: bool) -> Upgrade | None:
        """HTTP requests until the client goes, or an accepted WebSocket handshake to hand over."""
        settings = self.settings
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=settings.max_header_bytes)
        first_deadline: float | None = None
        if not admin:
            # The usual first request is a WebSocket upgrade that arrives whole in one read:
            # parsed quickly when it can be, else handed to h11 with the same head deadline.
            first_deadline = trio.current_time() + settings.handshake_timeout
            data: bytes | None = None
            with trio.move_on_at(first_deadline):
                data = await _receive_first(stream)
            if not data:
                return None  # closed, or nothing in time: as h11 would end it (nothing partial)
            quick = parse_get_head(data, settings.max_header_bytes)
            routed = self._quick_route(quick[0]) if quick is not None else None
            if quick is not None and routed is not None:
                head, trailing = quick
                client = client_ip(peer, _header(head.headers, b"x-forwarded-for"), self.trusted_proxies)
                return await self._websocket(stream, conn, head, *routed, client, (data, trailing))
            conn.receive_data(data)
        try:
            while True:
                deadline = first_deadline if first_deadline is not None else trio.current_time() + settings.handshake_timeout
                first_deadline = None
                with trio.move_on_at(deadline) as head_scope:
                    event = await _next_event(conn, stream)
                if head_scope.cancelled_caught:
                    if conn.their_state is h11.SEND_BODY or _partial(conn):
                        await _send_response(conn, stream, text_response(408, "Request head not received in time"), metrics=self.metrics)
                    return None
                if isinstance(event, h11.ConnectionClosed) or not isinstance(event, h11.Request):
                    return None
                # h11 limits only a head still incomplete in its buffer; a complete one is checked here.
                if _head_size(event) > settings.max_header_bytes:
                    await _send_response(conn, stream, text_response(431, "Request header fields too large"), metrics=self.metrics)
                    return None
                target = event.target.decode("latin-1")
                path = urlsplit(target).path
                client = client_ip(peer, _header(event.headers, b"x-forwarded-for"), self.trusted_proxies)
                if not admin and _has_token(_header(event.headers, b"upgrade"), b"websocket") and path in _WS_PATHS:
                    if event.method != b"GET":
                        response = attrs.evolve(text_response(405, "Method Not Allowed"), headers=((b"allow", b"GET"),))
                        await _send_response(conn, stream, response, route="websocket", metrics=self.metrics,
                                             head=event.method == b"HEAD")
                        return None
                    return await self._websocket(stream, conn, event, target, path, client, None)
                body = b""
                with trio.move_on_after(settings.handshake_timeout) as body_scope:
                    while True:
                        part = await _next_event(conn, stream)
                        if isinstance(part, h11.Data):
                            body += part.data
                            if len(body) > settings.max_body_bytes:
                                await _send_response(conn, stream, text_response(413, "Request body too large"), metrics=self.metrics)
                                return None
                        elif isinstance(part, h11.EndOfMessage):
                            break
                        else:
                            return None
                if body_scope.cancelled_caught:
                    await _send_response(conn, stream, text_response(408, "Request body not received in time"), metrics=self.metrics)
                    return None
                response = await self.http.handle(event, path, target, body, admin=admin, peer=peer)
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
                    await _send_response(conn, stream, text_response(status, reason), metrics=self.metrics)
            return None

    def _quick_route(self, head: RequestHead) -> tuple[str, str] | None:
        """Target and path of a quickly parsed head that is an upgrade to a WebSocket endpoint;
        None for anything else (the h11 path serves it, 431 included)."""
        if _head_size(head) > self.settings.max_header_bytes:
            return None
        target = head.target.decode("latin-1")
        path = urlsplit(target).path
        if path not in _WS_PATHS or not _has_token(_header(head.headers, b"upgrade"), b"websocket"):
            return None
        return target, path

    async def _websocket(
        self, stream: trio.SocketStream, conn: h11.Connection, request: RequestHead | h11.Request, target: str,
        path: str, client: str, quick: tuple[bytes, bytes] | None,
    ) -> Upgrade | None:
        """A GET upgrade to a WebSocket endpoint: admission, then the 101 or the refusal.

        ``quick``: the bytes read and those after the head when the head was not parsed by h11;
        before answering anything but a 101, h11 parses them (the same request) so that it
        writes the response as on the h11 path.
        """
        endpoint = _WS_PATHS[path]
        origin = _header(request.headers, b"origin")
        verdict = await self.admission.decide(endpoint, target, origin.decode("latin-1") if origin is not None else None,
                                              client)
        if verdict.refusal is not None:
            # Recoverable (D22): answered before the upgrade, so no client sees an open
            # socket; a proxy retries a 503 on another instance (proxy_next_upstream).
            _h11_catch_up(conn, quick)
            status, detail, retry_after = self.admission.count_refusal(verdict, target, client)
            response = attrs.evolve(text_response(status, detail),
                                    headers=((b"retry-after", str(retry_after).encode()),))
            await _send_response(conn, stream, response, route="websocket", metrics=self.metrics)
            return None
        upgrade: Upgrade | None = None
        try:
            upgrade = await self._upgrade(stream, conn, request, endpoint, target, client, quick, verdict)
        finally:
            if upgrade is None:  # no socket after all: its cluster-wide lease goes
                self.admission.finished(verdict)
        return upgrade

    async def _upgrade(
        self, stream: trio.SocketStream, conn: h11.Connection, request: RequestHead | h11.Request, endpoint: Endpoint,
        target: str, client: str, quick: tuple[bytes, bytes] | None, verdict: Verdict,
    ) -> Upgrade | None:
        """The 101 (or a 400 for a bad handshake) of an admitted request."""
        try:
            version = negotiated_version(_header(request.headers, b"sec-websocket-protocol"))
            accept, protocol = accept_upgrade(request.method, request.headers,
                                              subprotocol=SUBPROTOCOL_V2 if version == 2 else None)
        except WsRemoteProtocolError:
            _h11_catch_up(conn, quick)
            await _send_response(conn, stream, text_response(400, "Bad WebSocket handshake"), route="websocket", metrics=self.metrics)
            return None
        await _send_now(stream, accept)
        # After the handshake only the frame-level protocol object is needed.
        return Upgrade(
            protocol=protocol,
            endpoint=endpoint,
            target=target,
            verdict=verdict,
            client=client,
            trailing=conn.trailing_data[0] if quick is None else quick[1],
            version=version,
        )

    async def serve_websocket(self, stream: trio.SocketStream, upgrade: Upgrade, slot: _PendingSlot) -> None:
        settings = self.settings
        endpoint = upgrade.endpoint
        conn = Connection(
            stream,
            upgrade.protocol,
            endpoint,
            conn_id=next(self._ids),
            metrics=self.metrics,
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
        target, verdict, version = upgrade.target, upgrade.verdict, upgrade.version
        del upgrade
        self.registry.sockets.add(conn)
        try:
            async with trio.open_nursery() as nursery:
                conn.attach(nursery)  # its writer task starts only if a write would block
                rejection = self.admission.register(conn, verdict, target)
                if rejection is None:
                    slot.release()  # an admitted socket counts in the connection limits instead
                    self.freezer.admitted()
                    if version == 2:
                        self.protocol_v2.start(conn, nursery)  # the welcome, before any event
                    await self.run_connection(conn)
                else:
                    conn.begin_close(rejection)
                await conn.finish_close()
                nursery.cancel_scope.cancel()
        finally:
            self.admission.finished(verdict)
            self.registry.sockets.discard(conn)
            if conn in self.registry.index:
                self.registry.index.remove(conn)
                self.metrics.connections.labels(endpoint).dec()
            log.debug("socket closed", extra={**conn.log_context(), "code": conn.close_code and conn.close_code.code})


    async def run_connection(self, conn: Connection) -> None:
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
