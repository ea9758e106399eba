"""The amended routing matrix (§4.4, D8–D13) end to end: real Redis, real gateway, real sockets.

Every test opens one socket of every kind at once and publishes through the stream or a pub/sub
channel, then compares what each socket received against the exact expected audience: a missing
frame and a duplicate frame both fail.

Knowing when delivery is over without sleeping: the broadcaster's counters say when the event was
routed (``dispatch`` never checkpoints, so once a counter moved the frames are in every send
queue), and then each socket sends ``ping``. The pong is queued behind anything already queued
for that socket, so everything received before the pong is everything the event produced.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import trio
from helpers import compact

from gateway_testing import GatewayHandle, Publisher, WSClient

PONG = '{"type":"pong"}'

# Staff user ids are distinct per socket (the per-user limit is 3 sockets). Tenant 2 reuses
# tenant 1's ids on purpose: isolation must not depend on ids being globally unique.
STAFF: dict[str, dict[str, Any]] = {
    "admin": {"endpoint": "admin", "user": 11, "tenant": 1, "branches": (2,), "roles": ("ADMIN",)},
    "mgr_waiter": {"endpoint": "waiter", "user": 12, "tenant": 1, "branches": (2,), "roles": ("MANAGER",)},
    "waiter_s3": {"endpoint": "waiter", "user": 13, "tenant": 1, "branches": (2,), "roles": ("WAITER",),
                  "sector_ids": [3]},
    "waiter_s4": {"endpoint": "waiter", "user": 14, "tenant": 1, "branches": (2,), "roles": ("WAITER",),
                  "sector_ids": [4]},
    "waiter_none": {"endpoint": "waiter", "user": 15, "tenant": 1, "branches": (2,), "roles": ("WAITER",)},
    "kitchen": {"endpoint": "kitchen", "user": 16, "tenant": 1, "branches": (2,), "roles": ("KITCHEN",)},
    "mgr_kitchen": {"endpoint": "kitchen", "user": 17, "tenant": 1, "branches": (2,), "roles": ("MANAGER",)},
    "b3_waiter": {"endpoint": "waiter", "user": 18, "tenant": 1, "branches": (3,), "roles": ("WAITER",)},
    "b3_admin": {"endpoint": "admin", "user": 19, "tenant": 1, "branches": (3,), "roles": ("ADMIN",)},
    "t2_admin": {"endpoint": "admin", "user": 11, "tenant": 2, "branches": (2,), "roles": ("ADMIN",)},
    "t2_waiter": {"endpoint": "waiter", "user": 13, "tenant": 2, "branches": (2,), "roles": ("WAITER",)},
}
DINERS: dict[str, dict[str, int]] = {
    "diner9_a": {"tenant": 1, "branch": 2, "table": 5, "session": 9},
    "diner9_b": {"tenant": 1, "branch": 2, "table": 5, "session": 9},
    "diner10": {"tenant": 1, "branch": 2, "table": 6, "session": 10},
    "t2_diner9": {"tenant": 2, "branch": 2, "table": 5, "session": 9},
}
ALL = frozenset(STAFF) | frozenset(DINERS)

# The groups of the matrix in gateway/core/routing.py, for tenant 1 unless prefixed.
A2 = frozenset({"admin", "mgr_waiter", "mgr_kitchen"})
A_T1 = A2 | {"b3_admin"}
W2 = frozenset({"waiter_s3", "waiter_s4", "waiter_none"})
S3 = frozenset({"waiter_s3", "waiter_none"})
S4 = frozenset({"waiter_s4", "waiter_none"})
K2 = frozenset({"kitchen"})
D9 = frozenset({"diner9_a", "diner9_b"})
D10 = frozenset({"diner10"})
D_B2 = D9 | D10
T2 = frozenset({"t2_admin", "t2_waiter", "t2_diner9"})

ENTITY = {"round_id": 41, "round_number": 2, "note": "Mesa junto a la ventana — café ☕"}
ACTOR = {"user_id": 7, "role": "WAITER"}


def with_internal_fields(env: Mapping[str, Any]) -> dict[str, Any]:
    """The envelope as the existing gateway stamped it; one field mid-envelope, one at the end."""
    out: dict[str, Any] = {}
    for key, value in env.items():
        out[key] = value
        if key == "entity":
            out["_enqueued_at"] = 1769860800.1234
    out["_retry_count"] = 1
    return out


def iso(moment: datetime) -> str:
    return moment.isoformat()


Mesh = dict[str, WSClient]


@pytest.fixture
async def mesh(gateway: GatewayHandle) -> Mesh:
    sockets: Mesh = {}
    for name, spec in STAFF.items():
        token = gateway.staff_token(
            user=spec["user"], tenant=spec["tenant"], branches=spec["branches"], roles=spec["roles"],
            **({"sector_ids": spec["sector_ids"]} if "sector_ids" in spec else {}),
        )
        sockets[name] = await gateway.connect(spec["endpoint"], token)
    for name, spec in DINERS.items():
        sockets[name] = await gateway.connect("diner", gateway.table_token(**spec))
    await gateway.connected(len(sockets))
    return sockets


def counters(gateway: GatewayHandle) -> tuple[int, int]:
    b = gateway.gw.broadcaster
    return b.delivered_events, b.duplicate_events


async def routed(gateway: GatewayHandle, before: tuple[int, int], *, delivered: int, duplicates: int = 0) -> None:
    """Wait until ``delivered + duplicates`` arrivals were dispatched, then check the split."""
    expected = delivered + duplicates
    with trio.fail_after(15):
        while True:
            if sum(counters(gateway)) - sum(before) >= expected:
                break
            await trio.sleep(0.01)
    now = counters(gateway)
    assert (now[0] - before[0], now[1] - before[1]) == (delivered, duplicates)


async def drain(sockets: Mesh) -> dict[str, list[str]]:
    """Everything each socket received up to its answer to a ``ping`` sent now."""
    out: dict[str, list[str]] = {}

    async def one(name: str, client: WSClient) -> None:
        frames: list[str] = []
        await client.ws.send_message("ping")
        while True:
            message = await client.ws.get_message()
            if message == PONG:
                break
            frames.append(message)
        out[name] = frames

    with trio.fail_after(15):
        async with trio.open_nursery() as nursery:
            for name, client in sockets.items():
                nursery.start_soon(one, name, client)
    return out


def assert_audience(received: Mapping[str, list[str]], audience: frozenset[str], frame: bytes,
                    copies: int = 1) -> None:
    counts = {name: len(frames) for name, frames in received.items()}
    expected = {name: (copies if name in audience else 0) for name in ALL}
    assert counts == expected
    for name in audience:
        for message in received[name]:
            assert message.encode("utf-8") == frame, name


# (id, envelope arguments, channel for the pub/sub variant, expected audience)
ROWS: list[tuple[str, dict[str, Any], str, frozenset[str]]] = [
    ("round_pending_branch_wide", dict(event_type="ROUND_PENDING", tenant_id=1, branch_id=2, table_id=5,
                                       session_id=9, sector_id=3),
     "branch:2:waiters", A2 | W2 | D9),
    ("round_confirmed_sector_3", dict(event_type="ROUND_CONFIRMED", tenant_id=1, branch_id=2, table_id=5,
                                      sector_id=3),
     "sector:3:waiters", A2 | S3),
    ("round_submitted_kitchen", dict(event_type="ROUND_SUBMITTED", tenant_id=1, branch_id=2, table_id=5,
                                     session_id=9),
     "branch:2:kitchen", A2 | W2 | K2 | D9),
    ("round_in_kitchen", dict(event_type="ROUND_IN_KITCHEN", tenant_id=1, branch_id=2, table_id=5, session_id=9),
     "branch:2:kitchen", A2 | W2 | K2 | D9),
    ("round_ready_sector_4", dict(event_type="ROUND_READY", tenant_id=1, branch_id=2, table_id=5, session_id=9,
                                  sector_id=4),
     "sector:4:waiters", A2 | S4 | K2 | D9),
    ("round_served", dict(event_type="ROUND_SERVED", tenant_id=1, branch_id=2, table_id=5, session_id=9),
     "session:9", A2 | W2 | K2 | D9),
    ("check_requested", dict(event_type="CHECK_REQUESTED", tenant_id=1, branch_id=2, table_id=5, session_id=9),
     "branch:2:waiters", A2 | W2 | D9),
    ("check_paid_sector_3", dict(event_type="CHECK_PAID", tenant_id=1, branch_id=2, table_id=5, session_id=9,
                                 sector_id=3),
     "session:9", A2 | S3 | D9),
    ("payment_approved", dict(event_type="PAYMENT_APPROVED", tenant_id=1, branch_id=2, table_id=5, session_id=9),
     "session:9", A2 | W2 | D9),
    ("payment_rejected", dict(event_type="PAYMENT_REJECTED", tenant_id=1, branch_id=2, table_id=5, session_id=9),
     "session:9", A2 | W2 | D9),
    ("payment_failed", dict(event_type="PAYMENT_FAILED", tenant_id=1, branch_id=2, table_id=6, session_id=10),
     "session:10", A2 | W2 | D10),
    ("table_session_started_sector_3", dict(event_type="TABLE_SESSION_STARTED", tenant_id=1, branch_id=2,
                                            table_id=6, session_id=10, sector_id=3),
     "sector:3:waiters", A2 | W2 | D10),
    ("service_call_sector_3", dict(event_type="SERVICE_CALL_CREATED", tenant_id=1, branch_id=2, table_id=5,
                                   sector_id=3),
     "branch:2:waiters", A2 | S3),
    # A sector id never reaches a waiter of another branch; branch 3's waiter has no assignment.
    ("service_call_branch_3", dict(event_type="SERVICE_CALL_CREATED", tenant_id=1, branch_id=3, table_id=8,
                                   sector_id=3),
     "branch:3:waiters", frozenset({"b3_admin", "b3_waiter"})),
    ("cart_item_added_session_9", dict(event_type="CART_ITEM_ADDED", tenant_id=1, branch_id=2, table_id=5,
                                       session_id=9),
     "session:9", A2 | W2 | D9),
    # Without a branch only the tenant's admins and the session's diners qualify: no waiter at all.
    ("cart_item_added_no_branch", dict(event_type="CART_ITEM_ADDED", tenant_id=1, branch_id=0, table_id=5,
                                       session_id=9),
     "session:9", A_T1 | D9),
    ("product_availability", dict(event_type="PRODUCT_AVAILABILITY_CHANGED", tenant_id=1, branch_id=2),
     "branch:2:waiters", A2 | W2 | D_B2),
    # Admin-only even when it names a session and a sector.
    ("entity_updated_branch_2", dict(event_type="ENTITY_UPDATED", tenant_id=1, branch_id=2, session_id=9,
                                     sector_id=3),
     "branch:2:admin", A2),
    ("entity_created_tenant_wide", dict(event_type="ENTITY_CREATED", tenant_id=1, branch_id=0),
     "tenant:1:admin", A_T1),
    ("unknown_type", dict(event_type="SOMETHING_NEW_V2", tenant_id=1, branch_id=2, table_id=5, session_id=9),
     "branch:2:waiters", A2 | W2 | D9),
    # Tenant 2 reuses branch 2, session 9 and user ids; only tenant 2's sockets may see it.
    ("tenant_2_round_ready", dict(event_type="ROUND_READY", tenant_id=2, branch_id=2, table_id=5, session_id=9),
     "branch:2:kitchen", T2),
]


@pytest.mark.parametrize("transport", ["stream", "pubsub"])
@pytest.mark.parametrize(("kwargs", "channel", "audience"), [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
async def test_routing_row(gateway: GatewayHandle, publisher: Publisher, mesh: Mesh, transport: str,
                           kwargs: dict[str, Any], channel: str, audience: frozenset[str]) -> None:
    env = publisher.envelope(entity=ENTITY, actor=ACTOR, **kwargs)
    published = with_internal_fields(env)
    before = counters(gateway)
    if transport == "stream":
        await publisher.stream_event(published)
    else:
        await publisher.channel_event(channel, published)
    await routed(gateway, before, delivered=1)
    received = await drain(mesh)
    assert_audience(received, audience, compact(env))
    if env["tenant_id"] == 1:
        assert not any(received[name] for name in T2)


@pytest.mark.parametrize("transport", ["stream", "pubsub"])
async def test_tenant_one_traffic_never_reaches_tenant_two(gateway: GatewayHandle, publisher: Publisher,
                                                          mesh: Mesh, transport: str) -> None:
    """Every row's tenant-1 event at once: tenant 2's sockets, same ids, receive nothing."""
    items: list[tuple[str | None, dict[str, Any]]] = []
    for _name, kwargs, channel, _audience in ROWS:
        if kwargs["tenant_id"] == 1:
            items.append((None if transport == "stream" else channel,
                          with_internal_fields(publisher.envelope(entity=ENTITY, actor=ACTOR, **kwargs))))
    before = counters(gateway)
    await publisher.many(items)
    await routed(gateway, before, delivered=len(items))
    received = await drain(mesh)
    assert {name: received[name] for name in T2} == {name: [] for name in T2}
    assert all(json.loads(m)["tenant_id"] == 1 for name in ALL - T2 for m in received[name])


# --- D10: one logical event, several Redis deliveries ------------------------------------------

TABLE_EVENT = dict(event_type="TABLE_SESSION_STARTED", tenant_id=1, branch_id=2, table_id=5, session_id=9,
                   sector_id=3, entity={"table_code": "A1"}, actor={"user_id": 7, "role": "WAITER"})
#: ``publish_table_event``: sector channel + branch waiters + branch admin.
TABLE_CHANNELS: list[str | None] = ["sector:3:waiters", "branch:2:waiters", "branch:2:admin"]
AVAILABILITY_EVENT = dict(event_type="PRODUCT_AVAILABILITY_CHANGED", tenant_id=1, branch_id=2,
                          entity={"product_id": 12, "is_available": False}, actor={"user_id": 3, "role": "KITCHEN"})
#: The kitchen availability route: branch waiters + branch admin on pub/sub, and the stream.
AVAILABILITY_PATHS: list[str | None] = ["branch:2:waiters", "branch:2:admin", None]


@pytest.mark.parametrize("reserialised", [False, True], ids=["same_bytes", "ts_differs_by_ms"])
@pytest.mark.parametrize(
    ("kwargs", "paths", "audience"),
    [(TABLE_EVENT, TABLE_CHANNELS, A2 | W2 | D9), (AVAILABILITY_EVENT, AVAILABILITY_PATHS, A2 | W2 | D_B2)],
    ids=["publish_table_event", "product_availability"],
)
async def test_copies_on_several_paths_are_delivered_once(
    gateway: GatewayHandle, publisher: Publisher, mesh: Mesh, kwargs: dict[str, Any],
    paths: list[str | None], audience: frozenset[str], reserialised: bool,
) -> None:
    base = datetime.now(UTC)
    copies: list[dict[str, Any]] = []
    for i in range(len(paths)):
        # The backend serialises once per PUBLISH, so each copy may carry a slightly later ts.
        ts = iso(base + timedelta(milliseconds=3 * i)) if reserialised else iso(base)
        copies.append(publisher.envelope(ts=ts, **kwargs))
    before = counters(gateway)
    await publisher.many(list(zip(paths, copies, strict=True)))
    await routed(gateway, before, delivered=1, duplicates=len(paths) - 1)
    received = await drain(mesh)
    counts = {name: len(frames) for name, frames in received.items()}
    assert counts == {name: (1 if name in audience else 0) for name in ALL}
    # Whichever copy won, every recipient got that one copy's exact bytes.
    frames = {received[name][0].encode("utf-8") for name in audience}
    assert len(frames) == 1
    assert frames.pop() in {compact(c) for c in copies}


async def test_identical_events_seconds_apart_are_both_delivered(
    gateway: GatewayHandle, publisher: Publisher, mesh: Mesh
) -> None:
    """Two service calls with the same content, 5 s apart by ``ts``, each sent on two paths."""
    kwargs = dict(event_type="SERVICE_CALL_CREATED", tenant_id=1, branch_id=2, table_id=5, sector_id=3,
                  entity={"call_id": 77, "call_type": "WAITER"}, actor={"user_id": None, "role": "DINER"})
    base = datetime.now(UTC)
    first = publisher.envelope(ts=iso(base), **kwargs)
    second = publisher.envelope(ts=iso(base + timedelta(seconds=5)), **kwargs)
    before = counters(gateway)
    await publisher.many([(None, first), ("branch:2:waiters", first),
                          (None, second), ("branch:2:waiters", second)])
    await routed(gateway, before, delivered=2, duplicates=2)
    received = await drain(mesh)
    audience = A2 | S3
    assert {name: len(f) for name, f in received.items()} == {name: (2 if name in audience else 0) for name in ALL}
    for name in audience:
        assert sorted(m.encode("utf-8") for m in received[name]) == sorted([compact(first), compact(second)])
