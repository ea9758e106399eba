"""The sockets of the benchmarks, tenant 1: per branch *b*, 2 admins (ADMIN and MANAGER), 6
waiters over 3 sectors (``sector_ids`` claim), 1 kitchen and 20 diners over 10 table sessions
(29 sockets), every staff socket with its own user id; or N plain waiters or diners (storm,
memory)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import attrs

from bench.lib.tokens import staff_token, table_token
from gateway.core.auth import (
    diner_principal,
    staff_principal,
    verify_staff_token,
    verify_table_token,
)
from gateway.core.model import Principal
from gateway.settings import Settings

#: Socket kinds, in the order the plots list them.
KINDS = ("admin", "waiter", "kitchen", "diner")


@dataclass(frozen=True)
class SocketSpec:
    i: int
    kind: str  # admin, waiter, kitchen, diner
    endpoint: str
    target: str  # request target: /ws/<endpoint>?token=... or ?table_token=...
    branch: int
    principal: Principal


def sector_id(branch: int, k: int) -> int:
    """Sector k (1..3) of a branch."""
    return branch * 10 + k


def session_id(branch: int, j: int) -> int:
    """Table session j (1..10) of a branch; its table has the same id."""
    return branch * 100 + j


def sector_of_session(branch: int, j: int, sectors: int = 3) -> int:
    return sector_id(branch, (j - 1) % sectors + 1)


def build_population(
    branches: int,
    *,
    settings: Settings,
    ttl: float = 4 * 3600,
    admins: int = 2,
    waiters: int = 6,
    sectors: int = 3,
    kitchens: int = 1,
    sessions: int = 10,
    diners_per_session: int = 2,
) -> list[SocketSpec]:
    """Every socket of ``branches`` branches, with its token and the Principal the gateway derives."""
    now = time.time()
    out: list[SocketSpec] = []

    def staff(
        kind: str,
        endpoint: str,
        user: int,
        branch: int,
        roles: list[str],
        sector_ids: list[int] | None = None,
    ) -> None:
        token = staff_token(
            settings,
            user_id=user,
            branch_ids=[branch],
            roles=roles,
            ttl=ttl,
            sector_ids=sector_ids,
        )
        claims = verify_staff_token(
            token,
            secret=settings.jwt_secret,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            now=now,
        )
        # Waiters carry the sector_ids claim, so the gateway's sector lookup returns them as is.
        principal = staff_principal(endpoint, claims)  # type: ignore[arg-type]
        out.append(
            SocketSpec(len(out), kind, endpoint, f"/ws/{endpoint}?token={token}", branch, principal)
        )

    for b in range(1, branches + 1):
        base = 1_000_000 + b * 100
        for k in range(admins):
            staff("admin", "admin", base + k, b, ["ADMIN"] if k % 2 == 0 else ["MANAGER"])
        for k in range(waiters):
            sector = sector_id(b, k % sectors + 1)
            staff("waiter", "waiter", base + 10 + k, b, ["WAITER"], sector_ids=[sector])
        for k in range(kitchens):
            staff("kitchen", "kitchen", base + 20 + k, b, ["KITCHEN"])
        for j in range(1, sessions + 1):
            sid = session_id(b, j)
            for _ in range(diners_per_session):
                token = table_token(settings, branch_id=b, session_id=sid, ttl=ttl)
                claims = verify_table_token(token, secret=settings.table_token_secret, now=now)
                out.append(
                    SocketSpec(
                        len(out),
                        "diner",
                        "diner",
                        f"/ws/diner?table_token={token}",
                        b,
                        diner_principal(claims),
                    )
                )
    return out


def routing_class(p: Principal) -> Principal:
    """The principal without what ``receives`` never reads (user id, token id, times)."""
    return attrs.evolve(p, user_id=0, jti=None, issued_at=None, expires_at=0.0)


def population_targets(kind: str, n: int, settings: Settings) -> tuple[list[str], list[str]]:
    """(request targets, kinds) of N sockets."""
    if kind == "mix":
        specs = build_population(math.ceil(n / 29), settings=settings)[:n]
        return [s.target for s in specs], [s.kind for s in specs]
    targets: list[str] = []
    for i in range(n):
        if kind == "waiter":
            token = staff_token(
                settings,
                user_id=2_000_000 + i,
                branch_ids=[1 + i % 100],
                roles=["WAITER"],
                ttl=4 * 3600,
            )
            targets.append(f"/ws/waiter?token={token}")
        else:
            sid = 300_000 + i // 2
            token = table_token(settings, branch_id=1 + i % 100, session_id=sid, ttl=4 * 3600)
            targets.append(f"/ws/diner?table_token={token}")
    return targets, [kind] * n
