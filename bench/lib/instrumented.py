"""``gateway serve`` with tracemalloc snapshots on SIGUSR1 and/or a log of its GC pauses.

Started by ``bench.lib.gateway_process.instrumented_gateway`` as
``python -P bench/lib/instrumented.py --port P [--tracemalloc-frames F --snapshot-dir D]
[--gc-log FILE]``: run by path, not with ``-m``, and importing nothing from ``bench``, so that with
``--gateway-ref`` the snapshot on ``PYTHONPATH`` is the gateway that runs (``-P``: this folder is
not put first on ``sys.path``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time


def serve_instrumented(argv: list[str]) -> int:
    """``gateway serve`` with tracemalloc snapshots on SIGUSR1 and/or a log of GC pauses."""
    p = argparse.ArgumentParser(prog="bench/lib/instrumented.py")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tracemalloc-frames", type=int, default=0)
    p.add_argument("--snapshot-dir", default=None)
    p.add_argument("--gc-log", default=None)
    args = p.parse_args(argv)
    import gc
    import tracemalloc

    if args.tracemalloc_frames > 0:
        tracemalloc.start(args.tracemalloc_frames)
    counter = {"n": 0}

    def on_usr1(signum: int, frame: object) -> None:
        if not tracemalloc.is_tracing() or args.snapshot_dir is None:
            return
        snap = tracemalloc.take_snapshot()
        path = os.path.join(args.snapshot_dir, f"snap-{counter['n']}.tm")
        snap.dump(path + ".tmp")
        os.replace(path + ".tmp", path)
        counter["n"] += 1

    signal.signal(signal.SIGUSR1, on_usr1)
    pauses: list[tuple[float, int, float, int]] = []  # (time, generation, seconds, collected)
    started: dict[str, float] = {}
    if args.gc_log:

        def on_gc(phase: str, info: dict[str, int]) -> None:
            now = time.monotonic()
            if phase == "start":
                started["t"] = now
            elif "t" in started:
                pauses.append(
                    (started["t"], info["generation"], now - started.pop("t"), info["collected"])
                )

        gc.callbacks.append(on_gc)
    import trio

    from gateway.app import run_until_signalled
    from gateway.logs import setup_logging
    from gateway.settings import Settings

    settings = Settings.from_env(port=str(args.port), host="127.0.0.1")
    setup_logging(settings.log_level, settings.log_format, settings.environment)
    try:
        trio.run(run_until_signalled, settings)
    finally:
        if args.gc_log:
            with open(args.gc_log + ".tmp", "w") as fh:
                json.dump({"pauses": pauses}, fh)
            os.replace(args.gc_log + ".tmp", args.gc_log)
    return 0


if __name__ == "__main__":
    sys.exit(serve_instrumented(sys.argv[1:]))
