"""The HS256 fast path says yes only where PyJWT says yes, with the same claims; every other
token goes to PyJWT, so refusals and their reasons are PyJWT's."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import jwt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core import hs256

SECRET = "s" * 32
ISSUER, AUDIENCE = "integrador", "integrador-ws"
CLAIMS = {"sub": "7", "tenant_id": 1, "iss": ISSUER, "aud": AUDIENCE, "exp": 4_000_000_000}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def pyjwt(token: str, secret: str = SECRET) -> dict[str, Any] | None:
    try:
        return jwt.decode(token, secret, algorithms=["HS256"], issuer=ISSUER, audience=AUDIENCE, leeway=0,
                          options={"verify_exp": False, "verify_iat": False, "verify_nbf": False,
                                   "verify_sub": False, "verify_jti": False, "require": ["iss", "aud"]})
    except (jwt.PyJWTError, ValueError, TypeError, RecursionError):
        return None


def learned() -> hs256.Known:
    known = hs256.Known()
    token = jwt.encode(CLAIMS, SECRET, algorithm="HS256")
    known.learn(token, jwt.get_unverified_header(token), SECRET)
    return known


def fast(known: hs256.Known, token: str, secret: str = SECRET) -> dict[str, Any] | None:
    return hs256.accepted_claims(known, token, secret=secret, issuer=ISSUER, audience=AUDIENCE)


def signed(header: str, payload: str, secret: str = SECRET) -> str:
    signature = hmac.new(secret.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64(signature)}"


def test_a_token_like_a_learned_one_is_accepted_with_pyjwts_claims() -> None:
    known = learned()
    token = jwt.encode({**CLAIMS, "sub": "8", "aud": ["other", AUDIENCE]}, SECRET, algorithm="HS256")
    assert fast(known, token) == pyjwt(token) is not None


def test_nothing_is_accepted_before_pyjwt_accepted_that_header_and_key() -> None:
    token = jwt.encode(CLAIMS, SECRET, algorithm="HS256")
    assert fast(hs256.Known(), token) is None
    assert fast(learned(), token, secret="t" * 32) is None
    other_header = jwt.encode(CLAIMS, SECRET, algorithm="HS256", headers={"kid": "k1"})
    assert fast(learned(), other_header) is None


HEADER = b64(b'{"alg":"HS256","typ":"JWT"}')


@pytest.mark.parametrize("payload", [
    {**CLAIMS, "iss": "other"},
    {**CLAIMS, "iss": None},
    {**CLAIMS, "iss": 5},
    {**CLAIMS, "aud": "other"},
    {**CLAIMS, "aud": ""},
    {**CLAIMS, "aud": []},
    {**CLAIMS, "aud": [AUDIENCE, 5]},
    {**CLAIMS, "aud": {"x": AUDIENCE}},
    {k: v for k, v in CLAIMS.items() if k != "aud"},
    [CLAIMS],
    "text",
])
def test_what_pyjwt_refuses_the_fast_path_leaves_to_it(payload: Any) -> None:
    token = signed(HEADER, b64(json.dumps(payload).encode()))
    assert pyjwt(token) is None
    assert fast(learned(), token) is None


def test_a_learned_header_with_a_bad_signature_or_odd_segments_goes_to_pyjwt() -> None:
    known = learned()
    good = signed(HEADER, b64(json.dumps(CLAIMS).encode()))
    assert fast(known, good) == pyjwt(good) is not None
    head, payload, signature = good.split(".")
    for token in (
        f"{head}.{payload}.{signature[:-2]}AA",              # another signature
        f"{head}.{payload}.{signature}=",                     # padding: PyJWT's rules, not ours
        f"{head}.{payload}",                                  # two segments
        f"{head}.{payload}.{signature}.x",                    # four
        f"{head}.{payload}!.{signature}",                     # not base64url
        signed(HEADER, payload[:-1] + ("B" if payload[-1] == "A" else "A")),  # non-canonical last char
    ):
        claims = fast(known, token)
        assert claims is None or claims == pyjwt(token), token


def test_headers_that_change_how_pyjwt_reads_are_never_learned() -> None:
    known = hs256.Known()
    for header in ({"alg": "HS256", "crit": ["b64"], "b64": False}, {"alg": "HS256", "b64": True},
                   {"alg": "none"}, {"alg": "HS384"}):
        known.learn("h.p.s", header, SECRET)
    assert known.headers == set() and known.keys == {}


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_mutated_tokens_fast_path_never_says_yes_where_pyjwt_says_no(data: st.DataObject) -> None:
    known = learned()
    payload = data.draw(st.fixed_dictionaries({}, optional={
        "iss": st.sampled_from([ISSUER, "x", 1, None, [ISSUER]]),
        "aud": st.sampled_from([AUDIENCE, "", [AUDIENCE], ["x", AUDIENCE], [AUDIENCE, 1], [], None, 3]),
        "sub": st.sampled_from(["7", 7, None]),
    }))
    token = signed(HEADER, b64(json.dumps(payload).encode()),
                   secret=data.draw(st.sampled_from([SECRET, SECRET, "t" * 32])))
    chars = list(token)
    for _ in range(data.draw(st.integers(0, 3))):
        i = data.draw(st.integers(0, len(chars) - 1))
        chars[i] = data.draw(st.sampled_from("AB_-.=a0+/ "))
    mutated = "".join(chars)
    claims = fast(known, mutated)
    if claims is not None:
        assert claims == pyjwt(mutated)
