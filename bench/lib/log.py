"""Progress lines on stderr."""

from __future__ import annotations

import sys
import time


def log(msg: str) -> None:
    """Progress goes to stderr; stdout is reserved for the one JSON result line."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
