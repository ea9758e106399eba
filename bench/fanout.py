#!/usr/bin/env python3
"""Fan-out benchmark: one event stream to N sockets of one branch, end to end, in one command.

    .venv/bin/python bench/fanout.py --sockets 1000 --events 200 --rate 20 [--payload 200]
        [--clients 2] [--direct-write 0|1] [--role waiter|admin] [--client-impl raw|trio-websocket]
        [--profile]

What it does, every step bounded in time:

1. starts a private ``redis-server`` (``RedisProcess``, TCP on a free port) and the gateway as its
   own process (``.venv/bin/gateway serve --port <free> --host 127.0.0.1``, ``REDIS_URL`` set,
   connection limits raised, ``LOG_LEVEL=WARNING``) and waits for ``/ws/health``;
2. opens N sockets on tenant 1 branch 2 (waiters with distinct user ids, or admins) from K client
   processes (``bench/_client.py``) and checks the gateway counts N registered sockets;
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
import json
import math
import os
import platform
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    RESULTS,
    ROOT,
    CpuSnapshot,
    GatewayProcess,
    Resp,
    bottleneck,
    export_gateway,
    format_profile,
    gateway_code_identity,
    log,
    machine_cpu,
    percentiles,
    plot_latency,
    profile_summary,
    python_exe,
    render_flamegraph,
    stamp,
    start_py_spy,
    stop_process,
    write_json,
)

from gateway.events import encode_envelope, envelope
from gateway.redis_server import RedisConfig, RedisProcess, free_port
from gateway.settings import Settings
from gateway.tokens import mint_staff_token

TENANT = 1
BRANCH = 2
STREAM = "events:critical"
STREAM_MAXLEN = 50000
#: Reaches A(b) and every waiter of the branch whatever its sectors (see gateway.routing).
EVENT_TYPE = "ROUND_PENDING"
CLIENT_SCRIPT = Path(__file__).resolve().parent / "_client.py"


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
        "--connect-timeout", type=float, default=60.0, help="seconds to open all sockets"
    )
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        help="seconds after the last publish to wait for the last frame",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="record the gateway with py-spy during the measurement window",
    )
    p.add_argument(
        "--profile-rate", type=int, default=200, help="py-spy samples per second (default 200)"
    )
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="wait up to this many seconds for the host to be quiet before starting (default 0)",
    )
    p.add_argument(
        "--idle-threshold",
        type=float,
        default=0.5,
        help="busy cores below which the host counts as quiet (default 0.5)",
    )
    p.add_argument(
        "--gateway-ref",
        default=None,
        help="run the gateway package of this git commit (e.g. HEAD, exported with git archive) "
        "instead of the work tree's",
    )
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--no-save", action="store_true", help="print the JSON line only")
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
    if args.sockets * args.events > 20_000_000:
        p.error("--sockets × --events must stay below 20 million frames")
    return args


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


def wait_for_quiet_host(limit: float, threshold: float) -> float:
    """Sample the machine's busy cores each second until below ``threshold`` or ``limit`` s passed.

    Returns the last sample: the load other users put on the host just before the run.
    """
    deadline = time.monotonic() + limit
    while True:
        before = machine_cpu()
        time.sleep(1.0)
        after = machine_cpu()
        busy = round(after[0] - before[0], 2)
        if busy < threshold or time.monotonic() >= deadline:
            if limit > 0:
                log(
                    f"host busy: {busy} cores before the run"
                    + ("" if busy < threshold else " (not quiet)")
                )
            return busy
        log(f"host busy: {busy} cores, waiting for < {threshold}")


def _rel(path: Path) -> str:
    """A path relative to the repository when it is inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def dispatch_stats(metrics: dict[str, float]) -> dict[str, float | None]:
    """The gateway's own histogram: from reading an event to its last frame handed to the kernel.

    Mean from sum/count; p50/p99 as the upper bound of the bucket that holds them.
    """
    prefix = "wsgateway_delivery_latency_seconds"
    count = metrics.get(f"{prefix}_count") or 0.0
    total = metrics.get(f"{prefix}_sum") or 0.0
    buckets = sorted(
        (float(name.split('le="', 1)[1].rstrip('"}')), value)
        for name, value in metrics.items()
        if name.startswith(f"{prefix}_bucket") and "+Inf" not in name
    )

    def upper(q: float) -> float | None:
        for le, cumulative in buckets:
            if count and cumulative >= q * count:
                return round(le * 1000, 2)
        return None

    return {
        "events": count,
        "mean": round(total / count * 1000, 2) if count else None,
        "p50_le": upper(0.5),
        "p99_le": upper(0.99),
    }


class ClientProc:
    """One client process, with a thread turning its stdout lines into queue items."""

    def __init__(
        self,
        k: int,
        cfg: dict[str, Any],
        out: queue.Queue[tuple[int, dict[str, Any]]],
        log_dir: str,
    ) -> None:
        self.k = k
        self.stderr_path = os.path.join(log_dir, f"client-{k}.log")
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [python_exe(), str(CLIENT_SCRIPT)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=str(ROOT),
                start_new_session=True,
            )
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cfg) + "\n").encode())
        self.proc.stdin.flush()
        self.thread = threading.Thread(target=self._read, args=(out,), daemon=True)
        self.thread.start()

    def _read(self, out: queue.Queue[tuple[int, dict[str, Any]]]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                out.put((self.k, json.loads(line)))
        out.put((self.k, {"type": "eof"}))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.write(b"stop\n")
                self.proc.stdin.flush()

    def log_tail(self) -> str:
        try:
            return Path(self.stderr_path).read_text(errors="replace")[-2000:]
        except OSError:
            return ""


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = stamp()
    base_name = (
        f"fanout-{started}-s{args.sockets}-e{args.events}-r{args.rate:g}-p{args.payload}"
        f"-c{args.clients}-dw{args.direct_write}"
        + ("" if args.role == "waiter" else f"-{args.role}")
        + ("" if args.client_impl == "raw" else "-trio")
        + ("-prof" if args.profile else "")
    )
    log_dir = tempfile.mkdtemp(prefix="gw-bench-")
    redis: RedisProcess | None = None
    gw: GatewayProcess | None = None
    clients: list[ClientProc] = []
    spy: subprocess.Popen[bytes] | None = None
    resp: Resp | None = None
    inbox: queue.Queue[tuple[int, dict[str, Any]]] = queue.Queue()
    result: dict[str, Any] = {}
    try:
        host_busy_before = wait_for_quiet_host(args.wait_idle, args.idle_threshold)
        # --- redis and gateway ----------------------------------------------------------------
        redis = RedisProcess(RedisConfig(port=0))
        redis.start()
        assert redis.port is not None
        log(f"redis-server {redis.url} (pid {redis.pid})")
        port = free_port()
        env = {
            "REDIS_URL": redis.url,
            "WS_MAX_CONNECTIONS_PER_USER": "10000",
            "WS_MAX_TOTAL_CONNECTIONS": str(args.sockets + 1000),
            "LOG_LEVEL": "WARNING",
            "GATEWAY_DIRECT_WRITE": str(args.direct_write),
            # The clients do not ping during the run; keep the sweeper from closing them.
            "WS_HEARTBEAT_TIMEOUT": "3600",
            "GATEWAY_INSTANCE_ID": f"bench-{os.getpid()}",
        }
        source = None
        if args.gateway_ref:
            source = os.path.join(log_dir, "src")
            ref = export_gateway(args.gateway_ref, source)
            code_identity = gateway_code_identity(ref, source)
            log(f"gateway code: {args.gateway_ref} = {ref} (snapshot in {source})")
        else:
            code_identity = gateway_code_identity()
        gw = GatewayProcess(port=port, env=env, log_dir=log_dir, source=source)
        gw.start()
        gw.wait_healthy()
        log(f"gateway {gw.base_url} (pid {gw.pid}), direct_write={args.direct_write}")

        # --- sockets ---------------------------------------------------------------------------
        settings = Settings.from_env({})
        roles = ["WAITER"] if args.role == "waiter" else ["ADMIN"]
        tokens = [
            mint_staff_token(
                secret=settings.jwt_secret,
                issuer=settings.jwt_issuer,
                audience=settings.jwt_audience,
                user_id=10_000 + i,
                tenant_id=TENANT,
                branch_ids=[BRANCH],
                roles=roles,
                ttl=3600,
            )
            for i in range(args.sockets)
        ]
        url = f"{gw.ws_url}/ws/{args.role}"
        expected_window = args.events / args.rate
        deadline = args.connect_timeout + expected_window + args.drain_timeout + 60
        cpu_connect0 = CpuSnapshot({"gateway": gw.pid})
        t_connect0 = time.monotonic()
        for k in range(args.clients):
            idx = list(range(k, args.sockets, args.clients))
            cfg = {
                "client": k,
                "url": url,
                "tokens": [tokens[i] for i in idx],
                "indices": idx,
                "events": args.events,
                "connect_timeout": args.connect_timeout,
                "deadline": deadline,
                "impl": args.client_impl,
            }
            clients.append(ClientProc(k, cfg, inbox, log_dir))
        log(
            f"{args.clients} client processes ({args.client_impl}) opening {args.sockets} sockets on {url}"
        )
        connected: dict[int, dict[str, Any]] = {}
        wait_until = time.monotonic() + args.connect_timeout + 15
        while len(connected) < len(clients):
            if time.monotonic() > wait_until:
                raise RuntimeError("clients did not report their connections in time")
            if not gw.alive():
                raise RuntimeError(
                    f"gateway died while sockets were opening; log:\n{gw.log_tail()}"
                )
            with contextlib.suppress(queue.Empty):
                k, msg = inbox.get(timeout=0.2)
                if msg["type"] == "connected":
                    connected[k] = msg
                elif msg["type"] == "eof":
                    raise RuntimeError(f"client {k} exited early; stderr:\n{clients[k].log_tail()}")
        opened = sum(m["open"] for m in connected.values())
        failed = sum(m["failed"] for m in connected.values())
        errors: dict[str, int] = {}
        for m in connected.values():
            for e, n in m.get("errors", {}).items():
                errors[e] = errors.get(e, 0) + n
        # The gateway must have registered every socket the clients consider open.
        registered = -1
        until = time.monotonic() + max(args.connect_timeout - (time.monotonic() - t_connect0), 10)
        last_change = time.monotonic()
        while time.monotonic() < until and time.monotonic() - last_change < 10:
            now_registered = int(gw.health().get("total_connections", -1))
            if now_registered != registered:
                registered, last_change = now_registered, time.monotonic()
            if registered >= opened:
                break
            time.sleep(0.1)
        connect_s = time.monotonic() - t_connect0
        cpu_connect1 = CpuSnapshot({"gateway": gw.pid})
        connect_cpu = cpu_connect0.delta(cpu_connect1)["cpu_s"].get("gateway", 0.0)
        log(
            f"{opened} sockets open, {failed} failed, {registered} registered in {connect_s:.1f} s"
            + (f"; errors: {errors}" if errors else "")
        )
        if opened == 0:
            raise RuntimeError(f"no socket opened: {errors}")
        if registered < opened:
            raise RuntimeError(
                f"the gateway registered only {registered} of {opened} open sockets; log:\n"
                f"{gw.log_tail()}"
            )
        time.sleep(0.5)  # let admission tails (sector lookups, metrics) settle

        # --- publish ---------------------------------------------------------------------------
        resp = Resp("127.0.0.1", redis.port)
        pad = padding_for(args.payload)
        event_bytes = len(build_event(args.events, time.time(), time.monotonic(), pad))
        pids = {"gateway": gw.pid, "redis": redis.pid, "publisher": os.getpid()}
        pids.update({f"client{c.k}": c.pid for c in clients})
        pub_times: list[float] = [0.0] * args.events  # time.monotonic() of each XADD
        progress: dict[int, int] = {c.k: 0 for c in clients}
        done: dict[int, float] = {}
        eof: set[int] = set()
        max_lag = 0.0

        def pump(timeout: float) -> None:
            """Take client messages for up to ``timeout`` seconds."""
            end = time.monotonic() + timeout
            while True:
                remaining = end - time.monotonic()
                try:
                    k, msg = (
                        inbox.get(timeout=max(remaining, 0))
                        if remaining > 0
                        else inbox.get_nowait()
                    )
                except queue.Empty:
                    return
                kind = msg["type"]
                if kind == "progress":
                    progress[k] = msg["frames"]
                elif kind == "done":
                    progress[k] = msg["frames"]
                    done[k] = time.time()
                elif kind == "eof":
                    eof.add(k)
                elif kind == "result":
                    results[k] = msg

        results: dict[int, dict[str, Any]] = {}
        expected_frames = opened * args.events
        active = [c.k for c in clients if connected[c.k]["open"] > 0]
        snap0 = CpuSnapshot(pids)
        if args.profile:
            spy_path = args.results_dir / f"{base_name}.folded"
            args.results_dir.mkdir(parents=True, exist_ok=True)
            assert gw.pid is not None
            spy = start_py_spy(
                gw.pid,
                math.ceil(expected_window + args.drain_timeout + 10),
                spy_path,
                rate=args.profile_rate,
            )
            time.sleep(0.3)  # py-spy attaches
            snap0 = CpuSnapshot(pids)
        wall_offset0 = time.time() - time.monotonic()
        t0 = time.monotonic()
        t_first_pub = t0
        next_report = t0 + 1.0
        for seq in range(args.events):
            scheduled = t0 + seq / args.rate
            while True:
                delay = scheduled - time.monotonic()
                if delay <= 0:
                    break
                pump(min(delay, 0.05))
            max_lag = max(max_lag, time.monotonic() - scheduled)
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
                pump(0)
                log(
                    f"published {seq + 1}/{args.events}, received {sum(progress.values())}/{expected_frames} "
                    "frames"
                )
                next_report = now + 1.0
                if not gw.alive():
                    raise RuntimeError(f"gateway died during the run; log:\n{gw.log_tail()}")
        t_last_pub = time.monotonic()
        publish_s = time.monotonic() - t0
        log(f"published {args.events} events in {publish_s:.2f} s; waiting for the last frames")

        drain_until = time.monotonic() + args.drain_timeout
        next_report = time.monotonic() + 1.0
        while not all(k in done or k in eof for k in active):
            if time.monotonic() >= drain_until:
                log(f"drain timeout: {sum(progress.values())}/{expected_frames} frames received")
                break
            pump(0.02)
            if time.monotonic() >= next_report:
                log(f"received {sum(progress.values())}/{expected_frames} frames")
                next_report = time.monotonic() + 1.0
        snap1 = CpuSnapshot(pids)
        wall_step = (time.time() - time.monotonic()) - wall_offset0
        complete = all(k in done for k in active)
        if spy is not None and spy.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        util = snap0.delta(snap1)
        gateway_cpu = util["cpu_s"].get("gateway", 0.0)

        # --- collect ---------------------------------------------------------------------------
        for c in clients:
            c.stop()
        collect_until = time.monotonic() + 60
        while len(results) < len(clients) and time.monotonic() < collect_until:
            pump(0.2)
            if all(k in results or k in eof for k in range(len(clients))):
                break
        if len(results) < len(clients):
            missing_clients = [k for k in range(len(clients)) if k not in results]
            raise RuntimeError(f"no result from clients {missing_clients}")
        gw_metrics = gw.metrics()

        # --- analyse ---------------------------------------------------------------------------
        latencies: list[float] = []
        per_event: list[list[float]] = [[] for _ in range(args.events)]
        delivered = duplicates = out_of_order = other = 0
        closed: dict[str, int] = {}
        last_recv = t_first_pub
        for res in results.values():
            for s in res["sockets"]:
                seen: set[int] = set()
                prev = -1
                for seq, t in zip(s["seq"], s["t"], strict=True):
                    if seq in seen or not 0 <= seq < args.events:
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
        expected_all = args.sockets * args.events
        missing = expected_all - delivered
        window = max(last_recv - t_first_pub, 1e-9)
        lat = percentiles(latencies)
        per_event_stats = []
        for seq, values in enumerate(per_event):
            if values:
                values.sort()
                per_event_stats.append(
                    (pub_times[seq] - t_first_pub, values[len(values) // 2], values[-1])
                )
        ncpu = os.cpu_count() or 1
        neck = bottleneck(util, ncpu=ncpu)
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
            "duplicates": duplicates,
            "out_of_order": out_of_order,
            "complete": complete and missing == 0,
            "frames_per_s": round(delivered / window, 1),
            "latency_ms": {k: round(v, 2) for k, v in lat.items()},
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
            "cpu_cores": {
                **util["cores"],
                "machine_busy_cores": util["machine_busy_cores"],
                "outside_benchmark": util["other_cores"],
                "machine_by_kind": util["machine_cores_by_kind"],
            },
            "achieved_rate": round(achieved_rate, 2) if achieved_rate else None,
            "publish_max_lag_ms": round(max_lag * 1000, 2),
            "gateway_dispatch_ms": dispatch_stats(gw_metrics),
            "wall_clock_adjusted_ms": round(wall_step * 1000, 2),
            "connect": {
                "opened": opened,
                "failed": failed,
                "registered": registered,
                "seconds": round(connect_s, 2),
                "gateway_cpu_ms_per_socket": round(connect_cpu / max(opened, 1) * 1000, 3),
                "errors": errors,
            },
            "gateway_counters": {
                "frames_delivered": gw_frames,
                "direct_writes": direct,
                "direct_write_share": round(direct / gw_frames, 3)
                if direct is not None and gw_frames
                else None,
                "slow_consumer_closes": gw_metrics.get("wsgateway_slow_consumer_closes_total"),
            },
            "closed_sockets": closed,
            "other_frames": other,
            "profiled": bool(args.profile),
            "timestamp": started,
            "host_busy_cores_before": host_busy_before,
            "gateway_code": code_identity,
            "host": {
                "cpus": ncpu,
                "python": platform.python_version(),
                "machine": platform.machine(),
            },
        }

        # --- profile and files -----------------------------------------------------------------
        if spy is not None:
            try:
                _, spy_err = spy.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                stop_process(spy)
                spy_err = b""
            spy = None
            folded = args.results_dir / f"{base_name}.folded"
            if folded.exists() and folded.stat().st_size:
                summary = profile_summary(folded)
                top_txt = args.results_dir / f"{base_name}.top.txt"
                top_txt.write_text(format_profile(summary))
                svg = args.results_dir / f"profile-{base_name}.svg"
                render_flamegraph(folded, svg, f"gateway, {base_name}")
                result["profile"] = {
                    "samples": summary["samples"],
                    "idle_samples": summary["idle_samples"],
                    "svg": _rel(svg),
                    "top": _rel(top_txt),
                    "self_top5": [f"{r['percent']}% {r['function']}" for r in summary["self"][:5]],
                }
                log("gateway profile (py-spy):\n" + format_profile(summary, top=15))
            else:
                log(f"py-spy produced no output: {spy_err.decode(errors='replace')[-500:]}")
        if not args.no_save:
            args.results_dir.mkdir(parents=True, exist_ok=True)
            json_path = args.results_dir / f"{base_name}.json"
            png_path = args.results_dir / f"{base_name}.png"
            result["files"] = {"json": _rel(json_path), "png": _rel(png_path)}
            detail = {
                **result,
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
            write_json(json_path, detail)
            title = (
                f"fanout: {args.sockets} sockets × {args.events} events at {args.rate:g}/s, "
                f"{event_bytes} B, direct_write={args.direct_write}, {args.clients} clients "
                f"({args.client_impl}); p50 {lat.get('p50', 0):.1f} ms, p99 {lat.get('p99', 0):.1f} ms, "
                f"{result['server_cpu_us_per_frame']} µs/frame"
            )
            plot_latency(png_path, latencies, per_event_stats, title)
            log(f"wrote {_rel(json_path)} and {png_path.name}")
        return result
    finally:
        for c in clients:
            c.stop()
        for c in clients:
            stop_process(c.proc, timeout=5)
        if spy is not None:
            stop_process(spy)
        if resp is not None:
            resp.close()
        if gw is not None:
            gw.stop()
        if redis is not None:
            redis.close()
        if result:
            shutil.rmtree(log_dir, ignore_errors=True)
        else:
            log(f"logs of the gateway and the clients kept in {log_dir}")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # so that SIGTERM, too, stops every child in ``finally``


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        result = run(args)
    except Exception as exc:
        log(f"benchmark failed: {exc}")
        print(
            json.dumps(
                {"bench": "fanout", "error": str(exc).splitlines()[0] if str(exc) else repr(exc)}
            )
        )
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    print(json.dumps(result, separators=(",", ":")))
    return 0 if result.get("complete") else 3


if __name__ == "__main__":
    sys.exit(main())
