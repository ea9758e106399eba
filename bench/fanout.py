"""Fan-out benchmark: one event stream to N sockets of one branch, end to end, in one command.

    .venv/bin/python -m bench.fanout --sockets 1000 --events 200 --rate 20 [--payload 200]
        [--clients 2] [--direct-write 0|1] [--role waiter|admin] [--client-impl raw|trio-websocket]
        [--protocol v1|v2] [--profile]

What it does, every step bounded in time:

1. starts a private ``redis-server`` (``RedisProcess``, TCP on a free port) and the gateway as its
   own process (``.venv/bin/gateway serve --port <free> --host 127.0.0.1``, ``REDIS_URL`` set,
   connection limits raised, ``LOG_LEVEL=WARNING``) and waits for ``/ws/health``;
2. opens N sockets on tenant 1 branch 2 (waiters with distinct user ids, or admins) from K client
   processes (``python -m bench.client``) and checks the gateway counts N registered sockets;
3. publishes E envelopes with ``XADD events:critical MAXLEN ~ 50000 * data <json>`` at R per second,
   each carrying in ``entity`` its sequence number and publish time: ``t`` = ``time.time()`` and
   ``m`` = ``time.monotonic()`` (CLOCK_MONOTONIC: one clock for every process of the machine that,
   unlike the wall clock, never steps; latency is computed with it);
4. takes the gateway's CPU time (utime + stime from ``/proc/<pid>/stat``) just before the first
   publish and again when every client has received every event (or the drain timeout passed);
5. collects every frame's receive timestamp from the clients, checks that every socket got every
   event exactly once and in order, and computes publish→receive latency;
6. prints progress on stderr and ONE line of JSON on stdout, and writes that JSON (with more
   detail) and a latency plot under ``bench/results/``. ``--profile`` also records the gateway with
   py-spy during the measurement window (collapsed stacks, a flame graph SVG, a hot-spot table).

The gateway, redis-server, clients and py-spy are always stopped in ``finally``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import queue
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.lib.clients import (
    ClientInbox,
    ClientProcess,
    Opening,
    start_clients,
    stop_clients,
)
from bench.lib.constants import STREAM, STREAM_MAXLEN
from bench.lib.gateway_process import Stack, dispatch_stats
from bench.lib.log import log
from bench.lib.measurement import (
    CpuSnapshot,
    bottleneck,
    cpu_cores,
    host_info,
    wait_for_quiet_host,
)
from bench.lib.options import add_profile_args, add_run_args
from bench.lib.plots import plot_latency
from bench.lib.processes import stop_process
from bench.lib.profiling import finish_profile, start_py_spy
from bench.lib.resp import Resp
from bench.lib.results import (
    finish_log_dir,
    percentiles,
    rounded,
    run_main,
    save_result,
    stamp,
)
from bench.lib.tokens import staff_token
from bench.workloads.broadcast import (
    BRANCH,
    build_event,
    check_positions,
    count_deliveries,
    padding_for,
)
from gateway.settings import Settings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Fan-out benchmark of the gateway (see the module docstring)."
    )
    p.add_argument("--sockets", type=int, default=1000, help="sockets on the branch (default 1000)")
    p.add_argument("--events", type=int, default=200, help="events to publish (default 200)")
    p.add_argument("--rate", type=float, default=20.0, help="events per second (default 20)")
    p.add_argument(
        "--payload",
        type=int,
        default=200,
        help="target size of the event JSON in bytes; padded in entity (default 200)",
    )
    p.add_argument("--clients", type=int, default=2, help="client processes (default 2)")
    p.add_argument(
        "--direct-write",
        type=int,
        choices=(0, 1),
        default=1,
        help="GATEWAY_DIRECT_WRITE of the gateway (default 1)",
    )
    p.add_argument(
        "--role",
        choices=("waiter", "admin"),
        default="waiter",
        help="waiters on /ws/waiter (distinct users) or admins on /ws/admin (default waiter)",
    )
    p.add_argument(
        "--client-impl",
        choices=("raw", "trio-websocket"),
        default="raw",
        help="raw: epoll + minimal RFC 6455 reader (cheap); trio-websocket: a task per socket",
    )
    p.add_argument(
        "--protocol",
        choices=("v1", "v2"),
        default="v1",
        help="v2: the clients offer the subprotocol integrador.v2 (D20); frames carry _pos, and "
        "every socket's welcome and every event's position are checked too (raw client only)",
    )
    p.add_argument(
        "--connect-timeout", type=float, default=60.0, help="seconds to open all sockets"
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds after the last publish to wait for the last frame",
    )
    add_profile_args(p, "record the gateway with py-spy during the measurement window")
    add_run_args(p)
    args = p.parse_args(argv)
    if not 1 <= args.sockets <= 20000:
        p.error("--sockets must be within 1..20000")
    if not 1 <= args.events <= 100000:
        p.error("--events must be within 1..100000")
    if not 0 < args.rate <= 100000:
        p.error("--rate must be within (0, 100000]")
    if not 1 <= args.clients <= 16 or args.clients > args.sockets:
        p.error("--clients must be within 1..16 and not above --sockets")
    if not 0 <= args.payload <= 60000:
        p.error("--payload must be within 0..60000")
    if args.protocol == "v2" and args.client_impl != "raw":
        p.error("--protocol v2 needs --client-impl raw")
    if args.sockets * args.events > 20_000_000:
        p.error("--sockets × --events must stay below 20 million frames")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = stamp()
    base_name = (
        f"fanout-{started}-s{args.sockets}-e{args.events}-r{args.rate:g}-p{args.payload}"
        f"-c{args.clients}-dw{args.direct_write}"
        + ("" if args.role == "waiter" else f"-{args.role}")
        + ("" if args.client_impl == "raw" else "-trio")
        + ("" if args.protocol == "v1" else "-v2")
        + ("-prof" if args.profile else "")
    )
    log_dir = tempfile.mkdtemp(prefix="gw-bench-")
    stack: Stack | None = None
    clients: list[ClientProcess] = []
    spy: subprocess.Popen[bytes] | None = None
    resp: Resp | None = None
    inbox: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
    result: dict[str, Any] = {}
    try:
        host_busy_before = wait_for_quiet_host(args.wait_idle, args.idle_threshold)
        # --- redis and gateway ----------------------------------------------------------------
        env = {
            "WS_MAX_CONNECTIONS_PER_USER": "10000",
            "WS_MAX_TOTAL_CONNECTIONS": str(args.sockets + 1000),
            "GATEWAY_DIRECT_WRITE": str(args.direct_write),
            # The clients do not ping during the run; keep the sweeper from closing them.
            "WS_HEARTBEAT_TIMEOUT": "3600",
        }
        stack = Stack(env, log_dir=log_dir, gateway_ref=args.gateway_ref)
        gw = stack.start()
        assert stack.redis is not None and stack.redis.port is not None
        log(f"gateway direct_write={args.direct_write}")

        # --- sockets ---------------------------------------------------------------------------
        settings = Settings.from_env({"ENVIRONMENT": "development"})
        roles = ["WAITER"] if args.role == "waiter" else ["ADMIN"]
        tokens = [
            staff_token(settings, user_id=10_000 + i, branch_ids=[BRANCH], roles=roles, ttl=3600)
            for i in range(args.sockets)
        ]
        url = f"{gw.ws_url}/ws/{args.role}"
        expected_window = args.events / args.rate
        deadline = args.connect_timeout + expected_window + args.drain_timeout + 60
        opening = Opening(gw)
        start_clients(
            clients,
            args.clients,
            args.sockets,
            inbox=inbox,
            log_dir=log_dir,
            per_socket={"tokens": tokens},
            common={
                "url": url,
                "events": args.events,
                "connect_timeout": args.connect_timeout,
                "deadline": deadline,
                "impl": args.client_impl,
                "protocol": 2 if args.protocol == "v2" else 1,
            },
        )
        log(
            f"{args.clients} client processes ({args.client_impl}) opening {args.sockets} sockets on {url}"
        )
        # The gateway must have registered every socket the clients consider open.
        opening.wait(clients, inbox, args.connect_timeout)
        opened, registered, errors = opening.opened, opening.registered, opening.errors
        log(opening.describe() + (f"; errors: {errors}" if errors else ""))
        if opened == 0:
            raise RuntimeError(f"no socket opened: {errors}")
        if registered < opened:
            raise RuntimeError(
                f"the gateway registered only {registered} of {opened} open sockets; log:\n"
                f"{gw.log_tail()}"
            )
        time.sleep(0.5)  # let admission tails (sector lookups, metrics) settle

        # --- publish ---------------------------------------------------------------------------
        resp = Resp("127.0.0.1", stack.redis.port)
        pad = padding_for(args.payload)
        event_bytes = len(build_event(args.events, time.time(), time.monotonic(), pad))
        pids = {"gateway": gw.pid, "redis": stack.redis_pid, "publisher": os.getpid()}
        pids.update({f"client{c.k}": c.pid for c in clients})
        pub_times: list[float] = [0.0] * args.events  # time.monotonic() of each XADD
        box = ClientInbox(inbox, clients)
        max_lag = 0.0
        expected_frames = opened * args.events
        active = [c.k for c in clients if opening.connected[c.k]["open"] > 0]
        snap0 = CpuSnapshot(pids)
        if args.profile:
            assert gw.pid is not None
            spy = start_py_spy(
                gw.pid,
                math.ceil(expected_window + args.drain_timeout + 10),
                args.results_dir / f"{base_name}.folded",
                rate=args.profile_rate,
                attach=0.3,
            )
            snap0 = CpuSnapshot(pids)
        wall_offset0 = time.time() - time.monotonic()
        t0 = time.monotonic()
        t_first_pub = t0
        next_report = t0 + 1.0
        for seq in range(args.events):
            max_lag = max(max_lag, box.wait_until(t0 + seq / args.rate))
            m_pub = time.monotonic()
            pub_times[seq] = m_pub
            resp.call(
                "XADD",
                STREAM,
                "MAXLEN",
                "~",
                STREAM_MAXLEN,
                "*",
                "data",
                build_event(seq, time.time(), m_pub, pad),
            )
            now = time.monotonic()
            if now >= next_report:
                box.pump(0)
                log(
                    f"published {seq + 1}/{args.events}, received {box.frames()}/{expected_frames} "
                    "frames"
                )
                next_report = now + 1.0
                if not gw.alive():
                    raise RuntimeError(f"gateway died during the run; log:\n{gw.log_tail()}")
        t_last_pub = time.monotonic()
        publish_s = time.monotonic() - t0
        log(f"published {args.events} events in {publish_s:.2f} s; waiting for the last frames")

        next_report = time.monotonic() + 1.0

        def report() -> None:
            nonlocal next_report
            if time.monotonic() >= next_report:
                log(f"received {box.frames()}/{expected_frames} frames")
                next_report = time.monotonic() + 1.0

        box.drain(active, args.drain_timeout, expected_frames, report)
        snap1 = CpuSnapshot(pids)
        wall_step = (time.time() - time.monotonic()) - wall_offset0
        complete = all(k in box.done for k in active)
        if spy is not None and spy.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        util = snap0.delta(snap1)
        gateway_cpu = util["cpu_s"].get("gateway", 0.0)

        # --- collect ---------------------------------------------------------------------------
        box.collect(clients, 60)
        results = box.results
        gw_metrics = gw.metrics()

        # --- analyse ---------------------------------------------------------------------------
        d = count_deliveries(results, pub_times, t_first_pub)
        positions = check_positions(results, args.events) if args.protocol == "v2" else None
        delivered = d.delivered
        expected_all = args.sockets * args.events
        missing = expected_all - d.delivered
        window = max(d.last_recv - t_first_pub, 1e-9)
        lat = percentiles(d.latencies)
        neck = bottleneck(util, ncpu=os.cpu_count() or 1)
        achieved_rate = (
            args.events / (t_last_pub - t_first_pub)
            if args.events > 1 and t_last_pub > t_first_pub
            else None
        )
        direct = gw_metrics.get("wsgateway_direct_writes_total")
        gw_frames = gw_metrics.get("wsgateway_frames_delivered_total")
        result = {
            "bench": "fanout",
            "sockets": args.sockets,
            "events": args.events,
            "rate": args.rate,
            "payload_bytes": event_bytes,
            "delivered": delivered,
            "expected": expected_all,
            "missing": missing,
            "duplicates": d.duplicates,
            "out_of_order": d.out_of_order,
            "complete": complete and missing == 0 and (positions is None or positions["ok"]),
            "protocol": args.protocol,
            **({"v2_check": positions} if positions is not None else {}),
            "frames_per_s": round(delivered / window, 1),
            "latency_ms": rounded(lat),
            "server_cpu_us_per_frame": round(gateway_cpu / delivered * 1e6, 2)
            if delivered
            else None,
            "server_cpu_s": gateway_cpu,
            "server_cpu_split_us_per_frame": {
                "user": round(util["user_s"].get("gateway", 0.0) / delivered * 1e6, 2)
                if delivered
                else None,
                "sys": round(util["sys_s"].get("gateway", 0.0) / delivered * 1e6, 2)
                if delivered
                else None,
            },
            "client_cpu_us_per_frame": round(
                sum(v for k, v in util["cpu_s"].items() if k.startswith("client"))
                / delivered
                * 1e6,
                2,
            )
            if delivered
            else None,
            "window_s": round(util["wall_s"], 3),
            "client_processes": args.clients,
            "client_impl": args.client_impl,
            "direct_write": args.direct_write,
            "role": args.role,
            "bottleneck": neck["summary"],
            "cpu_cores": cpu_cores(util),
            "achieved_rate": round(achieved_rate, 2) if achieved_rate else None,
            "publish_max_lag_ms": round(max_lag * 1000, 2),
            "gateway_dispatch_ms": dispatch_stats(gw_metrics),
            "wall_clock_adjusted_ms": round(wall_step * 1000, 2),
            "connect": opening.summary(),
            "gateway_counters": {
                "frames_delivered": gw_frames,
                "direct_writes": direct,
                "direct_write_share": round(direct / gw_frames, 3)
                if direct is not None and gw_frames
                else None,
                "slow_consumer_closes": gw_metrics.get("wsgateway_slow_consumer_closes_total"),
            },
            "closed_sockets": d.closed,
            "other_frames": d.other,
            "profiled": bool(args.profile),
            "timestamp": started,
            "host_busy_cores_before": host_busy_before,
            "gateway_code": stack.code_identity,
            "host": host_info(fd_limit=False),
        }

        # --- profile and files -----------------------------------------------------------------
        if spy is not None:
            profile = finish_profile(spy, args.results_dir, base_name, timeout=30)
            spy = None
            if "error" not in profile:
                keep = ("samples", "idle_samples", "svg", "top", "self_top5")
                result["profile"] = {k: profile[k] for k in keep}
        if not args.no_save:
            detail = {
                "utilisation": util,
                "bottleneck_detail": neck,
                "per_client": {
                    k: {
                        "open": r["open"],
                        "failed": r["failed"],
                        "cpu_s_receive": r.get("cpu_s_receive"),
                    }
                    for k, r in results.items()
                },
                "gateway_metrics": {
                    k: v for k, v in gw_metrics.items() if k.startswith("wsgateway_")
                },
            }
            title = (
                f"fanout: {args.sockets} sockets × {args.events} events at {args.rate:g}/s, "
                f"{event_bytes} B, direct_write={args.direct_write}, {args.clients} clients "
                f"({args.client_impl}, {args.protocol}); p50 {lat.get('p50', 0):.1f} ms, p99 {lat.get('p99', 0):.1f} ms, "
                f"{result['server_cpu_us_per_frame']} µs/frame"
            )
            save_result(
                result,
                args.results_dir,
                base_name,
                detail=detail,
                draw=lambda png: plot_latency(png, d.latencies, d.per_event, title),
            )
        return result
    finally:
        stop_clients(clients, timeout=5)
        if spy is not None:
            stop_process(spy)
        if resp is not None:
            resp.close()
        if stack is not None:
            stack.close()
        finish_log_dir(log_dir, bool(result))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main("fanout", lambda: run(args), lambda result: bool(result.get("complete")))


if __name__ == "__main__":
    sys.exit(main())
