"""A Python client for the gateway, with the behaviour the audit demands of every front end.

``GatewayClient`` connects to ``/ws/<endpoint>`` with trio-websocket and keeps the socket alive:

- a ``{"type":"ping"}`` every ``ping_interval`` seconds; each ping arms its own pong timer (one
  cancel scope per outstanding ping, all owned by the connection's nursery, so none can outlive the
  socket); no pong within ``pong_timeout`` closes the socket with 4000 "Heartbeat timeout";
- exponential backoff with jitter between attempts (1 s doubling to 30 s, plus 0–30 %), at most 50
  reconnect attempts, then ``on_max_reconnect()``; a successful open resets the counter;
- close codes 4001, 4003 and 4029 are final: no reconnect, ``on_final_close(code, reason)``;
- after every reconnect, a catch-up request over HTTP for what was missed; catch-up and live
  events are de-duplicated against a bounded memory of recently seen envelopes;
- listeners per event type or ``"*"``, plain and throttled (leading call plus one trailing call
  carrying the latest event);
- ``update_token()`` reconnects with a new credential and keeps every listener.

The decision-making parts are plain classes without I/O (``Backoff``, ``ReconnectPolicy``,
``Listeners``, ``Throttle``, ``RecentKeys``); ``GatewayClient`` wires them to Trio. Catch-up uses a
minimal HTTP/1.1 GET on ``trio.open_tcp_stream`` + h11 (``http_get``).

Usage (structured: ``run()`` lives in the caller's nursery)::

    async with trio.open_nursery() as nursery:
        client = GatewayClient("ws://localhost:8001", "waiter", token, branch_id=2,
                               origin="http://localhost:5173")
        unsubscribe = client.on("ROUND_READY", lambda event: print(event["entity"]))
        nursery.start_soon(client.run)
        ...
        await client.close()
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import enum
import hashlib
import json
import logging
import math
import random
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

import h11
import trio
from trio_websocket import ConnectionClosed, HandshakeError, WebSocketConnection, open_websocket_url
from wsproto.utilities import ProtocolError

__all__ = [
    "FINAL_CLOSE_CODES",
    "HEARTBEAT_TIMEOUT",
    "Backoff",
    "CloseAction",
    "CloseInfo",
    "ConnectionState",
    "Decision",
    "Event",
    "GatewayClient",
    "HttpError",
    "HttpResponse",
    "Listener",
    "Listeners",
    "RecentKeys",
    "ReconnectPolicy",
    "Throttle",
    "event_key",
    "http_get",
    "session_id_from_table_token",
]

log = logging.getLogger("gateway.client")

#: An event as delivered to listeners: the parsed JSON envelope.
Event = dict[str, Any]
#: A listener is a plain (synchronous) callable; exceptions are logged and swallowed.
Listener = Callable[[Event], None]

#: Codes after which a client must not reconnect (the gateway's ``closecodes.FINAL_CODES``).
FINAL_CLOSE_CODES: Final = frozenset({4001, 4003, 4029})
#: What the client sends when a ping went unanswered.
HEARTBEAT_TIMEOUT: Final = (4000, "Heartbeat timeout")
#: Sent when ``update_token()`` replaces the connection.
SOFT_DISCONNECT: Final = (1000, "Soft disconnect")
#: Sent by ``close()``.
CLIENT_CLOSED: Final = (1000, "Client closed")
#: No close frame was received (refused connection, failed handshake, lost transport).
ABNORMAL: Final = 1006

PING_FRAME: Final = '{"type":"ping"}'
WILDCARD: Final = "*"
ENDPOINTS: Final = frozenset({"waiter", "kitchen", "admin", "diner"})


class RandomSource(Protocol):
    def random(self) -> float: ...


# --- sans-I/O: backoff and reconnect decisions ------------------------------------------------


@dataclass(frozen=True)
class Backoff:
    """Delay before reconnect attempt ``n`` (1-based): ``min(base·2^(n−1), cap)`` plus a jitter of
    ``0 … jitter`` times that value (the TypeScript clients' formula: 1 s → 30 s, +0–30 %)."""

    base: float = 1.0
    cap: float = 30.0
    jitter: float = 0.3

    def __post_init__(self) -> None:
        if not (self.base >= 0 and self.cap >= 0 and math.isfinite(self.base) and math.isfinite(self.cap)):
            raise ValueError("backoff base and cap must be finite and >= 0")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be within [0, 1]")

    def nominal(self, attempt: int) -> float:
        """The delay of attempt ``attempt`` without jitter."""
        if attempt < 1:
            raise ValueError("attempts are numbered from 1")
        # 2**1100 would overflow a float; the cap is reached long before.
        return min(self.base * 2.0 ** min(attempt - 1, 1000), self.cap)

    def bounds(self, attempt: int) -> tuple[float, float]:
        low = self.nominal(attempt)
        return low, low * (1 + self.jitter)

    def delay(self, attempt: int, u: float) -> float:
        """The delay of attempt ``attempt`` for a uniform sample ``u`` in [0, 1)."""
        low = self.nominal(attempt)
        return low + low * self.jitter * min(max(u, 0.0), 1.0)


class CloseAction(enum.Enum):
    RECONNECT = "reconnect"
    FINAL = "final"
    GIVE_UP = "give_up"


@dataclass(frozen=True)
class Decision:
    action: CloseAction
    delay: float = 0.0
    attempt: int = 0


class ReconnectPolicy:
    """What to do after a socket closed or an attempt failed; counts reconnect attempts.

    ``on_close`` is called once per closed socket or failed attempt, ``opened`` once per
    successful open (it resets the counter).
    """

    def __init__(self, *, max_attempts: int = 50, backoff: Backoff | None = None,
                 rng: RandomSource | None = None, final_codes: Iterable[int] = FINAL_CLOSE_CODES) -> None:
        if max_attempts < 0:
            raise ValueError("max_attempts must be >= 0")
        self.max_attempts = max_attempts
        self.backoff = backoff if backoff is not None else Backoff()
        self.rng: RandomSource = rng if rng is not None else random.Random()
        self.final_codes = frozenset(final_codes)
        self.attempts = 0

    def is_final(self, code: int | None) -> bool:
        return code is not None and code in self.final_codes

    def opened(self) -> bool:
        """A socket opened: reset the counter; returns whether it was a reconnect after failures."""
        was_retrying = self.attempts > 0
        self.attempts = 0
        return was_retrying

    def on_close(self, code: int | None) -> Decision:
        if self.is_final(code):
            return Decision(CloseAction.FINAL)
        if self.attempts >= self.max_attempts:
            return Decision(CloseAction.GIVE_UP, attempt=self.attempts)
        self.attempts += 1
        return Decision(CloseAction.RECONNECT, self.backoff.delay(self.attempts, self.rng.random()), self.attempts)

    def reset(self) -> None:
        self.attempts = 0


# --- sans-I/O: listeners, throttling, de-duplication -------------------------------------------


class Listeners:
    """Callbacks per event type (or ``"*"`` for all); ``add`` returns the unsubscribe function.

    Each subscription has its own key, so the same callable may be added twice and each
    unsubscribe removes only its own entry. An event type whose last listener goes is removed from
    the map (audit CLIENT-LOW-02). Dispatch order: the type's listeners, then ``"*"``, each in
    subscription order; a listener that raises is logged and the others still run.
    """

    def __init__(self) -> None:
        self._by_type: dict[str, dict[int, Listener]] = {}
        self._next_id = 0

    def add(self, event_type: str, callback: Listener) -> Callable[[], None]:
        if not isinstance(event_type, str) or not event_type:
            raise ValueError("event_type must be a non-empty string")
        key = self._next_id
        self._next_id += 1
        self._by_type.setdefault(event_type, {})[key] = callback

        def unsubscribe() -> None:
            group = self._by_type.get(event_type)
            if group is None:
                return
            group.pop(key, None)
            if not group:
                del self._by_type[event_type]

        return unsubscribe

    def __len__(self) -> int:
        return sum(len(group) for group in self._by_type.values())

    def __bool__(self) -> bool:
        return bool(self._by_type)

    @property
    def event_types(self) -> frozenset[str]:
        return frozenset(self._by_type)

    def count(self, event_type: str) -> int:
        return len(self._by_type.get(event_type, ()))

    def dispatch(self, event: Event) -> int:
        """Call the listeners of ``event["type"]`` and of ``"*"``; returns how many were called."""
        event_type = event.get("type")
        callbacks: list[Listener] = []
        if isinstance(event_type, str) and event_type != WILDCARD:
            callbacks.extend(self._by_type.get(event_type, {}).values())
        callbacks.extend(self._by_type.get(WILDCARD, {}).values())
        for callback in callbacks:  # a snapshot: listeners may (un)subscribe while dispatching
            _safe_call(callback, event)
        return len(callbacks)


class Throttle:
    """Leading-edge throttle with one trailing call carrying the *latest* suppressed event.

    Sans-I/O: the caller passes the time and arms a timer when ``offer`` returns a deadline, then
    calls ``fire`` at that time. A trailing call opens a new interval, like a leading one.
    """

    def __init__(self, callback: Listener, interval: float = 0.1) -> None:
        if not interval >= 0:
            raise ValueError("interval must be >= 0")
        self.callback = callback
        self.interval = interval
        self.last_call: float | None = None
        self.pending: Event | None = None
        self.deadline: float | None = None
        self.cancelled = False

    def offer(self, event: Event, now: float) -> float | None:
        """An event arrived; returns a deadline when a trailing timer must be armed."""
        if self.cancelled:
            return None
        if self.deadline is None and (self.last_call is None or now - self.last_call >= self.interval):
            self.last_call = now
            _safe_call(self.callback, event)
            return None
        self.pending = event
        if self.deadline is not None:
            return None  # a timer is armed already; it will carry this (latest) event
        assert self.last_call is not None
        self.deadline = self.last_call + self.interval
        return self.deadline

    def fire(self, now: float) -> None:
        """The trailing timer expired: deliver the latest pending event, if any."""
        self.deadline = None
        event, self.pending = self.pending, None
        if event is not None and not self.cancelled:
            self.last_call = now
            _safe_call(self.callback, event)

    def cancel(self) -> None:
        self.cancelled = True
        self.pending = None
        self.deadline = None


class RecentKeys:
    """A bounded memory of recently seen keys (insertion order; the oldest is forgotten first)."""

    def __init__(self, maxlen: int = 2048) -> None:
        if maxlen < 1:
            raise ValueError("maxlen must be >= 1")
        self.maxlen = maxlen
        self._keys: OrderedDict[bytes, None] = OrderedDict()

    def add(self, key: bytes) -> bool:
        """Remember ``key``; returns False when it was already known."""
        if key in self._keys:
            self._keys.move_to_end(key)
            return False
        self._keys[key] = None
        if len(self._keys) > self.maxlen:
            self._keys.popitem(last=False)
        return True

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)


def event_key(event: Event) -> bytes:
    """The de-duplication key of an envelope: a digest of its compact JSON.

    Keys are sorted and top-level fields starting with ``_`` are left out, so a copy that went
    through another path (the existing gateway added ``_enqueued_at`` to pub/sub frames) still
    matches.
    """
    body = {k: v for k, v in event.items() if not k.startswith("_")}
    text = json.dumps(body, separators=(",", ":"), ensure_ascii=False, sort_keys=True)
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def session_id_from_table_token(token: str) -> int | None:
    """The ``session_id`` of a table token, read without verification (for the catch-up query).

    JWT form: the ``session_id`` claim of the base64url payload (padding restored). Legacy form
    ``tenant:branch:table:session:expires:signature``: the fourth field.
    """
    parts = token.split(".")
    if len(parts) == 3:
        payload = parts[1] + "=" * (-len(parts[1]) % 4)
        try:
            claims = json.loads(base64.urlsafe_b64decode(payload.encode("ascii")))
        except (ValueError, binascii.Error, UnicodeError):
            return None
        value = claims.get("session_id") if isinstance(claims, dict) else None
        return _positive_int(value)
    fields = token.split(":")
    if len(fields) == 6:
        return _positive_int(fields[3])
    return None


def _positive_int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value > 0 else None
    if isinstance(value, str) and value.isdigit():
        number = int(value)
        return number if number > 0 else None
    return None


def _safe_call(callback: Callable[..., object], *args: object) -> None:
    try:
        callback(*args)
    except Exception:
        log.exception("client callback failed", extra={"callback": getattr(callback, "__qualname__", repr(callback))})


# --- minimal HTTP/1.1 GET on Trio + h11 -------------------------------------------------------


class HttpError(Exception):
    """The HTTP exchange failed (protocol error, oversized body, unsupported URL)."""


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def http_get(url: str, *, headers: Sequence[tuple[str, str]] = (), max_body: int = 8 << 20,
                   ssl_context: ssl.SSLContext | None = None) -> HttpResponse:
    """One ``GET`` over a fresh connection (``Connection: close``); no redirects, no decoding.

    Time limits are the caller's (wrap in ``trio.fail_after``).
    """
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HttpError(f"unsupported URL: {parts.scheme}://{parts.hostname or ''}")
    secure = parts.scheme == "https"
    port = parts.port or (443 if secure else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.netloc.rpartition("@")[2]
    stream: trio.abc.Stream
    if secure:
        stream = await trio.open_ssl_over_tcp_stream(
            parts.hostname, port, ssl_context=ssl_context or ssl.create_default_context(), https_compatible=True)
    else:
        stream = await trio.open_tcp_stream(parts.hostname, port)
    async with stream:
        conn = h11.Connection(our_role=h11.CLIENT)
        request = h11.Request(method="GET", target=target, headers=[
            ("Host", host_header), ("Accept", "application/json"), ("Connection", "close"),
            ("User-Agent", "gateway.client"), *headers])
        await stream.send_all((conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b""))
        status: int | None = None
        response_headers: tuple[tuple[bytes, bytes], ...] = ()
        body = bytearray()
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(bytes(await stream.receive_some(65536)))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    response_headers = tuple((bytes(k), bytes(v)) for k, v in event.headers)
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > max_body:
                        raise HttpError(f"response body over {max_body} bytes")
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed) or event is h11.PAUSED:
                    break
        except h11.ProtocolError as exc:
            raise HttpError(f"HTTP protocol error: {exc}") from exc
        if status is None:
            raise HttpError("connection closed before a response")
        return HttpResponse(status, response_headers, bytes(body))


# --- the client --------------------------------------------------------------------------------


class ConnectionState(enum.StrEnum):
    DISCONNECTED = "disconnected"  # created, run() not started yet
    CONNECTING = "connecting"  # first attempt, or reconnect after update_token()
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"  # waiting out the backoff, or an attempt after a failure
    CLOSED = "closed"  # close(), a final close code, or max attempts reached


@dataclass(frozen=True)
class CloseInfo:
    """How the last socket (or attempt) ended."""

    code: int
    reason: str
    by_client: bool  # the client sent the close frame (heartbeat timeout, soft disconnect, close())
    opened: bool  # the handshake had succeeded


@dataclass
class _Live:
    ws: WebSocketConnection
    nursery: trio.Nursery
    outstanding: list[trio.CancelScope]  # one pong timer per ping, oldest first


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
    ) -> None:
        self.endpoint = _normalise_endpoint(endpoint)
        self.ws_base, self.http_base = _bases(url_base)
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
        self._live: _Live | None = None
        self._local_close: tuple[int, str] | None = None
        self._remote_close: tuple[int, str] | None = None
        self._last_event_wall: float | None = None
        self._last_open_wall: float | None = None
        self._throttle_timers: dict[Throttle, trio.CancelScope] = {}

    # --- public API ---------------------------------------------------------------------------
    @property
    def token(self) -> str:
        return self._token() if callable(self._token) else self._token

    @property
    def url(self) -> str:
        """The WebSocket URL with the current token."""
        return self._ws_url(self.token)

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
                self._arm(throttle, deadline)

        remove = self.listeners.add(event_type, offer)

        def unsubscribe() -> None:
            remove()
            throttle.cancel()
            scope = self._throttle_timers.pop(throttle, None)
            if scope is not None:
                scope.cancel()

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
        await self._send_ping(live)
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
                    self._flush_throttles()
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
                    _safe_call(self.on_final_close, code, reason)
                return
            if decision.action is CloseAction.GIVE_UP:
                log.error("max reconnect attempts reached", extra={"attempts": decision.attempt})
                self._set_state(ConnectionState.CLOSED)
                if self.on_max_reconnect is not None:
                    _safe_call(self.on_max_reconnect)
                return
            state = ConnectionState.RECONNECTING
            self._set_state(state)
            log.info("reconnecting", extra={"attempt": decision.attempt, "delay": round(decision.delay, 3),
                                            "code": code})
            with trio.CancelScope() as wait:
                self._wait_scope = wait
                await trio.sleep(decision.delay)
            self._wait_scope = None
            if self._restart_requested:
                self._restart_requested = False
                state = ConnectionState.CONNECTING

    async def _attempt(self) -> CloseInfo | None:
        """One connection attempt and, if it opens, the socket's whole life."""
        generation = self._token_generation
        token = self.token
        headers = [(b"Origin", self.origin.encode("latin-1"))] if self.origin is not None else []
        self._local_close = self._remote_close = None
        opened = False
        info: CloseInfo | None = None
        with trio.CancelScope() as attempt_scope:
            self._attempt_scope = attempt_scope
            try:
                async with open_websocket_url(self._ws_url(token), self.ssl_context, extra_headers=headers,
                                              message_queue_size=4096, connect_timeout=self.connect_timeout,
                                              disconnect_timeout=self.close_timeout) as ws:
                    opened = True
                    info = await self._connected(ws, token, generation)
            except (HandshakeError, OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                    ConnectionClosed, ProtocolError, h11.ProtocolError) as exc:
                if not opened:
                    log.info("connect failed", extra={"error": repr(exc)})
                    info = CloseInfo(ABNORMAL, _describe(exc), by_client=False, opened=False)
                elif info is None:
                    info = CloseInfo(ABNORMAL, _describe(exc), by_client=False, opened=True)
            finally:
                self._attempt_scope = None
                self._serve_scope = None
                self._live = None
        return info

    async def _connected(self, ws: WebSocketConnection, token: str, generation: int) -> CloseInfo:
        since = self._catchup_since()
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
                live = _Live(ws, nursery, [])
                self._live = live
                if since is not None:
                    # Catch-up first, then live frames (they queue in the socket meanwhile).
                    await self._catch_up(token, since)
                nursery.start_soon(self._read_loop, live)
                nursery.start_soon(self._heartbeat_loop, live)
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

    async def _read_loop(self, live: _Live) -> None:
        try:
            while True:
                message = await live.ws.get_message()
                if isinstance(message, str):
                    self._on_text(live, message)
        except ConnectionClosed as exc:
            close = exc.reason
            self._remote_close = (close.code, close.reason or "") if close is not None else (ABNORMAL, "")
            live.nursery.cancel_scope.cancel()

    def _on_text(self, live: _Live, text: str) -> None:
        try:
            value = json.loads(text)
        except ValueError:
            return  # non-JSON frames (e.g. "sectors_updated:...") are ignored
        if not isinstance(value, dict):
            return
        if value.get("type") == "pong":
            if live.outstanding:
                live.outstanding.pop(0).cancel()
            return
        self._last_event_wall = time.time()
        if not self.seen.add(event_key(value)):
            self.duplicates_dropped += 1
            return
        self.live_events += 1
        self.listeners.dispatch(value)

    # --- heartbeat ------------------------------------------------------------------------------
    async def _heartbeat_loop(self, live: _Live) -> None:
        while True:
            await trio.sleep(self.ping_interval)
            await self._send_ping(live)

    async def _send_ping(self, live: _Live) -> None:
        scope = trio.CancelScope()
        live.outstanding.append(scope)  # before sending: a fast pong must find its timer
        live.nursery.start_soon(self._pong_timer, live, scope)
        with contextlib.suppress(ConnectionClosed):  # the reader sees the close
            await live.ws.send_message(PING_FRAME)

    async def _pong_timer(self, live: _Live, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep(self.pong_timeout)
            log.warning("no pong: closing", extra={"pong_timeout": self.pong_timeout})
            self.heartbeat_timeouts += 1
            if self._local_close is None:
                self._local_close = HEARTBEAT_TIMEOUT
            live.nursery.cancel_scope.cancel()
        if scope in live.outstanding:
            live.outstanding.remove(scope)

    # --- catch-up ------------------------------------------------------------------------------
    def _catchup_since(self) -> float | None:
        """Where catch-up starts after a reconnect; None on the first connection.

        The client's clock at the last event received (or at the previous open, if later), minus
        ``catchup_margin``: the gateway scores stored events with its own clock, so the margin
        absorbs a small skew, and de-duplication drops what the overlap returns twice.
        """
        if not self.catchup_enabled or self._last_open_wall is None:
            return None
        anchor = max(self._last_open_wall, self._last_event_wall or 0.0)
        return max(anchor - self.catchup_margin, 0.0)

    def catchup_url(self, token: str, since: float) -> str | None:
        """The catch-up request for this client, or None when it has no scope to ask for."""
        if self.endpoint == "diner":
            session = self.session_id if self.session_id is not None else session_id_from_table_token(token)
            if session is None:
                return None
            query = urlencode({"session_id": session, "since": f"{since:.3f}", "table_token": token})
            return f"{self.http_base}/ws/catchup/session?{query}"
        if self.branch_id is None:
            return None
        query = urlencode({"branch_id": self.branch_id, "since": f"{since:.3f}", "token": token})
        return f"{self.http_base}/ws/catchup?{query}"

    async def _catch_up(self, token: str, since: float) -> None:
        url = self.catchup_url(token, since)
        if url is None:
            return
        headers = [("Origin", self.origin)] if self.origin is not None else []
        try:
            with trio.fail_after(self.catchup_timeout):
                response = await http_get(url, headers=headers, ssl_context=self.ssl_context)
        except (OSError, HttpError, trio.TooSlowError, trio.BrokenResourceError) as exc:
            log.warning("catch-up failed", extra={"error": repr(exc)})
            return
        if response.status != 200:
            log.warning("catch-up refused", extra={"status": response.status})
            return
        try:
            body = response.json()
        except ValueError:
            log.warning("catch-up: invalid JSON body")
            return
        events = body.get("events") if isinstance(body, dict) else None
        if not isinstance(events, list):
            return
        for event in events:
            if not isinstance(event, dict):
                continue
            if not self.seen.add(event_key(event)):
                self.duplicates_dropped += 1
                continue
            self.catchup_events += 1
            self.listeners.dispatch(event)
        log.info("caught up", extra={"events": len(events), "since": since})

    # --- helpers -------------------------------------------------------------------------------
    def _ws_url(self, token: str) -> str:
        param = "table_token" if self.endpoint == "diner" else "token"
        return f"{self.ws_base}/ws/{self.endpoint}?{param}={quote(token, safe='')}"

    def _set_state(self, state: ConnectionState) -> None:
        if state is self.state:
            return
        self.state = state
        self._state_changed.set()
        self._state_changed = trio.Event()
        if self.on_state is not None:
            _safe_call(self.on_state, state)

    def _arm(self, throttle: Throttle, deadline: float) -> None:
        nursery = self._nursery
        if nursery is None:  # not running: nothing can time the trailing call, deliver it now
            throttle.fire(trio.current_time())
            return
        scope = trio.CancelScope(deadline=deadline)
        self._throttle_timers[throttle] = scope
        nursery.start_soon(self._trailing, throttle, scope)

    async def _trailing(self, throttle: Throttle, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep_forever()
        # Still ours (not unsubscribed, not flushed by the end of run()): the interval is over.
        if self._throttle_timers.get(throttle) is scope:
            del self._throttle_timers[throttle]
            throttle.fire(trio.current_time())

    def _flush_throttles(self) -> None:
        """run() ends: deliver every pending trailing event now instead of dropping it."""
        timers, self._throttle_timers = self._throttle_timers, {}
        for throttle, scope in timers.items():
            scope.cancel()
            throttle.fire(trio.current_time())


def _normalise_endpoint(endpoint: str) -> str:
    name = endpoint.strip("/")
    name = name.removeprefix("ws/")
    if name not in ENDPOINTS:
        raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {sorted(ENDPOINTS)}")
    return name


def _bases(url_base: str) -> tuple[str, str]:
    """(ws base, http base) from a ws://, wss://, http:// or https:// base URL."""
    parts = urlsplit(url_base)
    secure = {"ws": False, "http": False, "wss": True, "https": True}.get(parts.scheme)
    if secure is None or not parts.netloc:
        raise ValueError(f"url_base must be ws://, wss://, http:// or https://host[:port], got {url_base!r}")
    path = parts.path.rstrip("/")
    ws = urlunsplit(("wss" if secure else "ws", parts.netloc, path, "", ""))
    http = urlunsplit(("https" if secure else "http", parts.netloc, path, "", ""))
    return ws, http


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return f"handshake rejected: HTTP {status}"
    cause = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {cause!r}" if cause is not None else type(exc).__name__
