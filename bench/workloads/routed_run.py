"""The routed workload (``bench.routed``, and ``bench.soak`` for minutes): start redis, the gateway
and the clients, open the population, publish the planned mix on an absolute schedule, collect
every frame. Everything started is stopped in ``finally``."""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from bench.lib.clients import ClientInbox, ClientProcess, Opening, start_clients, stop_clients
from bench.lib.gateway_process import Stack, instrumented_gateway
from bench.lib.gclog import gc_summary, wait_for_file
from bench.lib.log import log
from bench.lib.measurement import CpuSnapshot, proc_cpu_seconds, proc_memory, wait_for_quiet_host
from bench.lib.options import add_profile_args, add_run_args
from bench.lib.processes import stop_process
from bench.lib.profiling import finish_profile, start_py_spy
from bench.lib.resp import Resp
from bench.lib.results import finish_log_dir
from bench.workloads.audiences import Expectation, expected_audiences
from bench.workloads.mix import Planned, plan_event, publish_commands
from bench.workloads.population import SocketSpec, build_population
from gateway.settings import Settings


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
    p.add_argument(
        "--ingest-linger-ms",
        type=int,
        default=None,
        help="GATEWAY_INGEST_LINGER_MS of the gateway (default: the gateway's own default)",
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
        help="run the gateway instrumented (bench/lib/instrumented.py) and report garbage-collector "
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
    """What a run produced, for the report of ``bench.routed`` or ``bench.soak``."""

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
    settings = Settings.from_env({"ENVIRONMENT": "development"})
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
        if args.ingest_linger_ms is not None:
            env["GATEWAY_INGEST_LINGER_MS"] = str(args.ingest_linger_ms)
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
        if wait_for_file(gc_log, 10):  # written by the instrumented gateway as it exits
            w.gc = gc_summary(gc_log, w.t_first_pub, w.t_last_pub + args.drain_timeout)
        shutil.rmtree(gc_dir, ignore_errors=True)
    return w
