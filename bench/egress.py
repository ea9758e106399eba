"""What each gateway instance costs Redis: network bytes out and in, commands and Redis CPU for a
fixed publish workload, with 0, 1, 2 and 4 gateway instances on one Redis.

    .venv/bin/python -m bench.egress [--instances 0,1,2,4] [--events 6000] [--rate 500]
                                     [--payload 250] [--pubsub-share 0.5]

Every instance reads the whole stream (its own consumer group, D14) and receives every PUBLISH of
the patterns it subscribed, so Redis egress grows with instances × events/s whatever the sockets;
each instance also sends every event back in its position script (D20, appended once across
instances by a guard key, but the script and its payload go out from each). The run with 0
instances is the publisher alone: the rest is the gateways'. No sockets are connected (admission
adds one revocation ``MGET`` per staff handshake, not per event).

Per instance count: a fresh redis-server, the instances as processes, wait until their groups
exist; INFO stats/cpu and ``/proc`` CPU before; publish ``--events`` at ``--rate`` (absolute
schedule) over one RESP socket, each event either ``XADD events:critical`` or ``PUBLISH
branch:2:waiters`` (``--pubsub-share``); wait until every group has no lag and nothing pending,
plus a second; INFO and CPU after. Also an idle second before the publishing (blocked
``XREADGROUP`` timeouts), reported per second.

Prints progress on stderr, ONE JSON line on stdout, and writes it (with per-run detail) under
``bench/results/egress-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.lib.constants import RESULTS, STREAM, STREAM_MAXLEN
from bench.lib.gateway_code import export_gateway, gateway_code_identity
from bench.lib.gateway_process import GatewayProcess
from bench.lib.log import log
from bench.lib.measurement import CpuSnapshot, cpu_cores, wait_for_quiet_host
from bench.lib.resp import Resp
from bench.lib.results import rel, run_main, stamp, write_json
from gateway.core.events import encode_envelope, envelope
from gateway.redisio.embedded import RedisProcess
from gateway.redisio.embedded_config import RedisConfig, free_port

CHANNEL = "branch:2:waiters"
IDLE_S = 1.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Redis cost per gateway instance (see the module docstring).")
    p.add_argument("--instances", default="0,1,2,4", help="comma-separated instance counts (default 0,1,2,4)")
    p.add_argument("--events", type=int, default=6000)
    p.add_argument("--rate", type=float, default=500.0, help="events per second (default 500)")
    p.add_argument("--payload", type=int, default=250, help="approximate event JSON size in bytes")
    p.add_argument("--pubsub-share", type=float, default=0.5, help="fraction published with PUBLISH (default 0.5)")
    p.add_argument("--gateway-ref", default=None,
                   help="run the gateway package of this git commit (git archive) instead of the work tree's")
    p.add_argument("--wait-idle", type=float, default=0.0,
                   help="wait up to this many seconds for the host to be quiet before each run")
    p.add_argument("--results-dir", default=str(RESULTS))
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    args.counts = [int(n) for n in args.instances.split(",") if n.strip()]
    if not args.counts or any(n < 0 or n > 16 for n in args.counts):
        p.error("--instances: counts from 0 to 16")
    if not 0 <= args.pubsub_share <= 1 or args.events < 1 or args.rate <= 0:
        p.error("--pubsub-share in [0, 1], --events >= 1, --rate > 0")
    return args


def payload(seq: int, size: int) -> bytes:
    base = envelope("ROUND_PENDING", 1, 2, table_id=5, session_id=9, sector_id=3, entity={"seq": seq, "pad": ""})
    pad = max(0, size - len(encode_envelope(base)))
    base["entity"] = {"seq": seq, "pad": "x" * pad}
    return encode_envelope(base)


def info(r: Resp) -> dict[str, float]:
    out: dict[str, float] = {}
    for section in ("stats", "cpu"):
        text = r.call("INFO", section).decode()
        for line in text.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                try:
                    out[key] = float(value)
                except ValueError:
                    continue
    return out


def groups_drained(r: Resp, count: int) -> bool:
    try:
        groups = r.call("XINFO", "GROUPS", STREAM)
    except Exception:
        return count == 0
    if len(groups) < count:
        return False
    for g in groups:
        fields = {g[i].decode(): g[i + 1] for i in range(0, len(g) - 1, 2)}
        if fields.get("pending") or fields.get("lag"):
            return False
    return True


def wait_groups(r: Resp, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if len(r.call("XINFO", "GROUPS", STREAM)) >= count:
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{count} consumer groups not there within {timeout:g} s")


def one_run(args: argparse.Namespace, count: int, log_dir: str, source: str | None) -> dict[str, Any]:
    if args.wait_idle:
        wait_for_quiet_host(args.wait_idle, 0.5)
    redis = RedisProcess(RedisConfig(port=0))
    gateways: list[GatewayProcess] = []
    try:
        redis.start()
        assert redis.port is not None
        r = Resp("127.0.0.1", redis.port)
        # The stream exists before the gateways, as in production.
        r.call("XADD", STREAM, "MAXLEN", "~", STREAM_MAXLEN, "*", "data", payload(-1, args.payload))
        for i in range(count):
            gw_dir = os.path.join(log_dir, f"n{count}-{i}")
            os.makedirs(gw_dir, exist_ok=True)
            gw = GatewayProcess(port=free_port(), log_dir=gw_dir, source=source, env={
                "REDIS_URL": redis.url, "LOG_LEVEL": "WARNING", "GATEWAY_INSTANCE_ID": f"egress-{i}"})
            gateways.append(gw)
            gw.start()
        for gw in gateways:
            gw.wait_healthy(timeout=30)
        wait_groups(r, count)
        time.sleep(1.0)
        pids = {"redis": redis.pid, **{f"gateway{i}": gw.pid for i, gw in enumerate(gateways)}}
        idle_before = info(r)
        time.sleep(IDLE_S)
        before, cpu_before = info(r), CpuSnapshot(pids)
        ops_peak = 0.0
        start = time.monotonic()
        every = max(1, round(1 / args.pubsub_share)) if args.pubsub_share else 0
        for seq in range(args.events):
            delay = start + seq / args.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            data = payload(seq, args.payload)
            if every and seq % every == 0:
                r.call("PUBLISH", CHANNEL, data)
            else:
                r.call("XADD", STREAM, "MAXLEN", "~", STREAM_MAXLEN, "*", "data", data)
            if seq % int(args.rate) == 0:
                ops_peak = max(ops_peak, info(r).get("instantaneous_ops_per_sec", 0.0))
        deadline = time.monotonic() + 60
        while not groups_drained(r, count) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        after, cpu_after = info(r), CpuSnapshot(pids)
        util = cpu_before.delta(cpu_after)
        out_b = after["total_net_output_bytes"] - before["total_net_output_bytes"]
        in_b = after["total_net_input_bytes"] - before["total_net_input_bytes"]
        cmds = after["total_commands_processed"] - before["total_commands_processed"]
        redis_cpu = (after["used_cpu_sys"] + after["used_cpu_user"]) - (before["used_cpu_sys"] + before["used_cpu_user"])
        return {
            "instances": count,
            "redis_out_bytes": int(out_b),
            "redis_in_bytes": int(in_b),
            "out_bytes_per_event": round(out_b / args.events, 1),
            "in_bytes_per_event": round(in_b / args.events, 1),
            "commands": int(cmds),
            "commands_per_event": round(cmds / args.events, 2),
            "redis_cpu_s": round(redis_cpu, 3),
            "redis_cpu_us_per_event": round(redis_cpu / args.events * 1e6, 1),
            "redis_cores": round(redis_cpu / util["wall_s"], 3),
            "ops_per_sec_peak": ops_peak,
            "idle_out_bytes_per_s": round((before["total_net_output_bytes"] - idle_before["total_net_output_bytes"])
                                          / IDLE_S, 1),
            "wall_s": util["wall_s"],
            "cpu_cores": cpu_cores(util, by_kind=False),
        }
    finally:
        for gw in gateways:
            gw.stop()
        redis.close()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = stamp()

    def body() -> dict[str, Any]:
        log_dir = tempfile.mkdtemp(prefix="gw-egress-")
        source = None
        if args.gateway_ref:
            source = os.path.join(log_dir, "src")
            identity = gateway_code_identity(export_gateway(args.gateway_ref, source), source)
        else:
            identity = gateway_code_identity()
        runs = []
        for count in args.counts:
            log(f"{count} instance(s): {args.events} events at {args.rate:g}/s")
            runs.append(one_run(args, count, log_dir, source))
            log(json.dumps({k: v for k, v in runs[-1].items() if k != "cpu_cores"}))
        base = next((r for r in runs if r["instances"] == 0), None)
        for run in runs:
            if base is not None and run["instances"]:
                run["gateway_out_bytes_per_event_per_instance"] = round(
                    (run["redis_out_bytes"] - base["redis_out_bytes"]) / args.events / run["instances"], 1)
                run["gateway_in_bytes_per_event_per_instance"] = round(
                    (run["redis_in_bytes"] - base["redis_in_bytes"]) / args.events / run["instances"], 1)
                run["gateway_redis_cpu_us_per_event_per_instance"] = round(
                    (run["redis_cpu_s"] - base["redis_cpu_s"]) / args.events / run["instances"] * 1e6, 1)
        result: dict[str, Any] = {
            "bench": "egress", "events": args.events, "rate": args.rate,
            "payload_bytes": len(payload(0, args.payload)), "pubsub_share": args.pubsub_share,
            "runs": runs, "gateway_code": identity, "timestamp": started,
        }
        if not args.no_save:
            path = Path(args.results_dir) / f"egress-{started}-e{args.events}-r{args.rate:g}.json"
            result["files"] = {"json": rel(path)}
            write_json(path, result)
        return result

    return run_main("egress", body, lambda result: True)


if __name__ == "__main__":
    sys.exit(main())
