"""Admission of a WebSocket: one decision before the 101, registration after it.

:func:`decide` runs while the upgrade request waits: the client address' attempt rate, Origin,
credential, role, the user's attempt rate, the per-process limits, then one Redis round trip shared
with concurrent handshakes (the revocation ``MGET`` and the cluster-wide lease script, D23), and
sectors. The cheapest checks come first: a client hammering the gateway is refused by a count in
this process before its token is verified. Its verdict is one of three:

- a recoverable refusal (limits, Redis unavailable, draining) is answered **before** the upgrade,
  as HTTP 429/503 with ``Retry-After`` (D22). A browser then sees a failed connection (1006)
  without ``onopen``, so even the existing clients, which reset their backoff on ``onopen``,
  back off 1, 2, 4, 8 … s instead of retrying every second;
- an authentication failure is reported **after** the 101 with 4001/4003 (D1), which the
  clients treat as final;
- an admitted principal, registered by :func:`register` once the 101 is out. Registration
  re-checks the limits without a checkpoint before adding to the index, so concurrent
  admissions cannot race past a limit; the rare socket that lost such a race is closed
  1008/1013 after the 101. The socket's cluster-wide lease is given back when it closes
  (:meth:`Admission.finished`), or at once if it is never registered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import attrs
import trio

from gateway.access.limiter import ClusterLimiter, Grant, Lease
from gateway.access.revocation import Revocation
from gateway.access.sectors import SectorSource
from gateway.core import closecodes
from gateway.core.auth import AuthError, diner_principal, staff_principal
from gateway.core.closecodes import Close
from gateway.core.credentials import Credentials
from gateway.core.model import Endpoint, Principal
from gateway.core.origins import origin_allowed
from gateway.logs import RateLimitedLog, redact_target
from gateway.metrics import Metrics
from gateway.serving.registry import SocketRegistry
from gateway.settings import Settings

if TYPE_CHECKING:
    from gateway.serving.connection import Connection

log = logging.getLogger("gateway.server")

#: Recoverable refusals before the upgrade: (HTTP status, detail, Retry-After seconds).
REFUSALS: Mapping[str, tuple[int, str, int]] = {
    "draining": (503, "Draining", 1),
    "redis_unavailable": (503, "Try again later", 2),
    "limit_total": (503, "Try again later", 5),
    "limit_user": (429, "Too many connections", 5),
    "limit_session": (429, "Too many connections", 5),
    # Retry-After: when the attempt rate would allow the next one (at least 1 s).
    "rate_ip": (429, "Too many connection attempts", 1),
    "rate_user": (429, "Too many connection attempts", 1),
}
#: The close code a registration that lost a race to a limit gets after the 101.
_LATE_CLOSE: Mapping[str, Close] = {
    "draining": closecodes.SERVER_RESTART,
    "limit_total": closecodes.TRY_AGAIN_LATER,
    "limit_user": closecodes.TOO_MANY_CONNECTIONS,
    "limit_session": closecodes.TOO_MANY_CONNECTIONS,
}


@attrs.frozen
class Verdict:
    """What :meth:`Admission.decide` concluded; exactly one of ``principal``, ``close``,
    ``refusal`` is set."""

    principal: Principal | None = None
    token: str = ""
    close: Close | None = None
    refusal: str | None = None
    reason: str = ""
    who: Mapping[str, object] = attrs.Factory(dict)
    #: The socket's cluster-wide lease (admitted verdicts; None when Redis did not grant one).
    lease: Lease | None = None
    #: Seconds for ``Retry-After`` when the refusal knows better than :data:`REFUSALS`.
    retry_after: int | None = None


def _reject(close: Close, reason: str, **who: object) -> Verdict:
    return Verdict(close=close, reason=reason, who=who)


def _refuse(reason: str) -> Verdict:
    return Verdict(refusal=reason, reason=reason)


def _refuse_grant(grant: Grant) -> Verdict:
    assert grant.refusal is not None
    return Verdict(refusal=grant.refusal, reason=grant.refusal, retry_after=grant.retry_after)


@attrs.frozen
class Limits:
    """The settings admission uses."""

    max_total: int
    per_user: int
    per_session: int
    bypass_missing_origin: bool
    staff_revalidation: float
    table_revalidation: float

    @classmethod
    def of(cls, s: Settings) -> Limits:
        return cls(s.max_total_connections, s.max_connections_per_user, s.max_connections_per_session,
                   s.origin_bypass_active, s.jwt_revalidation_interval, s.table_token_revalidation_interval)


@attrs.define(eq=False)
class Admission:
    limits: Limits
    credentials: Credentials
    origins: frozenset[str]
    registry: SocketRegistry
    metrics: Metrics
    revocation: Revocation
    sectors: SectorSource
    limiter: ClusterLimiter
    _rate_log: RateLimitedLog = attrs.Factory(lambda: RateLimitedLog(log, interval=10.0))

    def over_limit(self, principal: Principal) -> str | None:
        """The limit a new socket of ``principal`` would break (D5), or None. Never checkpoints."""
        index = self.registry.index
        if self.registry.draining:
            return "draining"
        if len(index) >= self.limits.max_total:
            return "limit_total"
        if principal.is_diner:
            assert principal.session_id is not None
            if index.count_session(principal.tenant_id, principal.session_id) >= self.limits.per_session:
                return "limit_session"
        elif index.count_user(principal.tenant_id, principal.user_id) >= self.limits.per_user:
            return "limit_user"
        return None

    async def decide(self, endpoint: Endpoint, target: str, origin: str | None, client: str = "-") -> Verdict:
        """Everything that can be known about an upgrade request before answering it (``client``:
        the client's address, see ``gateway.core.clientip``)."""
        if self.registry.draining:
            return _refuse("draining")
        rated = self.limiter.check_ip(client)
        if rated is not None:
            return _refuse_grant(rated)
        if not origin_allowed(origin, self.origins, bypass_missing=self.limits.bypass_missing_origin):
            return _reject(closecodes.ORIGIN_NOT_ALLOWED, "origin")
        query = parse_qs(urlsplit(target).query, keep_blank_values=True)
        param = "table_token" if endpoint == "diner" else "token"
        token = (query.get(param) or [""])[0]
        if not token:
            return _reject(closecodes.MISSING_TOKEN, "missing_token")
        now = time.time()
        try:
            principal: Principal
            if endpoint == "diner":
                principal = diner_principal(self.credentials.table(token, now))
            else:
                claims = self.credentials.staff(token, now)
                try:
                    principal = staff_principal(endpoint, claims)
                except AuthError as exc:  # valid token, wrong role: say whose it was
                    return _reject(exc.close, exc.reason, tenant=claims.tenant_id,
                                   branches=sorted(claims.branch_ids), user=claims.user_id)
        except AuthError as exc:
            return _reject(exc.close, exc.reason)
        # Over a rate or a limit of this process: refused before any Redis work.
        rated = self.limiter.check_user(principal)
        if rated is not None:
            return _refuse_grant(rated)
        limit = self.over_limit(principal)
        if limit is not None:
            return _refuse(limit)
        # The lease request is queued first, without a checkpoint, so the revocation check joins
        # the same batch: one round trip for both.
        request = self.limiter.request(principal, client)
        revoked = None if principal.is_diner else await self.revocation.check_one(principal)
        grant = await self.limiter.grant(request)
        try:
            # A revoked token is final (D1), whatever the limits say.
            if revoked:
                self.limiter.release(grant.lease)
                return _reject(closecodes.TOKEN_EXPIRED_OR_REVOKED, "revoked")
            if grant.refusal is not None:
                return _refuse_grant(grant)
            if not principal.is_diner:
                if revoked is None:
                    self.limiter.release(grant.lease)
                    return _refuse("redis_unavailable")
                if principal.is_plain_waiter or endpoint == "waiter":
                    principal = await self.sectors.assign(principal, refresh=False)
        except BaseException:
            self.limiter.release(grant.lease)
            raise
        return Verdict(principal=principal, token=token, lease=grant.lease)

    def count_refusal(self, verdict: Verdict, target: str, client: str) -> tuple[int, str, int]:
        """Count and log a refusal before the upgrade; the HTTP status, detail and Retry-After."""
        assert verdict.refusal is not None
        self.metrics.rejections.labels(verdict.refusal).inc()
        self.registry.count_rejection(verdict.refusal)
        if verdict.retry_after is not None:
            # A hammering client would fill the log: the first refusal, then counts.
            self._rate_log.warning("upgrade refused: too many connection attempts", reason=verdict.refusal,
                                   client=client, target=redact_target(target))
        else:
            log.info("upgrade refused", extra={"client": client, "reason": verdict.refusal,
                                               "target": redact_target(target)})
        status, detail, retry_after = REFUSALS[verdict.refusal]
        return status, detail, verdict.retry_after or retry_after

    def register(self, conn: Connection, verdict: Verdict, target: str) -> Close | None:
        """After the 101: register an admitted socket, or say how to close it. Never checkpoints,
        so nothing can be admitted between the limit check and ``index.add``."""
        principal = verdict.principal
        if principal is None:
            assert verdict.close is not None
            return self._rejected(conn, verdict.close, verdict.reason, target, **verdict.who)
        conn.principal = principal
        late = self.over_limit(principal)
        if late is not None:
            self.limiter.release(verdict.lease)
            return self._rejected(conn, _LATE_CLOSE[late], late, target)
        conn.token = verdict.token
        self.registry.index.add(conn, principal)
        self.metrics.connections.labels(conn.endpoint).inc()
        self.metrics.connections_opened.labels(conn.endpoint).inc()
        limits = self.limits
        interval = limits.table_revalidation if principal.is_diner else limits.staff_revalidation
        conn.next_check = trio.current_time() + interval
        if conn.endpoint == "waiter":
            conn.refresh_sectors = self.refresh_sectors
        log.debug("socket registered", extra=conn.log_context())
        return None

    def finished(self, verdict: Verdict) -> None:
        """The socket of an admitted verdict is gone (or was never opened): its lease goes."""
        self.limiter.release(verdict.lease)

    def _rejected(self, conn: Connection, close: Close, reason: str, target: str, **who: object) -> Close:
        self.metrics.rejections.labels(reason).inc()
        self.registry.count_rejection(reason)
        log.info("socket rejected", extra={**conn.log_context(), **who, "reason": reason, "code": close.code,
                                            "target": redact_target(target)})
        return close

    async def refresh_sectors(self, conn: Connection) -> str:
        """``refresh_sectors`` on /ws/waiter: look again (no cache), re-target at once, reply (§3.2)."""
        index = self.registry.index
        principal = conn.principal
        if principal is None or conn not in index:
            return "sectors_updated:"
        updated = await self.sectors.assign(principal, refresh=True)
        if conn in index:
            index.update_sectors(conn, updated.sector_ids)
            conn.principal = updated
        return "sectors_updated:" + ",".join(str(s) for s in sorted(updated.sector_ids))
