"""The reconnect storm's per-socket timings (connect → 101 → pong), failures, and the plot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.lib.plots import save_figure, subplots


@dataclass
class Timings:
    """Per socket, ms since its ``connect`` (or s since ``go``); failures by reason."""

    handshake: list[float]  # t_open - t_start, ms
    admission: list[float]  # t_pong - t_start, ms, sockets that got their pong
    start_spread: list[float]  # t_start - go, ms
    pong_at: list[float]  # t_pong - go, s
    open_at: list[float]  # t_open - go, s
    failures: dict[str, int]
    by_kind: dict[str, list[float]]  # admission by socket kind


def socket_timings(
    results: Mapping[int, Mapping[str, Any]], kinds: Sequence[str], t_go: float
) -> Timings:
    """Every client's per-socket timestamps, relative to each socket's start and to ``go``."""

    handshake: list[float] = []
    admission: list[float] = []
    start_spread: list[float] = []
    pong_at: list[float] = []
    open_at: list[float] = []
    failures: dict[str, int] = {}
    by_kind: dict[str, list[float]] = {}
    for res in results.values():
        for s in res["sockets"]:
            if s["t_start"] is not None:
                start_spread.append((s["t_start"] - t_go) * 1000)
            ok_socket = s["state"] == "open" and s["t_pong"] is not None
            if s["t_open"] is not None and s["t_start"] is not None:
                handshake.append((s["t_open"] - s["t_start"]) * 1000)
                open_at.append(s["t_open"] - t_go)
            if ok_socket:
                lat = (s["t_pong"] - s["t_start"]) * 1000
                admission.append(lat)
                pong_at.append(s["t_pong"] - t_go)
                by_kind.setdefault(kinds[s["i"]], []).append(lat)
            else:
                why = f"closed {s['close']}" if s["state"] == "closed" else s["error"] or s["state"]
                failures[why] = failures.get(why, 0) + 1
    return Timings(handshake, admission, start_spread, pong_at, open_at, failures, by_kind)


def plot(
    path: Path,
    result: dict[str, Any],
    handshake: list[float],
    admission: list[float],
    open_at: list[float],
    pong_at: list[float],
    timeline: list[tuple[float, int]],
) -> None:
    import numpy as np

    fig, axes = subplots(1, 2, (15, 5))
    ax = axes[0]
    for values, label in ((handshake, "TCP connect → 101"), (admission, "TCP connect → pong")):
        if values:
            arr = np.sort(np.asarray(values))
            ax.plot(arr, np.arange(1, len(arr) + 1) / len(arr), lw=1.5, label=label)
            p99 = float(np.percentile(arr, 99))
            ax.axvline(p99, color="grey", ls="--", lw=0.8)
            ax.text(p99, 0.05, f" p99 {p99:.0f} ms", fontsize=8, rotation=90)
    ax.set_xlabel("ms per socket")
    ax.set_ylabel("fraction of sockets")
    ax.set_title("handshake and handshake+auth (CDF)")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    ax = axes[1]
    for values, label in ((open_at, "101 received"), (pong_at, "pong received")):
        if values:
            arr = np.sort(np.asarray(values))
            ax.plot(arr, np.arange(1, len(arr) + 1), lw=1.5, label=f"{label} (clients)")
    if timeline:
        ax.plot(
            [t for t, _ in timeline],
            [c for _, c in timeline],
            ".",
            ms=3,
            label="/ws/health total_connections",
        )
    if result["sockets"] <= 1000:
        ax.axvline(2.0, color="red", ls=":", lw=1, label="2 s goal")
    gc_pauses = (result.get("gc_during_storm") or {}).get("pauses_ge_10ms") or []
    for k, (t, _gen, ms) in enumerate(gc_pauses):
        ax.axvspan(
            t, t + ms / 1000, color="red", alpha=0.25, label="GC pause ≥ 10 ms" if k == 0 else None
        )
    ax.set_xlabel("seconds since go")
    ax.set_ylabel("sockets")
    ax.set_title("sockets over time")
    ax.legend(fontsize=8)
    ax.grid(True, alpha=0.3)
    save_figure(
        fig,
        path,
        f"storm: {result['sockets']} sockets ({result['population']}) from "
        f"{result['client_processes']} processes; all registered {result['all_registered_s']} s; "
        f"failures {result['failures']}; {result['bottleneck']}",
    )
