"""A benchmark's output: ONE JSON line on stdout (``run_main``), the same JSON with more detail and
a PNG under ``bench/results/`` (``save_result``), statistics, and its log directory."""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.lib.constants import ROOT
from bench.lib.log import log


def stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


def percentiles(
    values: Sequence[float], qs: Iterable[float] = (50, 90, 99, 99.9)
) -> dict[str, float]:
    import numpy as np

    if not len(values):
        return {}
    arr = np.asarray(values, dtype=float)
    out = {f"p{q:g}": float(np.percentile(arr, q)) for q in qs}
    out["min"] = float(arr.min())
    out["mean"] = float(arr.mean())
    out["max"] = float(arr.max())
    return out


def rounded(d: Mapping[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in d.items()}


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def rel(path: Path) -> str:
    """A path relative to the repository when it is inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def save_result(
    result: dict[str, Any],
    results_dir: Path,
    name: str,
    *,
    detail: Mapping[str, Any],
    draw: Callable[[Path], None],
) -> None:
    """Write ``<name>.json`` (``result`` and then ``detail``) and ``draw`` ``<name>.png``.

    Both files are named in ``result["files"]`` first, so the JSON line mentions them too.
    """
    json_path = results_dir / f"{name}.json"
    png_path = results_dir / f"{name}.png"
    result["files"] = {"json": rel(json_path), "png": rel(png_path)}
    write_json(json_path, {**result, **detail})
    draw(png_path)
    log(f"wrote {rel(json_path)} and {png_path.name}")


def finish_log_dir(
    log_dir: str, ok: bool, what: str = "logs of the gateway and the clients"
) -> None:
    """Remove the run's log directory after a good run; keep it (and say where) otherwise."""
    if ok:
        shutil.rmtree(log_dir, ignore_errors=True)
    else:
        log(f"{what} kept in {log_dir}")


def run_main(
    bench: str,
    body: Callable[[], dict[str, Any]],
    passed: Callable[[dict[str, Any]], bool],
    *,
    ensure_ascii: bool = True,
) -> int:
    """Run a benchmark and print its ONE JSON line on stdout; returns the exit status.

    0 when ``passed(result)``, 3 when not, 1 on an error (the line then carries ``"error"``),
    130 when interrupted: SIGINT, or SIGTERM (``install_sigterm_handler``), so that every child
    is stopped in ``finally``.
    """
    install_sigterm_handler()
    try:
        result = body()
    except Exception as exc:
        log(f"benchmark failed: {exc}")
        msg = str(exc).splitlines()[0] if str(exc) else repr(exc)
        print(json.dumps({"bench": bench, "error": msg}))
        return 1
    except KeyboardInterrupt:
        log("interrupted")
        return 130
    print(json.dumps(result, separators=(",", ":"), ensure_ascii=ensure_ascii))
    return 0 if passed(result) else 3


def install_sigterm_handler() -> None:
    """SIGTERM raises KeyboardInterrupt, so every child is stopped in ``finally``."""

    def _interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
