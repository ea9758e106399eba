"""Memory per idle socket: gateway RSS before connecting vs with N idle registered sockets.

    .venv/bin/python -m bench.memory [--sockets 1000,5000,10000] [--clients 4] [--settle 5]
    .venv/bin/python -m bench.memory --sockets 5000 --tracemalloc     # where the bytes go

For each N, with a fresh redis-server and gateway process each time:

1. waits ``--settle-before`` s after ``/ws/health`` answers, then reads the gateway's
   ``/proc/<pid>/status`` (``VmRSS``, ``RssAnon``, ``RssFile``) and the kernel's TCP memory
   (``/proc/net/sockstat``);
2. opens N sockets (the routed benchmark's mix by default: staff and diners, 64 handshakes in
   flight per client process) from K client processes and waits until ``/ws/health`` counts N;
3. leaves them idle for ``--settle`` s (the clients send nothing; ``WS_HEARTBEAT_TIMEOUT`` is
   3600 s), sampling RSS every 0.5 s, then reads the same figures again: per socket =
   (after − before) / N, in KiB (1024 bytes). With several N the marginal cost between two sizes
   is reported too (it cancels the one-off growth of the first connections);
4. closes the sockets and reads RSS once more (what is returned to the OS).

With ``--tracemalloc`` the gateway is not ``gateway serve`` but ``bench/lib/instrumented.py``:
the same ``run_until_signalled(Settings.from_env())`` in one
process with ``tracemalloc`` started (``--tracemalloc-frames``, default 16) and a SIGUSR1 handler
that dumps a snapshot. Snapshots before connecting and after settling are compared by line and
by traceback: Python-heap bytes and allocations per socket, and the code that made them.
tracemalloc's own bookkeeping inflates RSS, so RSS figures of that run are not comparable and
are labelled so. ``--gc-log`` (also in ``bench.storm``) records every garbage-collector pause.

Goals: at most 20 KiB of RSS per idle socket, and 10,000 sockets held by one process.
Prints progress on stderr, ONE JSON line on stdout, and writes JSON + PNG (and the tracemalloc
tables) under ``bench/results/``. Every process is stopped in ``finally``.
"""

from __future__ import annotations

import argparse
import itertools
import os
import queue
import resource
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.lib.clients import ClientProcess, Opening, start_clients, stop_clients
from bench.lib.gateway_process import Stack, health_total, instrumented_gateway
from bench.lib.gclog import gc_summary, wait_for_file
from bench.lib.heap import tracemalloc_report
from bench.lib.log import log
from bench.lib.measurement import (
    bottleneck,
    host_info,
    kernel_socket_memory,
    proc_fd_count,
    proc_memory,
    wait_for_quiet_host,
)
from bench.lib.options import add_run_args
from bench.lib.plots import save_figure, subplots
from bench.lib.results import finish_log_dir, run_main, save_result, stamp
from bench.lib.tokens import default_settings
from bench.workloads.population import population_targets

GOAL_KIB = 20.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="RSS per idle socket (see the module docstring).")
    p.add_argument(
        "--sockets",
        default="1000,5000,10000",
        help="comma-separated socket counts, one fresh gateway each (default 1000,5000,10000)",
    )
    p.add_argument("--clients", type=int, default=4, help="client processes (default 4)")
    p.add_argument("--population", choices=("mix", "waiter", "diner"), default="mix")
    p.add_argument("--settle-before", type=float, default=3.0, help="idle s before the baseline")
    p.add_argument("--settle", type=float, default=5.0, help="idle s with every socket open")
    p.add_argument("--connect-timeout", type=float, default=120.0)
    p.add_argument("--tracemalloc", action="store_true", help="attribute Python allocations")
    p.add_argument("--tracemalloc-frames", type=int, default=16)
    p.add_argument("--gc-log", action="store_true", help="record the gateway's GC pauses")
    add_run_args(p)
    args = p.parse_args(argv)
    try:
        args.counts = [int(x) for x in args.sockets.split(",") if x.strip()]
    except ValueError:
        p.error("--sockets must be comma-separated integers")
    if not args.counts or any(not 1 <= c <= 15000 for c in args.counts):
        p.error("every --sockets count must be within 1..15000")
    if not 1 <= args.clients <= 16:
        p.error("--clients must be within 1..16")
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if max(args.counts) + 200 > soft:
        p.error(f"ulimit -n is {soft}: too low for {max(args.counts)} sockets in one gateway")
    return args


def measure(args: argparse.Namespace, n: int, log_dir: str) -> dict[str, Any]:
    """One gateway, N sockets: RSS before, idle with N, after closing."""
    settings = default_settings()
    targets, _kinds = population_targets(args.population, n, settings)
    run_dir = tempfile.mkdtemp(prefix=f"n{n}-", dir=log_dir)
    snap_dir = os.path.join(run_dir, "snapshots")
    os.makedirs(snap_dir, exist_ok=True)
    gc_log = os.path.join(run_dir, "gc.json") if args.gc_log else None
    instrumented = args.tracemalloc or args.gc_log
    env = {
        "WS_MAX_CONNECTIONS_PER_USER": "100",
        "WS_MAX_TOTAL_CONNECTIONS": str(n + 1000),
        "WS_HEARTBEAT_TIMEOUT": "3600",
    }
    factory = instrumented_gateway(
        frames=args.tracemalloc_frames if args.tracemalloc else 0,
        snapshot_dir=snap_dir if args.tracemalloc else None,
        gc_log=gc_log,
    )
    stack = Stack(
        env,
        log_dir=run_dir,
        gateway_ref=args.gateway_ref,
        cmd_factory=factory if instrumented else None,
    )
    clients: list[ClientProcess] = []
    inbox: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
    try:
        gw = stack.start()
        args.code_identity = stack.code_identity
        time.sleep(args.settle_before)
        mem0 = proc_memory(gw.pid) or {}
        sock0 = kernel_socket_memory()
        if args.tracemalloc:
            os.kill(gw.pid or 0, signal.SIGUSR1)
            if not wait_for_file(os.path.join(snap_dir, "snap-0.tm"), 60):
                raise RuntimeError("no tracemalloc snapshot before connecting")
            mem0 = proc_memory(gw.pid) or {}
        log(f"N={n}: gateway RSS before {mem0.get('VmRSS', 0) / 1024:.1f} MiB; connecting")
        k_count = min(args.clients, n)
        opening = Opening(gw)
        start_clients(
            clients,
            k_count,
            n,
            inbox=inbox,
            log_dir=run_dir,
            per_socket={"tokens": ["-"] * n, "targets": targets},
            common={
                "url": f"{gw.ws_url}/ws/waiter",
                "events": 0,
                "connect_timeout": args.connect_timeout,
                "deadline": args.connect_timeout + args.settle + 120,
            },
        )
        opening.wait(
            clients, inbox, args.connect_timeout, expect=n, register_timeout=args.connect_timeout
        )
        log(f"N={n}: {opening.describe()}")
        timeline: list[tuple[float, int]] = []
        t_idle = time.monotonic()
        while time.monotonic() - t_idle < args.settle:
            m = proc_memory(gw.pid) or {}
            timeline.append((round(time.monotonic() - t_idle, 2), m.get("VmRSS", 0)))
            time.sleep(0.5)
        mem1 = proc_memory(gw.pid) or {}
        sock1 = kernel_socket_memory()
        fds = proc_fd_count(gw.pid)
        still = health_total(gw)
        tm: dict[str, Any] | None = None
        if args.tracemalloc:
            os.kill(gw.pid or 0, signal.SIGUSR1)
            if not wait_for_file(os.path.join(snap_dir, "snap-1.tm"), 120):
                raise RuntimeError("no tracemalloc snapshot after settling")
        # Close every socket; what comes back to the OS?
        stop_clients(clients, timeout=30)
        t_close = time.monotonic()
        drained = -1
        while time.monotonic() - t_close < 15:
            drained = health_total(gw)
            if drained == 0:
                break
            time.sleep(0.2)
        time.sleep(2.0)
        mem2 = proc_memory(gw.pid) or {}
        if args.tracemalloc:
            os.kill(gw.pid or 0, signal.SIGUSR1)
            if not wait_for_file(os.path.join(snap_dir, "snap-2.tm"), 120):
                raise RuntimeError("no tracemalloc snapshot after closing")
        rss0, rss1, rss2 = mem0.get("VmRSS", 0), mem1.get("VmRSS", 0), mem2.get("VmRSS", 0)
        anon0, anon1 = mem0.get("RssAnon", 0), mem1.get("RssAnon", 0)
        per = (rss1 - rss0) / n
        result: dict[str, Any] = {
            "sockets": n,
            "opened": opening.opened,
            "failed": opening.failed,
            "registered": opening.registered,
            "still_registered_after_settle": still,
            "registered_after_close": drained,
            "errors": opening.errors,
            "rss_before_kib": rss0,
            "rss_idle_kib": rss1,
            "rss_after_close_kib": rss2,
            "rss_hwm_kib": mem2.get("VmHWM"),
            "rss_per_socket_kib": round(per, 2),
            "anon_per_socket_kib": round((anon1 - anon0) / n, 2),
            "returned_after_close_kib": rss1 - rss2,
            "kernel_tcp_mem_per_socket_kib": round(
                (sock1.get("mem", 0) - sock0.get("mem", 0)) * 4 / n, 2
            ),
            "kernel_tcp_note": "machine-wide TCP buffer pages (both ends of each loopback "
            "connection, other users of the host too); not part of any process's RSS",
            "gateway_fds": fds,
            "connect_s": round(opening.seconds, 2),
            "connect_gateway_cpu_ms_per_socket": opening.gateway_cpu_ms_per_socket,
            "connect_bottleneck": bottleneck(opening.util, ncpu=os.cpu_count() or 1)["summary"],
            "rss_timeline_kib": timeline,
            "instrumented": bool(instrumented),
        }
        if args.tracemalloc:
            out_txt = args.results_dir / f"{args.base_name}-n{n}.tracemalloc.txt"
            args.results_dir.mkdir(parents=True, exist_ok=True)
            tm = tracemalloc_report(
                os.path.join(snap_dir, "snap-0.tm"), os.path.join(snap_dir, "snap-1.tm"), n, out_txt
            )
            # Python heap still held once every socket is closed (a leak would show here).
            tm["after_close"] = tracemalloc_report(
                os.path.join(snap_dir, "snap-0.tm"),
                os.path.join(snap_dir, "snap-2.tm"),
                n,
                out_txt.with_name(out_txt.name.replace(".tracemalloc", ".after-close.tracemalloc")),
            )
            result["tracemalloc"] = tm
            result["note"] = "RSS of a tracemalloc run includes tracemalloc's own bookkeeping"
        return result
    finally:
        stop_clients(clients, timeout=10)
        stack.close()
        # Written by the instrumented gateway on exit (after the drain); run_all() picks it up.
        if gc_log and wait_for_file(gc_log, 5):
            args.gc_results[n] = gc_summary(gc_log)


def plot(path: Path, runs: list[dict[str, Any]], title: str) -> None:
    import numpy as np

    fig, axes = subplots(1, 2, (14, 4.8))
    ax = axes[0]
    x = np.arange(len(runs))
    per = [r["rss_per_socket_kib"] for r in runs]
    anon = [r["anon_per_socket_kib"] for r in runs]
    ax.bar(x - 0.2, per, 0.4, label="RSS per socket")
    ax.bar(x + 0.2, anon, 0.4, label="RssAnon per socket")
    for xi, v in zip(x, per, strict=True):
        ax.text(xi - 0.2, v, f"{v:.1f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(GOAL_KIB, color="red", ls=":", lw=1, label="20 KiB goal")
    ax.set_xticks(x, [f"{r['sockets']} sockets" for r in runs])
    ax.set_ylabel("KiB per idle socket")
    ax.set_title("gateway memory per idle socket")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3, axis="y")
    ax = axes[1]
    for r in runs:
        tl = r["rss_timeline_kib"]
        if tl:
            ax.plot([t for t, _ in tl], [v / 1024 for _, v in tl], label=f"{r['sockets']} sockets")
        ax.axhline(r["rss_before_kib"] / 1024, color="grey", ls=":", lw=0.8)
    ax.set_xlabel("seconds idle with every socket open")
    ax.set_ylabel("gateway RSS (MiB); dotted: before connecting")
    ax.set_title("RSS while idle")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    save_figure(fig, path, title)


def run_all(args: argparse.Namespace, started: str) -> dict[str, Any]:
    """Every count of ``args.counts`` in turn, then the summary and the result files."""
    log_dir = tempfile.mkdtemp(prefix="gw-bench-mem-")
    ok = False
    try:
        host_busy = wait_for_quiet_host(args.wait_idle, args.idle_threshold)
        runs = []
        for n in args.counts:
            run = measure(args, n, log_dir)
            if n in args.gc_results:
                run["gc"] = args.gc_results[n]
            runs.append(run)
            log(
                f"N={n}: {run['rss_per_socket_kib']} KiB RSS per idle socket "
                f"({run['rss_before_kib'] / 1024:.1f} -> {run['rss_idle_kib'] / 1024:.1f} MiB)"
            )
        code = args.code_identity
        marginal = []
        by_n = sorted(runs, key=lambda r: r["sockets"])
        for a, b in itertools.pairwise(by_n):
            marginal.append(
                {
                    "from": a["sockets"],
                    "to": b["sockets"],
                    "kib_per_socket": round(
                        (b["rss_idle_kib"] - a["rss_idle_kib"]) / (b["sockets"] - a["sockets"]), 2
                    ),
                }
            )
        worst = max(r["rss_per_socket_kib"] for r in runs)
        held = [
            r["sockets"]
            for r in runs
            if r["failed"] == 0 and r["still_registered_after_settle"] == r["sockets"]
        ]
        result: dict[str, Any] = {
            "bench": "memory",
            "population": args.population,
            "client_processes": args.clients,
            "per_socket_kib": {str(r["sockets"]): r["rss_per_socket_kib"] for r in runs},
            "anon_per_socket_kib": {str(r["sockets"]): r["anon_per_socket_kib"] for r in runs},
            "marginal_kib_per_socket": marginal,
            "rss_mib": {
                str(r["sockets"]): {
                    "before": round(r["rss_before_kib"] / 1024, 1),
                    "idle": round(r["rss_idle_kib"] / 1024, 1),
                    "after_close": round(r["rss_after_close_kib"] / 1024, 1),
                }
                for r in runs
            },
            "failures": sum(r["failed"] for r in runs),
            "held": held,
            "resource": "memory: gateway RSS (the sockets are idle; CPU is spent only connecting)",
            "goals": {
                "le_20_kib_per_socket": worst <= GOAL_KIB,
                "worst_kib_per_socket": worst,
                "over_goal_by_pct": round((worst / GOAL_KIB - 1) * 100, 1),
                "held_10k_in_one_process": 10000 in held if 10000 in args.counts else None,
            },
            "instrumented": bool(args.tracemalloc or args.gc_log),
            "timestamp": started,
            "host_busy_cores_before": host_busy,
            "gateway_code": code,
            "host": host_info(),
        }
        for r in runs:
            if "tracemalloc" in r:
                tm = r["tracemalloc"]
                result.setdefault("tracemalloc", {})[str(r["sockets"])] = {
                    "python_heap_bytes_per_socket": tm["python_heap_bytes_per_socket"],
                    "python_blocks_per_socket": tm["python_blocks_per_socket"],
                    "by_package": tm["by_package_bytes_per_socket"],
                    "by_gateway_line_top5": [
                        f"{x['bytes']:.0f} B {x['site']}"
                        for x in tm["by_gateway_line_bytes_per_socket"][:5]
                    ],
                    "after_close_bytes_per_socket": tm["after_close"][
                        "python_heap_bytes_per_socket"
                    ],
                    "top5": [
                        f"{x['bytes_per_socket']:.0f} B {x['where']}" for x in tm["top_lines"][:5]
                    ],
                    "table": tm["table"],
                }
            if "gc" in r:
                result.setdefault("gc", {})[str(r["sockets"])] = r["gc"]
        if not args.no_save:
            title = (
                f"memory: {', '.join(str(r['sockets']) for r in runs)} idle sockets "
                f"({args.population}); KiB/socket "
                + ", ".join(f"{r['rss_per_socket_kib']}" for r in runs)
                + (" [tracemalloc run: RSS inflated]" if args.tracemalloc else "")
            )
            save_result(
                result,
                args.results_dir,
                args.base_name,
                detail={"runs": runs},
                draw=lambda png: plot(png, runs, title),
            )
        ok = True
        return result
    finally:
        finish_log_dir(log_dir, ok, "logs")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = stamp()
    args.base_name = (
        f"memory-{started}-n{'-'.join(str(c) for c in args.counts)}-c{args.clients}"
        f"-{args.population}" + ("-tm" if args.tracemalloc else "") + ("-gc" if args.gc_log else "")
    )
    args.gc_results = {}
    args.code_identity = {}
    return run_main(
        "memory", lambda: run_all(args, started), lambda result: result["failures"] == 0
    )


if __name__ == "__main__":
    sys.exit(main())
