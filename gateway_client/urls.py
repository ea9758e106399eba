"""Where the client connects and catches up: endpoint names, base URLs, the diner's session id."""

from __future__ import annotations

import base64
import binascii
import json
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from gateway.core.model import ENDPOINTS, Endpoint, credential_param

__all__ = ["bases", "catchup_url", "normalise_endpoint", "session_id_from_table_token", "ws_url"]


def normalise_endpoint(endpoint: str) -> Endpoint:
    """``waiter``, ``/ws/waiter`` or ``ws/waiter`` → ``waiter``; anything else is a ValueError."""
    name = endpoint.strip("/")
    name = name.removeprefix("ws/")
    if name not in ENDPOINTS:
        raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {sorted(ENDPOINTS)}")
    return name


def bases(url_base: str) -> tuple[str, str]:
    """(ws base, http base) from a ws://, wss://, http:// or https:// base URL."""
    parts = urlsplit(url_base)
    secure = {"ws": False, "http": False, "wss": True, "https": True}.get(parts.scheme)
    if secure is None or not parts.netloc:
        raise ValueError(f"url_base must be ws://, wss://, http:// or https://host[:port], got {url_base!r}")
    path = parts.path.rstrip("/")
    ws = urlunsplit(("wss" if secure else "ws", parts.netloc, path, "", ""))
    http = urlunsplit(("https" if secure else "http", parts.netloc, path, "", ""))
    return ws, http


def ws_url(ws_base: str, endpoint: Endpoint, token: str) -> str:
    """The socket URL, the credential URL-encoded (legacy table tokens contain ``:``)."""
    return f"{ws_base}/ws/{endpoint}?{credential_param(endpoint)}={quote(token, safe='')}"


def catchup_url(http_base: str, endpoint: Endpoint, token: str, since: float, *, branch_id: int | None,
                session_id: int | None) -> str | None:
    """The catch-up request, or None when there is no scope to ask for (a staff client without a
    branch, a diner whose session cannot be told)."""
    if endpoint == "diner":
        session = session_id if session_id is not None else session_id_from_table_token(token)
        if session is None:
            return None
        query = urlencode({"session_id": session, "since": f"{since:.3f}", "table_token": token})
        return f"{http_base}/ws/catchup/session?{query}"
    if branch_id is None:
        return None
    query = urlencode({"branch_id": branch_id, "since": f"{since:.3f}", "token": token})
    return f"{http_base}/ws/catchup?{query}"


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
