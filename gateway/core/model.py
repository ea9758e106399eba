"""Plain data shared by the sans-I/O core: who a socket is, and what an event is."""

from __future__ import annotations

from typing import Literal

import attrs

Endpoint = Literal["waiter", "kitchen", "admin", "diner"]
ENDPOINTS: tuple[Endpoint, ...] = ("waiter", "kitchen", "admin", "diner")


def credential_param(endpoint: str) -> str:
    """The query parameter of ``/ws/<endpoint>`` that carries the socket's credential."""
    return "table_token" if endpoint == "diner" else "token"


@attrs.frozen
class Principal:
    """What a socket's credentials entitle it to; everything routing needs to know.

    Staff: ``user_id`` is the JWT ``sub``. Diners: ``user_id`` is ``-session_id`` (the existing
    gateway's pseudo user id, kept for the health counters) and ``session_id`` is set.
    ``sector_ids`` matters only for plain waiters (not admin, not kitchen): an empty set means
    "no assignment", which receives every sector-targeted event of its branches (D11).
    """

    endpoint: Endpoint
    tenant_id: int
    user_id: int
    branch_ids: frozenset[int]
    is_admin: bool = False
    is_kitchen: bool = False
    sector_ids: frozenset[int] = frozenset()
    #: True when ``sector_ids`` came from the token's ``sector_ids`` claim (the first source, §4.7).
    sectors_from_claim: bool = False
    session_id: int | None = None
    table_id: int | None = None
    #: Unix time at which the credential stops being valid.
    expires_at: float = float("inf")
    #: Staff token id and issue time, for the revocation keys (D3).
    jti: str | None = None
    issued_at: float | None = None
    roles: frozenset[str] = frozenset()

    @property
    def is_diner(self) -> bool:
        return self.endpoint == "diner"

    @property
    def is_plain_waiter(self) -> bool:
        """A staff socket on /ws/waiter that gets waiter (branch/sector) traffic."""
        return self.endpoint == "waiter" and not self.is_admin and not self.is_kitchen


@attrs.frozen
class Event:
    """A validated event envelope.

    ``frame_payload`` is the compact JSON that goes on the wire (the envelope as published,
    without gateway-internal fields, D13). ``dedup_key`` identifies the logical event across
    channels and the stream (D10): a digest of the envelope without ``ts``; ``ts_epoch`` is the
    publisher's ``ts`` as Unix seconds when it parses.
    """

    type: str
    tenant_id: int
    branch_id: int
    table_id: int | None
    session_id: int | None
    sector_id: int | None
    frame_payload: bytes
    dedup_key: bytes
    ts_epoch: float | None = None
