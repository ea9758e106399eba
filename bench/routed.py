"""Routed benchmark: the real event mix to a restaurant-shaped population, every frame checked.

    .venv/bin/python -m bench.routed [--branches 100] [--rate 200] [--duration 30] [--clients 2]

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
``bench.soak`` runs this same workload for minutes (``bench.workloads.routed_run``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from bench.lib.results import run_main, save_result, stamp
from bench.workloads.routed_report import analyse, passed, plot, summary
from bench.workloads.routed_run import add_workload_args, check_workload_args, run_workload


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


if __name__ == "__main__":
    sys.exit(main())
