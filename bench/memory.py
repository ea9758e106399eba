#!/usr/bin/env python3
"""Memory per idle socket: gateway RSS before connecting vs with N idle registered sockets.

    .venv/bin/python bench/memory.py [--sockets 1000,5000,10000] [--clients 4] [--settle 5]
    .venv/bin/python bench/memory.py --sockets 5000 --tracemalloc     # where the bytes go

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

With ``--tracemalloc`` the gateway is not ``gateway serve`` but this same file in
``--serve-instrumented`` mode: the same ``run_until_signalled(Settings.from_env())`` in one
process with ``tracemalloc`` started (``--tracemalloc-frames``, default 16) and a SIGUSR1 handler
that dumps a snapshot. Snapshots before connecting and after settling are compared by line and
by traceback: Python-heap bytes and allocations per socket, and the code that made them.
tracemalloc's own bookkeeping inflates RSS, so RSS figures of that run are not comparable and
are labelled so. ``--gc-log`` (also in ``storm.py``) records every garbage-collector pause.

Goals: at most 20 KiB of RSS per idle socket, and 10,000 sockets held by one process.
Prints progress on stderr, ONE JSON line on stdout, and writes JSON + PNG (and the tracemalloc
tables) under ``bench/results/``. Every process is stopped in ``finally``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import queue
import resource
import signal
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------------------------------------
# The instrumented gateway (a child process; imports nothing from the benchmark, so that with
# --gateway-ref the snapshot on PYTHONPATH is the gateway that runs)
# ---------------------------------------------------------------------------------------------


def serve_instrumented(argv: list[str]) -> int:
    """``gateway serve`` with tracemalloc snapshots on SIGUSR1 and/or a log of GC pauses."""
    p = argparse.ArgumentParser(prog="memory.py --serve-instrumented")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tracemalloc-frames", type=int, default=0)
    p.add_argument("--snapshot-dir", default=None)
    p.add_argument("--gc-log", default=None)
    args = p.parse_args(argv)
    import gc
    import tracemalloc

    if args.tracemalloc_frames > 0:
        tracemalloc.start(args.tracemalloc_frames)
    counter = {"n": 0}

    def on_usr1(signum: int, frame: object) -> None:
        if not tracemalloc.is_tracing() or args.snapshot_dir is None:
            return
        snap = tracemalloc.take_snapshot()
        path = os.path.join(args.snapshot_dir, f"snap-{counter['n']}.tm")
        snap.dump(path + ".tmp")
        os.replace(path + ".tmp", path)
        counter["n"] += 1

    signal.signal(signal.SIGUSR1, on_usr1)
    pauses: list[tuple[float, int, float, int]] = []  # (time, generation, seconds, collected)
    started: dict[str, float] = {}
    if args.gc_log:

        def on_gc(phase: str, info: dict[str, int]) -> None:
            now = time.monotonic()
            if phase == "start":
                started["t"] = now
            elif "t" in started:
                pauses.append(
                    (started["t"], info["generation"], now - started.pop("t"), info["collected"])
                )

        gc.callbacks.append(on_gc)
    import trio

    from gateway.app import run_until_signalled
    from gateway.logs import setup_logging
    from gateway.settings import Settings

    settings = Settings.from_env(port=str(args.port), host="127.0.0.1")
    setup_logging(settings.log_level, settings.log_format, settings.environment)
    try:
        trio.run(run_until_signalled, settings)
    finally:
        if args.gc_log:
            with open(args.gc_log + ".tmp", "w") as fh:
                json.dump({"pauses": pauses}, fh)
            os.replace(args.gc_log + ".tmp", args.gc_log)
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["--serve-instrumented"]:
    sys.exit(serve_instrumented(sys.argv[2:]))

# ---------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------

# Imported only now: _common puts the work tree first on sys.path, which would shadow the
# --gateway-ref snapshot that the instrumented gateway above must import.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    ClientProcess,
    Opening,
    Stack,
    add_run_args,
    bottleneck,
    finish_log_dir,
    host_info,
    instrumented_gateway,
    kernel_socket_memory,
    log,
    proc_fd_count,
    proc_memory,
    rel,
    run_main,
    save_figure,
    save_result,
    stamp,
    start_clients,
    stop_clients,
    subplots,
    wait_for_quiet_host,
)
from storm import population_targets  # noqa: E402

from gateway.settings import Settings  # noqa: E402

GOAL_KIB = 20.0


def gc_summary(path: str, t_from: float | None = None, t_to: float | None = None) -> dict[str, Any]:
    """Pauses of the garbage collector from an instrumented gateway's log (ms)."""
    try:
        with open(path) as fh:
            pauses = json.load(fh)["pauses"]
    except (OSError, ValueError, KeyError):
        return {"error": "no gc log"}
    sel = [
        p for p in pauses if (t_from is None or p[0] >= t_from) and (t_to is None or p[0] <= t_to)
    ]
    out: dict[str, Any] = {"collections": len(sel)}
    for gen in (0, 1, 2):
        durs = sorted(p[2] * 1000 for p in sel if p[1] == gen)
        if durs:
            out[f"gen{gen}"] = {
                "count": len(durs),
                "total_ms": round(sum(durs), 1),
                "max_ms": round(durs[-1], 1),
                "p50_ms": round(durs[len(durs) // 2], 2),
            }
    out["total_ms"] = round(sum(p[2] for p in sel) * 1000, 1)
    origin = t_from if t_from is not None else (sel[0][0] if sel else 0.0)
    out["longest"] = [
        {"t": round(p[0] - origin, 3), "gen": p[1], "ms": round(p[2] * 1000, 1)}
        for p in sorted(sel, key=lambda p: -p[2])[:8]
    ]
    out["pauses_ge_10ms"] = [
        [round(p[0] - origin, 3), p[1], round(p[2] * 1000, 1)] for p in sel if p[2] >= 0.01
    ]
    return out


def health_total(gw: Any, timeout: float = 60.0) -> int:
    """``/ws/health`` ``total_connections``, retried: a traced gateway answers slowly."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return int(gw.health().get("total_connections", -1))
        except (OSError, ValueError):
            if time.monotonic() >= deadline:
                return -1
            time.sleep(0.5)


def wait_for_file(path: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        time.sleep(0.1)
    return False


def _source_line(filename: str, lineno: int) -> str:
    import linecache

    return linecache.getline(filename, lineno).strip()[:70]


def tracemalloc_report(before: str, after: str, n: int, out_txt: Path) -> dict[str, Any]:
    """Compare two snapshots: bytes and blocks per socket, by line, file and traceback."""
    import tracemalloc

    s0 = tracemalloc.Snapshot.load(before)
    s1 = tracemalloc.Snapshot.load(after)
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    s0, s1 = s0.filter_traces(ignore), s1.filter_traces(ignore)
    total0 = sum(st.size for st in s0.statistics("filename"))
    total1 = sum(st.size for st in s1.statistics("filename"))
    blocks0 = sum(st.count for st in s0.statistics("filename"))
    blocks1 = sum(st.count for st in s1.statistics("filename"))

    def short(path: str) -> str:
        for marker in ("site-packages/", "/lib/python3.11/", "/gateway/"):
            idx = path.find(marker)
            if idx >= 0:
                rest = path[idx + len(marker) :]
                return ("gateway/" + rest) if marker == "/gateway/" else rest
        return path

    by_line = s1.compare_to(s0, "lineno")
    by_file = s1.compare_to(s0, "filename")
    by_tb = s1.compare_to(s0, "traceback")
    lines = [
        f"tracemalloc: {n} idle sockets; Python heap {total0 / 1e6:.1f} MB -> {total1 / 1e6:.1f} MB "
        f"(+{(total1 - total0) / n:.0f} B and +{(blocks1 - blocks0) / n:.1f} blocks per socket)",
        "",
        "by line (bytes per socket, blocks per socket):",
    ]
    top_lines = []
    for st in by_line[:30]:
        fr = st.traceback[0]
        where = f"{short(fr.filename)}:{fr.lineno}"
        top_lines.append(
            {
                "where": where,
                "bytes_per_socket": round(st.size_diff / n, 1),
                "blocks_per_socket": round(st.count_diff / n, 2),
            }
        )
        lines.append(f"  {st.size_diff / n:8.0f} B  {st.count_diff / n:6.2f}  {where}")
    lines += ["", "by file:"]
    top_files = []
    for st in by_file[:20]:
        where = short(st.traceback[0].filename)
        top_files.append({"file": where, "bytes_per_socket": round(st.size_diff / n, 1)})
        lines.append(f"  {st.size_diff / n:8.0f} B  {st.count_diff / n:6.2f}  {where}")
    packages: dict[str, float] = defaultdict(float)
    for st in by_file:
        where = short(st.traceback[0].filename)
        if where.startswith("<attrs generated methods trio"):
            pkg = "trio"
        elif "/" in where:
            pkg = where.split("/", 1)[0]
        else:
            pkg = "stdlib" if where.endswith(".py") or where.startswith("<frozen") else "other"
        packages[pkg] += st.size_diff / n
    by_package = {k: round(v, 1) for k, v in sorted(packages.items(), key=lambda kv: -kv[1])}
    lines += ["", "by package (bytes per socket):"]
    for pkg, v in by_package.items():
        if abs(v) >= 1:
            lines.append(f"  {v:8.0f} B  {pkg}")
    # Who is responsible: each allocation charged to the innermost gateway line on its stack
    # (e.g. wsproto's handshake state to the gateway line that created the WSConnection).
    sites: dict[str, float] = defaultdict(float)
    for st in by_tb:
        site = "(no gateway frame in the recorded stack)"
        for fr in reversed(list(st.traceback)):
            where = short(fr.filename)
            if where.startswith("gateway/"):
                site = f"{where}:{fr.lineno} {_source_line(fr.filename, fr.lineno)}"
                break
        sites[site] += st.size_diff / n
    by_site = sorted(sites.items(), key=lambda kv: -kv[1])
    lines += ["", "by the innermost gateway line on the allocation's stack (bytes per socket):"]
    for site, v in by_site[:25]:
        lines.append(f"  {v:8.0f} B  {site}")
    lines += ["", "by traceback (largest 12; innermost frame last):"]
    for st in by_tb[:12]:
        lines.append(f"  {st.size_diff / n:8.0f} B  {st.count_diff / n:6.2f} blocks")
        for fr in list(st.traceback)[-8:]:
            lines.append(f"        {short(fr.filename)}:{fr.lineno}")
    out_txt.write_text("\n".join(lines) + "\n")
    return {
        "python_heap_before_mb": round(total0 / 1e6, 2),
        "python_heap_after_mb": round(total1 / 1e6, 2),
        "python_heap_bytes_per_socket": round((total1 - total0) / n, 1),
        "python_blocks_per_socket": round((blocks1 - blocks0) / n, 2),
        "by_package_bytes_per_socket": {k: v for k, v in by_package.items() if abs(v) >= 1},
        "by_gateway_line_bytes_per_socket": [
            {"site": site, "bytes": round(v, 1)} for site, v in by_site[:12]
        ],
        "top_lines": top_lines[:15],
        "top_files": top_files[:10],
        "table": rel(out_txt),
    }


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


def kib(kb: int | None) -> float | None:
    """/proc reports kB that are KiB."""
    return None if kb is None else float(kb)


def measure(args: argparse.Namespace, n: int, log_dir: str) -> dict[str, Any]:
    """One gateway, N sockets: RSS before, idle with N, after closing."""
    settings = Settings.from_env({})
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
