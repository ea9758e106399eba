"""Minting staff and table tokens the way the backend issues them (§2.1, §2.3).

Used by ``gateway token ...``, the tests and the benchmarks; the gateway itself never mints.
"""

from __future__ import annotations

import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jwt

from gateway.core.auth import (
    ALGORITHM,
    TABLE_TOKEN_AUDIENCE,
    TABLE_TOKEN_ISSUER,
    TABLE_TOKEN_TYPE,
    legacy_table_signature,
)


def _encode(claims: Mapping[str, Any], secret: str) -> str:
    with warnings.catch_warnings():
        # The development table secret is shorter than PyJWT recommends for HS256; that is a
        # matter for the deployment's settings check, not a warning per minted token.
        warnings.simplefilter("ignore", UserWarning)
        return jwt.encode(dict(claims), secret, algorithm=ALGORITHM)


def _issued(now: float | None) -> float:
    return time.time() if now is None else now


def mint_staff_token(
    *,
    secret: str,
    issuer: str,
    audience: str,
    user_id: int,
    tenant_id: int,
    branch_ids: Sequence[int],
    roles: Sequence[str],
    ttl: float = 900,
    now: float | None = None,
    token_type: str = "access",
    sector_ids: Sequence[int] | None = None,
    jti: str | None = None,
    extra: Mapping[str, object] | None = None,
) -> str:
    """A staff JWT with the backend's claims; ``extra`` overrides last, a None value removes."""
    issued = _issued(now)
    claims: dict[str, Any] = {
        "sub": str(user_id),
        "tenant_id": tenant_id,
        "branch_ids": list(branch_ids),
        "roles": list(roles),
        "email": f"user{user_id}@example.test",
        "iss": issuer,
        "aud": audience,
        "iat": int(issued),
        "exp": int(issued + ttl),
        "type": token_type,
        "jti": uuid.uuid4().hex if jti is None else jti,
    }
    if sector_ids is not None:
        claims["sector_ids"] = list(sector_ids)
    for name, value in (extra or {}).items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return _encode(claims, secret)


def mint_table_token(
    *,
    secret: str,
    tenant_id: int,
    branch_id: int,
    table_id: int,
    session_id: int,
    ttl: float = 10800,
    now: float | None = None,
) -> str:
    """A table token in the JWT form."""
    issued = _issued(now)
    claims: dict[str, Any] = {
        "tenant_id": tenant_id,
        "branch_id": branch_id,
        "table_id": table_id,
        "session_id": session_id,
        "type": TABLE_TOKEN_TYPE,
        "iss": TABLE_TOKEN_ISSUER,
        "aud": TABLE_TOKEN_AUDIENCE,
        "iat": int(issued),
        "exp": int(issued + ttl),
    }
    return _encode(claims, secret)


def mint_legacy_table_token(
    *,
    secret: str,
    tenant_id: int,
    branch_id: int,
    table_id: int,
    session_id: int,
    ttl: float = 10800,
    now: float | None = None,
) -> str:
    """A table token in the legacy ``tenant:branch:table:session:expires:signature`` form."""
    expires_at = int(_issued(now) + ttl)
    payload = f"{tenant_id}:{branch_id}:{table_id}:{session_id}:{expires_at}"
    return f"{payload}:{legacy_table_signature(secret, payload)}"
