"""Files of ``browser/`` served by the gateway: the client library and the live console.

- ``GET /ws/client.js``: the library as one ES module. It re-exports ``./client/index.js``, and
  every module of the library is served as ``/ws/client/<name>.js``, so the library's own relative
  imports resolve against the gateway without a bundler.
- ``GET /ws/client.d.ts``: its TypeScript declarations.
- ``GET /ws/console`` and ``/ws/console/<name>``: the live console (development, or
  ``GATEWAY_CONSOLE``).

The files are looked up in the installed package (``gateway/_browser``, where a wheel puts them)
and then in the source checkout (``browser/`` beside ``gateway/``, which an editable install
uses). ``dev_token`` answers ``POST /ws/dev/token``, which the console uses in development.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gateway.core.tokens import mint_legacy_table_token, mint_staff_token, mint_table_token
from gateway.settings import Settings

CLIENT_PATH = "/ws/client.js"
TYPES_PATH = "/ws/client.d.ts"
MODULE_PREFIX = "/ws/client/"
CONSOLE_PATH = "/ws/console"
CONSOLE_PREFIX = "/ws/console/"

#: The one-file entry point: relative to /ws/client.js, ./client/index.js is /ws/client/index.js.
CLIENT_ENTRY = b'// @integrador/ws-client, served by the gateway.\nexport * from "./client/index.js";\n'

_CONTENT_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".ts": "application/typescript; charset=utf-8",
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
#: The ``gateway`` package directory.
_HERE = Path(__file__).resolve().parent.parent


def browser_root() -> Path | None:
    """The directory holding ``src/`` and ``console/``: the wheel's copy, else the checkout's."""
    for candidate in (_HERE / "_browser", _HERE.parent / "browser"):
        if (candidate / "src" / "index.js").is_file():
            return candidate
    return None


def _files(root: Path | None, sub: str, suffixes: tuple[str, ...]) -> dict[str, Path]:
    if root is None or not (root / sub).is_dir():
        return {}
    return {p.name: p for p in sorted((root / sub).iterdir()) if p.is_file() and p.name.endswith(suffixes)}


def _table(root: Path | None) -> dict[str, tuple[Path | None, bool]]:
    """URL path -> (file, console-only). ``None`` as file means the generated entry module."""
    table: dict[str, tuple[Path | None, bool]] = {}
    modules = _files(root, "src", (".js",))
    if modules:
        table[CLIENT_PATH] = (None, False)
        for name, path in modules.items():
            table[MODULE_PREFIX + name] = (path, False)
    types = _files(root, "src", (".d.ts",)).get("index.d.ts")
    if types is not None:
        table[TYPES_PATH] = (types, False)
    console = _files(root, "console", tuple(_CONTENT_TYPES))
    if "index.html" in console:
        table[CONSOLE_PATH] = (console.pop("index.html"), True)
        for name, path in console.items():
            table[CONSOLE_PREFIX + name] = (path, True)
    return table


_TABLE = _table(browser_root())
#: Every path served; the HTTP layer registers one route per path.
PATHS: tuple[str, ...] = tuple(_TABLE)


def content_type(name: str) -> str:
    if name.endswith(".d.ts"):
        return _CONTENT_TYPES[".ts"]
    return _CONTENT_TYPES.get(Path(name).suffix, "application/octet-stream")


def lookup(path: str, *, console: bool) -> tuple[str, bytes] | None:
    """(content type, bytes) of a served path, or None (unknown, or the console while it is off)."""
    entry = _TABLE.get(path)
    if entry is None:
        return None
    file, console_only = entry
    if console_only and not console:
        return None
    if file is None:
        return content_type(CLIENT_PATH), CLIENT_ENTRY
    try:
        return content_type(file.name), file.read_bytes()
    except OSError:
        return None


def is_console(path: str) -> bool:
    return path == CONSOLE_PATH or path.startswith(CONSOLE_PREFIX)


def console_enabled(settings: Settings) -> bool:
    return settings.environment == "development" or settings.console_enabled


class DevTokenError(ValueError):
    """A bad ``POST /ws/dev/token`` body; the message is the 422 detail."""


def _int(body: Mapping[str, Any], name: str, default: int) -> int:
    value = body.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DevTokenError(f"{name} must be a positive integer")
    return value


def _ints(body: Mapping[str, Any], name: str, default: list[int] | None) -> list[int] | None:
    value = body.get(name, default)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise DevTokenError(f"{name} must be a list of positive integers")
    return list(value)


def dev_token(settings: Settings, raw: bytes) -> dict[str, Any]:
    """Mint a development token with the gateway's own secrets (development only; the caller checks).

    Body (JSON object, every field optional): ``kind`` (``staff`` | ``table`` | ``legacy``), ``ttl``
    (seconds), and for staff ``user``, ``tenant``, ``branches``, ``roles``, ``sectors``; for table
    tokens ``tenant``, ``branch``, ``table``, ``session``. The answer carries the token, its ``exp``
    and the publish token, so the console can also publish test events.
    """
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise DevTokenError("body must be JSON") from None
    if not isinstance(body, dict):
        raise DevTokenError("body must be a JSON object")
    kind = body.get("kind", "staff")
    ttl = body.get("ttl", 900)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 1 <= ttl <= 86400:
        raise DevTokenError("ttl must be a number of seconds between 1 and 86400")
    now = time.time()
    tenant = _int(body, "tenant", 1)
    if kind == "staff":
        roles = body.get("roles", ["WAITER"])
        if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
            raise DevTokenError("roles must be a list of strings")
        token = mint_staff_token(
            secret=settings.jwt_secret, issuer=settings.jwt_issuer, audience=settings.jwt_audience,
            user_id=_int(body, "user", 7), tenant_id=tenant, branch_ids=_ints(body, "branches", [2]) or [],
            roles=roles, ttl=ttl, now=now, sector_ids=_ints(body, "sectors", None),
        )
    elif kind in ("table", "legacy"):
        mint = mint_table_token if kind == "table" else mint_legacy_table_token
        token = mint(
            secret=settings.table_token_secret, tenant_id=tenant, branch_id=_int(body, "branch", 2),
            table_id=_int(body, "table", 5), session_id=_int(body, "session", 9), ttl=ttl, now=now,
        )
    else:
        raise DevTokenError("kind must be staff, table or legacy")
    return {"kind": kind, "token": token, "exp": int(now + ttl), "publish_token": settings.publish_token}
