"""Admission of a WebSocket: one decision before the 101, registration after it.

:func:`decide` runs while the upgrade request waits: Origin, credential, role, revocation (one
Redis ``MGET``), sectors and the connection limits. Its verdict is one of three:

- a recoverable refusal (limits, Redis unavailable, draining) is answered **before** the upgrade,
  as HTTP 429/503 with ``Retry-After`` (D22). A browser then sees a failed connection (1006)
  without ``onopen``, so even the existing clients, which reset their backoff on ``onopen``,
  back off 1, 2, 4, 8 … s instead of retrying every second;
- an authentication failure is reported **after** the 101 with 4001/4003 (D1), which the
  clients treat as final;
- an admitted principal, registered by :func:`register` once the 101 is out. Registration
  re-checks the limits without a checkpoint before adding to the index, so concurrent
  admissions cannot race past a limit; the rare socket that lost such a race is closed
  1008/1013 after the 101.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import attrs
import trio

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
from gateway.core.closecodes import Close
from gateway.core.model import Endpoint, Principal
from gateway.core.origins import origin_allowed
from gateway.ingest import is_redis_failure
from gateway.logs import redact_target

if TYPE_CHECKING:
    from gateway.app import Gateway
    from gateway.connection import Connection

log = logging.getLogger("gateway.server")

REVOCATION_TIMEOUT = 2.0

#: Recoverable refusals before the upgrade: (HTTP status, detail, Retry-After seconds).
REFUSALS: Mapping[str, tuple[int, str, int]] = {
    "draining": (503, "Draining", 1),
    "redis_unavailable": (503, "Try again later", 2),
    "limit_total": (503, "Try again later", 5),
    "limit_user": (429, "Too many connections", 5),
    "limit_session": (429, "Too many connections", 5),
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
    """What :func:`decide` concluded; exactly one of ``principal``, ``close``, ``refusal`` is set."""

    principal: Principal | None = None
    token: str = ""
    close: Close | None = None
    refusal: str | None = None
    reason: str = ""
    who: Mapping[str, object] = attrs.Factory(dict)


def _reject(close: Close, reason: str, **who: object) -> Verdict:
    return Verdict(close=close, reason=reason, who=who)


def _refuse(reason: str) -> Verdict:
    return Verdict(refusal=reason, reason=reason)


def over_limit(gw: Gateway, principal: Principal) -> str | None:
    """The limit a new socket of ``principal`` would break (D5), or None. Never checkpoints."""
    settings = gw.settings
    index = gw.index
    if gw.draining:
        return "draining"
    if len(index) >= settings.max_total_connections:
        return "limit_total"
    if principal.is_diner:
        assert principal.session_id is not None
        if index.count_session(principal.tenant_id, principal.session_id) >= settings.max_connections_per_session:
            return "limit_session"
    elif index.count_user(principal.tenant_id, principal.user_id) >= settings.max_connections_per_user:
        return "limit_user"
    return None


async def decide(gw: Gateway, endpoint: Endpoint, target: str, origin: str | None) -> Verdict:
    """Everything that can be known about an upgrade request before answering it."""
    settings = gw.settings
    if gw.draining:
        return _refuse("draining")
    if not origin_allowed(origin, gw.origins, bypass_missing=settings.origin_bypass_active):
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
                return _reject(exc.close, exc.reason, tenant=claims.tenant_id, branches=sorted(claims.branch_ids),
                               user=claims.user_id)
    except AuthError as exc:
        return _reject(exc.close, exc.reason)
    # A socket over a limit is refused before any Redis work: a hammering client costs a
    # signature check, not a round trip.
    limit = over_limit(gw, principal)
    if limit is not None:
        return _refuse(limit)
    if not principal.is_diner:
        revoked = await check_revoked(gw, [principal])
        if revoked is None:
            return _refuse("redis_unavailable")
        if revoked[0]:
            return _reject(closecodes.TOKEN_EXPIRED_OR_REVOKED, "revoked")
        if principal.is_plain_waiter or endpoint == "waiter":
            principal = await gw.sectors.assign(principal, refresh=False)
    return Verdict(principal=principal, token=token)


def count_refusal(gw: Gateway, verdict: Verdict, target: str, client: str) -> tuple[int, str, int]:
    """Count and log a refusal before the upgrade; the HTTP status, detail and Retry-After."""
    assert verdict.refusal is not None
    gw.metrics.rejections.labels(verdict.refusal).inc()
    gw.count_rejection(verdict.refusal)
    log.info("upgrade refused", extra={"client": client, "reason": verdict.refusal, "target": redact_target(target)})
    return REFUSALS[verdict.refusal]


def register(gw: Gateway, conn: Connection, verdict: Verdict, target: str) -> Close | None:
    """After the 101: register an admitted socket, or say how to close it. Never checkpoints,
    so nothing can be admitted between the limit check and ``index.add``."""
    principal = verdict.principal
    if principal is None:
        assert verdict.close is not None
        return _rejected(gw, conn, verdict.close, verdict.reason, target, **verdict.who)
    conn.principal = principal
    late = over_limit(gw, principal)
    if late is not None:
        return _rejected(gw, conn, _LATE_CLOSE[late], late, target)
    settings = gw.settings
    conn.token = verdict.token
    gw.index.add(conn, principal)
    gw.metrics.connections.labels(conn.endpoint).inc()
    gw.metrics.connections_opened.labels(conn.endpoint).inc()
    interval = settings.table_token_revalidation_interval if principal.is_diner else settings.jwt_revalidation_interval
    conn.next_check = trio.current_time() + interval
    if conn.endpoint == "waiter":
        conn.refresh_sectors = gw.refresh_sectors
    log.debug("socket registered", extra=conn.log_context())
    return None


def _rejected(gw: Gateway, conn: Connection, close: Close, reason: str, target: str, **who: object) -> Close:
    gw.metrics.rejections.labels(reason).inc()
    gw.count_rejection(reason)
    log.info("socket rejected", extra={**conn.log_context(), **who, "reason": reason, "code": close.code,
                                        "target": redact_target(target)})
    return close


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
        if not is_redis_failure(exc) and not isinstance(exc, trio.TooSlowError):
            raise
        gw.redis_failed(breaker, "revocation", exc)
        return None
    gw.redis_ok(breaker)
    return [is_revoked(p, list(values[a:b])) for p, (a, b) in zip(principals, spans, strict=True)]
