"""Reconnect storm: N clients connect at the same instant; how long until all are registered?

    .venv/bin/python -m bench.storm --sockets 1000 [--clients 4] [--population mix|waiter|diner]
    .venv/bin/python -m bench.storm --sockets 5000

What it does, every step bounded in time:

1. starts a private ``redis-server`` and the gateway as its own process (``WS_MAX_TOTAL_CONNECTIONS``
   = N + 1000, ``WS_MAX_CONNECTIONS_PER_USER`` = 100, ``WS_HEARTBEAT_TIMEOUT`` = 3600, every other
   setting at its default: the listen backlog is the kernel's ``somaxconn``);
2. starts K client processes (``python -m bench.client``, raw epoll client); each builds its
   requests and reports ready; then all get ``go`` at once and open all their sockets without any limit
   on handshakes in flight (``max_connecting`` 0) — what a gateway restart does to it when every
   client reconnects at once;
3. each socket sends ``ping`` as soon as its 101 arrives; the gateway reads messages only after
   authentication (JWT or table token, revocation ``MGET`` for staff) and registration, so the
   ``{"type":"pong"}`` marks the end of admission. Per socket the client records ``t_start``
   (before ``connect``), ``t_open`` (101 received) and ``t_pong``;
4. meanwhile the benchmark polls ``/ws/health`` (one keep-alive connection, every 50 ms) for
   ``total_connections``: ``all_registered_s`` is from ``go`` to the first poll that sees N;
5. reports handshake (``t_open − t_start``) and handshake+auth (``t_pong − t_start``) p50/p99/max,
   failures (no 101, no pong, or closed: with their reasons), the gateway's CPU per socket, the
   kernel's listen-queue counters (``ListenOverflows``, ``TCPSynRetrans``… from /proc/net) and
   which resource saturated; ONE JSON line on stdout, JSON + PNG under ``bench/results/``.

Population ``mix`` (default) is the routed benchmark's (per branch: 2 admins, 6 waiters with
sector claims, 1 kitchen, 20 diners), cut at N; ``waiter`` is N plain waiters (every one a Redis
revocation ``MGET``); ``diner`` is N diners (no Redis work at admission).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import queue
import resource
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.lib.clients import ClientInbox, ClientProcess, start_clients, stop_clients
from bench.lib.gateway_process import HealthPoller, Stack, instrumented_gateway, metric_sum
from bench.lib.gclog import gc_summary, wait_for_file
from bench.lib.log import log
from bench.lib.measurement import (
    CpuSnapshot,
    bottleneck,
    counter_delta,
    cpu_cores,
    host_info,
    proc_fd_count,
    proc_memory,
    tcp_counters,
    wait_for_quiet_host,
)
from bench.lib.options import add_profile_args, add_run_args
from bench.lib.processes import stop_process
from bench.lib.profiling import finish_profile, start_py_spy
from bench.lib.results import finish_log_dir, percentiles, rounded, run_main, save_result, stamp
from bench.lib.tokens import default_settings
from bench.workloads.population import population_targets
from bench.workloads.storm_report import plot, socket_timings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Reconnect storm (see the module docstring).")
    p.add_argument("--sockets", type=int, default=1000, help="clients connecting at once (1000)")
    p.add_argument("--clients", type=int, default=4, help="client processes (default 4)")
    p.add_argument("--population", choices=("mix", "waiter", "diner"), default="mix")
    p.add_argument(
        "--connect-timeout",
        type=float,
        default=60.0,
        help="seconds for every socket to get its pong (default 60)",
    )
    p.add_argument("--poll-interval", type=float, default=0.05, help="/ws/health polling, s (0.05)")
    p.add_argument("--hold", type=float, default=2.0, help="seconds to hold the sockets after")
    add_profile_args(
        p, "py-spy the gateway from go until all are registered (adds latency: profile only)"
    )
    p.add_argument(
        "--gc-log",
        action="store_true",
        help="run the gateway instrumented (bench/lib/instrumented.py) and report garbage-collector "
        "pauses during the storm",
    )
    add_run_args(p)
    args = p.parse_args(argv)
    if not 1 <= args.sockets <= 15000:
        p.error("--sockets must be within 1..15000")
    if not 1 <= args.clients <= 16 or args.clients > args.sockets:
        p.error("--clients must be within 1..16 and not above --sockets")
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if args.sockets + 200 > soft or math.ceil(args.sockets / args.clients) + 100 > soft:
        p.error(f"ulimit -n is {soft}: too low for {args.sockets} sockets in one gateway")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = stamp()
    n = args.sockets
    name = (
        f"storm-{started}-n{n}-c{args.clients}-{args.population}"
        + ("-prof" if args.profile else "")
        + ("-gc" if args.gc_log else "")
    )
    spy: subprocess.Popen[bytes] | None = None
    log_dir = tempfile.mkdtemp(prefix="gw-bench-")
    settings = default_settings()
    targets, kinds = population_targets(args.population, n, settings)
    stack: Stack | None = None
    clients: list[ClientProcess] = []
    poller: HealthPoller | None = None
    inbox: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
    ok = False
    try:
        host_busy = wait_for_quiet_host(args.wait_idle, args.idle_threshold)
        env = {
            "WS_MAX_CONNECTIONS_PER_USER": "100",
            "WS_MAX_TOTAL_CONNECTIONS": str(n + 1000),
            "WS_HEARTBEAT_TIMEOUT": "3600",
        }
        gc_log = os.path.join(log_dir, "gc.json") if args.gc_log else None
        factory = instrumented_gateway(gc_log=gc_log) if gc_log else None
        stack = Stack(env, log_dir=log_dir, gateway_ref=args.gateway_ref, cmd_factory=factory)
        gw = stack.start()
        assert gw.port is not None
        poller = HealthPoller(gw.port)
        start_clients(
            clients,
            args.clients,
            n,
            inbox=inbox,
            log_dir=log_dir,
            per_socket={"tokens": ["-"] * n, "targets": targets},
            common={
                "url": f"{gw.ws_url}/ws/waiter",
                "events": 0,
                "connect_timeout": args.connect_timeout,
                "deadline": args.connect_timeout + args.hold + 60,
                "max_connecting": 0,
                "wait_go": True,
                "go_timeout": 60,
                "ping_on_open": True,
            },
        )
        ready: set[int] = set()
        until = time.monotonic() + 60
        while len(ready) < len(clients):
            if time.monotonic() > until:
                raise RuntimeError("client processes did not get ready in 60 s")
            with contextlib.suppress(queue.Empty):
                k, msg = inbox.get(timeout=0.2)
                if msg["type"] == "ready":
                    ready.add(k)
                elif msg["type"] == "eof":
                    raise RuntimeError(f"client {k} exited early:\n{clients[k].log_tail()}")
        time.sleep(1.0)  # let the client processes' start-up CPU settle
        rss0 = proc_memory(gw.pid) or {}
        pids: dict[str, int | None] = {"gateway": gw.pid, "redis": stack.redis_pid}
        pids.update({f"client{c.k}": c.pid for c in clients})
        tcp0 = tcp_counters()
        metrics0 = gw.metrics()
        log(f"{len(clients)} client processes ready; go: {n} sockets ({args.population}) at once")

        # --- the storm -------------------------------------------------------------------------
        if args.profile:
            assert gw.pid is not None
            spy = start_py_spy(
                gw.pid,
                int(args.connect_timeout) + 5,
                args.results_dir / f"{name}.folded",
                rate=args.profile_rate,
            )
        snap0 = CpuSnapshot(pids)
        t_go = time.monotonic()
        for c in clients:
            c.go()
        timeline: list[tuple[float, int]] = []
        connected: dict[int, dict[str, Any]] = {}
        all_registered_s: float | None = None
        snap_registered: CpuSnapshot | None = None
        until = t_go + args.connect_timeout + 10
        next_poll = t_go
        while time.monotonic() < until:
            now = time.monotonic()
            if now >= next_poll and all_registered_s is None:
                total = poller.total()
                t_seen = time.monotonic()
                if total is not None:
                    timeline.append((round(t_seen - t_go, 4), total))
                    if total >= n:
                        all_registered_s = t_seen - t_go
                        snap_registered = CpuSnapshot(pids)
                        log(f"all {n} registered after {all_registered_s:.3f} s (/ws/health)")
                next_poll = now + args.poll_interval
            with contextlib.suppress(queue.Empty):
                k, msg = inbox.get(timeout=max(min(next_poll - time.monotonic(), 0.02), 0.001))
                if msg["type"] == "connected":
                    connected[k] = msg
                elif msg["type"] == "eof":
                    raise RuntimeError(f"client {k} exited early:\n{clients[k].log_tail()}")
            if len(connected) == len(clients) and (
                all_registered_s is not None
                or sum(m["failed"] for m in connected.values()) > 0
                or time.monotonic() - t_go > args.connect_timeout
            ):
                break
        snap1 = CpuSnapshot(pids)
        if spy is not None and spy.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        if not gw.alive():
            raise RuntimeError(f"gateway died during the storm; log:\n{gw.log_tail()}")
        tcp1 = tcp_counters()
        time.sleep(args.hold)
        final_total = poller.total()
        rss1 = proc_memory(gw.pid) or {}
        fds = proc_fd_count(gw.pid)
        metrics1 = gw.metrics()

        # --- collect ---------------------------------------------------------------------------
        box = ClientInbox(inbox, clients)
        box.collect(clients, 60)
        results = box.results
        t = socket_timings(results, kinds, t_go)
        handshake, admission, open_at, pong_at = t.handshake, t.admission, t.open_at, t.pong_at
        failures, by_kind, start_spread = t.failures, t.by_kind, t.start_spread
        failed = sum(failures.values())
        util = snap0.delta(snap_registered or snap1)
        neck = bottleneck(util, ncpu=os.cpu_count() or 1)
        gw_cpu = util["cpu_s"].get("gateway", 0.0)
        hs = percentiles(handshake, (50, 99))
        adm = percentiles(admission, (50, 99))
        all_ponged_s = max(pong_at) if pong_at and not failed else None
        tcp = counter_delta(tcp0, tcp1)
        rejected = {
            k.split('reason="', 1)[1].rstrip('"}'): v - metrics0.get(k, 0.0)
            for k, v in metrics1.items()
            if k.startswith("wsgateway_rejections_total{") and 'reason="' in k
        }
        goal_s = 2.0 if n <= 1000 else None
        result: dict[str, Any] = {
            "bench": "storm",
            "sockets": n,
            "population": args.population,
            "client_processes": args.clients,
            "registered": final_total,
            "failures": failed,
            "failure_reasons": failures,
            "all_registered_s": round(all_registered_s, 3) if all_registered_s else None,
            "all_ponged_s": round(all_ponged_s, 3) if all_ponged_s else None,
            "all_101_s": round(max(open_at), 3) if open_at else None,
            "handshake_ms": rounded(hs),
            "handshake_auth_ms": rounded(adm),
            "handshake_auth_p99_ms_by_kind": {
                k: round(percentiles(v, (99,))["p99"], 2) for k, v in sorted(by_kind.items())
            },
            "connect_issue_spread_ms": rounded(percentiles(start_spread, (50, 99))),
            "gateway_cpu_s": gw_cpu,
            "gateway_cpu_ms_per_socket": round(gw_cpu / max(len(admission), 1) * 1000, 3),
            "gateway_cores": util["cores"].get("gateway"),
            "bottleneck": neck["summary"],
            "cpu_cores": cpu_cores(util),
            "window_s": util["wall_s"],
            "tcp_counters_delta": tcp,
            "gateway_rejections": {k: v for k, v in rejected.items() if v},
            "gateway_rss_mb": {
                "before": round(rss0.get("VmRSS", 0) / 1024, 1),
                "after": round(rss1.get("VmRSS", 0) / 1024, 1),
                "hwm": round(rss1.get("VmHWM", 0) / 1024, 1),
            },
            "gateway_fds": fds,
            "goals": {
                "all_registered_le_2s": (
                    all_registered_s is not None and all_registered_s <= goal_s and failed == 0
                )
                if goal_s
                else None,
                "margin_s": round(goal_s - all_registered_s, 3)
                if goal_s and all_registered_s
                else None,
                "zero_failures": failed == 0,
            },
            "timestamp": started,
            "host_busy_cores_before": host_busy,
            "gateway_code": stack.code_identity,
            "host": host_info(),
        }
        if metric_sum(metrics1, "wsgateway_slow_consumer_closes_total"):
            result["slow_consumer_closes"] = metric_sum(
                metrics1, "wsgateway_slow_consumer_closes_total"
            )
        if gc_log:
            stack.close()  # the instrumented gateway writes its GC log on exit
            if wait_for_file(gc_log, 10):
                end = t_go + (all_registered_s or util["wall_s"])
                result["gc_during_storm"] = gc_summary(gc_log, t_go, end)
            result["instrumented"] = True
        if spy is not None:
            result["profile"] = finish_profile(spy, args.results_dir, name)
            spy = None
        if not args.no_save:
            save_result(
                result,
                args.results_dir,
                name,
                detail={"utilisation": util, "health_timeline": timeline},
                draw=lambda png: plot(
                    png, result, handshake, admission, open_at, pong_at, timeline
                ),
            )
        ok = True
        return result
    finally:
        if spy is not None:
            stop_process(spy)
        if poller is not None:
            poller.close()
        stop_clients(clients, timeout=5)
        if stack is not None:
            stack.close()
        finish_log_dir(log_dir, ok)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main("storm", lambda: run(args), lambda result: result["failures"] == 0)


if __name__ == "__main__":
    sys.exit(main())
