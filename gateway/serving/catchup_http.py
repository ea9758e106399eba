"""The catch-up endpoints (§1.3, D16): what a reconnecting v1 client missed.

Each answer holds only what that token's sockets would have received live: for staff, the union
over the endpoints its roles allow with the waiter's current sectors; for a diner, its own table's
events of the diner types. The routing predicate itself decides (``gateway.core.routing``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attrs

from gateway.access.revocation import Revocation
from gateway.catchup.store import CatchupStore
from gateway.core.auth import ENDPOINT_ROLES, AuthError, diner_principal, staff_principal
from gateway.core.credentials import Credentials
from gateway.core.model import Event, Principal
from gateway.core.routing import DINER_CATCHUP_TYPES, receives
from gateway.serving.http_types import HttpRequest, Response, json_response, text_response

AssignSectors = Callable[[Principal], Awaitable[Principal]]


@attrs.define(eq=False)
class CatchupRoutes:
    store: CatchupStore
    credentials: Credentials
    revocation: Revocation
    assign_sectors: AssignSectors

    async def staff(self, req: HttpRequest) -> Response:
        # A header keeps the credential out of URLs and access logs; the query stays for v1 clients.
        parsed = _query(req, "token", _bearer(req), "branch_id")
        if isinstance(parsed, Response):
            return parsed
        token, branch_id, since = parsed
        try:
            claims = self.credentials.staff(token, time.time())
        except AuthError:
            return text_response(401, "Invalid token")
        if branch_id not in claims.branch_ids:
            return text_response(403, "No access to this branch")
        principals: list[Principal] = []
        for endpoint, roles in ENDPOINT_ROLES.items():
            if roles & claims.roles:
                principal = staff_principal(endpoint, claims)
                if endpoint == "waiter":
                    principal = await self.assign_sectors(principal)
                principals.append(principal)
        if not principals:
            return text_response(403, "Access denied")
        # A revoked token's sockets are closed (D3), so it would have received nothing live.
        revoked = await self.revocation.check(principals[:1])
        if revoked is None:
            # Redis cannot answer, so the store cannot be read either: the read-error answer.
            return json_response(200, _body([]))
        if revoked[0]:
            return text_response(401, "Invalid token")
        events = await self.store.read_or_empty(claims.tenant_id, branch_id, since)
        chosen = [e for e in events if any(receives(e, p) for p in principals)]
        return json_response(200, _body(chosen))

    async def session(self, req: HttpRequest) -> Response:
        header = req.headers.get(b"x-table-token", b"").decode("latin-1").strip()
        parsed = _query(req, "table_token", header or None, "session_id")
        if isinstance(parsed, Response):
            return parsed
        token, session_id, since = parsed
        try:
            claims = self.credentials.table(token, time.time())
        except AuthError:
            return text_response(401, "Invalid table token")
        if claims.session_id != session_id:
            return text_response(403, "Session ID does not match token")
        principal = diner_principal(claims)
        events = await self.store.read_or_empty(claims.tenant_id, claims.branch_id, since)
        chosen = [e for e in events if e.type in DINER_CATCHUP_TYPES and receives(e, principal)]
        return json_response(200, _body(chosen))


def _query(req: HttpRequest, credential: str, from_header: str | None, id_name: str) -> tuple[str, int, float] | Response:
    """The credential (header first, then the query), the id and ``since``; or the 422 to answer."""
    token = from_header or req.param(credential)
    id_raw, since_raw = req.param(id_name), req.param("since")
    missing = [n for n, v in ((id_name, id_raw), ("since", since_raw), (credential, token)) if v is None]
    if missing:
        return text_response(422, f"Missing query parameter: {', '.join(missing)}")
    assert token is not None and id_raw is not None and since_raw is not None
    ident, since = _int(id_raw), _float(since_raw)
    if ident is None or since is None:
        return text_response(422, f"{id_name} must be an integer and since a number")
    return token, ident, since


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
