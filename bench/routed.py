#!/usr/bin/env python3
"""Routed benchmark: the real event mix to a restaurant-shaped population, every frame checked.

    .venv/bin/python bench/routed.py [--branches 100] [--rate 200] [--duration 30] [--clients 2]

Population, tenant 1, per branch *b* (1..B): 2 admins (``/ws/admin``, ADMIN and MANAGER), 6
waiters over 3 sectors (``/ws/waiter``, 2 per sector, ``sector_ids`` claim), 1 kitchen
(``/ws/kitchen``) and 20 diners over 10 table sessions (``/ws/diner``, 2 per session): 29 sockets
per branch, 2,900 for 100 branches, every staff socket with its own user id.

Events, at R per second on an absolute schedule, drawn (seeded) from the backend's mix and
published the way the backend does:

| family | types | fields | path(s) |
|---|---|---|---|
| round | ROUND_PENDING/CONFIRMED/SUBMITTED/IN_KITCHEN/READY/SERVED | branch, table, session, sector | stream |
| service_call | SERVICE_CALL_CREATED/ACKED/CLOSED | branch, table, sector | stream |
| check | CHECK_REQUESTED/PAID, PAYMENT_APPROVED/REJECTED | branch, table, session | stream |
| table | TABLE_SESSION_STARTED, TABLE_CLEARED, TABLE_STATUS_CHANGED | branch, table, session, sector | 3 copies: ``sector:{s}:waiters``, ``branch:{b}:waiters``, ``branch:{b}:admin`` |
| cart | CART_ITEM_ADDED/UPDATED/REMOVED, CART_CLEARED | branch, table, session | ``session:{id}`` |
| availability | PRODUCT_AVAILABILITY_CHANGED | branch | 3 copies: ``branch:{b}:waiters``, ``branch:{b}:admin``, stream |
| entity | ENTITY_CREATED/UPDATED/DELETED, CASCADE_DELETE | branch (10 %: branch 0) | ``branch:{b}:admin`` / ``tenant:1:admin`` |

Copies of one logical event are identical except ``ts``: for every other event each copy's
``ts`` is 2 ms later than the previous one (the backend serialises once per PUBLISH). Each
logical event must reach each socket once.

Verification: each socket's Principal is derived from its token with the gateway's own
``verify_staff_token``/``staff_principal`` (``verify_table_token``/``diner_principal``), each
event's routing fields with ``parse_event``, and the expected audience with
``gateway.core.routing.receives``. Per socket, misses = expected − received and extras = received −
expected + duplicates; both must be 0. Sockets whose principals differ only in user id, jti and
times get the same answer from ``receives`` (it does not read them), so it is evaluated once per
such class and checked on a sample of sockets with their own principals.

Prints progress on stderr, ONE JSON line on stdout, and writes the JSON and a PNG under
``bench/results/``. The gateway, redis-server and clients are always stopped in ``finally``.
``soak.py`` runs this same workload for minutes (``run_workload``).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import queue
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attrs
from _common import (
    ClientInbox,
    ClientProcess,
    CpuSnapshot,
    Opening,
    Resp,
    Stack,
    add_profile_args,
    add_run_args,
    bottleneck,
    cpu_cores,
    dispatch_stats,
    finish_log_dir,
    finish_profile,
    host_info,
    instrumented_gateway,
    log,
    metric_sum,
    percentiles,
    plot_per_event,
    proc_cpu_seconds,
    proc_memory,
    rounded,
    run_main,
    save_figure,
    save_result,
    stamp,
    start_clients,
    start_py_spy,
    stop_clients,
    stop_process,
    subplots,
    wait_for_quiet_host,
)

from gateway.core import routing
from gateway.core.auth import (
    diner_principal,
    staff_principal,
    verify_staff_token,
    verify_table_token,
)
from gateway.core.events import encode_envelope, envelope, parse_event
from gateway.core.model import Event, Principal
from gateway.core.tokens import mint_staff_token, mint_table_token
from gateway.settings import Settings

TENANT = 1
STREAM = "events:critical"
STREAM_MAXLEN = 50000
MAX_EVENT_BYTES = 65536
KINDS = ("admin", "waiter", "kitchen", "diner")

# --------------------------------------------------------------------------------------------
# Population
# --------------------------------------------------------------------------------------------


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
        kind: str, endpoint: str, user: int, branch: int, roles: list[str], **kw: Any
    ) -> None:
        token = mint_staff_token(
            secret=settings.jwt_secret,
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            user_id=user,
            tenant_id=TENANT,
            branch_ids=[branch],
            roles=roles,
            ttl=ttl,
            **kw,
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
                token = mint_table_token(
                    secret=settings.table_token_secret,
                    tenant_id=TENANT,
                    branch_id=b,
                    table_id=sid,
                    session_id=sid,
                    ttl=ttl,
                )
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


# --------------------------------------------------------------------------------------------
# Event mix
# --------------------------------------------------------------------------------------------

#: family -> (weight, [(type, weight)]); see the module docstring for fields and paths.
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


# --------------------------------------------------------------------------------------------
# Expected audiences
# --------------------------------------------------------------------------------------------


@dataclass
class Expectation:
    class_of: list[int]  # socket index -> class index
    class_seqs: list[list[int]]  # class index -> expected seqs, ascending
    classes: int
    seconds: float
    sample_checked: int


def expected_audiences(
    population: list[SocketSpec], plans: list[Planned], *, sample: int = 200, seed: int = 1
) -> Expectation:
    """Per socket, the seqs ``gateway.core.routing.receives`` says it must get."""
    t0 = time.monotonic()
    class_index: dict[Principal, int] = {}
    class_of: list[int] = []
    reps: list[Principal] = []
    for spec in population:
        key = routing_class(spec.principal)
        idx = class_index.get(key)
        if idx is None:
            idx = class_index[key] = len(reps)
            reps.append(spec.principal)
        class_of.append(idx)
    class_seqs: list[list[int]] = [[] for _ in reps]
    memo: dict[Event, list[int]] = {}
    events: list[Event] = []
    for p in plans:
        ev = routing_event(p)
        events.append(ev)
        members = memo.get(ev)
        if members is None:
            members = memo[ev] = [c for c, rep in enumerate(reps) if routing.receives(ev, rep)]
        for c in members:
            class_seqs[c].append(p.seq)
    # The class shortcut, checked: sampled sockets with their own principals.
    rng = random.Random(seed)
    picked = rng.sample(range(len(population)), min(sample, len(population)))
    for i in picked:
        own = population[i].principal
        mine = [p.seq for p, ev in zip(plans, events, strict=True) if routing.receives(ev, own)]
        if mine != class_seqs[class_of[i]]:
            raise AssertionError(f"socket {i}: the class shortcut disagrees with receives()")
    return Expectation(class_of, class_seqs, len(reps), time.monotonic() - t0, len(picked))


# --------------------------------------------------------------------------------------------
# The workload (shared with soak.py)
# --------------------------------------------------------------------------------------------


def add_workload_args(p: argparse.ArgumentParser, *, duration_default: float) -> None:
    p.add_argument("--branches", type=int, default=100, help="branches of 29 sockets (default 100)")
    p.add_argument("--rate", type=float, default=200.0, help="logical events per second (200)")
    p.add_argument(
        "--duration",
        type=float,
        default=duration_default,
        help=f"seconds of publishing (default {duration_default:g})",
    )
    p.add_argument("--clients", type=int, default=2, help="client processes (default 2)")
    p.add_argument("--seed", type=int, default=1, help="seed of the event mix (default 1)")
    p.add_argument(
        "--ping-interval",
        type=float,
        default=0.0,
        help="each socket sends `ping` this often, in seconds (0: never; the heartbeat "
        "timeout is then raised to 3600 s)",
    )
    p.add_argument("--connect-timeout", type=float, default=90.0)
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=20.0,
        help="seconds after the last publish to wait for the last frame",
    )
    p.add_argument(
        "--grace",
        type=float,
        default=2.0,
        help="seconds to keep listening after every socket is complete, to catch extras",
    )
    p.add_argument(
        "--sample-interval",
        type=float,
        default=1.0 if duration_default <= 60 else 5.0,
        help="RSS/CPU sampling, s",
    )
    p.add_argument(
        "--gc-log",
        action="store_true",
        help="run the gateway in memory.py's instrumented mode and report garbage-collector "
        "pauses (gen 2 collections walk every object, so they grow with the socket count)",
    )
    add_profile_args(p, "py-spy the gateway while publishing (adds latency: for the profile only)")
    add_run_args(p)


def check_workload_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not 1 <= args.branches <= 300:
        p.error("--branches must be within 1..300 (29 sockets each)")
    if not 0 < args.rate <= 5000:
        p.error("--rate must be within (0, 5000]")
    if not 0 < args.duration <= 4 * 3600:
        p.error("--duration must be within (0, 14400] seconds")
    if not 1 <= args.clients <= 8:
        p.error("--clients must be within 1..8")
    if args.rate * args.duration > 3_000_000:
        p.error("--rate × --duration must stay below 3 million events")


@dataclass
class Workload:
    """What a run produced, for the report of routed.py or soak.py."""

    args: argparse.Namespace
    population: list[SocketSpec]
    plans: list[Planned]
    expectation: Expectation
    pub_m: list[float]
    t_first_pub: float
    t_last_pub: float
    results: dict[int, dict[str, Any]]
    util: dict[str, Any]
    samples: list[dict[str, Any]]
    connect: dict[str, Any]
    metrics_before: dict[str, float]
    metrics_after: dict[str, float]
    complete: bool
    max_lag: float
    code_identity: dict[str, Any]
    host_busy_before: float
    rss_before_connect_kb: int | None
    rss_after_connect_kb: int | None
    gc: dict[str, Any] | None = None
    profile: dict[str, Any] | None = None


def run_workload(args: argparse.Namespace) -> Workload:
    """Start redis, the gateway and clients; publish; collect. Everything stopped in ``finally``."""
    log_dir = tempfile.mkdtemp(prefix="gw-bench-")
    settings = Settings.from_env({})
    population = build_population(args.branches, settings=settings)
    n_events = max(round(args.rate * args.duration), 1)
    plans = [plan_event(seq, args.seed, args.branches) for seq in range(n_events)]
    log(f"{len(population)} sockets, {n_events} events planned; computing expected audiences")
    expectation = expected_audiences(population, plans)
    wants = [len(expectation.class_seqs[c]) for c in expectation.class_of]
    log(
        f"expected {sum(wants)} frames over {expectation.classes} routing classes "
        f"({expectation.seconds:.1f} s; {expectation.sample_checked} sockets re-checked one by one)"
    )
    stack: Stack | None = None
    clients: list[ClientProcess] = []
    resp: Resp | None = None
    inbox: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
    ok = False
    gc_dir = tempfile.mkdtemp(prefix="gw-bench-gc-") if args.gc_log else None
    gc_log = os.path.join(gc_dir, "gc.json") if gc_dir else None
    factory = instrumented_gateway(gc_log=gc_log) if gc_log else None
    w: Workload | None = None
    spy: subprocess.Popen[bytes] | None = None
    try:
        host_busy = wait_for_quiet_host(args.wait_idle, args.idle_threshold)
        env = {
            "WS_MAX_CONNECTIONS_PER_USER": "100",
            "WS_MAX_TOTAL_CONNECTIONS": str(len(population) + 1000),
            "WS_HEARTBEAT_TIMEOUT": "3600" if args.ping_interval <= 0 else "60",
        }
        stack = Stack(env, log_dir=log_dir, gateway_ref=args.gateway_ref, cmd_factory=factory)
        gw = stack.start()
        assert stack.redis is not None
        time.sleep(1.0)
        rss_before = (proc_memory(gw.pid) or {}).get("VmRSS")

        # --- sockets ---------------------------------------------------------------------------
        duration = n_events / args.rate
        deadline = args.connect_timeout + duration + args.drain_timeout + args.grace + 120
        opening = Opening(gw)
        start_clients(
            clients,
            args.clients,
            len(population),
            inbox=inbox,
            log_dir=log_dir,
            per_socket={
                "tokens": ["-"] * len(population),
                "targets": [spec.target for spec in population],
                "expected": wants,
            },
            common={
                "url": f"{gw.ws_url}/ws/waiter",
                "events": 0,
                "connect_timeout": args.connect_timeout,
                "deadline": deadline,
                "ping_interval": args.ping_interval,
            },
        )
        log(f"{args.clients} client processes opening {len(population)} sockets")
        opening.wait(clients, inbox, args.connect_timeout, register_timeout=args.connect_timeout)
        log(opening.describe())
        if opening.failed or opening.registered < len(population):
            raise RuntimeError(
                f"only {opening.registered} of {len(population)} sockets registered "
                f"({opening.errors}); log:\n{gw.log_tail()}"
            )
        time.sleep(1.0)
        rss_after_connect = (proc_memory(gw.pid) or {}).get("VmRSS")
        connect = {"sockets": len(population), **opening.summary()}

        # --- publish ---------------------------------------------------------------------------
        resp = Resp("127.0.0.1", stack.redis.port)
        pids = {"gateway": gw.pid, "redis": stack.redis_pid, "publisher": os.getpid()}
        pids.update({f"client{c.k}": c.pid for c in clients})
        box = ClientInbox(inbox, clients)
        samples: list[dict[str, Any]] = []
        gw_pid, redis_pid = gw.pid, stack.redis_pid

        def sample(t_rel: float) -> None:
            mem = proc_memory(gw_pid) or {}
            samples.append(
                {
                    "t": round(t_rel, 3),
                    "rss_kb": mem.get("VmRSS"),
                    "anon_kb": mem.get("RssAnon"),
                    "redis_rss_kb": (proc_memory(redis_pid) or {}).get("VmRSS"),
                    "gateway_cpu_s": proc_cpu_seconds(gw_pid),
                    "redis_cpu_s": proc_cpu_seconds(redis_pid),
                    "frames": box.frames(),
                }
            )

        metrics_before = gw.metrics()
        pub_m = [0.0] * n_events
        max_lag = 0.0
        if args.profile:
            assert gw.pid is not None
            spy = start_py_spy(
                gw.pid,
                math.ceil(duration + args.drain_timeout + 15),
                args.results_dir / f"{args.base_name}.folded",
                rate=args.profile_rate,
            )
        snap0 = CpuSnapshot(pids)
        t0 = time.monotonic()
        sample(0.0)
        next_sample = t0 + args.sample_interval
        next_report = t0 + 5.0
        for seq, plan in enumerate(plans):
            max_lag = max(max_lag, box.wait_until(t0 + seq / args.rate))
            m_pub = time.monotonic()
            pub_m[seq] = m_pub
            replies = resp.pipeline(publish_commands(plan, time.time(), m_pub, seq % 2 == 1))
            for r in replies:
                if isinstance(r, Exception):
                    raise RuntimeError(f"redis refused event {seq}: {r}")
            now = time.monotonic()
            if now >= next_sample:
                sample(now - t0)
                next_sample += args.sample_interval
            if now >= next_report:
                box.pump(0)
                log(
                    f"published {seq + 1}/{n_events}, received {box.frames()} frames, "
                    f"gateway RSS {(samples[-1]['rss_kb'] or 0) / 1024:.1f} MB"
                )
                next_report = now + (5.0 if args.duration <= 120 else 30.0)
                if not gw.alive():
                    raise RuntimeError(f"gateway died during the run; log:\n{gw.log_tail()}")
        t_last_pub = time.monotonic()
        log(f"published {n_events} events in {t_last_pub - t0:.1f} s; waiting for the last frames")

        def sample_when_due() -> None:
            nonlocal next_sample
            if time.monotonic() >= next_sample:
                sample(time.monotonic() - t0)
                next_sample += args.sample_interval

        active = [c.k for c in clients]
        box.drain(active, args.drain_timeout, sum(wants), sample_when_due)
        snap1 = CpuSnapshot(pids)
        if spy is not None and spy.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        sample(time.monotonic() - t0)
        complete = all(k in box.done for k in active)
        # Keep listening a little: a copy delivered twice would arrive now.
        box.pump(args.grace)
        metrics_after = gw.metrics()
        box.collect(clients, 120)
        profile = None
        if spy is not None:
            profile = finish_profile(spy, args.results_dir, args.base_name)
            spy = None
        ok = True
        w = Workload(
            args=args,
            population=population,
            plans=plans,
            expectation=expectation,
            pub_m=pub_m,
            t_first_pub=t0,
            t_last_pub=t_last_pub,
            results=box.results,
            util=snap0.delta(snap1),
            samples=samples,
            connect=connect,
            metrics_before=metrics_before,
            metrics_after=metrics_after,
            complete=complete,
            max_lag=max_lag,
            code_identity=stack.code_identity,
            host_busy_before=host_busy,
            rss_before_connect_kb=rss_before,
            rss_after_connect_kb=rss_after_connect,
            profile=profile,
        )
    finally:
        if spy is not None:
            stop_process(spy)
        stop_clients(clients, timeout=5)
        if resp is not None:
            resp.close()
        if stack is not None:
            stack.close()
        finish_log_dir(log_dir, ok)
    assert w is not None  # an exception in the try propagates past this point
    if gc_log and gc_dir:
        from memory import gc_summary, wait_for_file

        if wait_for_file(gc_log, 10):  # written by the instrumented gateway as it exits
            w.gc = gc_summary(gc_log, w.t_first_pub, w.t_last_pub + args.drain_timeout)
        shutil.rmtree(gc_dir, ignore_errors=True)
    return w


@dataclass
class Analysis:
    misses: int
    extras: int
    duplicates: int
    delivered: int
    expected: int
    reordered: int
    sockets_with_misses: int
    sockets_with_extras: int
    latencies: list[float]  # ms, every expected frame's first arrival
    lat_seq: list[int]  # the seq of each latency
    by_kind: dict[str, list[float]]
    by_family: dict[str, list[float]]
    last_recv: float
    examples: list[dict[str, Any]]
    pongs: int
    closed: dict[str, int]


def analyse(w: Workload) -> Analysis:
    exp = w.expectation
    class_sets = [set(s) for s in exp.class_seqs]
    family_of = [p.family for p in w.plans]
    pub_m = w.pub_m
    misses = extras = duplicates = delivered = reordered = 0
    with_misses = with_extras = pongs = 0
    latencies: list[float] = []
    lat_seq: list[int] = []
    by_kind: dict[str, list[float]] = defaultdict(list)
    by_family: dict[str, list[float]] = defaultdict(list)
    last_recv = w.t_first_pub
    examples: list[dict[str, Any]] = []
    closed: dict[str, int] = defaultdict(int)
    for res in w.results.values():
        for s in res["sockets"]:
            spec = w.population[s["i"]]
            want = class_sets[exp.class_of[s["i"]]]
            seen: set[int] = set()
            extra_here = 0
            prev = -1
            kind_lat = by_kind[spec.kind]
            pongs += s.get("pongs", 0)
            if s["close"] is not None:
                closed[str(s["close"])] += 1
            for seq, t in zip(s["seq"], s["t"], strict=True):
                if seq in seen:
                    duplicates += 1
                    extra_here += 1
                    continue
                seen.add(seq)
                if seq < prev:
                    reordered += 1
                prev = max(prev, seq)
                if seq not in want:
                    extra_here += 1
                    if len(examples) < 10:
                        examples.append({"socket": s["i"], "kind": spec.kind, "extra_seq": seq})
                    continue
                lat = (t - pub_m[seq]) * 1000.0
                latencies.append(lat)
                lat_seq.append(seq)
                kind_lat.append(lat)
                by_family[family_of[seq]].append(lat)
                last_recv = max(last_recv, t)
            missed_here = len(want - seen)
            if missed_here and len(examples) < 10:
                examples.append(
                    {
                        "socket": s["i"],
                        "kind": spec.kind,
                        "missed": sorted(want - seen)[:5],
                        "missed_count": missed_here,
                    }
                )
            delivered += len(seen & want)
            misses += missed_here
            extras += extra_here
            with_misses += bool(missed_here)
            with_extras += bool(extra_here)
    expected_total = sum(len(exp.class_seqs[c]) for c in exp.class_of)
    return Analysis(
        misses,
        extras,
        duplicates,
        delivered,
        expected_total,
        reordered,
        with_misses,
        with_extras,
        latencies,
        lat_seq,
        dict(by_kind),
        dict(by_family),
        last_recv,
        examples,
        pongs,
        dict(closed),
    )


def summary(w: Workload, a: Analysis, bench: str) -> dict[str, Any]:
    """The fields routed.py and soak.py share."""
    args = w.args
    util = w.util
    gateway_cpu = util["cpu_s"].get("gateway", 0.0)
    window = max(a.last_recv - w.t_first_pub, 1e-9)
    n_events = len(w.plans)
    mb, ma = w.metrics_before, w.metrics_after

    def delta(name: str) -> float:
        return round(metric_sum(ma, name) - metric_sum(mb, name), 1)

    copies = sum(len(p.paths) for p in w.plans)
    lat = percentiles(a.latencies)
    neck = bottleneck(util, ncpu=os.cpu_count() or 1)
    families = {f: sum(1 for p in w.plans if p.family == f) for f in FAMILIES}
    return {
        "bench": bench,
        "sockets": len(w.population),
        "branches": args.branches,
        "events": n_events,
        "copies_published": copies,
        "rate": args.rate,
        "duration_s": round(n_events / args.rate, 1),
        "expected_frames": a.expected,
        "delivered": a.delivered,
        "misses": a.misses,
        "extras": a.extras,
        "duplicates": a.duplicates,
        "sockets_with_misses": a.sockets_with_misses,
        "sockets_with_extras": a.sockets_with_extras,
        "correct": a.misses == 0 and a.extras == 0,
        "complete": w.complete,
        "latency_ms": rounded(lat),
        "latency_p99_ms_by_kind": {
            k: round(percentiles(v, (99,))["p99"], 2) for k, v in sorted(a.by_kind.items()) if v
        },
        "latency_p99_ms_by_family": {
            k: round(percentiles(v, (99,))["p99"], 2) for k, v in sorted(a.by_family.items()) if v
        },
        "frames_per_s": round(a.delivered / window, 1),
        "server_cpu_us_per_frame": round(gateway_cpu / a.delivered * 1e6, 2)
        if a.delivered
        else None,
        "server_cpu_us_per_event": round(gateway_cpu / n_events * 1e6, 1),
        "server_cpu_split_us_per_frame": {
            "user": round(util["user_s"].get("gateway", 0.0) / max(a.delivered, 1) * 1e6, 2),
            "sys": round(util["sys_s"].get("gateway", 0.0) / max(a.delivered, 1) * 1e6, 2),
        },
        "server_cpu_s": gateway_cpu,
        "gateway_cores": util["cores"].get("gateway"),
        "bottleneck": neck["summary"],
        "cpu_cores": cpu_cores(util, by_kind=False),
        "gateway_counters": {
            "frames_delivered": delta("wsgateway_frames_delivered_total"),
            "events_routed": delta("wsgateway_events_routed_total"),
            "events_duplicate": delta("wsgateway_events_duplicate_total"),
            "copies_expected_duplicate": copies - n_events,
            "events_invalid": delta("wsgateway_events_invalid_total"),
            "slow_consumer_closes": delta("wsgateway_slow_consumer_closes_total"),
        },
        "gateway_dispatch_ms": dispatch_stats(ma),
        "reordered_frames": a.reordered,
        "pongs": a.pongs,
        "closed_sockets": a.closed,
        "achieved_rate": round((n_events - 1) / (w.t_last_pub - w.t_first_pub), 2)
        if n_events > 1 and w.t_last_pub > w.t_first_pub
        else None,
        "publish_max_lag_ms": round(w.max_lag * 1000, 2),
        "families": families,
        "connect": w.connect,
        "gateway_rss_mb": {
            "before_connect": round((w.rss_before_connect_kb or 0) / 1024, 1),
            "after_connect": round((w.rss_after_connect_kb or 0) / 1024, 1),
            "end": round((w.samples[-1]["rss_kb"] or 0) / 1024, 1) if w.samples else None,
        },
        "expectation": {
            "routing_classes": w.expectation.classes,
            "sockets_rechecked_individually": w.expectation.sample_checked,
            "seconds": round(w.expectation.seconds, 2),
        },
        "examples": a.examples,
        "gc": {k: v for k, v in w.gc.items() if k != "pauses_ge_10ms"} if w.gc else None,
        "profile": w.profile,
        "instrumented_gateway": bool(w.gc is not None or getattr(args, "gc_log", False)),
        "ping_interval_s": args.ping_interval,
        "host_busy_cores_before": w.host_busy_before,
        "gateway_code": w.code_identity,
        "host": host_info(),
    }


def plot(path: Path, w: Workload, a: Analysis, title: str) -> None:
    import numpy as np

    fig, axes = subplots(2, 2, (15, 9))
    ax = axes[0][0]
    for kind in KINDS:
        values = a.by_kind.get(kind)
        if values:
            arr = np.sort(np.asarray(values))
            ax.plot(
                arr, np.arange(1, len(arr) + 1) / len(arr), lw=1.4, label=f"{kind} ({len(arr)})"
            )
    if a.latencies:
        p99 = float(np.percentile(a.latencies, 99))
        ax.axvline(p99, color="grey", ls="--", lw=1)
        ax.text(p99, 0.05, f" p99 {p99:.1f} ms", fontsize=8)
    ax.axvline(50, color="red", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("publish → receive latency (ms)")
    ax.set_ylabel("fraction of frames")
    ax.set_title("CDF by socket kind (red: 50 ms goal)")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)

    ax = axes[0][1]
    per_seq: dict[int, list[float]] = defaultdict(list)
    for seq, lat in zip(a.lat_seq, a.latencies, strict=True):
        per_seq[seq].append(lat)
    per_event = [
        (w.pub_m[s] - w.t_first_pub, float(np.median(per_seq[s])), max(per_seq[s]))
        for s in sorted(per_seq)
    ]
    plot_per_event(ax, per_event, xlabel="publish time (s)", ms=2)

    ax = axes[1][0]
    fams = [f for f in FAMILIES if a.by_family.get(f)]
    if fams:
        x = np.arange(len(fams))
        p50 = [float(np.percentile(a.by_family[f], 50)) for f in fams]
        p99 = [float(np.percentile(a.by_family[f], 99)) for f in fams]
        ax.bar(x - 0.2, p50, 0.4, label="p50")
        ax.bar(x + 0.2, p99, 0.4, label="p99")
        ax.set_xticks(x, [f"{f}\n{len(a.by_family[f])} fr" for f in fams], fontsize=8)
        ax.legend(fontsize=8)
    ax.set_ylabel("latency (ms)")
    ax.set_title("by event family")
    ax.grid(True, alpha=0.3, axis="y")

    ax = axes[1][1]
    if len(w.samples) > 1:
        ts = [s["t"] for s in w.samples]
        rss = [(s["rss_kb"] or 0) / 1024 for s in w.samples]
        ax.plot(ts, rss, color="tab:purple", label="gateway RSS (MB)")
        ax.set_ylabel("RSS (MB)")
        ax2 = ax.twinx()
        cpu = []
        cpu_t = []
        for s0, s1 in zip(w.samples, w.samples[1:], strict=False):
            dt = s1["t"] - s0["t"]
            if dt >= 0.5 * w.args.sample_interval:  # a short last interval is all tick noise
                cpu_t.append(s1["t"])
                cpu.append(((s1["gateway_cpu_s"] or 0) - (s0["gateway_cpu_s"] or 0)) / dt * 100)
        ax2.plot(cpu_t, cpu, color="tab:orange", lw=1, label="gateway CPU (% of a core)")
        ax2.set_ylabel("CPU %")
        ax.legend(loc="upper left", fontsize=8)
        ax2.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("time since first publish (s)")
    ax.set_title("gateway RSS and CPU")
    ax.grid(True, alpha=0.3)
    save_figure(fig, path, title)


# --------------------------------------------------------------------------------------------
# routed.py itself
# --------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Routed benchmark (see the module docstring).")
    add_workload_args(p, duration_default=30.0)
    args = p.parse_args(argv)
    check_workload_args(p, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = stamp()
    args.base_name = (
        f"routed-{started}-b{args.branches}-r{args.rate:g}-d{args.duration:g}-c{args.clients}"
        + (f"-ping{args.ping_interval:g}" if args.ping_interval else "")
        + ("-gc" if args.gc_log else "")
        + ("-prof" if args.profile else "")
    )

    def body() -> dict[str, Any]:
        w = run_workload(args)
        a = analyse(w)
        result = summary(w, a, "routed")
        lat = result["latency_ms"]
        result["goals"] = {
            "zero_misses_and_extras": result["correct"],
            "p99_le_50ms": bool(lat and lat["p99"] <= 50.0),
            "p99_margin_ms": round(50.0 - lat["p99"], 2) if lat else None,
        }
        result["timestamp"] = started
        if not args.no_save:
            title = (
                f"routed: {len(w.population)} sockets ({args.branches} branches), "
                f"{len(w.plans)} events at {args.rate:g}/s; misses {a.misses}, extras {a.extras}; "
                f"p50 {lat.get('p50', 0):.1f} ms, p99 {lat.get('p99', 0):.1f} ms; "
                f"{result['server_cpu_us_per_frame']} µs/frame; {result['bottleneck']}"
            )
            save_result(
                result,
                args.results_dir,
                args.base_name,
                detail={"utilisation": w.util, "samples": w.samples},
                draw=lambda png: plot(png, w, a, title),
            )
        return result

    return run_main("routed", body, passed, ensure_ascii=False)


def passed(result: dict[str, Any]) -> bool:
    """Exit status 0 (routed.py and soak.py): every frame right, every socket complete."""
    return bool(result["correct"] and result["complete"])


if __name__ == "__main__":
    sys.exit(main())
