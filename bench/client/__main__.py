"""``python -m bench.client``: read the configuration line, run, print the result line."""

from __future__ import annotations

import json
import sys

from bench.client.protocol import emit
from bench.client.raw import run_raw
from bench.client.trio_ws import run_trio


def main() -> int:
    line = sys.stdin.buffer.readline()
    if not line:
        return 2
    cfg = json.loads(line)
    impl = cfg.get("impl", "raw")
    result = run_trio(cfg) if impl == "trio-websocket" else run_raw(cfg)
    emit({"type": "result", "client": cfg["client"], "impl": impl, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
