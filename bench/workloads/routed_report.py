"""The routed workload's frames checked against the expected audiences: misses, extras,
latency by socket kind and event family; the result fields and the plot."""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.lib.gateway_process import dispatch_stats, metric_sum
from bench.lib.measurement import bottleneck, cpu_cores, host_info
from bench.lib.plots import plot_per_event, save_figure, subplots
from bench.lib.results import percentiles, rounded
from bench.workloads.mix import FAMILIES
from bench.workloads.population import KINDS
from bench.workloads.routed_run import Workload


@dataclass
class Analysis:
    misses: int
    extras: int
    duplicates: int
    delivered: int
    expected: int
    reordered: int
    sockets_with_misses: int
    sockets_with_extras: int
    latencies: list[float]  # ms, every expected frame's first arrival
    lat_seq: list[int]  # the seq of each latency
    by_kind: dict[str, list[float]]
    by_family: dict[str, list[float]]
    last_recv: float
    examples: list[dict[str, Any]]
    pongs: int
    closed: dict[str, int]


def analyse(w: Workload) -> Analysis:
    exp = w.expectation
    class_sets = [set(s) for s in exp.class_seqs]
    family_of = [p.family for p in w.plans]
    pub_m = w.pub_m
    misses = extras = duplicates = delivered = reordered = 0
    with_misses = with_extras = pongs = 0
    latencies: list[float] = []
    lat_seq: list[int] = []
    by_kind: dict[str, list[float]] = defaultdict(list)
    by_family: dict[str, list[float]] = defaultdict(list)
    last_recv = w.t_first_pub
    examples: list[dict[str, Any]] = []
    closed: dict[str, int] = defaultdict(int)
    for res in w.results.values():
        for s in res["sockets"]:
            spec = w.population[s["i"]]
            want = class_sets[exp.class_of[s["i"]]]
            seen: set[int] = set()
            extra_here = 0
            prev = -1
            kind_lat = by_kind[spec.kind]
            pongs += s.get("pongs", 0)
            if s["close"] is not None:
                closed[str(s["close"])] += 1
            for seq, t in zip(s["seq"], s["t"], strict=True):
                if seq in seen:
                    duplicates += 1
                    extra_here += 1
                    continue
                seen.add(seq)
                if seq < prev:
                    reordered += 1
                prev = max(prev, seq)
                if seq not in want:
                    extra_here += 1
                    if len(examples) < 10:
                        examples.append({"socket": s["i"], "kind": spec.kind, "extra_seq": seq})
                    continue
                lat = (t - pub_m[seq]) * 1000.0
                latencies.append(lat)
                lat_seq.append(seq)
                kind_lat.append(lat)
                by_family[family_of[seq]].append(lat)
                last_recv = max(last_recv, t)
            missed_here = len(want - seen)
            if missed_here and len(examples) < 10:
                examples.append(
                    {
                        "socket": s["i"],
                        "kind": spec.kind,
                        "missed": sorted(want - seen)[:5],
                        "missed_count": missed_here,
                    }
                )
            delivered += len(seen & want)
            misses += missed_here
            extras += extra_here
            with_misses += bool(missed_here)
            with_extras += bool(extra_here)
    expected_total = sum(len(exp.class_seqs[c]) for c in exp.class_of)
    return Analysis(
        misses,
        extras,
        duplicates,
        delivered,
        expected_total,
        reordered,
        with_misses,
        with_extras,
        latencies,
        lat_seq,
        dict(by_kind),
        dict(by_family),
        last_recv,
        examples,
        pongs,
        dict(closed),
    )


def summary(w: Workload, a: Analysis, bench: str) -> dict[str, Any]:
    """The fields ``bench.routed`` and ``bench.soak`` share."""
    args = w.args
    util = w.util
    gateway_cpu = util["cpu_s"].get("gateway", 0.0)
    window = max(a.last_recv - w.t_first_pub, 1e-9)
    n_events = len(w.plans)
    mb, ma = w.metrics_before, w.metrics_after

    def delta(name: str) -> float:
        return round(metric_sum(ma, name) - metric_sum(mb, name), 1)

    copies = sum(len(p.paths) for p in w.plans)
    lat = percentiles(a.latencies)
    neck = bottleneck(util, ncpu=os.cpu_count() or 1)
    families = {f: sum(1 for p in w.plans if p.family == f) for f in FAMILIES}
    return {
        "bench": bench,
        "sockets": len(w.population),
        "branches": args.branches,
        "events": n_events,
        "copies_published": copies,
        "rate": args.rate,
        "duration_s": round(n_events / args.rate, 1),
        "expected_frames": a.expected,
        "delivered": a.delivered,
        "misses": a.misses,
        "extras": a.extras,
        "duplicates": a.duplicates,
        "sockets_with_misses": a.sockets_with_misses,
        "sockets_with_extras": a.sockets_with_extras,
        "correct": a.misses == 0 and a.extras == 0,
        "complete": w.complete,
        "latency_ms": rounded(lat),
        "latency_p99_ms_by_kind": {
            k: round(percentiles(v, (99,))["p99"], 2) for k, v in sorted(a.by_kind.items()) if v
        },
        "latency_p99_ms_by_family": {
            k: round(percentiles(v, (99,))["p99"], 2) for k, v in sorted(a.by_family.items()) if v
        },
        "frames_per_s": round(a.delivered / window, 1),
        "server_cpu_us_per_frame": round(gateway_cpu / a.delivered * 1e6, 2)
        if a.delivered
        else None,
        "server_cpu_us_per_event": round(gateway_cpu / n_events * 1e6, 1),
        "server_cpu_split_us_per_frame": {
            "user": round(util["user_s"].get("gateway", 0.0) / max(a.delivered, 1) * 1e6, 2),
            "sys": round(util["sys_s"].get("gateway", 0.0) / max(a.delivered, 1) * 1e6, 2),
        },
        "server_cpu_s": gateway_cpu,
        "gateway_cores": util["cores"].get("gateway"),
        "bottleneck": neck["summary"],
        "cpu_cores": cpu_cores(util, by_kind=False),
        "gateway_counters": {
            "frames_delivered": delta("wsgateway_frames_delivered_total"),
            "events_routed": delta("wsgateway_events_routed_total"),
            "events_duplicate": delta("wsgateway_events_duplicate_total"),
            "copies_expected_duplicate": copies - n_events,
            "events_invalid": delta("wsgateway_events_invalid_total"),
            "slow_consumer_closes": delta("wsgateway_slow_consumer_closes_total"),
        },
        "gateway_dispatch_ms": dispatch_stats(ma),
        "reordered_frames": a.reordered,
        "pongs": a.pongs,
        "closed_sockets": a.closed,
        "achieved_rate": round((n_events - 1) / (w.t_last_pub - w.t_first_pub), 2)
        if n_events > 1 and w.t_last_pub > w.t_first_pub
        else None,
        "publish_max_lag_ms": round(w.max_lag * 1000, 2),
        "families": families,
        "connect": w.connect,
        "gateway_rss_mb": {
            "before_connect": round((w.rss_before_connect_kb or 0) / 1024, 1),
            "after_connect": round((w.rss_after_connect_kb or 0) / 1024, 1),
            "end": round((w.samples[-1]["rss_kb"] or 0) / 1024, 1) if w.samples else None,
        },
        "expectation": {
            "routing_classes": w.expectation.classes,
            "sockets_rechecked_individually": w.expectation.sample_checked,
            "seconds": round(w.expectation.seconds, 2),
        },
        "examples": a.examples,
        "gc": {k: v for k, v in w.gc.items() if k != "pauses_ge_10ms"} if w.gc else None,
        "profile": w.profile,
        "instrumented_gateway": bool(w.gc is not None or getattr(args, "gc_log", False)),
        "ping_interval_s": args.ping_interval,
        "ingest_linger_ms": args.ingest_linger_ms,
        "host_busy_cores_before": w.host_busy_before,
        "gateway_code": w.code_identity,
        "host": host_info(),
    }


def plot(path: Path, w: Workload, a: Analysis, title: str) -> None:
    import numpy as np

    fig, axes = subplots(2, 2, (15, 9))
    ax = axes[0][0]
    for kind in KINDS:
        values = a.by_kind.get(kind)
        if values:
            arr = np.sort(np.asarray(values))
            ax.plot(
                arr, np.arange(1, len(arr) + 1) / len(arr), lw=1.4, label=f"{kind} ({len(arr)})"
            )
    if a.latencies:
        p99 = float(np.percentile(a.latencies, 99))
        ax.axvline(p99, color="grey", ls="--", lw=1)
        ax.text(p99, 0.05, f" p99 {p99:.1f} ms", fontsize=8)
    ax.axvline(50, color="red", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("publish → receive latency (ms)")
    ax.set_ylabel("fraction of frames")
    ax.set_title("CDF by socket kind (red: 50 ms goal)")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)

    ax = axes[0][1]
    per_seq: dict[int, list[float]] = defaultdict(list)
    for seq, lat in zip(a.lat_seq, a.latencies, strict=True):
        per_seq[seq].append(lat)
    per_event = [
        (w.pub_m[s] - w.t_first_pub, float(np.median(per_seq[s])), max(per_seq[s]))
        for s in sorted(per_seq)
    ]
    plot_per_event(ax, per_event, xlabel="publish time (s)", ms=2)

    ax = axes[1][0]
    fams = [f for f in FAMILIES if a.by_family.get(f)]
    if fams:
        x = np.arange(len(fams))
        p50s = [float(np.percentile(a.by_family[f], 50)) for f in fams]
        p99s = [float(np.percentile(a.by_family[f], 99)) for f in fams]
        ax.bar(x - 0.2, p50s, 0.4, label="p50")
        ax.bar(x + 0.2, p99s, 0.4, label="p99")
        ax.set_xticks(x, [f"{f}\n{len(a.by_family[f])} fr" for f in fams], fontsize=8)
        ax.legend(fontsize=8)
    ax.set_ylabel("latency (ms)")
    ax.set_title("by event family")
    ax.grid(True, alpha=0.3, axis="y")

    ax = axes[1][1]
    if len(w.samples) > 1:
        ts = [s["t"] for s in w.samples]
        rss = [(s["rss_kb"] or 0) / 1024 for s in w.samples]
        ax.plot(ts, rss, color="tab:purple", label="gateway RSS (MB)")
        ax.set_ylabel("RSS (MB)")
        ax2 = ax.twinx()
        cpu = []
        cpu_t = []
        for s0, s1 in zip(w.samples, w.samples[1:], strict=False):
            dt = s1["t"] - s0["t"]
            if dt >= 0.5 * w.args.sample_interval:  # a short last interval is all tick noise
                cpu_t.append(s1["t"])
                cpu.append(((s1["gateway_cpu_s"] or 0) - (s0["gateway_cpu_s"] or 0)) / dt * 100)
        ax2.plot(cpu_t, cpu, color="tab:orange", lw=1, label="gateway CPU (% of a core)")
        ax2.set_ylabel("CPU %")
        ax.legend(loc="upper left", fontsize=8)
        ax2.legend(loc="upper right", fontsize=8)
    ax.set_xlabel("time since first publish (s)")
    ax.set_title("gateway RSS and CPU")
    ax.grid(True, alpha=0.3)
    save_figure(fig, path, title)


def passed(result: dict[str, Any]) -> bool:
    """Exit status 0 (``bench.routed`` and ``bench.soak``): every frame right, every socket
    complete."""
    return bool(result["correct"] and result["complete"])
