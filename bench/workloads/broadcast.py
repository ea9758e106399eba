"""The fan-out workload: one event type that reaches every waiter and admin of one branch, and
the count of what every socket received (missing, duplicates, order, latency)."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.lib.constants import TENANT
from gateway.core.events import encode_envelope, envelope

BRANCH = 2
#: Reaches A(b) and every waiter of the branch whatever its sectors (see gateway.core.routing).
EVENT_TYPE = "ROUND_PENDING"


def build_event(seq: int, t_pub: float, m_pub: float, pad: str) -> bytes:
    """``t``: time.time() at publish (wall clock); ``m``: time.monotonic(), what latency uses."""
    entity: dict[str, object] = {"seq": seq, "t": t_pub, "m": m_pub}
    if pad:
        entity["pad"] = pad
    return encode_envelope(envelope(EVENT_TYPE, TENANT, BRANCH, table_id=5, entity=entity))


def padding_for(target: int) -> str:
    """Padding so the event JSON is about ``target`` bytes long."""
    base = len(build_event(10**6, time.time(), time.monotonic(), ""))
    if target <= base:
        return ""
    # ',"pad":""' adds 10 bytes around the padding itself.
    return "x" * max(target - base - 10, 0)


@dataclass
class Deliveries:
    """What the sockets received: each event counted once per socket, latencies in ms."""

    delivered: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    other: int = 0
    closed: dict[str, int] = field(default_factory=dict)
    latencies: list[float] = field(default_factory=list)
    #: Per event with frames: (publish time since the first, p50 over sockets, max), ms.
    per_event: list[tuple[float, float, float]] = field(default_factory=list)
    last_recv: float = 0.0


def count_deliveries(
    results: Mapping[int, Mapping[str, Any]],
    pub_times: Sequence[float],
    t_first_pub: float,
) -> Deliveries:
    """Check every socket's frames (sequence numbers and receive times) against the publishes."""
    events = len(pub_times)
    out = Deliveries(last_recv=t_first_pub)
    latencies = out.latencies
    per_event: list[list[float]] = [[] for _ in range(events)]
    closed = out.closed
    last_recv = t_first_pub
    delivered = duplicates = out_of_order = other = 0
    for res in results.values():
        for s in res["sockets"]:
            seen: set[int] = set()
            prev = -1
            for seq, t in zip(s["seq"], s["t"], strict=True):
                if seq in seen or not 0 <= seq < events:
                    duplicates += 1
                    continue
                seen.add(seq)
                if seq < prev:
                    out_of_order += 1
                prev = seq
                lat = (t - pub_times[seq]) * 1000.0
                latencies.append(lat)
                per_event[seq].append(lat)
                last_recv = max(last_recv, t)
            delivered += len(seen)
            other += s["other"]
            if s["close"] is not None:
                closed[str(s["close"])] = closed.get(str(s["close"]), 0) + 1
    for seq, values in enumerate(per_event):
        if values:
            values.sort()
            out.per_event.append(
                (pub_times[seq] - t_first_pub, values[len(values) // 2], values[-1])
            )
    out.delivered, out.duplicates, out.out_of_order, out.other = (
        delivered,
        duplicates,
        out_of_order,
        other,
    )
    out.last_recv = last_recv
    return out


def check_positions(results: Mapping[int, Mapping[str, Any]], events: int) -> dict[str, Any]:
    """Protocol v2: every socket's first frame was the welcome, every event frame carried a
    ``_pos``, all sockets saw the same one for an event and no two events share one."""
    seen: dict[int, str] = {}
    conflicts = unpositioned = 0
    sockets = welcomed = 0
    for res in results.values():
        report = res.get("v2") or {}
        conflicts += int(report.get("conflicts", 0))
        unpositioned += int(report.get("unpositioned", 0))
        for seq_text, key in (report.get("positions") or {}).items():
            if seen.setdefault(int(seq_text), key) != key:
                conflicts += 1
        for s in res["sockets"]:
            if s["state"] in ("open", "closed"):
                sockets += 1
                welcomed += s.get("welcome") == 1
    shared = len(seen) - len(set(seen.values()))
    missing = sum(1 for seq in range(events) if seq not in seen)
    return {
        "sockets_welcomed": welcomed,
        "sockets_without_welcome": sockets - welcomed,
        "events_positioned": len(seen),
        "events_without_position": missing,
        "unpositioned_payloads": unpositioned,
        "position_conflicts": conflicts,
        "positions_shared": shared,
        "ok": sockets == welcomed and missing == 0 and not unpositioned and not conflicts and not shared,
    }
