"""Protocol v2 on one socket (D20, D21): the welcome, resume by position, in-band refresh.

A client that offers the subprotocol ``integrador.v2`` gets it selected in the 101; once admitted,
its first frame is the welcome. Its event frames carry ``_pos`` (``gateway.fanout.v2frames``).

Resume: live events for the socket are held (``ResumeState``) while the store is read after each
position; what the socket would have received live (``routing.receives``) is sent in order, then
``resumed``, then the held events except those the replay covered. Nothing is skipped or sent
twice. A position that is too old, from a lost store (its epoch), of another tenant or garbage
is answered ``recovered:false``: never a close.

Refresh: the credential is verified as at connect (``gateway.access.refresh``); on success the
socket is re-indexed at once (branches, roles, sectors) and its expiry deadline moves.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import attrs
import trio

from gateway.access.refresh import Refresher
from gateway.catchup.positions import Page, PositionStore
from gateway.core import frames
from gateway.core.events import InvalidEvent, parse_event
from gateway.core.positions import (
    MAX_RESUME_STREAMS,
    Position,
    ResumeState,
    StreamId,
    make_offset,
    parse_client_message,
    parse_offset,
    parse_stream_name,
    positioned_payload,
    refresh_failed_message,
    refreshed_message,
    resumed_message,
    welcome_message,
)
from gateway.core.routing import receives
from gateway.redisio.client import is_redis_failure
from gateway.serving.connection import Connection
from gateway.serving.registry import SocketRegistry

log = logging.getLogger("gateway.v2")

SUBPROTOCOL_V2 = "integrador.v2"
#: Entries read per round trip while replaying.
REPLAY_PAGE = 500


def negotiated_version(header: bytes | None) -> int:
    """2 when ``Sec-WebSocket-Protocol`` offers ``integrador.v2``, else 1 (D20)."""
    if header is None:
        return 1
    offered = (part.strip() for part in header.decode("latin-1").split(","))
    return 2 if SUBPROTOCOL_V2 in offered else 1


@attrs.define(eq=False)
class ProtocolV2:
    store: PositionStore
    registry: SocketRegistry
    refresher: Refresher
    #: Send-queue bytes above which a replay waits for the socket to drain.
    replay_high_water: int
    #: How long a new v2 socket's live events wait for a ``resume`` as its first message.
    resume_grace: float = 2.0
    revalidation: tuple[float, float] = (300.0, 1800.0)

    def start(self, conn: Connection, nursery: trio.Nursery) -> None:
        """A v2 socket was just admitted: attach its state and queue the welcome (no checkpoint,
        so nothing is delivered before it). Live events wait for its first message, at most
        ``resume_grace`` seconds."""
        assert conn.principal is not None
        conn.v2 = ResumeState()
        conn.on_message = self.on_message
        conn.send_control(frames.text_frame(welcome_message(conn.principal.expires_at)))
        nursery.start_soon(self._grace, conn)

    async def _grace(self, conn: Connection) -> None:
        await trio.sleep(self.resume_grace)
        self._release(conn)

    def _release(self, conn: Connection) -> None:
        state = conn.v2
        if state is not None:
            for frame in state.release():
                conn.deliver(frame)

    async def on_message(self, conn: Connection, text: str) -> bool:
        parsed = parse_client_message(text)
        if parsed is None or parsed[0] != "resume":
            self._release(conn)  # the first message was not a resume: live events flow now
        if parsed is None:
            return False
        kind, value = parsed
        conn.metrics.inbound_messages.labels(kind).inc()
        if kind == "resume":
            await self.resume(conn, value)
        else:
            await self.refresh(conn, value)
        return True

    # --- resume -------------------------------------------------------------------------------
    async def resume(self, conn: Connection, positions: dict[str, Any]) -> None:
        state = conn.v2
        assert state is not None
        if not state.fresh:
            # One resume per socket: a second could only repeat what this one already sent.
            conn.send_control(frames.text_frame(resumed_message({s: (False, 0) for s in
                                                                 list(positions)[:MAX_RESUME_STREAMS]})))
            return
        state.begin_replay()
        results: dict[str, tuple[bool, int]] = {}
        covered: dict[str, StreamId] = {}
        try:
            for n, (stream, offset) in enumerate(positions.items()):
                if n >= MAX_RESUME_STREAMS or conn.closing:
                    results[str(stream)[:64]] = (False, 0)
                    continue
                results[stream] = await self._replay(conn, state, stream, offset, covered)
        finally:
            release = state.end_replay(covered)
        conn.send_control(frames.text_frame(resumed_message(results)))
        for frame in release:
            conn.deliver(frame)

    async def _replay(self, conn: Connection, state: ResumeState, stream: str, offset: object,
                      covered: dict[str, StreamId]) -> tuple[bool, int]:
        principal = conn.principal
        where = parse_stream_name(stream)
        parsed = parse_offset(offset)
        if principal is None or where is None or parsed is None or where[0] != principal.tenant_id:
            return (False, 0)
        tenant, branch = where
        epoch, after = parsed
        before = state.first_live.get(stream)
        replayed = 0
        first = True
        while True:
            page = await self._read(tenant, branch, epoch, after, before)
            if page is None or page.status != "ok":
                return (False, replayed)
            if first and (after < page.max_deleted or after > page.last):
                # Entries after the position were trimmed already, or it was never issued here.
                return (False, 0)
            first = False
            covered[stream] = max(covered.get(stream, after), after)
            for sid, data in page.entries:
                after = sid
                covered[stream] = sid
                try:
                    event = parse_event(data, max_size=1 << 20)
                except InvalidEvent:
                    continue
                if not receives(event, conn.principal or principal):
                    continue
                position = Position(stream, sid, make_offset(epoch, sid))
                conn.deliver(frames.text_frame(positioned_payload(event.frame_payload, position)))
                replayed += 1
            if len(page.entries) < REPLAY_PAGE:
                return (True, replayed)
            await self._drained(conn)
            if conn.closing:
                return (False, replayed)

    async def _read(self, tenant: int, branch: int, epoch: str, after: StreamId, before: StreamId | None) -> Page | None:
        store = self.store
        if not store.guard.allow():
            return None
        try:
            page = await store.read_after(tenant, branch, epoch, after, before, REPLAY_PAGE)
        except Exception as exc:
            if not (is_redis_failure(exc) or isinstance(exc, trio.TooSlowError)):
                raise
            store.guard.failed(exc)
            return None
        store.guard.ok()
        return page

    async def _drained(self, conn: Connection) -> None:
        # A replay larger than the send budget waits for the client to read, like live traffic
        # would; a client that never reads is closed as a slow consumer by the budget itself.
        while conn.out_bytes > self.replay_high_water and not conn.closing:  # noqa: ASYNC110 - no event for "drained"
            await trio.sleep(0.005)

    # --- refresh ------------------------------------------------------------------------------
    async def refresh(self, conn: Connection, token: str) -> None:
        current = conn.principal
        if current is None:
            return
        verdict = await self.refresher.verify(current, token)
        index = self.registry.index
        if conn.closing or conn not in index:
            return
        if isinstance(verdict, str):
            log.info("refresh refused", extra={**conn.log_context(), "reason": verdict})
            conn.send_control(frames.text_frame(refresh_failed_message(verdict)))
            return
        # Same principal, so the connection limits are unchanged; the buckets move at once.
        index.add(conn, verdict)
        conn.principal = verdict
        conn.token = token
        remaining = verdict.expires_at - time.time()
        conn.scope.deadline = trio.current_time() + remaining if remaining != float("inf") else float("inf")
        staff, table = self.revalidation
        conn.next_check = trio.current_time() + (table if verdict.is_diner else staff)
        log.info("credential refreshed", extra=conn.log_context())
        conn.send_control(frames.text_frame(refreshed_message(verdict.expires_at)))
