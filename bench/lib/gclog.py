"""Reading the GC-pause log an instrumented gateway writes as it exits."""

from __future__ import annotations

import json
import os
import time
from typing import Any


def gc_summary(path: str, t_from: float | None = None, t_to: float | None = None) -> dict[str, Any]:
    """Pauses of the garbage collector from an instrumented gateway's log (ms)."""
    try:
        with open(path) as fh:
            pauses = json.load(fh)["pauses"]
    except (OSError, ValueError, KeyError):
        return {"error": "no gc log"}
    sel = [
        p for p in pauses if (t_from is None or p[0] >= t_from) and (t_to is None or p[0] <= t_to)
    ]
    out: dict[str, Any] = {"collections": len(sel)}
    for gen in (0, 1, 2):
        durs = sorted(p[2] * 1000 for p in sel if p[1] == gen)
        if durs:
            out[f"gen{gen}"] = {
                "count": len(durs),
                "total_ms": round(sum(durs), 1),
                "max_ms": round(durs[-1], 1),
                "p50_ms": round(durs[len(durs) // 2], 2),
            }
    out["total_ms"] = round(sum(p[2] for p in sel) * 1000, 1)
    origin = t_from if t_from is not None else (sel[0][0] if sel else 0.0)
    out["longest"] = [
        {"t": round(p[0] - origin, 3), "gen": p[1], "ms": round(p[2] * 1000, 1)}
        for p in sorted(sel, key=lambda p: -p[2])[:8]
    ]
    out["pauses_ge_10ms"] = [
        [round(p[0] - origin, 3), p[1], round(p[2] * 1000, 1)] for p in sel if p[2] >= 0.01
    ]
    return out


def wait_for_file(path: str, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            return True
        time.sleep(0.1)
    return False
