"""Child processes: one way to start them (own session, so a signal to the benchmark's group does
not reach them) and one way to stop them (SIGTERM, wait, SIGKILL)."""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Mapping, Sequence
from typing import IO, Any

from bench.lib.constants import VENV_BIN
from gateway.redisio.embedded import stop_process as _stop_process

#: What ``spawn`` accepts for a standard stream: a pipe/DEVNULL constant, a file, or None.
Stream = int | IO[Any] | None


def python_exe() -> str:
    candidate = VENV_BIN / "python"
    return str(candidate) if candidate.exists() else sys.executable


def spawn(
    cmd: Sequence[str],
    *,
    stdin: Stream = subprocess.DEVNULL,
    stdout: Stream = None,
    stderr: Stream = None,
    env: Mapping[str, str] | None = None,
    cwd: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in a session of its own; its owner stops it with ``stop_process``."""
    return subprocess.Popen(
        list(cmd),
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        env=None if env is None else dict(env),
        cwd=cwd,
        start_new_session=True,
    )


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 5.0) -> None:
    """Terminate one child we started (by its own handle), then kill it if it lingers.

    The sequence is ``gateway.redisio.embedded.stop_process``; here a missing process is fine and a
    child that outlives SIGKILL's wait does not raise out of a ``finally``.
    """
    if proc is None:
        return
    with contextlib.suppress(subprocess.TimeoutExpired):
        _stop_process(proc, timeout)
