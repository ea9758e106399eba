"""The backend's event mix (see ``bench/routed.py``): planned from a seed before the run, encoded
and published the way the backend does, and read back the way the gateway's ``parse_event`` reads
it."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs

from bench.lib.constants import STREAM, STREAM_MAXLEN, TENANT
from bench.workloads.population import sector_of_session, session_id
from gateway.core.events import encode_envelope, envelope, parse_event
from gateway.core.model import Event

MAX_EVENT_BYTES = 65536

FAMILIES: dict[str, tuple[int, list[tuple[str, int]]]] = {
    "round": (
        26,
        [
            ("ROUND_PENDING", 3),
            ("ROUND_CONFIRMED", 2),
            ("ROUND_SUBMITTED", 2),
            ("ROUND_IN_KITCHEN", 2),
            ("ROUND_READY", 2),
            ("ROUND_SERVED", 2),
        ],
    ),
    "service_call": (
        10,
        [("SERVICE_CALL_CREATED", 5), ("SERVICE_CALL_ACKED", 3), ("SERVICE_CALL_CLOSED", 2)],
    ),
    "check": (
        8,
        [
            ("CHECK_REQUESTED", 3),
            ("CHECK_PAID", 2),
            ("PAYMENT_APPROVED", 2),
            ("PAYMENT_REJECTED", 1),
        ],
    ),
    "table": (
        8,
        [("TABLE_SESSION_STARTED", 2), ("TABLE_CLEARED", 1), ("TABLE_STATUS_CHANGED", 1)],
    ),
    "cart": (
        24,
        [
            ("CART_ITEM_ADDED", 4),
            ("CART_ITEM_UPDATED", 2),
            ("CART_ITEM_REMOVED", 1),
            ("CART_CLEARED", 1),
        ],
    ),
    "availability": (4, [("PRODUCT_AVAILABILITY_CHANGED", 1)]),
    "entity": (
        14,
        [
            ("ENTITY_CREATED", 2),
            ("ENTITY_UPDATED", 5),
            ("ENTITY_DELETED", 1),
            ("CASCADE_DELETE", 1),
        ],
    ),
}
ENTITY_TENANT_WIDE_SHARE = 0.10


@dataclass(frozen=True)
class Planned:
    """One logical event: its routing fields and the paths its copies take (None = stream)."""

    seq: int
    family: str
    type: str
    branch: int
    table: int | None
    session: int | None
    sector: int | None
    paths: tuple[str | None, ...]


def plan_event(seq: int, seed: int, branches: int) -> Planned:
    rng = random.Random(seed * 1_000_003 + seq)
    families = list(FAMILIES)
    family = rng.choices(families, weights=[FAMILIES[f][0] for f in families])[0]
    types = FAMILIES[family][1]
    kind = rng.choices([t for t, _ in types], weights=[w for _, w in types])[0]
    b = rng.randint(1, branches)
    j = rng.randint(1, 10)
    sid, sector = session_id(b, j), sector_of_session(b, j)
    table: int | None = sid
    session: int | None = sid
    sec: int | None = sector
    paths: tuple[str | None, ...]
    if family == "round":
        paths = (None,)
    elif family == "service_call":
        session = None
        paths = (None,)
    elif family == "check":
        sec = None
        paths = (None,)
    elif family == "table":
        paths = (f"sector:{sector}:waiters", f"branch:{b}:waiters", f"branch:{b}:admin")
    elif family == "cart":
        sec = None
        paths = (f"session:{sid}",)
    elif family == "availability":
        table = session = sec = None
        paths = (f"branch:{b}:waiters", f"branch:{b}:admin", None)
    else:  # entity
        table = session = sec = None
        if rng.random() < ENTITY_TENANT_WIDE_SHARE:
            b = 0
            paths = (f"tenant:{TENANT}:admin",)
        else:
            paths = (f"branch:{b}:admin",)
    return Planned(seq, family, kind, b, table, session, sec, paths)


ACTORS: dict[str, dict[str, object]] = {
    "round": {"user_id": None, "role": "DINER"},
    "service_call": {"user_id": None, "role": "DINER"},
    "check": {"user_id": None, "role": "DINER"},
    "table": {"user_id": 7, "role": "WAITER"},
    "cart": {"user_id": None, "role": "DINER"},
    "availability": {"user_id": 3, "role": "KITCHEN"},
    "entity": {"user_id": 1, "role": "ADMIN"},
}


def entity_of(p: Planned) -> dict[str, Any]:
    """A realistic entity; ``seq`` identifies the logical event on every socket."""
    n = p.seq
    if p.family == "round":
        return {"seq": n, "round_id": 50_000 + n, "round_number": n % 7 + 1, "items": n % 5 + 1}
    if p.family == "service_call":
        return {"seq": n, "call_id": 70_000 + n, "call_type": "WAITER"}
    if p.family == "check":
        return {"seq": n, "check_id": 90_000 + n, "total_cents": 1000 + n % 9000}
    if p.family == "table":
        return {"seq": n, "table_code": f"T{p.table}", "status": "ACTIVE"}
    if p.family == "cart":
        return {"seq": n, "item_id": n, "product_id": n % 400 + 1, "qty": n % 3 + 1, "by": "Ana"}
    if p.family == "availability":
        return {"seq": n, "product_id": n % 400 + 1, "is_available": n % 2 == 0}
    return {"seq": n, "entity_type": "product", "entity_id": n % 400 + 1, "name": "Café ☕"}


def encoded_event(p: Planned, entity: dict[str, Any], ts: str | None = None) -> bytes:
    """One copy of a logical event as the backend publishes it (``ts`` None: now)."""
    return encode_envelope(
        envelope(
            p.type,
            TENANT,
            p.branch,
            table_id=p.table,
            session_id=p.session,
            sector_id=p.sector,
            entity=entity,
            actor=ACTORS[p.family],
            ts=ts,
        )
    )


def routing_event(p: Planned) -> Event:
    """The routing fields exactly as the gateway's ``parse_event`` reads them (payload dropped)."""
    ev = parse_event(encoded_event(p, entity_of(p)), max_size=MAX_EVENT_BYTES)
    return attrs.evolve(ev, frame_payload=b"", dedup_key=b"", ts_epoch=None)


def publish_commands(p: Planned, t_pub: float, m_pub: float, jitter: bool) -> list[list[Any]]:
    """Redis commands for every copy of one logical event, in the backend's order."""
    entity = entity_of(p)
    entity["t"] = t_pub
    entity["m"] = m_pub
    base = datetime.now(UTC)
    commands: list[list[Any]] = []
    for k, path in enumerate(p.paths):
        ts = (base + timedelta(milliseconds=2 * k if jitter else 0)).isoformat()
        raw = encoded_event(p, entity, ts)
        if path is None:
            commands.append(["XADD", STREAM, "MAXLEN", "~", STREAM_MAXLEN, "*", "data", raw])
        else:
            commands.append(["PUBLISH", path, raw])
    return commands
