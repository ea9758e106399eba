"""One accepted WebSocket: its write path, its read loop and its closing sequence.

Write path. Event frames are encoded once per event (``gateway.core.frames``) and the same ``bytes``
object is handed to every recipient through :meth:`Connection.deliver`, which is synchronous: when
nothing is queued it writes straight to the socket (no task wake-up), otherwise it appends to a
bounded queue that the connection's writer task flushes with ``writev``. The writer never removes
a frame before the kernel took all of it, so "queue empty" means "safe to write directly", and the
exact byte position inside the queue is always known: a close frame can follow a partly written
frame without corrupting the stream. A queue that grows past its byte limit marks a slow consumer:
pending frames are dropped and the socket is closed 1013 without delaying anyone else.

Only incoming data goes through wsproto; outgoing frames are ours (``gateway.core.frames``), so wsproto
never sees what we send and the close handshake is tracked here.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio
from wsproto.connection import Connection as WsProtocol
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Ping, Pong, TextMessage

from gateway.core import closecodes, frames
from gateway.core.closecodes import Close
from gateway.core.closing import Closing
from gateway.core.outbox import IOV_MAX, Outbox
from gateway.core.positions import ResumeState
from gateway.core.ratelimit import SlidingWindow

if TYPE_CHECKING:
    from gateway.core.model import Endpoint, Principal
    from gateway.metrics import Metrics

log = logging.getLogger("gateway.connection")

_RECV_SIZE = 65536
#: How long the closing handshake may take once our close frame is queued.
CLOSE_TIMEOUT = 5.0
_JSON_PING = '{"type":"ping"}'

#: Results of :meth:`Connection.deliver`.
DROPPED, QUEUED, WRITTEN = 0, 1, 2

#: Called for ``refresh_sectors``; returns the reply text.
RefreshSectors = Callable[["Connection"], Awaitable[str]]
#: Called with every other text message of a v2 socket; True when it was a v2 message.
OnMessage = Callable[["Connection", str], Awaitable[bool]]


class Connection:
    """An accepted socket. ``deliver`` and ``begin_close`` are safe to call from any task."""

    __slots__ = (
        "_frames_in_message",
        "_limiter",
        "_lot",
        "_max_frames",
        "_max_message",
        "_tasks",
        "_text",
        "_writer_done",
        "client",
        "closing_state",
        "direct",
        "endpoint",
        "fd",
        "id",
        "last_seen",
        "metrics",
        "next_check",
        "on_message",
        "outbox",
        "principal",
        "refresh_sectors",
        "scope",
        "stream",
        "token",
        "v2",
        "ws",
    )

    def __init__(
        self,
        stream: trio.SocketStream,
        ws: WsProtocol,
        endpoint: Endpoint,
        *,
        conn_id: int,
        metrics: Metrics,
        max_queue_bytes: int,
        max_message: int,
        max_frames: int,
        rate_limit: int,
        rate_window: float,
        direct_write: bool,
        client: str = "-",
    ) -> None:
        self.id = conn_id
        self.stream = stream
        self.fd = stream.socket.fileno()
        self.ws = ws
        self.endpoint = endpoint
        self.client = client
        self.metrics = metrics
        self.principal: Principal | None = None
        self.token = ""
        self.outbox = Outbox(max_queue_bytes)
        self._max_message = max_message
        self._max_frames = max_frames
        # The writer task, its wake-up and its end exist only once a write would block (or the
        # close frame is queued): most sockets never need one (docs/performance.md).
        self._tasks: trio.Nursery | None = None
        self._writer_done: trio.Event | None = None
        self._lot: trio.lowlevel.ParkingLot | None = None
        self.direct = direct_write
        self.closing_state = Closing()
        self.scope = trio.CancelScope()
        self.last_seen = trio.current_time()
        self.next_check = float("inf")
        self._limiter = SlidingWindow(rate_limit, rate_window)
        # Fragments of the message being received, gathered in one buffer.
        self._text = ""
        self._frames_in_message = 0
        self.refresh_sectors: RefreshSectors | None = None
        #: Protocol v2 (D20): the socket's resume state, and the handler of its v2 messages.
        self.v2: ResumeState | None = None
        self.on_message: OnMessage | None = None

    def __repr__(self) -> str:
        return f"<Connection {self.id} {self.endpoint}>"

    def log_context(self) -> dict[str, object]:
        """Who this socket is, for log lines (never the token)."""
        p = self.principal
        ctx: dict[str, object] = {"conn": self.id, "endpoint": self.endpoint, "client": self.client}
        if p is not None:
            ctx.update(tenant=p.tenant_id, branches=sorted(p.branch_ids), user=p.user_id)
        return ctx

    @property
    def out_bytes(self) -> int:
        """Bytes queued for this socket that the kernel has not taken yet."""
        return self.outbox.queued_bytes

    # --- write path ---------------------------------------------------------------------------
    def deliver(self, frame: bytes) -> int:
        """Hand one encoded frame to this socket. Never blocks, never checkpoints.

        Returns ``WRITTEN`` (the kernel took it all), ``QUEUED`` or ``DROPPED``; the caller counts,
        so no per-frame metric lock is taken here.
        """
        if self.closing:
            return DROPPED
        written = 0
        if self.direct and not self.outbox:
            try:
                written = os.write(self.fd, frame)
            except BlockingIOError:
                written = 0
            except OSError:
                self._transport_failed()
                return DROPPED
            if written == len(frame):
                return WRITTEN
        if not self.outbox.push(frame, written):
            self._over_budget()
            return DROPPED
        self._wake_writer()
        return QUEUED

    def deliver_many(self, frames: list[bytes]) -> tuple[int, int]:
        """Hand several frames to this socket, in order, with one ``writev`` when it is idle.

        One system call instead of one per frame: the kernel's cost of a loopback or LAN write is
        mostly per call (it also runs the receiver's TCP input). Returns how many frames were
        handed over and how many of them the kernel took at once. The queue and its budget end
        up exactly as after calling :meth:`deliver` for each frame.
        """
        if len(frames) == 1:
            result = self.deliver(frames[0])
            return (1 if result else 0, 1 if result == WRITTEN else 0)
        if self.closing:
            return (0, 0)
        outbox = self.outbox
        written = 0
        if self.direct and not outbox:
            try:
                written = os.writev(self.fd, frames if len(frames) <= IOV_MAX else frames[:IOV_MAX])
            except BlockingIOError:
                written = 0
            except OSError:
                self._transport_failed()
                return (0, 0)
        whole = 0
        for frame in frames:
            if written < len(frame):
                break
            written -= len(frame)
            whole += 1
        if whole == len(frames):
            return (whole, whole)
        outbox.push(frames[whole], written)
        for frame in frames[whole + 1:]:
            outbox.push(frame)
        if outbox.over_budget:
            self._over_budget()
            return (whole, whole)
        self._wake_writer()
        return (len(frames), whole)

    def attach(self, nursery: trio.Nursery) -> None:
        """The socket's nursery: the writer task starts there the first time one is needed."""
        self._tasks = nursery

    def _wake_writer(self) -> None:
        lot = self._lot
        if lot is None:
            if self._tasks is not None:
                self._lot, self._writer_done = trio.lowlevel.ParkingLot(), trio.Event()
                self._tasks.start_soon(self.writer)
        elif lot:
            # Only a parked writer needs waking; a busy one finds the new frame on its next pass.
            lot.unpark_all()

    def send_control(self, frame: bytes) -> None:
        """Send a reply of ours (``{"type":"pong"}``, sector replies) behind whatever is pending.

        Replies count in the same budget as events: a client that asks and never reads is a
        slow consumer like any other.
        """
        # The same path as an event: written at once to an idle socket, else queued.
        self.deliver(frame)

    def _send_pong(self, payload: bytes) -> None:
        if self.closing:
            return
        if not self.outbox.push_pong(frames.pong_frame(payload)):
            self._over_budget()
            return
        self._wake_writer()

    def _over_budget(self) -> None:
        self.metrics.slow_consumer_closes.inc()
        log.warning("slow consumer: closing", extra=self.log_context())
        self.begin_close(closecodes.SLOW_CONSUMER, discard_pending=True)

    @property
    def closing(self) -> bool:
        return self.closing_state.started

    @property
    def close_code(self) -> Close | None:
        return self.closing_state.sent

    def begin_close(self, close: Close, *, discard_pending: bool = False) -> None:
        """Queue our close frame and stop the read loop; the connection task finishes the close."""
        if not self.closing_state.close(close):
            return
        self.metrics.closes.labels(close_label(close.code)).inc()
        if discard_pending:
            self.outbox.discard()
        # The close frame goes out even past the budget: it is small and ends the socket.
        self.outbox.push(frames.close_frame(close.code, close.reason))
        self._wake_writer()
        self.scope.cancel()

    def _transport_failed(self) -> None:
        if self.closing_state.lost():
            self.metrics.closes.labels("1006").inc()
        self.outbox.clear()
        if self._lot:
            self._lot.unpark_all()
        self.scope.cancel()

    def _flush_some(self) -> None:
        try:
            written = os.writev(self.fd, self.outbox.pending())
        except BlockingIOError:
            return
        except OSError:
            self._transport_failed()
            return
        self.outbox.consumed(written)

    async def writer(self) -> None:
        """Flush the queue whenever it is non-empty; return once the close frame is out.

        Started by :meth:`_wake_writer` in the socket's nursery (or directly, by a caller that
        runs it itself).
        """
        if self._lot is None:
            self._lot, self._writer_done = trio.lowlevel.ParkingLot(), trio.Event()
        lot, done = self._lot, self._writer_done
        assert done is not None
        try:
            while True:
                if not self.outbox:
                    if self.closing:
                        return
                    await lot.park()
                    continue
                self._flush_some()
                if self.outbox and not self.closing_state.transport_dead:
                    await trio.lowlevel.wait_writable(self.stream.socket)
        finally:
            done.set()

    # --- read path ----------------------------------------------------------------------------
    async def read_loop(self) -> None:
        """Read and handle client frames until the client closes or a limit is hit."""
        while not self.closing:
            try:
                data = await self.stream.receive_some(_RECV_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                data = b""
            if not data:
                self._transport_failed()
                return
            self.ws.receive_data(data)
            for event in self.ws.events():
                try:
                    await self._handle(event)
                except (ValueError, RecursionError, OverflowError, UnicodeError, TypeError) as exc:
                    # Input we could not make sense of: a clean close, never a traceback.
                    self.metrics.frames_rejected.labels("invalid").inc()
                    log.info("unprocessable message: closing", extra={**self.log_context(),
                                                                       "error": type(exc).__name__})
                    self.begin_close(closecodes.INVALID_MESSAGE)
                if self.closing:
                    return

    def _count_frame(self) -> bool:
        """Every frame counts in the inbound limit (D6): data, continuation and control alike."""
        now = trio.current_time()
        if self._limiter.allow(now):
            self.last_seen = now
            return True
        self.metrics.frames_rejected.labels("rate_limited").inc()
        log.info("rate limit exceeded: closing", extra=self.log_context())
        self.begin_close(closecodes.RATE_LIMITED)
        return False

    async def _handle(self, event: object) -> None:
        if isinstance(event, TextMessage):
            if event.frame_finished:
                if not self._count_frame():
                    return
                self._frames_in_message += 1
                if self._frames_in_message > self._max_frames:
                    self.metrics.frames_rejected.labels("too_many_fragments").inc()
                    self.begin_close(closecodes.TOO_MANY_FRAGMENTS)
                    return
            if event.data:
                self._text += event.data
            if len(self._text) > self._max_message:
                self.metrics.frames_rejected.labels("too_large").inc()
                self.begin_close(closecodes.MESSAGE_TOO_LARGE)
                return
            if event.message_finished:
                text = self._text
                self._text = ""
                self._frames_in_message = 0
                await self._on_text(text)
        elif isinstance(event, BytesMessage):
            self.metrics.frames_rejected.labels("binary").inc()
            self.begin_close(closecodes.BINARY_NOT_SUPPORTED)
        elif isinstance(event, Ping):
            if self._count_frame():
                self._send_pong(bytes(event.payload))
        elif isinstance(event, Pong):
            self._count_frame()
        elif isinstance(event, CloseConnection):
            self._on_close_event(event)

    def _on_close_event(self, event: CloseConnection) -> None:
        if self.ws.state is ConnectionState.REMOTE_CLOSING:
            # The client started the close: echo its code, as RFC 6455 asks.
            self.begin_close(self.closing_state.peer_started(event.code))
            return
        # wsproto reports a malformed frame as a close event while the state stays open.
        # It parses nothing after that, so the client's close reply could never be recognised.
        close, reason = self.closing_state.malformed(event.code)
        self.metrics.frames_rejected.labels(reason).inc()
        self.begin_close(close)

    async def _on_text(self, text: str) -> None:
        if self.on_message is not None and await self.on_message(self, text):
            return
        if text == "ping" or text == _JSON_PING or _is_json_ping(text):
            self.metrics.inbound_messages.labels("ping").inc()
            self.send_control(frames.PONG_TEXT)
        elif text == "refresh_sectors" and self.refresh_sectors is not None:
            self.metrics.inbound_messages.labels("refresh_sectors").inc()
            reply = await self.refresh_sectors(self)
            self.send_control(frames.text_frame(reply.encode()))
        else:
            self.metrics.inbound_messages.labels("other").inc()

    # --- closing ------------------------------------------------------------------------------
    async def finish_close(self, timeout: float = CLOSE_TIMEOUT) -> None:  # noqa: ASYNC109 - a bound, not a deadline the caller owns
        """After ``begin_close``: let the writer flush, read until the client's close, then return.

        The caller hangs up afterwards; a client that never answers costs at most ``timeout``.
        """
        with trio.move_on_after(timeout):
            if self._writer_done is not None:  # no writer: nothing was ever queued to flush
                await self._writer_done.wait()
            state = self.closing_state
            while not state.peer_closed and not state.transport_dead:
                try:
                    data = await self.stream.receive_some(_RECV_SIZE)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    return
                if not data or state.unparseable:
                    # After a malformed frame, whatever the client sends next stands for its
                    # close reply (RFC 6455 §7.1.7: fail the connection, don't parse further).
                    return
                self.ws.receive_data(data)
                for event in self.ws.events():
                    if isinstance(event, CloseConnection):
                        state.peer_answered()


#: Codes counted under their own label; a client may echo any code, which must not mint labels.
_KNOWN_CODES = frozenset({1000, 1001, 1002, 1003, 1006, 1007, 1008, 1009, 1011, 1012, 1013, 4000, 4001, 4003, 4029})


def close_label(code: int) -> str:
    return str(code) if code in _KNOWN_CODES else "other"


def _is_json_ping(text: str) -> bool:
    # The load test sends {"type":"ping","ts":...}; any JSON object typed "ping" gets a pong (D6).
    if len(text) > 1024 or not text.startswith("{") or "ping" not in text:
        return False
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        # Deep nesting inside 1 KiB is RecursionError, not ValueError.
        return False
    return isinstance(value, dict) and value.get("type") == "ping"
