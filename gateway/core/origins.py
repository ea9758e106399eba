"""Origin allow-list decisions (D2, audit SEC-MED-01), sans-I/O."""

from __future__ import annotations

DEFAULT_ORIGINS: tuple[str, ...] = tuple(
    f"http://{host}:{port}"
    for host in ("localhost", "127.0.0.1", "192.168.1.106")
    for port in (5173, 5176, 5177, 5178, 5179, 5180)
)


def allowed_origins(configured: tuple[str, ...], own_port: int | None = None) -> frozenset[str]:
    """The configured allow-list, or the 18 development origins and their https:// forms, plus,
    given ``own_port``, the gateway's own origins (its console's pages are served from there)."""
    if configured:
        return frozenset(configured)
    https = (origin.replace("http://", "https://", 1) for origin in DEFAULT_ORIGINS)
    own = (f"http://{host}:{own_port}" for host in ("localhost", "127.0.0.1")) if own_port else ()
    return frozenset(DEFAULT_ORIGINS).union(https, own)


def origin_allowed(origin: str | None, allowed: frozenset[str], *, bypass_missing: bool) -> bool:
    """Exact, case-sensitive match; a missing or empty Origin only under the development bypass."""
    if not origin:
        return bypass_missing
    return origin in allowed
