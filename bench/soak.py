"""Soak: the routed workload for N minutes; does memory or latency drift?

    .venv/bin/python -m bench.soak --minutes 10          # opt-in, not part of CI
    .venv/bin/python -m bench.soak --minutes 2           # a short proof run

The workload is ``bench.routed``'s (``bench.workloads.routed_run``): 2,900 sockets of 100
branches (admins, waiters with sectors, kitchens, diners), the backend's event mix at 200 logical events/s with
multi-channel copies, published the way the backend publishes; every socket's received set is
checked against ``gateway.core.routing.receives`` at the end (misses and extras must be 0). Unlike
``bench.routed`` the clients behave like the TS clients for the heartbeat: every socket sends
``ping`` every 30 s (``--ping-interval``), and the gateway keeps its default 60 s heartbeat
timeout, so a missed ping would show up as a 1001 close.

Sampled: gateway RSS (``/proc/<pid>/status``) and CPU every ``--sample-interval`` s (default 5);
per minute of publish time: latency p50/p99/max of the frames of the events published in it,
frames, gateway CPU (cores) and RSS at the end of the minute. Drift = last minute − first minute,
and an RSS slope (least squares over the samples after the first minute, MiB per hour).
``--gc-log`` also records the gateway's garbage-collector pauses (instrumented gateway).

Prints progress on stderr, ONE JSON line on stdout, and writes JSON + PNG under
``bench/results/``. The gateway, redis-server and clients are always stopped in ``finally``.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.lib.plots import save_figure, subplots
from bench.lib.results import percentiles, run_main, save_result, stamp
from bench.workloads.routed_report import Analysis, analyse, passed, summary
from bench.workloads.routed_run import Workload, add_workload_args, check_workload_args
from bench.workloads.routed_run import run_workload as run_routed_workload


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Soak of the routed workload (see the docstring).")
    p.add_argument("--minutes", type=float, default=10.0, help="minutes of publishing (10)")
    add_workload_args(p, duration_default=600.0)
    p.set_defaults(ping_interval=30.0)
    args = p.parse_args(argv)
    if not 0.5 <= args.minutes <= 240:
        p.error("--minutes must be within 0.5..240")
    args.duration = args.minutes * 60.0
    check_workload_args(p, args)
    return args


def per_minute(w: Workload, a: Analysis) -> list[dict[str, Any]]:
    """Latency, frames, CPU and RSS per minute of publish time."""
    t0 = w.t_first_pub
    bins: dict[int, list[float]] = defaultdict(list)
    for seq, lat in zip(a.lat_seq, a.latencies, strict=True):
        bins[int((w.pub_m[seq] - t0) // 60)].append(lat)
    minutes = max(int((w.t_last_pub - t0) // 60) + 1, 1)
    out: list[dict[str, Any]] = []
    gc_pauses = (w.gc or {}).get("pauses_ge_10ms") or []
    for m in range(minutes):
        lo, hi = m * 60.0, (m + 1) * 60.0
        inside = [s for s in w.samples if lo <= s["t"] <= hi]
        row: dict[str, Any] = {"minute": m + 1, "frames": len(bins.get(m, []))}
        if bins.get(m):
            row["latency_ms"] = {
                k: round(v, 2) for k, v in percentiles(bins[m], (50, 99)).items() if k != "min"
            }
        if inside:
            row["rss_mib_end"] = round((inside[-1]["rss_kb"] or 0) / 1024, 2)
            row["rss_mib_max"] = round(max((s["rss_kb"] or 0) for s in inside) / 1024, 2)
            row["redis_rss_mib_end"] = round((inside[-1].get("redis_rss_kb") or 0) / 1024, 2)
            if len(inside) >= 2 and inside[-1]["t"] > inside[0]["t"]:
                cpu = (inside[-1]["gateway_cpu_s"] or 0) - (inside[0]["gateway_cpu_s"] or 0)
                row["gateway_cores"] = round(cpu / (inside[-1]["t"] - inside[0]["t"]), 3)
        if gc_pauses:
            row["gc_pauses_ge_10ms"] = sum(1 for t, _g, _ms in gc_pauses if lo <= t < hi)
        out.append(row)
    return out


def rss_slope_mib_per_hour(w: Workload) -> float | None:
    """Least-squares slope of RSS over the samples after the first minute."""
    pts: list[tuple[float, float]] = [
        (s["t"], (s["rss_kb"] or 0) / 1024) for s in w.samples if s["t"] >= 60.0
    ]
    if len(pts) < 3:
        return None
    n = len(pts)
    mx = sum(t for t, _ in pts) / n
    my = sum(v for _, v in pts) / n
    var = sum((t - mx) ** 2 for t, _ in pts)
    if var <= 0:
        return None
    slope = sum((t - mx) * (v - my) for t, v in pts) / var
    return round(slope * 3600, 2)


def drift(rows: list[dict[str, Any]], w: Workload) -> dict[str, Any]:
    full = [r for r in rows if r.get("latency_ms") and "rss_mib_end" in r]
    if len(full) < 2:
        return {"note": "fewer than two minutes: no drift to compare"}
    first, last = full[0], full[-1]
    out: dict[str, Any] = {
        "first_minute": first["minute"],
        "last_minute": last["minute"],
        "rss_mib_first": first["rss_mib_end"],
        "rss_mib_last": last["rss_mib_end"],
        "rss_change_mib": round(last["rss_mib_end"] - first["rss_mib_end"], 2),
        "rss_change_pct": round((last["rss_mib_end"] / first["rss_mib_end"] - 1) * 100, 2),
        "rss_slope_mib_per_hour": rss_slope_mib_per_hour(w),
        "redis_rss_mib_first": first.get("redis_rss_mib_end"),
        "redis_rss_mib_last": last.get("redis_rss_mib_end"),
        "p50_ms_first": first["latency_ms"]["p50"],
        "p50_ms_last": last["latency_ms"]["p50"],
        "p99_ms_first": first["latency_ms"]["p99"],
        "p99_ms_last": last["latency_ms"]["p99"],
        "p99_change_ms": round(last["latency_ms"]["p99"] - first["latency_ms"]["p99"], 2),
    }
    if "gateway_cores" in first and "gateway_cores" in last:
        out["gateway_cores_first"] = first["gateway_cores"]
        out["gateway_cores_last"] = last["gateway_cores"]
    return out


def plot(path: Path, w: Workload, rows: list[dict[str, Any]], title: str) -> None:
    fig, axes = subplots(1, 3, (17, 4.8))
    ax = axes[0]
    mins = [r["minute"] for r in rows if r.get("latency_ms")]
    for key, style in (("p50", "o-"), ("p99", "s-"), ("max", "^:")):
        ax.plot(mins, [r["latency_ms"][key] for r in rows if r.get("latency_ms")], style, label=key)
    ax.axhline(50, color="red", ls=":", lw=1, label="50 ms (p99 goal)")
    ax.set_yscale("log")
    ax.set_xlabel("minute")
    ax.set_ylabel("publish → receive latency (ms)")
    ax.set_title("latency per minute")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    ax = axes[1]
    ts = [s["t"] / 60 for s in w.samples]
    ax.plot(ts, [(s["rss_kb"] or 0) / 1024 for s in w.samples], color="tab:purple")
    gc_pauses = (w.gc or {}).get("pauses_ge_10ms") or []
    for k, (t, gen, _ms) in enumerate(gc_pauses):
        if gen == 2:
            ax.axvline(t / 60, color="red", lw=0.6, alpha=0.5, label="gen-2 GC" if k == 0 else None)
    ax.set_xlabel("minutes since first publish")
    ax.set_ylabel("gateway RSS (MiB)")
    ax.set_title("gateway RSS")
    ax.grid(True, alpha=0.3)
    if gc_pauses:
        ax.legend(fontsize=8)
    ax = axes[2]
    cores = [r.get("gateway_cores") for r in rows]
    ax.bar([r["minute"] for r in rows], [c or 0 for c in cores], color="tab:orange")
    ax.set_xlabel("minute")
    ax.set_ylabel("gateway CPU (cores)")
    ax.set_title("gateway CPU per minute")
    ax.grid(True, alpha=0.3, axis="y")
    save_figure(fig, path, title)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = stamp()
    args.base_name = (
        f"soak-{started}-m{args.minutes:g}-b{args.branches}-r{args.rate:g}"
        f"-c{args.clients}-ping{args.ping_interval:g}"
        + ("-gc" if args.gc_log else "")
        + ("-prof" if args.profile else "")
    )

    def body() -> dict[str, Any]:
        w = run_routed_workload(args)
        a = analyse(w)
        result = summary(w, a, "soak")
        rows = per_minute(w, a)
        result = {
            "bench": "soak",
            "minutes": args.minutes,
            **{k: v for k, v in result.items() if k != "bench"},
            "per_minute": rows,
            "drift": drift(rows, w),
        }
        lat = result["latency_ms"]
        result["goals"] = {
            "zero_misses_and_extras": result["correct"],
            "p99_le_50ms_every_minute": all(
                r["latency_ms"]["p99"] <= 50.0 for r in rows if r.get("latency_ms")
            ),
            "no_heartbeat_closes": not result["closed_sockets"],
        }
        result["timestamp"] = started
        if not args.no_save:
            d = result["drift"]
            title = (
                f"soak: {args.minutes:g} min, {len(w.population)} sockets, {args.rate:g} events/s; "
                f"misses {a.misses}, extras {a.extras}; p99 {lat.get('p99', 0):.1f} ms; "
                f"RSS {d.get('rss_mib_first')} → {d.get('rss_mib_last')} MiB; {result['bottleneck']}"
            )
            save_result(
                result,
                args.results_dir,
                args.base_name,
                detail={"utilisation": w.util, "samples": w.samples, "gc_full": w.gc},
                draw=lambda png: plot(png, w, rows, title),
            )
        return result

    return run_main("soak", body, passed, ensure_ascii=False)


if __name__ == "__main__":
    sys.exit(main())
