"""py-spy profiles of the gateway: recording, hot-spot tables and a flame graph."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from bench.lib.constants import VENV_BIN
from bench.lib.log import log
from bench.lib.processes import spawn, stop_process
from bench.lib.results import rel


def find_py_spy() -> str | None:
    candidate = VENV_BIN / "py-spy"
    if candidate.exists():
        return str(candidate)
    return shutil.which("py-spy")


def start_py_spy(
    pid: int, duration: int, out_path: Path, rate: int = 200, *, attach: float = 0.5
) -> subprocess.Popen[bytes] | None:
    """``py-spy record`` of ``pid`` for ``duration`` s, collapsed stacks (``--format raw``).

    Raw output keeps the numbers for the hot-spot tables; ``render_flamegraph`` draws the SVG.
    Frames carry the line being run (no ``--function``), so a C call such as ``os.write`` shows as
    the line that makes it; the tables aggregate per function and also list the hottest lines.
    Returns after ``attach`` s, the time py-spy takes to attach.
    """
    exe = find_py_spy()
    if exe is None:
        log("py-spy not found: profiling skipped (.venv/bin/pip install py-spy)")
        return None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        exe,
        "record",
        "--pid",
        str(pid),
        "--duration",
        str(duration),
        "--rate",
        str(rate),
        "--format",
        "raw",
        "-o",
        str(out_path),
    ]
    spy = spawn(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(attach)
    return spy


def read_folded(path: Path) -> list[tuple[list[str], int]]:
    stacks: list[tuple[list[str], int]] = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            line = line.rstrip("\n")
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            stacks.append((stack.split(";"), int(count)))
    return stacks


def _short_frame(frame: str) -> str:
    # "deliver (gateway/serving/connection.py:139)" -> keep the package-relative file, drop site-packages.
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    for marker in ("site-packages/", "lib/python3"):
        idx = where.find(marker)
        if idx >= 0:
            where = where[idx + len(marker) :]
            if marker == "lib/python3":
                where = "stdlib/" + where.split("/", 1)[-1]
            break
    idx = where.find("/gateway/")
    if idx >= 0:
        where = where[idx + 1 :]
    return f"{name} ({where})" if where else name


#: Leaf functions that mean "blocked waiting for I/O": Trio's epoll wait (the gateway's only
#: blocking call). py-spy's idle detection does not drop these samples on this machine, so they
#: are separated here and the tables cover the remaining, busy, samples.
IDLE_LEAVES = (("get_events", "trio/_core/_io_epoll.py"),)


def is_idle_stack(frames: Sequence[str]) -> bool:
    if not frames:
        return False
    leaf = _short_frame(frames[-1])
    name, _, where = leaf.partition(" (")
    name = name.rsplit(".", 1)[-1]  # py-spy prefixes the class: "EpollIOManager.get_events"
    return any(name == n and where.startswith(f) for n, f in IDLE_LEAVES)


def _function_key(frame: str) -> str:
    """ "deliver (gateway/serving/connection.py:152)" -> "deliver (gateway/serving/connection.py)"."""
    name, sep, where = frame.partition(" (")
    if not sep:
        return frame
    file, colon, line = where.rstrip(")").rpartition(":")
    return f"{name} ({file})" if colon and line.isdigit() else frame


def profile_summary(path: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares per function from collapsed stacks (idle samples apart)."""
    all_stacks = read_folded(path)
    idle = sum(c for s, c in all_stacks if is_idle_stack(s))
    stacks = [(s, c) for s, c in all_stacks if not is_idle_stack(s)]
    total = sum(c for _s, c in stacks)
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    by_file: Counter[str] = Counter()
    by_line: Counter[str] = Counter()
    for raw_frames, count in stacks:
        lines = [_short_frame(f) for f in raw_frames]
        frames = [_function_key(f) for f in lines]
        if frames:
            self_counts[frames[-1]] += count
            by_line[lines[-1]] += count
            leaf = frames[-1]
            where = leaf.partition(" (")[2].rstrip(")")
            by_file[where or leaf] += count
        for f in set(frames):
            incl_counts[f] += count

    def table(counter: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": f, "samples": c, "percent": round(100 * c / total, 1) if total else 0.0}
            for f, c in counter.most_common(top)
        ]

    return {
        "samples": total + idle,
        "busy_samples": total,
        "idle_samples": idle,
        "self": table(self_counts),
        "inclusive": table(incl_counts),
        "self_by_file": table(by_file),
        "self_by_line": table(by_line),
    }


def format_profile(summary: Mapping[str, Any], top: int = 20) -> str:
    lines = [
        f"samples: {summary['samples']}, of which {summary['idle_samples']} idle (waiting in epoll) "
        f"and {summary['busy_samples']} busy; percentages are of the busy samples",
        "",
        "self time (leaf function):",
    ]
    for row in summary["self"][:top]:
        lines.append(f"  {row['percent']:5.1f}%  {row['function']}")
    lines += ["", "inclusive time (function on the stack):"]
    for row in summary["inclusive"][:top]:
        lines.append(f"  {row['percent']:5.1f}%  {row['function']}")
    lines += ["", "self time by line (a C call is charged to the line that makes it):"]
    for row in summary.get("self_by_line", [])[:15]:
        lines.append(f"  {row['percent']:5.1f}%  {row['function']}")
    lines += ["", "self time by file:"]
    for row in summary["self_by_file"][:15]:
        lines.append(f"  {row['percent']:5.1f}%  {row['function']}")
    return "\n".join(lines) + "\n"


def render_flamegraph(folded: Path, svg: Path, title: str, width: int = 1600) -> None:
    """A static flame graph (SVG, hover a box for its name and share) from collapsed stacks."""
    all_stacks = read_folded(folded)
    stacks = [(s, c) for s, c in all_stacks if not is_idle_stack(s)]
    idle = sum(c for s, c in all_stacks if is_idle_stack(s))
    total = sum(c for _s, c in stacks) or 1
    tree: dict[str, Any] = {"n": 0, "kids": {}}
    for frames, count in stacks:
        node = tree
        node["n"] += count
        for f in frames:
            node = node["kids"].setdefault(_function_key(_short_frame(f)), {"n": 0, "kids": {}})
            node["n"] += count
    row_h = 16
    boxes: list[str] = []
    depth_max = 0

    def colour(name: str) -> str:
        h = sum(name.encode()) % 60
        if "gateway/" in name:
            return f"rgb({205 + h % 50},{80 + h},{40})"
        if "stdlib/" in name:
            return f"rgb({60 + h},{140 + h},{200})"
        return f"rgb({200 + h % 55},{150 + h},{60})"

    def walk(node: dict[str, Any], x: float, depth: int) -> None:
        nonlocal depth_max
        depth_max = max(depth_max, depth)
        for name, kid in sorted(node["kids"].items()):
            w = kid["n"] / total * width
            if w >= 0.5:
                y = depth * row_h
                pct = 100 * kid["n"] / total
                label = escape(name)
                text = label if w > 60 else ""
                chars = int(w / 6.5)
                if text and len(name) > chars:
                    text = escape(name[: max(chars - 2, 0)]) + ".."
                boxes.append(
                    f"<g><title>{label} ({kid['n']} samples, {pct:.1f}%)</title>"
                    f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{row_h - 1}" fill="{colour(name)}"/>'
                    f'<text x="{x + 3:.1f}" y="{y + 12}">{text}</text></g>'
                )
                walk(kid, x, depth + 1)
            x += w

    walk(tree, 0.0, 1)
    height = (depth_max + 2) * row_h
    # Icicle layout (root on top) so the deep gateway frames read top-down.
    svg.write_text(
        f'<?xml version="1.0" encoding="UTF-8"?>\n'
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="monospace" font-size="11">\n'
        f'<text x="4" y="12" font-size="12">{escape(title)} — {total} busy samples shown, {idle} idle '
        f"(epoll wait) left out; hover a box for details</text>\n" + "\n".join(boxes) + "\n</svg>\n"
    )


def finish_profile(
    spy: subprocess.Popen[bytes], results_dir: Path, name: str, *, timeout: float = 60.0
) -> dict[str, Any]:
    """Wait for py-spy's output; write the hot-spot table and a flame graph next to the JSON.

    Returns the ``profile`` summary for the result, or ``{"error": ...}`` without output.
    """
    try:
        _, err = spy.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(spy)
        err = b""
    folded = results_dir / f"{name}.folded"
    if not folded.exists() or not folded.stat().st_size:
        log(f"py-spy produced no output: {err.decode(errors='replace')[-300:]}")
        return {"error": "no py-spy output"}
    summary = profile_summary(folded)
    top_txt = results_dir / f"{name}.top.txt"
    top_txt.write_text(format_profile(summary))
    svg = results_dir / f"profile-{name}.svg"
    render_flamegraph(folded, svg, f"gateway, {name}")
    log("gateway profile (py-spy):\n" + format_profile(summary, top=15))
    return {
        "samples": summary["samples"],
        "idle_samples": summary["idle_samples"],
        "svg": rel(svg),
        "top": rel(top_txt),
        "self_top5": [f"{r['percent']}% {r['function']}" for r in summary["self"][:5]],
        "inclusive_top10": [f"{r['percent']}% {r['function']}" for r in summary["inclusive"][:10]],
    }
