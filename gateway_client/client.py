"""``GatewayClient``: one reconnecting client of a gateway WebSocket endpoint, on Trio.

The socket is trio-websocket's; the decisions are the sans-I/O parts of this package: reconnect
policy and backoff (``policy``), listeners and throttles (``listeners``), de-duplication
(``dedup``), URLs (``urls``); its timers are in ``timers`` and the catch-up request in ``catchup``.
"""

from __future__ import annotations

import json
import math
import ssl
import time
from collections.abc import Callable

import h11
import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection, open_websocket_url
from wsproto.utilities import ProtocolError

from gateway_client.catchup import catchup_since, fetch_missed
from gateway_client.dedup import RecentKeys, event_key
from gateway_client.listeners import Event, Listener, Listeners, Throttle, log, safe_call
from gateway_client.policy import (
    ABNORMAL,
    CLIENT_CLOSED,
    HEARTBEAT_TIMEOUT,
    SOFT_DISCONNECT,
    Backoff,
    CloseAction,
    CloseInfo,
    ConnectionState,
    RandomSource,
    ReconnectPolicy,
    describe_failure,
    retry_after,
)
from gateway_client.timers import LiveSocket, TrailingCalls
from gateway_client.urls import bases, catchup_url, normalise_endpoint, ws_url
from gateway_client.v2 import SUBPROTOCOL, RecoveryFailed, V2Session

__all__ = ["GatewayClient"]


class GatewayClient:
    """A reconnecting client of one gateway WebSocket endpoint. See the module docstring."""

    def __init__(
        self,
        url_base: str,
        endpoint: str,
        token: str | Callable[[], str],
        *,
        origin: str | None = None,
        branch_id: int | None = None,
        session_id: int | None = None,
        ping_interval: float = 30.0,
        pong_timeout: float = 10.0,
        max_attempts: int = 50,
        backoff_base: float = 1.0,
        backoff_cap: float = 30.0,
        jitter: float = 0.3,
        on_state: Callable[[ConnectionState], None] | None = None,
        on_max_reconnect: Callable[[], None] | None = None,
        on_final_close: Callable[[int, str], None] | None = None,
        rng: RandomSource | None = None,
        connect_timeout: float = 10.0,
        close_timeout: float = 2.0,
        catchup: bool = True,
        catchup_timeout: float = 5.0,
        catchup_margin: float = 2.0,
        dedup_memory: int = 2048,
        ssl_context: ssl.SSLContext | None = None,
        protocol: int = 2,
        on_recovery_failed: RecoveryFailed | None = None,
        refresh_margin: float = 30.0,
    ) -> None:
        self.endpoint = normalise_endpoint(endpoint)
        self.ws_base, self.http_base = bases(url_base)
        for name, value in (("ping_interval", ping_interval), ("pong_timeout", pong_timeout),
                            ("connect_timeout", connect_timeout), ("close_timeout", close_timeout),
                            ("catchup_timeout", catchup_timeout)):
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a positive number")
        if not catchup_margin >= 0:
            raise ValueError("catchup_margin must be >= 0")
        self._token = token
        self.origin = origin
        self.branch_id = branch_id
        self.session_id = session_id
        self.ping_interval = ping_interval
        self.pong_timeout = pong_timeout
        self.connect_timeout = connect_timeout
        self.close_timeout = close_timeout
        self.catchup_enabled = catchup
        self.catchup_timeout = catchup_timeout
        self.catchup_margin = catchup_margin
        self.ssl_context = ssl_context
        self.on_state = on_state
        self.on_max_reconnect = on_max_reconnect
        self.on_final_close = on_final_close
        self.policy = ReconnectPolicy(max_attempts=max_attempts, rng=rng,
                                      backoff=Backoff(base=backoff_base, cap=backoff_cap, jitter=jitter))
        self.listeners = Listeners()
        self.seen = RecentKeys(dedup_memory)
        #: Protocol v2 state (positions, expiry); None with ``protocol=1``.
        self.v2 = V2Session(on_recovery_failed=on_recovery_failed, refresh_margin=refresh_margin) if protocol == 2 else None
        #: Whether the current (or last) socket speaks v2: the gateway selected it.
        self.speaking_v2 = False

        self.state = ConnectionState.DISCONNECTED
        #: How the last socket or attempt ended; ``final_close`` is set after a final code.
        self.last_close: CloseInfo | None = None
        self.final_close: tuple[int, str] | None = None
        #: Counters: successful opens, events dispatched live / from catch-up, duplicates dropped,
        #: heartbeat timeouts.
        self.opens = 0
        self.live_events = 0
        self.catchup_events = 0
        self.duplicates_dropped = 0
        self.heartbeat_timeouts = 0

        self._running = False
        self._stop_requested = False
        self._restart_requested = False
        self._token_generation = 0
        self._done = trio.Event()
        self._done.set()
        self._state_changed = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._attempt_scope: trio.CancelScope | None = None
        self._serve_scope: trio.CancelScope | None = None
        self._wait_scope: trio.CancelScope | None = None
        self._live: LiveSocket | None = None
        self._local_close: tuple[int, str] | None = None
        self._remote_close: tuple[int, str] | None = None
        self._last_event_wall: float | None = None
        self._last_open_wall: float | None = None
        self._trailing = TrailingCalls()

    # --- public API ---------------------------------------------------------------------------
    @property
    def token(self) -> str:
        return self._token() if callable(self._token) else self._token

    @property
    def url(self) -> str:
        """The WebSocket URL with the current token."""
        return ws_url(self.ws_base, self.endpoint, self.token)

    @property
    def _throttle_timers(self) -> dict[Throttle, trio.CancelScope]:
        """The armed trailing-call timers, one per throttled listener with an event pending."""
        return self._trailing.scopes

    @property
    def outstanding_pings(self) -> int:
        """Pings sent on the current socket whose pong has not arrived (each has one timer)."""
        return len(self._live.outstanding) if self._live is not None else 0

    def on(self, event_type: str, callback: Listener) -> Callable[[], None]:
        """Call ``callback(event)`` for every event of ``event_type`` (``"*"``: every event)."""
        return self.listeners.add(event_type, callback)

    def on_throttled(self, event_type: str, callback: Listener, interval: float = 0.1) -> Callable[[], None]:
        """Like ``on``, at most one call per ``interval``: the first event at once, then one trailing
        call at the end of the interval with the latest event that arrived meanwhile."""
        throttle = Throttle(callback, interval)

        def offer(event: Event) -> None:
            deadline = throttle.offer(event, trio.current_time())
            if deadline is not None:
                self._trailing.arm(throttle, deadline, self._nursery)

        remove = self.listeners.add(event_type, offer)

        def unsubscribe() -> None:
            remove()
            throttle.cancel()
            self._trailing.cancel(throttle)

        return unsubscribe

    def update_token(self, new_token: str | Callable[[], str]) -> None:
        """Use ``new_token`` from now on: the open socket is closed (1000 "Soft disconnect") and a
        new one opened at once; listeners, de-duplication memory and catch-up position are kept."""
        self._token = new_token
        self._token_generation += 1
        if not self._running:
            return
        self._restart_requested = True
        if self._serve_scope is not None:
            self._local_close = SOFT_DISCONNECT
            self._serve_scope.cancel()
        elif self._attempt_scope is not None:
            self._attempt_scope.cancel()
        elif self._wait_scope is not None:
            self._wait_scope.cancel()

    async def ping(self) -> bool:
        """Send an extra ping now (e.g. after the host woke up); False when not connected."""
        live = self._live
        if live is None or self.state is not ConnectionState.CONNECTED:
            return False
        await live.ping()
        return True

    async def wait_state(self, *states: ConnectionState) -> ConnectionState:
        """Wait until the state is one of ``states``; returns it."""
        while self.state not in states:
            await self._state_changed.wait()
        return self.state

    async def close(self) -> None:
        """Close the socket (1000), stop reconnecting, and wait until ``run()`` has returned."""
        self._stop_requested = True
        if self._serve_scope is not None:
            if self._local_close is None:
                self._local_close = CLIENT_CLOSED
            self._serve_scope.cancel()
        if self._attempt_scope is not None and self._serve_scope is None:
            self._attempt_scope.cancel()
        if self._wait_scope is not None:
            self._wait_scope.cancel()
        if self._running:
            await self._done.wait()
        else:  # not started yet: the run() about to start returns at once
            self._set_state(ConnectionState.CLOSED)

    async def run(self) -> None:
        """Connect and keep connected until ``close()``, a final close code or max attempts.

        Listeners are called from this task. May be called again after it returned (for example
        with a new token after a final 4001). A ``close()`` that comes before ``run()`` has
        started makes it return at once.
        """
        if self._running:
            raise RuntimeError("GatewayClient.run() is already running")
        self._running = True
        self._restart_requested = False
        self._done = trio.Event()
        self.final_close = None
        self.policy.reset()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    await self._loop()
                finally:
                    self._trailing.flush()
                    nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            self._running = False
            self._stop_requested = False
            self._set_state(ConnectionState.CLOSED)
            self._done.set()

    # --- the connection loop --------------------------------------------------------------------
    async def _loop(self) -> None:
        state = ConnectionState.CONNECTING
        while not self._stop_requested:
            self._set_state(state)
            info = await self._attempt()
            if info is not None:
                self.last_close = info
            if self._stop_requested:
                return
            if self._restart_requested:
                self._restart_requested = False
                state = ConnectionState.CONNECTING
                continue
            code = info.code if info is not None else ABNORMAL
            decision = self.policy.on_close(code)
            if decision.action is CloseAction.FINAL:
                reason = info.reason if info is not None else ""
                self.final_close = (code, reason)
                log.warning("final close: not reconnecting", extra={"code": code, "reason": reason})
                self._set_state(ConnectionState.CLOSED)
                if self.on_final_close is not None:
                    safe_call(self.on_final_close, code, reason)
                return
            if decision.action is CloseAction.GIVE_UP:
                log.error("max reconnect attempts reached", extra={"attempts": decision.attempt})
                self._set_state(ConnectionState.CLOSED)
                if self.on_max_reconnect is not None:
                    safe_call(self.on_max_reconnect)
                return
            state = ConnectionState.RECONNECTING
            self._set_state(state)
            # A refusal's Retry-After (D22) is a floor under the backoff, never a shortcut.
            delay = max(decision.delay, (info.retry_after if info is not None else None) or 0.0)
            log.info("reconnecting", extra={"attempt": decision.attempt, "delay": round(delay, 3), "code": code})
            with trio.CancelScope() as wait:
                self._wait_scope = wait
                await trio.sleep(delay)
            self._wait_scope = None
            if self._restart_requested:
                self._restart_requested = False
                state = ConnectionState.CONNECTING

    async def _attempt(self) -> CloseInfo | None:
        """One connection attempt and, if it opens, the socket's whole life."""
        generation = self._token_generation
        token = self.token
        url = ws_url(self.ws_base, self.endpoint, token)
        headers = [(b"Origin", self.origin.encode("latin-1"))] if self.origin is not None else []
        self._local_close = self._remote_close = None
        opened = False
        info: CloseInfo | None = None
        with trio.CancelScope() as attempt_scope:
            self._attempt_scope = attempt_scope
            try:
                async with open_websocket_url(url, self.ssl_context, extra_headers=headers,
                                              subprotocols=[SUBPROTOCOL] if self.v2 is not None else None,
                                              message_queue_size=4096, connect_timeout=self.connect_timeout,
                                              disconnect_timeout=self.close_timeout) as ws:
                    opened = True
                    info = await self._connected(ws, token, generation)
            except (HandshakeError, OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                    ConnectionClosed, ProtocolError, h11.ProtocolError) as exc:
                if not opened:
                    log.info("connect failed", extra={"error": repr(exc)})
                    info = CloseInfo(ABNORMAL, describe_failure(exc), by_client=False, opened=False,
                                     retry_after=retry_after(exc))
                elif info is None:
                    info = CloseInfo(ABNORMAL, describe_failure(exc), by_client=False, opened=True)
            finally:
                self._attempt_scope = None
                self._serve_scope = None
                self._live = None
        return info

    async def _connected(self, ws: WebSocketConnection, token: str, generation: int) -> CloseInfo:
        # Where catch-up starts: None on the first open (or with catch-up off, or v2: resume).
        self.speaking_v2 = self.v2 is not None and ws.subprotocol == SUBPROTOCOL
        since = (catchup_since(self._last_open_wall, self._last_event_wall, self.catchup_margin)
                 if self.catchup_enabled and not self.speaking_v2 else None)
        self._last_open_wall = time.time()
        self.opens += 1
        self.policy.opened()
        self._set_state(ConnectionState.CONNECTED)
        with trio.CancelScope() as serve_scope:
            self._serve_scope = serve_scope
            if self._stop_requested:
                self._local_close = CLIENT_CLOSED
                serve_scope.cancel()
            elif generation != self._token_generation:
                self._local_close = SOFT_DISCONNECT
                self._restart_requested = True
                serve_scope.cancel()
            async with trio.open_nursery() as nursery:
                live = LiveSocket(ws, nursery, pong_timeout=self.pong_timeout, on_timeout=self._heartbeat_timed_out)
                self._live = live
                if since is not None:
                    # Catch-up first, then live frames (they queue in the socket meanwhile).
                    await self._catch_up(token, since)
                if self.speaking_v2 and self.v2 is not None:
                    # Resume first: the gateway holds live events until this message.
                    try:
                        await ws.send_message(self.v2.resume_message())
                    except ConnectionClosed as exc:
                        # The close can arrive with the 101 itself (a credential refused after
                        # the handshake, D1): the same outcome as one the read loop sees.
                        self._closed_by_server(exc)
                        nursery.cancel_scope.cancel()
                    if callable(self._token):
                        nursery.start_soon(self.v2.refresher, ws.send_message, self._token)
                nursery.start_soon(self._read_loop, live)
                nursery.start_soon(live.heartbeat, self.ping_interval)
        self._serve_scope = None
        self._live = None
        if self._remote_close is not None:
            code, reason = self._remote_close
            log.info("socket closed by the server", extra={"code": code, "reason": reason})
            return CloseInfo(code, reason, by_client=False, opened=True)
        code, reason = self._local_close or CLIENT_CLOSED
        with trio.move_on_after(self.close_timeout):
            await ws.aclose(code, reason)
        return CloseInfo(code, reason, by_client=True, opened=True)

    async def _read_loop(self, live: LiveSocket) -> None:
        try:
            while True:
                message = await live.ws.get_message()
                if isinstance(message, str):
                    self._on_text(live, message)
        except ConnectionClosed as exc:
            self._closed_by_server(exc)
            live.nursery.cancel_scope.cancel()

    def _closed_by_server(self, exc: ConnectionClosed) -> None:
        close = exc.reason
        self._remote_close = (close.code, close.reason or "") if close is not None else (ABNORMAL, "")

    def _on_text(self, live: LiveSocket, text: str) -> None:
        try:
            value = json.loads(text)
        except ValueError:
            return  # non-JSON frames (e.g. "sectors_updated:...") are ignored
        if not isinstance(value, dict):
            return
        if value.get("type") == "pong":
            live.pong()
            return
        if self.speaking_v2 and self.v2 is not None:
            if self.v2.handle(value):
                return
            # v2 delivers each event exactly once (D20): nothing to de-duplicate.
            self._last_event_wall = time.time()
            self.live_events += 1
            self.listeners.dispatch(value)
            return
        self._last_event_wall = time.time()
        self._deliver(value, live=True)

    def _deliver(self, event: Event, *, live: bool) -> None:
        """Dispatch an event seen for the first time; count it, or count the duplicate."""
        if not self.seen.add(event_key(event)):
            self.duplicates_dropped += 1
            return
        if live:
            self.live_events += 1
        else:
            self.catchup_events += 1
        self.listeners.dispatch(event)

    def _heartbeat_timed_out(self) -> None:
        self.heartbeat_timeouts += 1
        if self._local_close is None:
            self._local_close = HEARTBEAT_TIMEOUT

    # --- catch-up ------------------------------------------------------------------------------
    def catchup_url(self, token: str, since: float) -> str | None:
        """The catch-up request for this client, or None when it has no scope to ask for."""
        return catchup_url(self.http_base, self.endpoint, token, since, branch_id=self.branch_id,
                           session_id=self.session_id)

    async def _catch_up(self, token: str, since: float) -> None:
        url = self.catchup_url(token, since)
        if url is None:
            return
        events = await fetch_missed(url, origin=self.origin, within=self.catchup_timeout,
                                    ssl_context=self.ssl_context)
        if events is None:
            return
        for event in events:
            if isinstance(event, dict):
                self._deliver(event, live=False)
        log.info("caught up", extra={"events": len(events), "since": since})

    # --- helpers -------------------------------------------------------------------------------
    def _set_state(self, state: ConnectionState) -> None:
        if state is self.state:
            return
        self.state = state
        self._state_changed.set()
        self._state_changed = trio.Event()
        if self.on_state is not None:
            safe_call(self.on_state, state)
