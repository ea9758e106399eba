"""Paths and the fixed identities every benchmark uses."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
VENV_BIN = ROOT / ".venv" / "bin"

#: Every socket of every benchmark belongs to this tenant.
TENANT = 1
#: The Redis stream the backend writes critical events to, and its approximate cap.
STREAM = "events:critical"
STREAM_MAXLEN = 50000
