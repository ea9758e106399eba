"""HS256 tokens PyJWT has the last word on, checked without it when the answer is sure to be yes.

PyJWT decodes each segment character by character in Python and builds its options per call:
about 50 µs per token here, the largest item of a reconnect storm (docs/performance.md). Most
tokens an issuer sends share one header, and one key signs them all. Once PyJWT has accepted a
token with a given header segment and key (:func:`learn`), :func:`accepted_claims` takes a token
with that same header and checks, with the C-speed stdlib, exactly what PyJWT checks under the
gateway's options: canonical base64url segments, the HMAC-SHA256 signature, a JSON object
payload, ``iss`` and ``aud``. It only ever says yes: any token it is not sure of (padding, an
unknown header, a bad signature, an odd claim) returns None and PyJWT decides, so refusals and
their reasons stay PyJWT's.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from typing import Any

from jwt.algorithms import HMACAlgorithm

#: How many header segments and keys are remembered: an issuer uses one or two of each.
_MAX_KNOWN = 16
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")


class Known:
    """Header segments and keys PyJWT accepted together, for :func:`accepted_claims`."""

    __slots__ = ("headers", "keys")

    def __init__(self) -> None:
        self.headers: set[str] = set()
        self.keys: dict[str, bytes] = {}

    def learn(self, token: str, header: dict[str, Any], secret: str) -> None:
        """Called after PyJWT accepted ``token`` (HS256) under ``secret``. A header with ``crit``
        or ``b64`` is never remembered: those change how PyJWT reads the token."""
        if header.get("alg") != "HS256" or "crit" in header or "b64" in header:
            return
        segment = token.partition(".")[0]
        if len(self.headers) < _MAX_KNOWN:
            self.headers.add(segment)
        if secret not in self.keys and len(self.keys) < _MAX_KNOWN:
            self.keys[secret] = HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(secret)


def _segment(text: str) -> bytes | None:
    """A canonical unpadded base64url segment's bytes (PyJWT's own rule), else None."""
    if len(text) % 4 == 1 or not _SEGMENT.fullmatch(text):
        return None
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    return raw if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") == text else None


def accepted_claims(known: Known, token: str, *, secret: str, issuer: str, audience: str) -> dict[str, Any] | None:
    """The claims of a token PyJWT would accept, or None when PyJWT must decide. ``token`` is ASCII."""
    parts = token.split(".")
    if len(parts) != 3 or parts[0] not in known.headers:
        return None
    key = known.keys.get(secret)
    signature, payload = _segment(parts[2]), _segment(parts[1])
    if key is None or signature is None or payload is None:
        return None
    signed = token[: len(parts[0]) + 1 + len(parts[1])].encode("ascii")
    if not hmac.compare_digest(hmac.new(key, signed, hashlib.sha256).digest(), signature):
        return None
    try:
        claims = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(claims, dict):
        return None
    iss, aud = claims.get("iss"), claims.get("aud")
    if not isinstance(iss, str) or iss != issuer:
        return None
    if isinstance(aud, str):
        return claims if aud and aud == audience else None
    if isinstance(aud, list) and aud and all(isinstance(item, str) for item in aud) and audience in aud:
        return claims
    return None
