"""Command-line options every benchmark has."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.lib.constants import RESULTS


def add_profile_args(p: argparse.ArgumentParser, what: str) -> None:
    """``--profile`` (its help: ``what`` it records) and ``--profile-rate`` of py-spy."""
    p.add_argument("--profile", action="store_true", help=what)
    p.add_argument(
        "--profile-rate", type=int, default=200, help="py-spy samples per second (default 200)"
    )


def add_run_args(p: argparse.ArgumentParser) -> None:
    """Options of every benchmark: a quiet host, which gateway code, the result files."""
    p.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        help="wait up to this many seconds for the host to be quiet before starting (default 0)",
    )
    p.add_argument(
        "--idle-threshold",
        type=float,
        default=0.5,
        help="busy cores below which the host counts as quiet (default 0.5)",
    )
    p.add_argument(
        "--gateway-ref",
        default=None,
        help="run the gateway package of this git commit (e.g. HEAD, exported with git archive) "
        "instead of the work tree's",
    )
    p.add_argument("--results-dir", type=Path, default=RESULTS)
    p.add_argument("--no-save", action="store_true", help="print the JSON line only")
