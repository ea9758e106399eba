"""Credential decisions: staff JWTs, table tokens, Origin, roles and revocation (sans-I/O).

Nothing here reads a clock, a socket or Redis: the caller passes ``now`` and the values it
fetched for :func:`revocation_keys`. Every way a credential can be bad ends in :class:`AuthError`
whose ``reason`` is a short, fixed label; token text never appears in a message.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import types
import warnings
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import attrs
import jwt
from jwt.types import Options

from gateway.core import hs256
from gateway.core.closecodes import (
    ACCESS_DENIED,
    AUTH_FAILED,
    SESSION_MISMATCH,
    TABLE_TOKEN_EXPIRED,
    Close,
)
from gateway.core.model import Endpoint, Principal

ALGORITHM = "HS256"
TABLE_TOKEN_ISSUER = "integrador:table"
TABLE_TOKEN_AUDIENCE = "integrador:diner"
TABLE_TOKEN_TYPE = "table"


ENDPOINT_ROLES: Mapping[Endpoint, frozenset[str]] = types.MappingProxyType(
    {
        "waiter": frozenset({"WAITER", "MANAGER", "ADMIN"}),
        "kitchen": frozenset({"KITCHEN", "MANAGER", "ADMIN"}),
        "admin": frozenset({"MANAGER", "ADMIN"}),
    }
)
_ADMIN_ROLES = frozenset({"MANAGER", "ADMIN"})

# Ids become Redis keys and database lookups elsewhere; the backend's ids are signed 64-bit.
_MAX_ID = 2**63 - 1
_MAX_ID_DIGITS = len(str(_MAX_ID))
_LEGACY_SIGNATURE_CHARS = 32

#: How far ahead of this clock a token's ``iat`` may lie (clock skew between backend and gateway).
IAT_SKEW = 60.0
#: Longest credential lifetime accepted unless the caller says otherwise (GATEWAY_MAX_TOKEN_LIFETIME).
DEFAULT_MAX_LIFETIME = 86400.0

BLACKLIST_KEY_PREFIX = "auth:token:blacklist:"
USER_REVOKED_KEY_PREFIX = "auth:user:revoked:"

# PyJWT's own clock-based checks are switched off: expiry is decided against the caller's `now`.
_DECODE_OPTIONS: Options = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_sub": False,
    "verify_jti": False,
    "verify_iss": True,
    "verify_aud": True,
    # PyJWT's `require` also treats a null value as missing, like the claim checks below.
    "require": ["iss", "aud"],
}


class AuthError(Exception):
    """A credential was refused. ``close`` is what the socket is closed with."""

    def __init__(self, close: Close, reason: str) -> None:
        super().__init__(f"{close.reason}: {reason}")
        self.close = close
        self.reason = reason


@attrs.frozen
class StaffClaims:
    user_id: int
    tenant_id: int
    branch_ids: frozenset[int]
    roles: frozenset[str]
    jti: str | None
    issued_at: float | None
    expires_at: float
    #: None when the token has no ``sector_ids`` claim.
    sector_ids: frozenset[int] | None


@attrs.frozen
class TableClaims:
    tenant_id: int
    branch_id: int
    table_id: int
    session_id: int
    expires_at: float
    # Only for the lifetime check; two tokens for the same table are the same claims.
    issued_at: float | None = attrs.field(default=None, eq=False)


def _fail(reason: str) -> AuthError:
    return AuthError(AUTH_FAILED, reason)


# --- PyJWT -------------------------------------------------------------------------------------


# Subclasses before their bases: InvalidSignatureError is a DecodeError.
_PYJWT_REASONS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.InvalidSignatureError, "bad_signature"),
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid"),
    (jwt.InvalidAlgorithmError, "bad_algorithm"),
    (jwt.MissingRequiredClaimError, "missing_claim"),
    (jwt.InvalidIssuerError, "wrong_issuer"),
    (jwt.InvalidAudienceError, "wrong_audience"),
    (jwt.InvalidIssuedAtError, "bad_claim"),
    # The configured secret is unusable (empty, or key material of another kind).
    (jwt.InvalidKeyError, "bad_key"),
)


def _pyjwt_reason(exc: jwt.PyJWTError) -> str:
    for kind, reason in _PYJWT_REASONS:
        if isinstance(exc, kind):
            return reason
    return "malformed"


#: Header segments and keys PyJWT accepted: later tokens like them skip PyJWT (``hs256``).
_KNOWN = hs256.Known()


def _decode_jwt(token: str, *, secret: str, issuer: str, audience: str) -> dict[str, Any]:
    """Signature, algorithm, ``iss`` and ``aud``; claim values are checked by the callers."""
    # PyJWT encodes as UTF-8, which raises on lone surrogates from a query string; a JWT is ASCII.
    if not token.isascii():
        raise _fail("malformed")
    claims = hs256.accepted_claims(_KNOWN, token, secret=secret, issuer=issuer, audience=audience)
    if claims is not None:
        return claims
    try:
        header = jwt.get_unverified_header(token)
        # PyJWT refuses these too, but generically: `alg: none` and friends get their own label.
        if header.get("alg") != ALGORITHM:
            raise _fail("bad_algorithm")
        with warnings.catch_warnings():
            # PyJWT warns on every decode with a short HMAC key; the secret is a deployment
            # setting, so a warning per connection would only flood the log.
            warnings.simplefilter("ignore", UserWarning)
            claims = jwt.decode(token, secret, algorithms=[ALGORITHM], options=_DECODE_OPTIONS, issuer=issuer,
                                audience=audience, leeway=0)
    except jwt.PyJWTError as exc:
        raise _fail(_pyjwt_reason(exc)) from None
    except (ValueError, TypeError, RecursionError, UnicodeError, OverflowError):
        # Some PyJWT releases let a pathological header (deep nesting, odd types) escape as a
        # plain Python error before any check: it is still only a malformed token.
        raise _fail("malformed") from None
    _KNOWN.learn(token, header, secret)
    return claims


def _check_lifetime(issued_at: float | None, expires_at: float, now: float, max_lifetime: float) -> None:
    """A token issued in the future would dodge ``auth:user:revoked:{sub}`` (whose value is a
    time); one valid for longer than the deployment allows is refused whatever signed it."""
    if issued_at is not None and issued_at > now + IAT_SKEW:
        raise _fail("issued_in_future")
    start = now if issued_at is None else min(issued_at, now)
    if expires_at - start > max_lifetime:
        raise _fail("lifetime_too_long")


# --- claim values ------------------------------------------------------------------------------
# A claim whose value is JSON null is treated as absent, as PyJWT's own `require` does.


def _number(value: object) -> float | None:
    """A finite JSON number as float; ``bool`` is not a number here."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        result = float(value)
    except OverflowError:
        return None
    # json.loads accepts NaN and Infinity; a NaN expiry would never compare as expired.
    return result if math.isfinite(result) else None


def _positive_id(value: object) -> int | None:
    # `type(...) is int` rejects bool (and any other int subclass).
    if type(value) is int and 0 < value <= _MAX_ID:
        return value
    return None


def _required_id(claims: Mapping[str, Any], name: str) -> int:
    value = claims.get(name)
    if value is None:
        raise _fail("missing_claim")
    result = _positive_id(value)
    if result is None:
        raise _fail("bad_claim")
    return result


def _id_set(value: object) -> frozenset[int]:
    if not isinstance(value, list):
        raise _fail("bad_claim")
    ids = [_positive_id(item) for item in value]
    if any(item is None for item in ids):
        raise _fail("bad_claim")
    return frozenset(item for item in ids if item is not None)


def _expires_at(claims: Mapping[str, Any], now: float) -> float:
    """``exp`` is required (D3); expiry is exact, no leeway. Also honours ``nbf`` if present."""
    raw = claims.get("exp")
    if raw is None:
        raise _fail("missing_claim")
    expires_at = _number(raw)
    if expires_at is None:
        raise _fail("bad_claim")
    raw_nbf = claims.get("nbf")
    if raw_nbf is not None:
        not_before = _number(raw_nbf)
        if not_before is None:
            raise _fail("bad_claim")
        if not_before > now:
            raise _fail("not_yet_valid")
    # Same boundary as PyJWT: a token is dead at the second named by `exp`.
    if expires_at <= now:
        raise _fail("expired")
    return expires_at


def _decimal(text: str) -> int | None:
    """A canonical positive decimal (as ``str(int)`` writes it), else None."""
    if not (0 < len(text) <= _MAX_ID_DIGITS and text.isascii() and text.isdigit()):
        return None
    if text[0] == "0":
        return None
    return _positive_id(int(text))


# --- staff -------------------------------------------------------------------------------------


def verify_staff_token(
    token: str, *, secret: str, issuer: str, audience: str, now: float, max_lifetime: float = DEFAULT_MAX_LIFETIME
) -> StaffClaims:
    """Verify a staff access JWT (§2.1, D1, D3); raises :class:`AuthError` with AUTH_FAILED."""
    claims = _decode_jwt(token, secret=secret, issuer=issuer, audience=audience)
    expires_at = _expires_at(claims, now)
    _check_staff_type(claims.get("type"))
    issued_at = _issued_at(claims.get("iat"))
    _check_lifetime(issued_at, expires_at, now, max_lifetime)
    return StaffClaims(
        user_id=_subject(claims.get("sub")),
        tenant_id=_required_id(claims, "tenant_id"),
        branch_ids=_branch_ids(claims.get("branch_ids")),
        roles=_roles(claims.get("roles")),
        jti=_jti(claims.get("jti")),
        issued_at=issued_at,
        expires_at=expires_at,
        sector_ids=None if claims.get("sector_ids") is None else _id_set(claims["sector_ids"]),
    )


def _check_staff_type(value: object) -> None:
    if value is None or value == "access":
        return
    raise _fail("refresh_token" if value == "refresh" else "wrong_type")


def _subject(value: object) -> int:
    if value is None:
        raise _fail("missing_claim")
    # Only the canonical form: the user-revocation key is built from the parsed id, and the
    # backend writes it with the canonical one, so "007" or " 7" would dodge revocation.
    user_id = _decimal(value) if isinstance(value, str) else None
    if user_id is None:
        raise _fail("bad_claim")
    return user_id


def _branch_ids(value: object) -> frozenset[int]:
    if value is None:
        raise _fail("missing_claim")
    return _id_set(value)


def _roles(value: object) -> frozenset[str]:
    if value is None:
        return frozenset()
    if not isinstance(value, list) or not all(isinstance(role, str) for role in value):
        raise _fail("bad_claim")
    return frozenset(value)


def _jti(value: object) -> str | None:
    if value is None:
        return None
    # An empty id would make the blacklist key a shared one.
    if not isinstance(value, str) or not value:
        raise _fail("bad_claim")
    return value


def _issued_at(value: object) -> float | None:
    if value is None:
        return None
    issued_at = _number(value)
    if issued_at is None:
        raise _fail("bad_claim")
    return issued_at


# --- table tokens ------------------------------------------------------------------------------


def legacy_table_signature(secret: str, payload: str) -> str:
    """Signature field of a legacy table token over ``tenant:branch:table:session:expires``."""
    digest = hmac.new(secret.encode("utf-8"), payload.encode("utf-8"), hashlib.sha256)
    return digest.hexdigest()[:_LEGACY_SIGNATURE_CHARS]


def verify_table_token(
    token: str, *, secret: str, now: float, max_lifetime: float = DEFAULT_MAX_LIFETIME
) -> TableClaims:
    """Verify a diner's table token, JWT or legacy HMAC (§2.3); raises AUTH_FAILED errors."""
    if token.count(".") == 2:
        claims = _verify_table_jwt(token, secret=secret, now=now)
    else:
        claims = _verify_legacy_table_token(token, secret=secret, now=now)
    _check_lifetime(claims.issued_at, claims.expires_at, now, max_lifetime)
    return claims


def _verify_table_jwt(token: str, *, secret: str, now: float) -> TableClaims:
    claims = _decode_jwt(
        token, secret=secret, issuer=TABLE_TOKEN_ISSUER, audience=TABLE_TOKEN_AUDIENCE
    )
    expires_at = _expires_at(claims, now)
    issued_at = _issued_at(claims.get("iat"))
    token_type = claims.get("type")
    if token_type is None:
        raise _fail("missing_claim")
    if token_type != TABLE_TOKEN_TYPE:
        raise _fail("wrong_type")
    return TableClaims(
        tenant_id=_required_id(claims, "tenant_id"),
        branch_id=_required_id(claims, "branch_id"),
        table_id=_required_id(claims, "table_id"),
        session_id=_required_id(claims, "session_id"),
        expires_at=expires_at,
        issued_at=issued_at,
    )


def _verify_legacy_table_token(token: str, *, secret: str, now: float) -> TableClaims:
    if not token.isascii():
        raise _fail("malformed")
    payload, _, signature = token.rpartition(":")
    fields = payload.split(":")
    if not payload or len(fields) != 5:
        raise _fail("malformed")
    if not all(field.isdigit() and len(field) <= _MAX_ID_DIGITS for field in fields):
        raise _fail("malformed")
    # Signature before anything else about the content: a forged token learns nothing more.
    expected = legacy_table_signature(secret, payload)
    if not hmac.compare_digest(signature.encode("ascii"), expected.encode("ascii")):
        raise _fail("bad_signature")
    tenant_id, branch_id, table_id, session_id = (_positive_id(int(f)) for f in fields[:4])
    if tenant_id is None or branch_id is None or table_id is None or session_id is None:
        raise _fail("bad_claim")
    expires_at = int(fields[4])
    if expires_at < now:
        raise _fail("expired")
    return TableClaims(
        tenant_id=tenant_id,
        branch_id=branch_id,
        table_id=table_id,
        session_id=session_id,
        expires_at=float(expires_at),
    )


# --- principals --------------------------------------------------------------------------------


def staff_principal(endpoint: Endpoint, claims: StaffClaims) -> Principal:
    """Role check and flags for a staff socket (§1.1, §2.2); raises ACCESS_DENIED on no role."""
    required = ENDPOINT_ROLES.get(endpoint)
    if required is None:
        raise ValueError(f"not a staff endpoint: {endpoint!r}")
    if not claims.roles & required:
        raise AuthError(ACCESS_DENIED, "role")
    return Principal(
        endpoint=endpoint,
        tenant_id=claims.tenant_id,
        user_id=claims.user_id,
        branch_ids=claims.branch_ids,
        is_admin=endpoint == "admin" or bool(claims.roles & _ADMIN_ROLES),
        is_kitchen=endpoint == "kitchen",
        sector_ids=claims.sector_ids or frozenset(),
        sectors_from_claim=claims.sector_ids is not None,
        expires_at=claims.expires_at,
        jti=claims.jti,
        issued_at=claims.issued_at,
        roles=claims.roles,
    )


def diner_principal(claims: TableClaims) -> Principal:
    return Principal(
        endpoint="diner",
        tenant_id=claims.tenant_id,
        # The existing gateway's pseudo user id; keeps health counters comparable.
        user_id=-claims.session_id,
        branch_ids=frozenset({claims.branch_id}),
        session_id=claims.session_id,
        table_id=claims.table_id,
        expires_at=claims.expires_at,
    )


def recheck_table_principal(principal: Principal, token: str, *, secret: str, now: float) -> None:
    """Periodic re-verification of a diner socket's token (§2.4, D3)."""
    if not principal.is_diner:
        raise ValueError("not a diner principal")
    try:
        # The lifetime was judged at connect; here only validity and where it points matter.
        claims = verify_table_token(token, secret=secret, now=now, max_lifetime=math.inf)
    except AuthError as exc:
        raise AuthError(TABLE_TOKEN_EXPIRED, exc.reason) from None
    # Any change of where the token points is a different table session for the socket.
    if (
        claims.session_id != principal.session_id
        or claims.tenant_id != principal.tenant_id
        or claims.branch_id not in principal.branch_ids
        or claims.table_id != principal.table_id
    ):
        raise AuthError(SESSION_MISMATCH, "session_mismatch")


# --- revocation (§2.1 steps 5-6, D3) -----------------------------------------------------------


def revocation_keys(principal: Principal) -> list[str]:
    """Redis keys to fetch (one MGET) for a staff socket; table tokens cannot be revoked."""
    if principal.is_diner:
        return []
    keys = [f"{USER_REVOKED_KEY_PREFIX}{principal.user_id}"]
    if principal.jti is not None:
        keys.insert(0, f"{BLACKLIST_KEY_PREFIX}{principal.jti}")
    return keys


def is_revoked(principal: Principal, values: Sequence[bytes | str | None]) -> bool:
    """Decide from the values of :func:`revocation_keys`, in the same order."""
    keys = revocation_keys(principal)
    if len(values) != len(keys):
        raise ValueError(f"expected {len(keys)} revocation values, got {len(values)}")
    if not keys:
        return False
    if principal.jti is not None and values[0] is not None:
        return True
    revoked_at = values[-1]
    if revoked_at is None:
        return False
    return _revoked_after(revoked_at, principal.issued_at)


def _revoked_after(value: bytes | str, issued_at: float | None) -> bool:
    """Whether a user-revocation time is later than the token's ``iat``; unreadable => revoked."""
    if issued_at is None:
        # Without `iat` there is no way to tell the token predates the revocation.
        return True
    try:
        text = value.decode("utf-8") if isinstance(value, bytes) else value
        moment = datetime.fromisoformat(text)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp() > issued_at
    except (ValueError, OverflowError):
        # Fail closed: the backend only writes ISO times, so anything else is not trusted.
        return True
