"""The floor under ``bench.routed``: what writing its frames costs, with nothing else to do.

    .venv/bin/python -m bench.floor [--branches 100] [--rate 1000] [--duration 30] [--clients 2]

No gateway and no Redis. The same population as ``bench.routed`` (29 sockets per branch), the
same seeded event mix and the same audiences (``gateway.core.routing.receives`` per routing
class, as the routed benchmark checks them); each logical event becomes one v1 WebSocket frame,
encoded once (the routed event's JSON, by the gateway's own ``text_frame``), and at ``--rate``
events per second on an absolute schedule this process ``send``s it to every socket of its
audience, one system call per frame, over loopback TCP with ``TCP_NODELAY``, to ``--clients`` sink processes
that read and discard. Between events it sleeps, as a gateway waits in ``epoll`` between
batches.

The CPU of this process over the writing window, per logical event and per frame, split into
user and system time, is the cost any gateway pays on this machine for the writes alone when
it writes each frame with its own system call: the system part (the loopback ``write`` also
runs the receiver's TCP input) is what any language pays; the user part is the least Python
pays to issue the calls. Compare with ``server_cpu_us_per_event`` of ``bench.routed``.

Prints ONE JSON line on stdout and writes it under ``bench/results/floor-<timestamp>-….json``.
"""

from __future__ import annotations

import argparse
import os
import resource
import selectors
import socket
import sys
import time
from typing import Any

from bench.lib.constants import RESULTS
from bench.lib.log import log
from bench.lib.measurement import CpuSnapshot, cpu_cores, wait_for_quiet_host
from bench.lib.processes import python_exe, spawn, stop_process
from bench.lib.results import rel, run_main, stamp, write_json
from bench.workloads.audiences import expected_audiences
from bench.workloads.mix import encoded_event, entity_of, plan_event
from bench.workloads.population import build_population
from gateway.core.frames import text_frame
from gateway.settings import Settings

SEED = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Cost of the routed benchmark's writes alone (see the module docstring).")
    p.add_argument("--branches", type=int, default=100)
    p.add_argument("--rate", type=float, default=1000.0, help="logical events per second (default 1000)")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of writing (default 30)")
    p.add_argument("--clients", type=int, default=2, help="sink processes (default 2)")
    p.add_argument("--wait-idle", type=float, default=0.0,
                   help="wait up to this many seconds for the host to be quiet before starting (default 0)")
    p.add_argument("--idle-threshold", type=float, default=0.5)
    p.add_argument("--no-save", action="store_true", help="print the JSON line only")
    p.add_argument("--sink", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.branches < 1 or args.rate <= 0 or args.duration <= 0 or args.clients < 1:
        p.error("--branches, --rate, --duration and --clients must be positive")
    return args


def sink() -> int:
    """Accept connections on a fresh port (printed on stdout) and discard what they send, until
    stdin closes."""
    listener = socket.create_server(("127.0.0.1", 0), backlog=4096)
    listener.setblocking(False)
    print(listener.getsockname()[1], flush=True)
    sel = selectors.EpollSelector()
    sel.register(listener, selectors.EVENT_READ, "listener")
    sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
    buf = bytearray(1 << 16)
    while True:
        for key, _mask in sel.select():
            if key.data == "stdin":
                return 0
            if key.data == "listener":
                while True:
                    try:
                        conn, _addr = listener.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, "conn")
                continue
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            try:
                n = sock.recv_into(buf)
            except BlockingIOError:
                continue
            if n == 0:
                sel.unregister(sock)
                sock.close()


def plan(args: argparse.Namespace) -> tuple[list[list[int]], list[bytes], int]:
    """Per logical event: the sockets that get it and its frame; and the socket count."""
    population = build_population(args.branches, settings=Settings())
    events = int(args.rate * args.duration)
    plans = [plan_event(seq, SEED, args.branches) for seq in range(events)]
    exp = expected_audiences(population, plans)
    by_class: list[list[int]] = [[] for _ in range(exp.classes)]
    for i, c in enumerate(exp.class_of):
        by_class[c].append(i)
    audiences: list[list[int]] = [[] for _ in plans]
    for c, seqs in enumerate(exp.class_seqs):
        for seq in seqs:
            audiences[seq].extend(by_class[c])
    frames = [text_frame(encoded_event(p, entity_of(p))) for p in plans]
    return audiences, frames, len(population)


def write_all(socks: list[socket.socket], audiences: list[list[int]], frames: list[bytes],
              rate: float) -> dict[str, Any]:
    start = time.monotonic() + 0.1
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.monotonic()
    blocked = 0
    for seq, (audience, frame) in enumerate(zip(audiences, frames, strict=True)):
        due = start + seq / rate
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        for i in audience:
            try:
                socks[i].send(frame)
            except BlockingIOError:
                blocked += 1
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_s": after.ru_utime - before.ru_utime, "sys_s": after.ru_stime - before.ru_stime,
            "wall_s": wall, "blocked_sends": blocked}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sink:
        return sink()
    started = stamp()

    def body() -> dict[str, Any]:
        log("planning the events and their audiences")
        audiences, frames, n_sockets = plan(args)
        if args.wait_idle:
            wait_for_quiet_host(args.wait_idle, args.idle_threshold)
        sinks = [spawn([python_exe(), "-m", "bench.floor", "--sink"], stdin=-1, stdout=-1)
                 for _ in range(args.clients)]
        socks: list[socket.socket] = []
        try:
            ports = [int((s.stdout.readline() if s.stdout else b"").strip()) for s in sinks]
            for i in range(n_sockets):
                sock = socket.create_connection(("127.0.0.1", ports[i % len(ports)]))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setblocking(False)
                socks.append(sock)
            time.sleep(1.0)
            log(f"{n_sockets} sockets open; writing {len(frames)} events at {args.rate:g}/s")
            pids = {"writer": os.getpid(), **{f"sink{k}": s.pid for k, s in enumerate(sinks)}}
            cpu0 = CpuSnapshot(pids)
            cost = write_all(socks, audiences, frames, args.rate)
            util = cpu0.delta(CpuSnapshot(pids))
        finally:
            for sock in socks:
                sock.close()
            for s in sinks:
                if s.stdin:
                    s.stdin.close()
                stop_process(s)
        n_events, n_frames = len(frames), sum(len(a) for a in audiences)
        result: dict[str, Any] = {
            "bench": "floor",
            "sockets": n_sockets,
            "branches": args.branches,
            "events": n_events,
            "rate": args.rate,
            "frames": n_frames,
            "frames_per_event": round(n_frames / n_events, 2),
            "frame_bytes_mean": round(sum(len(f) * len(a) for f, a in zip(frames, audiences, strict=True))
                                      / max(n_frames, 1), 1),
            "writer_cpu_us_per_event": round((cost["user_s"] + cost["sys_s"]) / n_events * 1e6, 1),
            "writer_cpu_split_us_per_event": {"user": round(cost["user_s"] / n_events * 1e6, 1),
                                              "sys": round(cost["sys_s"] / n_events * 1e6, 1)},
            "writer_cpu_us_per_frame": round((cost["user_s"] + cost["sys_s"]) / max(n_frames, 1) * 1e6, 2),
            "achieved_rate": round(n_events / cost["wall_s"], 1),
            "blocked_sends": cost["blocked_sends"],
            "cpu_cores": cpu_cores(util),
            "cpu_split_s": {"user": util["user_s"], "sys": util["sys_s"]},
            "timestamp": started,
        }
        if not args.no_save:
            path = RESULTS / f"floor-{started}-b{args.branches}-r{args.rate:g}-d{args.duration:g}-c{args.clients}.json"
            result["files"] = {"json": rel(path)}
            write_json(path, result)
            log(f"wrote {rel(path)}")
        return result

    return run_main("floor", body, lambda r: r["blocked_sends"] == 0)


if __name__ == "__main__":
    sys.exit(main())
