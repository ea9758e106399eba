"""Figures drawn off-screen (matplotlib's Agg backend) and written as PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_latency(
    path: Path,
    latencies_ms: Sequence[float],
    per_event: Sequence[tuple[float, float, float]],
    title: str,
) -> None:
    """Three panels: latency CDF, histogram, and per-event p50/max against publish time."""
    import numpy as np

    arr = np.sort(np.asarray(latencies_ms, dtype=float))
    fig, axes = subplots(1, 3, (16, 4.6))
    ax = axes[0]
    if len(arr):
        ax.plot(arr, np.arange(1, len(arr) + 1) / len(arr), lw=1.5)
        for q, style in ((50, ":"), (99, "--")):
            v = float(np.percentile(arr, q))
            ax.axvline(v, color="grey", ls=style, lw=1)
            ax.text(v, 0.02 + (0.1 if q == 99 else 0), f" p{q} {v:.1f} ms", fontsize=8)
        if arr[0] > 0:
            ax.set_xscale("log")
    ax.set_xlabel("publish → receive latency (ms)")
    ax.set_ylabel("fraction of frames")
    ax.set_title("CDF")
    ax.grid(True, alpha=0.3)
    ax = axes[1]
    if len(arr):
        hi = float(np.percentile(arr, 99.9)) if len(arr) > 100 else float(arr[-1])
        ax.hist(arr[arr <= hi], bins=80)
    ax.set_xlabel("latency (ms), up to p99.9")
    ax.set_ylabel("frames")
    ax.set_title("histogram")
    ax.grid(True, alpha=0.3)
    plot_per_event(axes[2], per_event, xlabel="publish time since first event (s)")
    save_figure(fig, path, title, dpi=110)


def plot_per_event(
    ax: Any, per_event: Sequence[tuple[float, float, float]], *, xlabel: str, ms: float = 3
) -> None:
    """One panel: per event, (publish time, p50 over sockets, max over sockets) in ms."""
    if per_event:
        t = [p[0] for p in per_event]
        ax.plot(t, [p[1] for p in per_event], ".", ms=ms, label="p50 over sockets")
        ax.plot(t, [p[2] for p in per_event], ".", ms=ms, label="max over sockets")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("latency (ms)")
    ax.set_title("per event")
    ax.grid(True, alpha=0.3)


def subplots(nrows: int, ncols: int, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """A figure and its axes, drawn off-screen (matplotlib's Agg backend); see ``save_figure``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=figsize)


def save_figure(fig: Any, path: Path, title: str, *, dpi: int = 100) -> None:
    """Give a matplotlib figure its title, lay it out, write it as PNG and close it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
