"""Unit tests of gateway.core.auth and gateway.core.tokens (no I/O)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
from typing import Any

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.auth import (
    ENDPOINT_ROLES,
    AuthError,
    StaffClaims,
    TableClaims,
    diner_principal,
    is_revoked,
    recheck_table_principal,
    revocation_keys,
    staff_principal,
    verify_staff_token,
    verify_table_token,
)
from gateway.core.closecodes import (
    ACCESS_DENIED,
    AUTH_FAILED,
    SESSION_MISMATCH,
    TABLE_TOKEN_EXPIRED,
)
from gateway.core.model import Endpoint, Principal
from gateway.core.origins import DEFAULT_ORIGINS, allowed_origins, origin_allowed
from gateway.core.tokens import mint_legacy_table_token, mint_staff_token, mint_table_token

SECRET = "unit-test-staff-secret-of-sufficient-length"
TABLE_SECRET = "unit-test-table-secret-of-sufficient-length"
ISSUER = "menu-ops"
AUDIENCE = "menu-ops-users"
NOW = 1_700_000_000.0


# --- helpers -----------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_token(
    payload: str | dict[str, Any],
    *,
    header: str | dict[str, Any] | None = None,
    secret: str = SECRET,
    signature: str | None = None,
) -> str:
    """Sign arbitrary header/payload text with HMAC-SHA256, bypassing PyJWT's encode checks."""
    header_text = header if isinstance(header, str) else json.dumps(header or {"alg": "HS256"})
    payload_text = payload if isinstance(payload, str) else json.dumps(payload)
    signing_input = f"{b64(header_text.encode())}.{b64(payload_text.encode())}"
    if signature is None:
        digest = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
        signature = b64(digest)
    return f"{signing_input}.{signature}"


def staff_claims(**changes: Any) -> dict[str, Any]:
    """The backend's access-token claims; a change to None removes that claim."""
    claims: dict[str, Any] = {
        "sub": "42",
        "tenant_id": 7,
        "branch_ids": [1, 2],
        "roles": ["WAITER"],
        "email": "user42@example.test",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": int(NOW) - 10,
        "exp": int(NOW) + 900,
        "type": "access",
        "jti": "abc123",
    }
    for name, value in changes.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def staff_token(**extra: Any) -> str:
    return mint_staff_token(
        secret=SECRET,
        issuer=ISSUER,
        audience=AUDIENCE,
        user_id=42,
        tenant_id=7,
        branch_ids=[1, 2],
        roles=["WAITER"],
        now=NOW - 10,
        jti="abc123",
        extra=extra,
    )


def verify_staff(token: str, *, now: float = NOW) -> StaffClaims:
    return verify_staff_token(token, secret=SECRET, issuer=ISSUER, audience=AUDIENCE, now=now)


def refused_staff(token: str, *, now: float = NOW) -> AuthError:
    with pytest.raises(AuthError) as info:
        verify_staff(token, now=now)
    assert_clean(info.value, token)
    assert info.value.close == AUTH_FAILED
    return info.value


def refused_table(token: str, *, secret: str = TABLE_SECRET, now: float = NOW) -> AuthError:
    with pytest.raises(AuthError) as info:
        verify_table_token(token, secret=secret, now=now)
    assert_clean(info.value, token)
    assert info.value.close == AUTH_FAILED
    return info.value


def assert_clean(exc: AuthError, token: str) -> None:
    text = f"{exc} {exc!r} {exc.args!r}"
    if token:
        assert token not in text
    assert SECRET not in text
    assert TABLE_SECRET not in text


def table_claims(**changes: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "tenant_id": 7,
        "branch_id": 3,
        "table_id": 11,
        "session_id": 99,
        "type": "table",
        "iss": "integrador:table",
        "aud": "integrador:diner",
        "iat": int(NOW) - 10,
        "exp": int(NOW) + 10800,
    }
    for name, value in changes.items():
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
    return claims


def legacy_token(fields: str, *, secret: str = TABLE_SECRET) -> str:
    signature = hmac.new(secret.encode(), fields.encode(), hashlib.sha256).hexdigest()[:32]
    return f"{fields}:{signature}"


def table_token(*, legacy: bool = False, secret: str = TABLE_SECRET, **kwargs: Any) -> str:
    args: dict[str, Any] = {
        "tenant_id": 7,
        "branch_id": 3,
        "table_id": 11,
        "session_id": 99,
        "now": NOW,
        **kwargs,
    }
    mint = mint_legacy_table_token if legacy else mint_table_token
    return mint(secret=secret, **args)


# --- staff tokens: accepted --------------------------------------------------------------------


def test_valid_staff_token_yields_all_claims() -> None:
    claims = verify_staff(staff_token())
    assert claims == StaffClaims(
        user_id=42,
        tenant_id=7,
        branch_ids=frozenset({1, 2}),
        roles=frozenset({"WAITER"}),
        jti="abc123",
        issued_at=NOW - 10,
        expires_at=NOW + 890,
        sector_ids=None,
    )


@pytest.mark.parametrize(
    ("changes", "field", "expected"),
    [
        ({"sector_ids": [5, 6, 5]}, "sector_ids", frozenset({5, 6})),
        ({"sector_ids": []}, "sector_ids", frozenset()),
        ({"type": None}, "user_id", 42),
        ({"roles": None}, "roles", frozenset()),
        ({"roles": []}, "roles", frozenset()),
        ({"branch_ids": []}, "branch_ids", frozenset()),
        ({"jti": None}, "jti", None),
        ({"iat": None}, "issued_at", None),
        ({"iat": NOW - 0.5}, "issued_at", NOW - 0.5),
        ({"exp": NOW + 0.5}, "expires_at", NOW + 0.5),
        ({"aud": ["other", AUDIENCE]}, "user_id", 42),
        ({"tenant_id": 2**63 - 1}, "tenant_id", 2**63 - 1),
        ({"sub": "9223372036854775807"}, "user_id", 2**63 - 1),
        ({"nbf": int(NOW)}, "user_id", 42),
    ],
)
def test_valid_staff_token_variants(changes: dict[str, Any], field: str, expected: object) -> None:
    claims = verify_staff(raw_token(staff_claims(**changes)))
    assert getattr(claims, field) == expected


def test_json_null_claim_counts_as_absent() -> None:
    payload = staff_claims()
    payload.update(type=None, roles=None, jti=None, iat=None, sector_ids=None)
    claims = verify_staff(raw_token(payload))
    assert (claims.roles, claims.jti, claims.issued_at, claims.sector_ids) == (
        frozenset(),
        None,
        None,
        None,
    )


def test_expiry_is_exact() -> None:
    token = staff_token()
    assert verify_staff(token, now=NOW + 889.999).expires_at == NOW + 890
    assert refused_staff(token, now=NOW + 890).reason == "expired"
    assert refused_staff(token, now=NOW + 891).reason == "expired"


# --- staff tokens: refused ---------------------------------------------------------------------

GOOD = staff_token()
GOOD_HEADER, GOOD_PAYLOAD, GOOD_SIGNATURE = GOOD.split(".")
TRUNCATED_HEADER = b64(b'{"alg":"HS256"')


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "not-a-jwt-at-all",
        "onlyone.segment",
        f"{GOOD_HEADER}.{GOOD_PAYLOAD}",
        f"{GOOD}.extra",
        f"{GOOD_HEADER}.{GOOD_PAYLOAD}.{GOOD_SIGNATURE}.{GOOD_SIGNATURE}",
        "...",
        "a.b.c",
        f"!!!.{GOOD_PAYLOAD}.{GOOD_SIGNATURE}",
        f"{GOOD_HEADER}.%%%%.{GOOD_SIGNATURE}",
        f"{GOOD_HEADER}.{GOOD_PAYLOAD}.***",
        f"{GOOD_HEADER}x.{GOOD_PAYLOAD}.{GOOD_SIGNATURE}",
        f"{b64(b'not json')}.{GOOD_PAYLOAD}.{GOOD_SIGNATURE}",
        f"{b64(b'[1,2]')}.{GOOD_PAYLOAD}.{GOOD_SIGNATURE}",
        f"{TRUNCATED_HEADER}.{GOOD_PAYLOAD}.{GOOD_SIGNATURE}",
        raw_token("not json"),
        raw_token("[1, 2, 3]"),
        raw_token('"a string"'),
        raw_token("12"),
        raw_token("null"),
        raw_token("[" * 100_000),
        raw_token('{"exp": ' + "9" * 5000 + "}"),
        f"{GOOD}\u00e9",
        f"{GOOD_HEADER}.\udcff.{GOOD_SIGNATURE}",
        "\u0000\u0001\u0002",
        raw_token(staff_claims(), header={"alg": "HS256", "kid": 5}),
        raw_token(staff_claims(), header={"alg": "HS256", "crit": ["exp"], "exp": 1}),
        raw_token("", header={"alg": "HS256", "b64": False, "crit": ["b64"]}),
    ],
)
def test_malformed_staff_token(token: str) -> None:
    assert refused_staff(token).reason == "malformed"


def _signed_with(algorithm: str) -> str:
    return jwt.encode(staff_claims(), SECRET * 2, algorithm=algorithm)


@pytest.mark.parametrize(
    "token",
    [
        _signed_with("HS512"),
        _signed_with("HS384"),
        raw_token(staff_claims(), header={"alg": "RS256", "typ": "JWT"}),
        raw_token(staff_claims(), header={"alg": "ES256"}),
        raw_token(staff_claims(), header={"alg": "none"}, signature=""),
        raw_token(staff_claims(), header={"alg": "none"}),
        raw_token(staff_claims(), header={"alg": "None"}, signature=""),
        raw_token(staff_claims(), header={"alg": "hs256"}),
        raw_token(staff_claims(), header={"alg": ""}),
        raw_token(staff_claims(), header={"typ": "JWT"}),
        raw_token(staff_claims(), header={"alg": ["HS256"]}),
        raw_token(staff_claims(), header={"alg": None}),
    ],
)
def test_wrong_algorithm(token: str) -> None:
    assert refused_staff(token).reason == "bad_algorithm"


def test_hand_crafted_alg_none_shape() -> None:
    header = b64(b'{"alg":"none","typ":"JWT"}')
    payload = b64(json.dumps(staff_claims()).encode())
    assert refused_staff(f"{header}.{payload}.").reason == "bad_algorithm"


@pytest.mark.parametrize(
    "token",
    [
        raw_token(staff_claims(), secret="another-secret-of-a-sufficient-length!"),
        f"{GOOD_HEADER}.{b64(json.dumps(staff_claims(tenant_id=8)).encode())}.{GOOD_SIGNATURE}",
        f"{GOOD_HEADER}.{GOOD_PAYLOAD}.{GOOD_SIGNATURE[:-4]}",
        f"{GOOD_HEADER}.{GOOD_PAYLOAD}.",
        f"{GOOD_HEADER}.{GOOD_PAYLOAD}.{b64(b'x' * 32)}",
    ],
)
def test_bad_signature(token: str) -> None:
    assert refused_staff(token).reason == "bad_signature"


@pytest.mark.parametrize("claim", ["exp", "aud", "iss", "sub", "tenant_id", "branch_ids"])
def test_missing_required_claim(claim: str) -> None:
    assert refused_staff(staff_token(**{claim: None})).reason == "missing_claim"
    # JSON null is the same as absent.
    payload = staff_claims()
    payload[claim] = None
    assert refused_staff(raw_token(payload)).reason == "missing_claim"


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"iss": "someone-else"}, "wrong_issuer"),
        ({"iss": "MENU-OPS"}, "wrong_issuer"),
        ({"iss": 5}, "wrong_issuer"),
        ({"iss": [ISSUER]}, "wrong_issuer"),
        ({"aud": "other"}, "wrong_audience"),
        ({"aud": ["other", "another"]}, "wrong_audience"),
        ({"aud": 5}, "wrong_audience"),
        ({"aud": {"x": AUDIENCE}}, "wrong_audience"),
        ({"aud": [AUDIENCE, 5]}, "wrong_audience"),
        ({"aud": ""}, "missing_claim"),
        ({"aud": []}, "missing_claim"),
        ({"type": "refresh"}, "refresh_token"),
        ({"type": "id"}, "wrong_type"),
        ({"type": "ACCESS"}, "wrong_type"),
        ({"type": ""}, "wrong_type"),
        ({"type": 1}, "wrong_type"),
        ({"type": ["access"]}, "wrong_type"),
        ({"type": "table"}, "wrong_type"),
        ({"nbf": int(NOW) + 1}, "not_yet_valid"),
    ],
)
def test_wrong_claim_value(changes: dict[str, Any], reason: str) -> None:
    assert refused_staff(raw_token(staff_claims(**changes))).reason == reason


def test_refresh_token_as_the_backend_issues_it() -> None:
    claims = {"sub": "42", "tenant_id": 7, "type": "refresh", "iss": ISSUER, "aud": AUDIENCE}
    claims |= {"iat": int(NOW), "exp": int(NOW) + 7 * 86400, "jti": "r1"}
    assert refused_staff(raw_token(claims)).reason == "refresh_token"
    minted = mint_staff_token(
        secret=SECRET, issuer=ISSUER, audience=AUDIENCE, user_id=1, tenant_id=1,
        branch_ids=[1], roles=["ADMIN"], now=NOW, token_type="refresh",
    )
    assert refused_staff(minted).reason == "refresh_token"


WRONG_TYPES: list[tuple[str, object]] = [
    ("sub", 42),
    ("sub", 42.0),
    ("sub", True),
    ("sub", ["42"]),
    ("sub", {"id": "42"}),
    ("sub", "abc"),
    ("sub", ""),
    ("sub", "0"),
    ("sub", "-1"),
    ("sub", "+42"),
    ("sub", " 42"),
    ("sub", "42 "),
    ("sub", "042"),
    ("sub", "4_2"),
    ("sub", "42.0"),
    ("sub", "1e3"),
    ("sub", "\uff14\uff12"),
    ("sub", "\u0664\u0662"),
    ("sub", "9" * 30),
    ("sub", "9223372036854775808"),
    ("tenant_id", "7"),
    ("tenant_id", 7.0),
    ("tenant_id", 7.5),
    ("tenant_id", True),
    ("tenant_id", False),
    ("tenant_id", 0),
    ("tenant_id", -7),
    ("tenant_id", 2**63),
    ("tenant_id", 10**40),
    ("tenant_id", [7]),
    ("tenant_id", {"id": 7}),
    ("branch_ids", 1),
    ("branch_ids", "1,2"),
    ("branch_ids", {"1": 1}),
    ("branch_ids", ["1"]),
    ("branch_ids", [1, "2"]),
    ("branch_ids", [0]),
    ("branch_ids", [-1]),
    ("branch_ids", [1.0]),
    ("branch_ids", [True]),
    ("branch_ids", [[1]]),
    ("branch_ids", [None]),
    ("branch_ids", [2**64]),
    ("roles", "WAITER"),
    ("roles", ["WAITER", 1]),
    ("roles", [["WAITER"]]),
    ("roles", {"WAITER": True}),
    ("roles", 5),
    ("sector_ids", 3),
    ("sector_ids", "3"),
    ("sector_ids", [0]),
    ("sector_ids", ["3"]),
    ("sector_ids", [True]),
    ("sector_ids", {"3": 3}),
    ("jti", 5),
    ("jti", ""),
    ("jti", ["abc"]),
    ("jti", {"id": "abc"}),
    ("iat", "yesterday"),
    ("iat", True),
    ("iat", [1]),
    ("iat", {"t": 1}),
    ("iat", 10**400),
    ("exp", "tomorrow"),
    ("exp", str(int(NOW) + 900)),
    ("exp", True),
    ("exp", [int(NOW) + 900]),
    ("exp", {"t": 1}),
    ("exp", 10**400),
    ("nbf", "now"),
]


@pytest.mark.parametrize(("claim", "value"), WRONG_TYPES)
def test_wrong_claim_type(claim: str, value: object) -> None:
    assert refused_staff(raw_token(staff_claims(**{claim: value}))).reason == "bad_claim"


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("claim", ["exp", "iat", "nbf"])
def test_non_finite_numbers_are_refused(claim: str, literal: str) -> None:
    # Python's json module accepts these non-standard literals; a NaN expiry must not pass.
    payload = json.dumps(staff_claims(**{claim: 123})).replace(f'"{claim}": 123', f'"{claim}": {literal}')
    assert refused_staff(raw_token(payload)).reason == "bad_claim"


@pytest.mark.parametrize(
    ("exp", "now", "reason"),
    [
        (int(NOW) - 1, NOW, "expired"),
        (int(NOW), NOW, "expired"),
        (0, NOW, "expired"),
        (-5, NOW, "expired"),
    ],
)
def test_expired_staff_token(exp: int, now: float, reason: str) -> None:
    assert refused_staff(raw_token(staff_claims(exp=exp)), now=now).reason == reason


def test_expired_with_ttl_through_minting() -> None:
    token = mint_staff_token(
        secret=SECRET, issuer=ISSUER, audience=AUDIENCE, user_id=1, tenant_id=1,
        branch_ids=[1], roles=["WAITER"], now=NOW - 1000, ttl=900,
    )
    assert refused_staff(token).reason == "expired"


def test_wrong_secret_configured_on_gateway() -> None:
    with pytest.raises(AuthError) as info:
        verify_staff_token(
            staff_token(), secret="x" * 40, issuer=ISSUER, audience=AUDIENCE, now=NOW
        )
    assert info.value.reason == "bad_signature"


def test_empty_configured_secret_fails_closed() -> None:
    with pytest.raises(AuthError) as info:
        verify_staff_token(staff_token(), secret="", issuer=ISSUER, audience=AUDIENCE, now=NOW)
    assert (info.value.close, info.value.reason) == (AUTH_FAILED, "bad_key")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=8,
)
claim_names = st.sampled_from(
    ["sub", "tenant_id", "branch_ids", "roles", "sector_ids", "jti", "iat", "exp", "nbf",
     "type", "iss", "aud"]
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(claim_names, json_values, max_size=6))
def test_any_claim_values_give_claims_or_auth_error(changes: dict[str, Any]) -> None:
    payload = staff_claims()
    payload.update(changes)
    token = raw_token(payload)
    try:
        claims = verify_staff(token)
    except AuthError as exc:
        assert exc.close == AUTH_FAILED
        assert_clean(exc, token)
    else:
        assert claims.tenant_id > 0
        assert claims.expires_at > NOW


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_gives_auth_error(token: str) -> None:
    with pytest.raises(AuthError):
        verify_staff(token)
    try:
        verify_table_token(token, secret=TABLE_SECRET, now=NOW)
    except AuthError as exc:
        assert exc.close == AUTH_FAILED


# --- roles and flags (§1.1, §2.2) --------------------------------------------------------------

DENIED = None


@pytest.mark.parametrize(
    ("endpoint", "roles", "flags"),
    [
        ("waiter", {"WAITER"}, (False, False)),
        ("waiter", {"KITCHEN"}, DENIED),
        ("waiter", {"MANAGER"}, (True, False)),
        ("waiter", {"ADMIN"}, (True, False)),
        ("kitchen", {"WAITER"}, DENIED),
        ("kitchen", {"KITCHEN"}, (False, True)),
        ("kitchen", {"MANAGER"}, (True, True)),
        ("kitchen", {"ADMIN"}, (True, True)),
        ("admin", {"WAITER"}, DENIED),
        ("admin", {"KITCHEN"}, DENIED),
        ("admin", {"MANAGER"}, (True, False)),
        ("admin", {"ADMIN"}, (True, False)),
        ("waiter", set(), DENIED),
        ("kitchen", set(), DENIED),
        ("admin", set(), DENIED),
        ("waiter", {"waiter"}, DENIED),
        ("admin", {"admin", "manager"}, DENIED),
        ("waiter", {"CASHIER"}, DENIED),
        ("waiter", {"WAITER", "KITCHEN"}, (False, False)),
        ("kitchen", {"WAITER", "KITCHEN"}, (False, True)),
        ("waiter", {"WAITER", "MANAGER"}, (True, False)),
        ("kitchen", {"KITCHEN", "ADMIN"}, (True, True)),
        ("admin", {"WAITER", "KITCHEN", "MANAGER"}, (True, False)),
    ],
)
def test_endpoint_roles_and_flags(
    endpoint: Endpoint, roles: set[str], flags: tuple[bool, bool] | None
) -> None:
    claims = verify_staff(raw_token(staff_claims(roles=sorted(roles), sector_ids=[4])))
    if flags is DENIED:
        with pytest.raises(AuthError) as info:
            staff_principal(endpoint, claims)
        assert info.value.close == ACCESS_DENIED
        assert info.value.reason == "role"
        return
    principal = staff_principal(endpoint, claims)
    assert (principal.is_admin, principal.is_kitchen) == flags
    assert principal.endpoint == endpoint
    assert principal.is_plain_waiter == (endpoint == "waiter" and flags == (False, False))


def test_endpoint_role_table() -> None:
    assert dict(ENDPOINT_ROLES) == {
        "waiter": frozenset({"WAITER", "MANAGER", "ADMIN"}),
        "kitchen": frozenset({"KITCHEN", "MANAGER", "ADMIN"}),
        "admin": frozenset({"MANAGER", "ADMIN"}),
    }


def test_staff_principal_copies_claims() -> None:
    claims = verify_staff(raw_token(staff_claims(sector_ids=[4, 5], roles=["WAITER"])))
    principal = staff_principal("waiter", claims)
    assert principal == Principal(
        endpoint="waiter",
        tenant_id=7,
        user_id=42,
        branch_ids=frozenset({1, 2}),
        sector_ids=frozenset({4, 5}),
        sectors_from_claim=True,
        expires_at=NOW + 900,
        jti="abc123",
        issued_at=NOW - 10,
        roles=frozenset({"WAITER"}),
    )


def test_staff_principal_without_sector_claim_has_no_sectors() -> None:
    principal = staff_principal("waiter", verify_staff(staff_token()))
    assert principal.sector_ids == frozenset()
    assert not principal.sectors_from_claim


def test_staff_principal_refuses_diner_endpoint() -> None:
    with pytest.raises(ValueError, match="not a staff endpoint"):
        staff_principal("diner", verify_staff(staff_token(roles=["ADMIN"])))


# --- table tokens (§2.3) -----------------------------------------------------------------------

EXPECTED_TABLE = TableClaims(
    tenant_id=7, branch_id=3, table_id=11, session_id=99, expires_at=NOW + 10800
)


@pytest.mark.parametrize("legacy", [False, True])
def test_valid_table_token(legacy: bool) -> None:
    token = table_token(legacy=legacy)
    assert verify_table_token(token, secret=TABLE_SECRET, now=NOW) == EXPECTED_TABLE


def test_legacy_token_shape() -> None:
    token = table_token(legacy=True)
    fields = token.split(":")
    assert fields[:5] == ["7", "3", "11", "99", str(int(NOW) + 10800)]
    assert len(fields[5]) == 32
    assert token == legacy_token(":".join(fields[:5]))


@pytest.mark.parametrize("legacy", [False, True])
def test_expired_table_token(legacy: bool) -> None:
    token = table_token(legacy=legacy, ttl=60)
    assert refused_table(token, now=NOW + 61).reason == "expired"


def test_table_expiry_boundaries() -> None:
    # The legacy format is expired strictly after its time; a JWT at its `exp`.
    legacy = table_token(legacy=True, ttl=60)
    assert verify_table_token(legacy, secret=TABLE_SECRET, now=NOW + 60).expires_at == NOW + 60
    assert refused_table(legacy, now=NOW + 60.001).reason == "expired"
    token = table_token(ttl=60)
    assert verify_table_token(token, secret=TABLE_SECRET, now=NOW + 59.9).expires_at == NOW + 60
    assert refused_table(token, now=NOW + 60).reason == "expired"


@pytest.mark.parametrize("legacy", [False, True])
def test_table_token_wrong_secret(legacy: bool) -> None:
    token = table_token(legacy=legacy, secret="some-other-table-secret-long-enough!")
    assert refused_table(token).reason == "bad_signature"


def _flip_last(token: str) -> str:
    return token[:-1] + ("A" if token[-1] != "A" else "B")


@pytest.mark.parametrize(
    "token",
    [
        _flip_last(table_token(legacy=True)),
        table_token(legacy=True)[:-1],
        table_token(legacy=True) + "0",
        table_token(legacy=True).upper(),
        legacy_token("7:3:11:99:1700010800").replace("7:3:11:99", "7:3:11:98", 1),
        legacy_token("7:3:11:99:1700010800").replace(":1700010800:", ":1800010800:", 1),
        legacy_token("7:3:11:99:1700010800").rpartition(":")[0] + ":",
        "7:3:11:99:1700010800:" + "0" * 32,
        _flip_last(table_token()),
        table_token().rpartition(".")[0] + "." + b64(b"x" * 32),
    ],
)
def test_tampered_table_token(token: str) -> None:
    assert refused_table(token).reason == "bad_signature"


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "7:3:11:99:1700010800",
        "7:3:11:99:1700010800:abc:def",
        "7:3:11:1700010800:" + "0" * 32,
        ":::::",
        legacy_token("7:3:11:99:1700010800:5"),
        legacy_token("a:3:11:99:1700010800"),
        legacy_token("7:b:11:99:1700010800"),
        legacy_token("7:3:1.5:99:1700010800"),
        legacy_token("7:3:11:-99:1700010800"),
        legacy_token("7:3:11:+99:1700010800"),
        legacy_token("7:3:11: 99:1700010800"),
        legacy_token("7:3:11:99:1700010800.5"),
        legacy_token("7:3:11:99:"),
        legacy_token("7:3::99:1700010800"),
        legacy_token("7:3:11:99:1_700_010_800"),
        legacy_token("7:3:11:\u0669\u0669:1700010800"),
        legacy_token("7:3:11:99:" + "9" * 30),
        legacy_token("7:3:11:99:1700010800", secret=TABLE_SECRET)[:-1] + "\u00e9",
        "7:3:11:99:1700010800:\udcff",
        "a.b",
        "a.b.c.d",
    ],
)
def test_malformed_table_token(token: str) -> None:
    assert refused_table(token).reason == "malformed"


@pytest.mark.parametrize(
    "fields",
    ["0:3:11:99:1800000000", "7:0:11:99:1800000000", "7:3:0:99:1800000000",
     "7:3:11:0:1800000000", "7:3:11:9223372036854775808:1800000000"],
)
def test_legacy_token_ids_must_be_positive(fields: str) -> None:
    assert refused_table(legacy_token(fields)).reason == "bad_claim"


def test_legacy_token_with_leading_zeros_verifies_as_signed() -> None:
    claims = verify_table_token(legacy_token("07:3:11:99:1800000000"), secret=TABLE_SECRET, now=NOW,
                               max_lifetime=math.inf)
    assert claims.tenant_id == 7


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"iss": "menu-ops"}, "wrong_issuer"),
        ({"iss": None}, "missing_claim"),
        ({"aud": "menu-ops-users"}, "wrong_audience"),
        ({"aud": None}, "missing_claim"),
        ({"type": "access"}, "wrong_type"),
        ({"type": "TABLE"}, "wrong_type"),
        ({"type": None}, "missing_claim"),
        ({"exp": None}, "missing_claim"),
        ({"exp": "later"}, "bad_claim"),
        ({"exp": int(NOW) - 1}, "expired"),
        ({"tenant_id": None}, "missing_claim"),
        ({"branch_id": None}, "missing_claim"),
        ({"table_id": None}, "missing_claim"),
        ({"session_id": None}, "missing_claim"),
        ({"tenant_id": "7"}, "bad_claim"),
        ({"branch_id": 3.0}, "bad_claim"),
        ({"table_id": True}, "bad_claim"),
        ({"session_id": 0}, "bad_claim"),
        ({"session_id": -99}, "bad_claim"),
        ({"session_id": [99]}, "bad_claim"),
        ({"branch_id": {"id": 3}}, "bad_claim"),
        ({"tenant_id": 2**63}, "bad_claim"),
    ],
)
def test_table_jwt_claims(changes: dict[str, Any], reason: str) -> None:
    token = raw_token(table_claims(**changes), secret=TABLE_SECRET)
    assert refused_table(token).reason == reason


@pytest.mark.parametrize(
    "header",
    [{"alg": "none"}, {"alg": "HS512"}, {"alg": "RS256"}, {"typ": "JWT"}],
)
def test_table_jwt_algorithm(header: dict[str, Any]) -> None:
    token = raw_token(table_claims(), header=header, secret=TABLE_SECRET)
    assert refused_table(token).reason == "bad_algorithm"


def test_staff_token_is_not_a_table_token() -> None:
    assert refused_table(staff_token(), secret=SECRET).reason == "wrong_issuer"


def test_table_token_is_not_a_staff_token() -> None:
    assert refused_staff(table_token(secret=SECRET)).reason == "wrong_issuer"


def test_diner_principal() -> None:
    principal = diner_principal(EXPECTED_TABLE)
    assert principal == Principal(
        endpoint="diner",
        tenant_id=7,
        user_id=-99,
        branch_ids=frozenset({3}),
        session_id=99,
        table_id=11,
        expires_at=NOW + 10800,
    )
    assert principal.is_diner
    assert not (principal.is_admin or principal.is_kitchen or principal.is_plain_waiter)


# --- periodic diner re-verification (§2.4, D3) -------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True])
def test_recheck_passes_for_a_still_valid_token(legacy: bool) -> None:
    token = table_token(legacy=legacy)
    principal = diner_principal(verify_table_token(token, secret=TABLE_SECRET, now=NOW))
    recheck_table_principal(principal, token, secret=TABLE_SECRET, now=NOW + 1800)


@pytest.mark.parametrize("legacy", [False, True])
def test_recheck_expired(legacy: bool) -> None:
    token = table_token(legacy=legacy, ttl=3600)
    principal = diner_principal(verify_table_token(token, secret=TABLE_SECRET, now=NOW))
    with pytest.raises(AuthError) as info:
        recheck_table_principal(principal, token, secret=TABLE_SECRET, now=NOW + 3601)
    assert info.value.close == TABLE_TOKEN_EXPIRED
    assert info.value.reason == "expired"
    assert_clean(info.value, token)


def test_recheck_after_secret_rotation() -> None:
    token = table_token()
    principal = diner_principal(verify_table_token(token, secret=TABLE_SECRET, now=NOW))
    with pytest.raises(AuthError) as info:
        recheck_table_principal(principal, token, secret="rotated-secret-long-enough-for-hs", now=NOW)
    assert info.value.close == TABLE_TOKEN_EXPIRED
    assert info.value.reason == "bad_signature"


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize(
    "changes",
    [{"session_id": 100}, {"tenant_id": 8}, {"branch_id": 4}, {"table_id": 12}],
)
def test_recheck_session_mismatch(legacy: bool, changes: dict[str, Any]) -> None:
    principal = diner_principal(EXPECTED_TABLE)
    token = table_token(legacy=legacy, **changes)
    with pytest.raises(AuthError) as info:
        recheck_table_principal(principal, token, secret=TABLE_SECRET, now=NOW)
    assert info.value.close == SESSION_MISMATCH
    assert info.value.reason == "session_mismatch"


def test_recheck_refuses_staff_principal() -> None:
    principal = staff_principal("waiter", verify_staff(staff_token()))
    with pytest.raises(ValueError, match="not a diner"):
        recheck_table_principal(principal, table_token(), secret=TABLE_SECRET, now=NOW)


# --- Origin (D2) -------------------------------------------------------------------------------


def test_default_origins() -> None:
    assert len(DEFAULT_ORIGINS) == 18
    assert len(set(DEFAULT_ORIGINS)) == 18
    assert "http://localhost:5173" in DEFAULT_ORIGINS
    assert "http://192.168.1.106:5180" in DEFAULT_ORIGINS
    assert "http://127.0.0.1:5176" in DEFAULT_ORIGINS
    assert all(origin.startswith("http://") for origin in DEFAULT_ORIGINS)
    defaults = allowed_origins(())
    assert len(defaults) == 36
    assert "https://192.168.1.106:5179" in defaults


DEFAULTS = allowed_origins(())


@pytest.mark.parametrize(
    ("origin", "bypass", "allowed"),
    [
        ("http://localhost:5173", False, True),
        ("https://localhost:5173", False, True),
        ("http://127.0.0.1:5180", False, True),
        ("http://localhost:5174", False, False),
        ("http://localhost:5174", True, False),
        ("HTTP://localhost:5173", True, False),
        ("http://LOCALHOST:5173", False, False),
        ("http://localhost:5173/", False, False),
        ("http://localhost:5173 ", False, False),
        ("http://localhost", False, False),
        ("http://evil.example", True, False),
        ("null", True, False),
        (None, True, True),
        ("", True, True),
        (None, False, False),
        ("", False, False),
    ],
)
def test_origin_rules(origin: str | None, bypass: bool, allowed: bool) -> None:
    assert origin_allowed(origin, DEFAULTS, bypass_missing=bypass) is allowed


def test_configured_origins_replace_the_defaults() -> None:
    allowed = allowed_origins(("https://app.example.com", "https://admin.example.com"))
    assert allowed == {"https://app.example.com", "https://admin.example.com"}
    assert origin_allowed("https://app.example.com", allowed, bypass_missing=False)
    assert not origin_allowed("http://localhost:5173", allowed, bypass_missing=True)
    assert not origin_allowed("http://app.example.com", allowed, bypass_missing=True)


# --- revocation (§2.1, D3) ---------------------------------------------------------------------


def staff(*, jti: str | None = "abc", issued_at: float | None = NOW) -> Principal:
    return Principal(
        endpoint="waiter", tenant_id=7, user_id=42, branch_ids=frozenset({1}),
        jti=jti, issued_at=issued_at,
    )


def test_revocation_keys() -> None:
    assert revocation_keys(staff()) == ["auth:token:blacklist:abc", "auth:user:revoked:42"]
    assert revocation_keys(staff(jti=None)) == ["auth:user:revoked:42"]
    assert revocation_keys(diner_principal(EXPECTED_TABLE)) == []


def test_revocation_keys_from_a_verified_token() -> None:
    principal = staff_principal("kitchen", verify_staff(staff_token(roles=["KITCHEN"])))
    assert revocation_keys(principal) == ["auth:token:blacklist:abc123", "auth:user:revoked:42"]


ISO_AFTER = "2023-11-14T22:13:21+00:00"  # NOW + 1 s
ISO_BEFORE = "2023-11-14T22:13:19+00:00"  # NOW - 1 s
ISO_EQUAL = "2023-11-14T22:13:20+00:00"


@pytest.mark.parametrize(
    ("principal", "values", "revoked"),
    [
        (staff(), [None, None], False),
        (staff(), [b"1", None], True),
        (staff(), ["1", None], True),
        (staff(), [b"", None], True),
        (staff(), [b"1", ISO_BEFORE], True),
        (staff(), [None, ISO_BEFORE], False),
        (staff(), [None, ISO_EQUAL], False),
        (staff(), [None, ISO_AFTER], True),
        (staff(), [None, ISO_AFTER.encode()], True),
        (staff(), [None, ISO_BEFORE.encode()], False),
        (staff(), [None, "2023-11-14T22:13:20.500000+00:00"], True),
        (staff(), [None, "2023-11-15T03:13:21+05:00"], True),
        (staff(), [None, "2023-11-15T03:13:19+05:00"], False),
        (staff(), [None, "2023-11-14T17:13:21-05:00"], True),
        (staff(), [None, "2023-11-14T22:13:21"], True),
        (staff(), [None, "2023-11-14T22:13:19"], False),
        (staff(), [None, "2023-11-14T22:13:21Z"], True),
        (staff(), [None, "2023-11-14T22:13:19Z"], False),
        (staff(), [None, "2023-11-14"], False),
        (staff(), [None, "garbage"], True),
        (staff(), [None, ""], True),
        (staff(), [None, b"\xff\xfe"], True),
        (staff(), [None, "1700000001"], True),
        (staff(), [None, "9999-12-31T23:59:59-23:59"], True),
        (staff(jti=None), [None], False),
        (staff(jti=None), [ISO_AFTER], True),
        (staff(jti=None), [ISO_BEFORE], False),
        (staff(issued_at=None), [None, None], False),
        (staff(issued_at=None), [None, ISO_BEFORE], True),
        (diner_principal(EXPECTED_TABLE), [], False),
    ],
)
def test_is_revoked(principal: Principal, values: list[bytes | str | None], revoked: bool) -> None:
    assert is_revoked(principal, values) is revoked


@pytest.mark.parametrize(
    ("principal", "values"),
    [(staff(), [None]), (staff(jti=None), [None, None]), (diner_principal(EXPECTED_TABLE), [None])],
)
def test_is_revoked_needs_one_value_per_key(
    principal: Principal, values: list[bytes | str | None]
) -> None:
    with pytest.raises(ValueError, match="revocation values"):
        is_revoked(principal, values)


# --- minting -----------------------------------------------------------------------------------


def _unverified(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def test_minted_staff_claims_match_the_backend() -> None:
    token = mint_staff_token(
        secret=SECRET, issuer=ISSUER, audience=AUDIENCE, user_id=5, tenant_id=2,
        branch_ids=(1, 3), roles=("WAITER",), now=NOW + 0.7, ttl=900,
    )
    claims = _unverified(token)
    jti = claims.pop("jti")
    assert claims == {
        "sub": "5",
        "tenant_id": 2,
        "branch_ids": [1, 3],
        "roles": ["WAITER"],
        "email": "user5@example.test",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "iat": int(NOW),
        "exp": int(NOW) + 900,
        "type": "access",
    }
    assert isinstance(jti, str)
    assert len(jti) == 32
    int(jti, 16)
    assert jwt.get_unverified_header(token)["alg"] == "HS256"


def test_minted_staff_token_options() -> None:
    token = mint_staff_token(
        secret=SECRET, issuer=ISSUER, audience=AUDIENCE, user_id=5, tenant_id=2,
        branch_ids=[1], roles=["WAITER"], now=NOW, sector_ids=[8], jti="fixed",
        token_type="refresh", extra={"email": None, "tenant_id": 9, "custom": [1]},
    )
    claims = _unverified(token)
    assert claims["sector_ids"] == [8]
    assert claims["jti"] == "fixed"
    assert claims["type"] == "refresh"
    assert claims["tenant_id"] == 9
    assert claims["custom"] == [1]
    assert "email" not in claims


def test_minted_jtis_differ() -> None:
    first, second = (
        mint_staff_token(
            secret=SECRET, issuer=ISSUER, audience=AUDIENCE, user_id=5, tenant_id=2,
            branch_ids=[1], roles=["WAITER"], now=NOW,
        )
        for _ in range(2)
    )
    assert _unverified(first)["jti"] != _unverified(second)["jti"]


def test_minted_table_token_claims() -> None:
    assert _unverified(table_token()) == table_claims(iat=int(NOW))


def test_minting_without_now_uses_the_clock() -> None:
    token = mint_table_token(secret=TABLE_SECRET, tenant_id=1, branch_id=1, table_id=1, session_id=1)
    assert _unverified(token)["exp"] - _unverified(token)["iat"] == 10800


def test_short_default_secret_does_not_warn(recwarn: pytest.WarningsRecorder) -> None:
    short = "table-token-secret-change-me"
    token = mint_table_token(secret=short, tenant_id=1, branch_id=1, table_id=1, session_id=1, now=NOW)
    verify_table_token(token, secret=short, now=NOW)
    assert not recwarn.list


# --- time claims and pathological headers (hardening) ---------------------------------------------


def test_iat_in_the_future_is_refused() -> None:
    # A token "issued" later than a revocation would slip past auth:user:revoked:{sub}.
    error = refused_staff(raw_token(staff_claims(iat=int(NOW) + 3600, exp=int(NOW) + 4000)))
    assert error.reason == "issued_in_future"


def test_iat_within_the_clock_skew_is_accepted() -> None:
    assert verify_staff(raw_token(staff_claims(iat=int(NOW) + 30))).user_id == 42


def test_lifetime_over_the_maximum_is_refused() -> None:
    token = raw_token(staff_claims(iat=int(NOW) - 10, exp=int(NOW) + 7 * 86400))
    error = refused_staff(token)
    assert error.reason == "lifetime_too_long"
    # A deployment that allows longer credentials says so.
    claims = verify_staff_token(token, secret=SECRET, issuer=ISSUER, audience=AUDIENCE, now=NOW,
                                max_lifetime=8 * 86400)
    assert claims.user_id == 42


def test_lifetime_without_iat_counts_from_now() -> None:
    error = refused_staff(raw_token(staff_claims(iat=None, exp=int(NOW) + 2 * 86400)))
    assert error.reason == "lifetime_too_long"
    assert verify_staff(raw_token(staff_claims(iat=None, exp=int(NOW) + 3600))).user_id == 42


@pytest.mark.parametrize("legacy", [False, True])
def test_table_token_lifetime_is_bounded(legacy: bool) -> None:
    token = table_token(legacy=legacy)  # valid for 3 h
    with pytest.raises(AuthError) as info:
        verify_table_token(token, secret=TABLE_SECRET, now=NOW, max_lifetime=3600)
    assert info.value.reason == "lifetime_too_long"
    assert_clean(info.value, token)


@pytest.mark.parametrize("header", [
    '{"alg":"HS256","x":' + "[" * 5000 + "]" * 5000 + "}",
    '{"alg":"HS256","x":' + "{\"a\":" * 3000 + "1" + "}" * 3000 + "}",
    '[' * 2000,
    '"HS256"',
    '{"alg":["HS256"]}',
    '{"alg":"HS256","kid":' + "9" * 5000 + "}",
])
def test_pathological_headers_are_malformed_tokens(header: str) -> None:
    token = raw_token(staff_claims(), header=header)
    error = refused_staff(token)
    assert error.reason in {"malformed", "bad_algorithm"}
