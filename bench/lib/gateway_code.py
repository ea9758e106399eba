"""Which gateway code a benchmark ran: the work tree, or a ``git archive`` snapshot of a commit."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path
from typing import Any

from bench.lib.constants import ROOT


def export_gateway(ref: str, dest: str) -> str:
    """``git archive <ref> gateway`` unpacked into ``dest`` (read-only for the repository)."""
    import io
    import tarfile

    commit = subprocess.run(
        ["git", "rev-parse", "--short", ref],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout.strip()
    data = subprocess.run(
        ["git", "archive", "--format=tar", commit, "gateway"],
        cwd=ROOT,
        capture_output=True,
        timeout=30,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(dest, filter="data")
    return commit


def _gateway_digest(root: Path) -> str:
    """A short sha256 of ``root/gateway/**/*.py`` (paths under ``gateway/`` and contents)."""
    import hashlib

    package = root / "gateway"
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def gateway_code_identity(ref: str | None = None, source: str | None = None) -> dict[str, Any]:
    """Which gateway code ran: HEAD commit, whether gateway/ differs from it, a digest of
    gateway/**/*.py.

    Read-only git commands; the tree is shared and edited while benchmarks run.
    """
    out: dict[str, Any] = {}
    if ref is not None and source is not None:
        return {
            "ref": ref,
            "commit": ref,
            "gateway_dirty": False,
            "gateway_sha256": _gateway_digest(Path(source)),
            "source": "git archive snapshot",
        }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out["commit"] = (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"],
                cwd=ROOT,
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or None
        )
        status = subprocess.run(
            ["git", "status", "--porcelain", "--", "gateway"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        out["gateway_dirty"] = bool(status.strip())
    out["gateway_sha256"] = _gateway_digest(ROOT)
    out["source"] = "work tree"
    return out
