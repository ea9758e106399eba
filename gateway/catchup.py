"""Catch-up: what a reconnecting client missed, kept per branch for a few minutes (D16).

Each delivered logical event is appended once to the stream ``gw:catchup:{tenant}:{branch}``
(capped at ``catchup_max_events`` entries; the key expires ``catchup_window`` seconds after the last
append), so every stored event has a stream id that a resume-by-offset feature can use. Appends are
buffered and written in one pipelined round trip: with a stream batch's acknowledgements when
there is one, otherwise by the writer task within a few milliseconds.

Reads filter with the routing predicate itself: a staff token gets what its sockets would have
received (role, sector), a diner only its own table's events of the diner types.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import TYPE_CHECKING, Any

import attrs
import trio

from gateway.core.auth import (
    ENDPOINT_ROLES,
    AuthError,
    diner_principal,
    staff_principal,
    verify_staff_token,
    verify_table_token,
)
from gateway.core.events import InvalidEvent, parse_event
from gateway.core.model import Event, Principal
from gateway.core.routing import DINER_CATCHUP_TYPES, receives

if TYPE_CHECKING:

    from gateway.app import Gateway
    from gateway.http import HttpRequest, Response

log = logging.getLogger("gateway.catchup")

FLUSH_INTERVAL = 0.005
#: Appends kept in memory while Redis cannot take them.
MAX_BUFFERED = 10000

# One call appends a whole batch. KEYS: a guard key and a branch stream per event, in pairs.
# ARGV[1]: TTL in seconds; ARGV[2]: entries kept per stream; ARGV[3...]: the frame payloads.
_APPEND_ONCE = """
local ttl, maxlen, appended = ARGV[1], ARGV[2], 0
for i = 1, #KEYS, 2 do
  if redis.call('SET', KEYS[i], '1', 'NX', 'EX', ttl) then
    redis.call('XADD', KEYS[i + 1], 'MAXLEN', maxlen, '*', 'data', ARGV[2 + (i + 1) / 2])
    redis.call('EXPIRE', KEYS[i + 1], ttl)
    appended = appended + 1
  end
end
return appended
"""
#: Events per script call: bounds the time Redis spends in one script.
_APPEND_CHUNK = 200
#: Largest millisecond part of a stream id. A larger ``since`` is an XRANGE syntax error, which
#: would count as a Redis failure and could open the breaker that guards live delivery.
_MAX_ID_MS = 2**64 - 1


def catchup_key(tenant_id: int, branch_id: int) -> str:
    return f"gw:catchup:{tenant_id}:{branch_id}"


@attrs.define(eq=False)
class CatchupStore:
    gw: Gateway
    pending: list[Event] = attrs.Factory(list)
    _wakeup: trio.Event = attrs.Factory(trio.Event)

    def add(self, event: Event) -> None:
        if event.branch_id > 0:
            self.pending.append(event)
            self._wakeup.set()

    def take_into(self, pipe: Any) -> int:
        """Queue the buffered appends on ``pipe``; returns how many were queued.

        Every instance delivers every event, so each would append it: a guard key per event
        (``SET NX``, in the same script as the append) lets exactly one copy in.
        """
        events, self.pending = self.pending, []
        settings = self.gw.settings
        ttl = int(settings.catchup_window) + 1
        # coredis spends hundreds of microseconds of CPU per command, pipelined or not: one script
        # call per chunk of events rather than one per event.
        for start in range(0, len(events), _APPEND_CHUNK):
            keys: list[str] = []
            payloads: list[bytes] = []
            for event in events[start : start + _APPEND_CHUNK]:
                digest = hashlib.blake2b(event.frame_payload, digest_size=16).hexdigest()
                keys += [f"gw:catchup:seen:{event.tenant_id}:{digest}", catchup_key(event.tenant_id, event.branch_id)]
                payloads.append(event.frame_payload)
            pipe.eval(_APPEND_ONCE, keys=keys, args=[ttl, settings.catchup_max_events, *payloads])
        return len(events)

    async def writer(self) -> None:
        """Flush buffered appends every few milliseconds, behind the catch-up breaker.

        While Redis cannot take them they stay buffered (the newest ``MAX_BUFFERED``) and are
        written once the breaker lets a trial call through; live delivery never waits for this.
        """
        from gateway.ingest import is_redis_failure

        breaker = self.gw.breakers["catchup"]
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            await trio.sleep(FLUSH_INTERVAL)
            if not self.pending:
                continue
            if not breaker.allow():
                del self.pending[:-MAX_BUFFERED]
                await trio.sleep(max(breaker.seconds_until_retry(), FLUSH_INTERVAL))
                self._wakeup.set()
                continue
            batch = list(self.pending)
            try:
                async with self.gw.redis.pipeline(transaction=False) as pipe:
                    self.take_into(pipe)
            except Exception as exc:
                if not is_redis_failure(exc):
                    raise
                self.pending[:0] = batch
                del self.pending[:-MAX_BUFFERED]
                self.gw.redis_failed(breaker, "catchup", exc)
                self._wakeup.set()
                await trio.sleep(FLUSH_INTERVAL)
            else:
                self.gw.redis_ok(breaker)

    async def read(self, tenant_id: int, branch_id: int, since: float) -> list[Event]:
        settings = self.gw.settings
        start = max(since, time.time() - settings.catchup_window) * 1000
        if start >= _MAX_ID_MS:
            return []  # nothing is stored after the end of time (and 1e306 * 1000 is inf)
        start_ms = int(start)
        entries = await self.gw.redis.xrange(catchup_key(tenant_id, branch_id), f"{start_ms}-0", "+",
                                            count=settings.catchup_max_events)
        out: list[Event] = []
        for entry in entries:
            raw = entry.field_values.get(b"data", b"")
            try:
                out.append(parse_event(raw, max_size=1 << 20))
            except InvalidEvent:
                continue
        return out

    # --- HTTP ---------------------------------------------------------------------------------
    async def staff(self, req: HttpRequest) -> Response:
        from gateway.http import json_response, text_response

        # A header keeps the credential out of URLs and access logs; the query stays for v1 clients.
        token = _bearer(req) or req.param("token")
        branch_raw, since_raw = req.param("branch_id"), req.param("since")
        missing = [n for n, v in (("branch_id", branch_raw), ("since", since_raw), ("token", token)) if v is None]
        if missing:
            return text_response(422, f"Missing query parameter: {', '.join(missing)}")
        assert token is not None and branch_raw is not None and since_raw is not None
        branch_id, since = _int(branch_raw), _float(since_raw)
        if branch_id is None or since is None:
            return text_response(422, "branch_id must be an integer and since a number")
        s = self.gw.settings
        try:
            claims = verify_staff_token(token, secret=s.jwt_secret, issuer=s.jwt_issuer, audience=s.jwt_audience,
                                        now=time.time(), max_lifetime=s.max_token_lifetime)
        except AuthError:
            return text_response(401, "Invalid token")
        if branch_id not in claims.branch_ids:
            return text_response(403, "No access to this branch")
        principals: list[Principal] = []
        for endpoint, roles in ENDPOINT_ROLES.items():
            if roles & claims.roles:
                principal = staff_principal(endpoint, claims)
                if endpoint == "waiter":
                    principal = await self.gw.sectors.assign(principal, refresh=False)
                principals.append(principal)
        if not principals:
            return text_response(403, "Access denied")
        # A revoked token's sockets are closed (D3), so it would have received nothing live.
        from gateway.admission import check_revoked

        revoked = await check_revoked(self.gw, principals[:1])
        if revoked is None:
            # Redis cannot answer, so the store cannot be read either: the read-error answer.
            return json_response(200, _body([]))
        if revoked[0]:
            return text_response(401, "Invalid token")
        events = await self._read_or_empty(claims.tenant_id, branch_id, since)
        chosen = [e for e in events if any(receives(e, p) for p in principals)]
        return json_response(200, _body(chosen))

    async def session(self, req: HttpRequest) -> Response:
        from gateway.http import json_response, text_response

        header = req.headers.get(b"x-table-token", b"").decode("latin-1").strip()
        token = header or req.param("table_token")
        session_raw, since_raw = req.param("session_id"), req.param("since")
        missing = [n for n, v in (("session_id", session_raw), ("since", since_raw), ("table_token", token))
                   if v is None]
        if missing:
            return text_response(422, f"Missing query parameter: {', '.join(missing)}")
        assert token is not None and session_raw is not None and since_raw is not None
        session_id, since = _int(session_raw), _float(since_raw)
        if session_id is None or since is None:
            return text_response(422, "session_id must be an integer and since a number")
        try:
            claims = verify_table_token(token, secret=self.gw.settings.table_token_secret, now=time.time(),
                                        max_lifetime=self.gw.settings.max_token_lifetime)
        except AuthError:
            return text_response(401, "Invalid table token")
        if claims.session_id != session_id:
            return text_response(403, "Session ID does not match token")
        principal = diner_principal(claims)
        events = await self._read_or_empty(claims.tenant_id, claims.branch_id, since)
        chosen = [e for e in events if e.type in DINER_CATCHUP_TYPES and receives(e, principal)]
        return json_response(200, _body(chosen))

    async def _read_or_empty(self, tenant_id: int, branch_id: int, since: float) -> list[Event]:
        from gateway.ingest import is_redis_failure

        breaker = self.gw.breakers["catchup"]
        if not breaker.allow():
            return []
        try:
            with trio.fail_after(2.0):
                events = await self.read(tenant_id, branch_id, since)
        except Exception as exc:
            if not (is_redis_failure(exc) or isinstance(exc, trio.TooSlowError)):
                raise
            self.gw.redis_failed(breaker, "catchup", exc)
            return []
        self.gw.redis_ok(breaker)
        return events


def _body(events: list[Event]) -> dict[str, Any]:
    return {"events": [json.loads(e.frame_payload) for e in events], "count": len(events)}


def _bearer(req: HttpRequest) -> str | None:
    scheme, _, value = req.headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    return value.strip() or None if scheme.lower() == "bearer" else None


def _int(raw: str) -> int | None:
    try:
        return int(raw)
    except ValueError:
        return None


def _float(raw: str) -> float | None:
    try:
        value = float(raw)
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None
