"""Shared pieces of the benchmarks: the gateway as its own process, CPU accounting from /proc,
a minimal synchronous Redis client, statistics, result files, plots, py-spy profiles, the client
processes and what they report, the options every benchmark has and its ``main``.

Everything here is bounded: every wait has a timeout, and every process started is stopped by
its owner in a ``finally``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
VENV_BIN = ROOT / ".venv" / "bin"
CLK_TCK = os.sysconf("SC_CLK_TCK")

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    """Progress goes to stderr; stdout is reserved for the one JSON result line."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def python_exe() -> str:
    candidate = VENV_BIN / "python"
    return str(candidate) if candidate.exists() else sys.executable


def stamp() -> str:
    return time.strftime("%Y%m%d-%H%M%S")


# --------------------------------------------------------------------------------------------
# CPU accounting
# --------------------------------------------------------------------------------------------


def proc_cpu_times(pid: int | None) -> tuple[float, float] | None:
    """(utime, stime) of a process (all its threads), in seconds; None if it is gone."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            raw = fh.read()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def proc_cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of a process, in seconds; None if it is gone."""
    times = proc_cpu_times(pid)
    return None if times is None else times[0] + times[1]


STAT_KINDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def machine_cpu_kinds() -> dict[str, float]:
    """Seconds per kind (user, system, softirq, steal, ...) summed over all CPUs, from /proc/stat."""
    with open("/proc/stat") as fh:
        parts = fh.readline().split()[1:]
    return {kind: int(v) / CLK_TCK for kind, v in zip(STAT_KINDS, parts, strict=False)}


def machine_cpu() -> tuple[float, float]:
    """(busy, total) seconds summed over all CPUs, from /proc/stat."""
    kinds = machine_cpu_kinds()
    total = sum(kinds.values())  # guest time is already inside user/nice
    return total - kinds["idle"] - kinds.get("iowait", 0.0), total


class CpuSnapshot:
    """CPU seconds of named processes and of the machine at one instant."""

    def __init__(self, pids: Mapping[str, int | None]) -> None:
        self.wall = time.time()
        self.times = {name: proc_cpu_times(pid) for name, pid in pids.items()}
        self.procs = {
            name: (t[0] + t[1] if t is not None else None) for name, t in self.times.items()
        }
        self.kinds = machine_cpu_kinds()
        total = sum(self.kinds.values())
        self.machine = (total - self.kinds["idle"] - self.kinds.get("iowait", 0.0), total)

    def delta(self, later: CpuSnapshot) -> dict[str, Any]:
        """CPU seconds used between two snapshots and utilisation in cores."""
        wall = max(later.wall - self.wall, 1e-9)
        out: dict[str, Any] = {
            "wall_s": round(wall, 3),
            "cpu_s": {},
            "cores": {},
            "user_s": {},
            "sys_s": {},
        }
        for name, before_t in self.times.items():
            after_t = later.times.get(name)
            if before_t is not None and after_t is not None:
                out["user_s"][name] = round(after_t[0] - before_t[0], 3)
                out["sys_s"][name] = round(after_t[1] - before_t[1], 3)
        for name, before in self.procs.items():
            after = later.procs.get(name)
            if before is None or after is None:
                continue
            out["cpu_s"][name] = round(after - before, 3)
            out["cores"][name] = round((after - before) / wall, 3)
        busy = later.machine[0] - self.machine[0]
        total = later.machine[1] - self.machine[1]
        out["machine_busy_fraction"] = round(busy / total, 3) if total > 0 else None
        out["machine_busy_cores"] = round(busy / wall, 3)
        # Machine time by kind, in cores: softirq is loopback TCP work no process is charged
        # for; steal is time the hypervisor gave to other guests.
        out["machine_cores_by_kind"] = {
            k: round((later.kinds.get(k, 0.0) - v) / wall, 3)
            for k, v in self.kinds.items()
            if k not in ("idle", "iowait")
        }
        # What the machine did beyond the processes we watch: other users' work on the host,
        # kernel threads and interrupt work not charged to any process.
        out["other_cores"] = round(max(busy - sum(out["cpu_s"].values()), 0.0) / wall, 3)
        return out


def bottleneck(util: Mapping[str, Any], *, ncpu: int, saturated: float = 0.9) -> dict[str, Any]:
    """Name the resource that limited the run, from utilisation in cores.

    Every process involved is single-threaded Python (or redis), so one at >= ``saturated`` of a
    core is saturated; the machine is saturated when all cores are nearly busy.
    """
    cores = util.get("cores", {})
    hot = sorted(((c, n) for n, c in cores.items() if c >= saturated), reverse=True)
    machine = util.get("machine_busy_fraction")
    parts = [f"{n} at {c * 100:.0f}% of a core" for c, n in hot]
    if machine is not None and machine >= saturated:
        other = util.get("other_cores", 0.0)
        kinds = util.get("machine_cores_by_kind", {})
        irq = kinds.get("softirq", 0.0) + kinds.get("irq", 0.0)
        steal = kinds.get("steal", 0.0)
        notes = []
        if other >= 0.2:
            notes.append(f"{other:.2f} cores outside the benchmark's processes")
        if irq >= 0.1:
            notes.append(f"softirq {irq:.2f} cores")
        if steal >= 0.1:
            notes.append(f"steal {steal:.2f} cores")
        note = f" ({'; '.join(notes)})" if notes else ""
        parts.append(f"machine CPU at {machine * 100:.0f}% of {ncpu} cores{note}")
    busiest = max(cores.items(), key=lambda kv: kv[1]) if cores else ("-", 0.0)
    summary = (
        "; ".join(parts)
        if parts
        else (f"none saturated (busiest: {busiest[0]} at {busiest[1] * 100:.0f}% of a core)")
    )
    return {
        "summary": summary,
        "saturated": [n for _c, n in hot],
        "machine_saturated": bool(machine is not None and machine >= saturated),
    }


def cpu_cores(util: Mapping[str, Any], *, by_kind: bool = True) -> dict[str, Any]:
    """The ``cpu_cores`` of a result: cores per process, the machine's, and what was not ours."""
    out = {
        **util["cores"],
        "machine_busy_cores": util["machine_busy_cores"],
        "outside_benchmark": util["other_cores"],
    }
    if by_kind:
        out["machine_by_kind"] = util["machine_cores_by_kind"]
    return out


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
    """A short sha256 of ``root/gateway/*.py`` (names and contents)."""
    import hashlib

    digest = hashlib.sha256()
    for path in sorted((root / "gateway").glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def gateway_code_identity(ref: str | None = None, source: str | None = None) -> dict[str, Any]:
    """Which gateway code ran: HEAD commit, whether gateway/ differs from it, a digest of gateway/*.py.

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


# --------------------------------------------------------------------------------------------
# The gateway as its own process
# --------------------------------------------------------------------------------------------


def _settings_env_names() -> set[str]:
    from gateway.settings import settings_fields

    return {f.metadata["env"] for f in settings_fields()}


class GatewayProcess:
    """``gateway serve`` in a child process; stopped (SIGTERM, then SIGKILL) by ``stop``."""

    def __init__(
        self,
        *,
        port: int,
        env: Mapping[str, str],
        log_dir: str | None = None,
        source: str | None = None,
        cmd: Sequence[str] | None = None,
    ) -> None:
        """``source``: a directory holding a ``gateway`` package to run instead of the work tree's.

        ``cmd``: the command to run instead of ``gateway serve --port <port> --host 127.0.0.1``
        (it must serve on ``port``; ``memory.py --tracemalloc`` runs a traced gateway this way).
        """
        self.port = port
        self.source = source
        self.cmd = list(cmd) if cmd is not None else None
        self.extra_env = dict(env)
        self._log_dir = log_dir or tempfile.mkdtemp(prefix="gw-bench-")
        self.log_path = os.path.join(self._log_dir, "gateway.log")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self) -> None:
        # Start from a clean slate: no gateway setting leaks in from the caller's environment.
        names = _settings_env_names()
        env = {k: v for k, v in os.environ.items() if k not in names}
        env.update(self.extra_env)
        cwd = str(ROOT)
        if self.source is not None:
            # PYTHONPATH comes before the editable install's finder, and the working directory is
            # the snapshot, so ``import gateway`` finds the snapshot.
            env["PYTHONPATH"] = self.source
            cwd = self.source
        exe = VENV_BIN / "gateway"
        cmd = [str(exe)] if exe.exists() else [python_exe(), "-m", "gateway"]
        cmd += ["serve", "--port", str(self.port), "--host", "127.0.0.1"]
        if self.cmd is not None:
            cmd = self.cmd
        with open(self.log_path, "ab") as logfile:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_healthy(self, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last_error = "no answer"
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"gateway exited during start-up; log:\n{self.log_tail()}")
            try:
                return self.health()
            except (OSError, urllib.error.URLError, ValueError) as exc:
                last_error = repr(exc)
            time.sleep(0.1)
        raise RuntimeError(
            f"gateway not healthy within {timeout:g} s ({last_error}); log:\n{self.log_tail()}"
        )

    def _get(self, path: str, timeout: float = 5.0) -> bytes:
        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as resp:
            data: bytes = resp.read()
            return data

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = json.loads(self._get("/ws/health"))
        return body

    def metrics(self) -> dict[str, float]:
        """Unlabelled samples of /ws/metrics-style exposition, by name."""
        out: dict[str, float] = {}
        for path in ("/ws/metrics", "/metrics"):
            try:
                text = self._get(path).decode()
            except (OSError, urllib.error.URLError):
                continue
            for line in text.splitlines():
                if not line or line.startswith("#"):
                    continue
                name, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
            if out:
                break
        return out

    def log_tail(self, limit: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - limit))
                return fh.read().decode("utf-8", "replace")
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 15.0) -> None:
        from gateway.redis_server import stop_process

        if self.proc is not None:
            stop_process(self.proc, timeout)
        self.proc = None


def instrumented_gateway(
    *, frames: int = 0, snapshot_dir: str | None = None, gc_log: str | None = None
) -> Callable[[int], list[str]]:
    """A ``Stack`` ``cmd_factory``: ``memory.py --serve-instrumented``, the gateway with
    tracemalloc snapshots on SIGUSR1 (``frames`` > 0 and ``snapshot_dir``) and/or a log of its
    garbage-collector pauses written to ``gc_log`` as it exits."""

    def cmd(port: int) -> list[str]:
        out = [python_exe(), str(MEMORY_SCRIPT), "--serve-instrumented", "--port", str(port)]
        if frames > 0 and snapshot_dir:
            out += ["--tracemalloc-frames", str(frames), "--snapshot-dir", snapshot_dir]
        if gc_log:
            out += ["--gc-log", gc_log]
        return out

    return cmd


def stop_process(proc: subprocess.Popen[Any] | None, timeout: float = 5.0) -> None:
    """Terminate one child we started (by its own handle), then kill it if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)


# --------------------------------------------------------------------------------------------
# A minimal synchronous Redis client (RESP2), so the publisher adds no event loop of its own
# --------------------------------------------------------------------------------------------


class RespError(Exception):
    pass


class Resp:
    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = self.sock.makefile("rb")

    @staticmethod
    def encode(*args: bytes | str | int | float) -> bytes:
        out = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
        return b"".join(out)

    def call(self, *args: bytes | str | int | float) -> Any:
        self.sock.sendall(self.encode(*args))
        return self._read()

    def pipeline(self, commands: Sequence[Sequence[bytes | str | int | float]]) -> list[Any]:
        """Several commands in one write, then their replies in order (errors returned, not raised)."""
        self.sock.sendall(b"".join(self.encode(*c) for c in commands))
        out: list[Any] = []
        for _ in commands:
            try:
                out.append(self._read())
            except RespError as exc:
                out.append(exc)
        return out

    def _read(self) -> Any:
        line = self.reader.readline()
        if not line:
            raise ConnectionError("redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RespError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            return self.reader.read(n + 2)[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise RespError(f"unexpected reply {line[:40]!r}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.reader.close()
            self.sock.close()


# --------------------------------------------------------------------------------------------
# Statistics and result files
# --------------------------------------------------------------------------------------------


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


def plot_latency(
    path: Path,
    latencies_ms: Sequence[float],
    per_event: Sequence[tuple[float, float, float]],
    title: str,
) -> None:
    """Three panels: latency CDF, histogram, and per-event p50/max against publish time."""
    import numpy as np

    arr = np.sort(np.asarray(latencies_ms, dtype=float))
    fig, axes = subplots(1, 3, (16, 4.6))
    ax = axes[0]
    if len(arr):
        ax.plot(arr, np.arange(1, len(arr) + 1) / len(arr), lw=1.5)
        for q, style in ((50, ":"), (99, "--")):
            v = float(np.percentile(arr, q))
            ax.axvline(v, color="grey", ls=style, lw=1)
            ax.text(v, 0.02 + (0.1 if q == 99 else 0), f" p{q} {v:.1f} ms", fontsize=8)
        if arr[0] > 0:
            ax.set_xscale("log")
    ax.set_xlabel("publish → receive latency (ms)")
    ax.set_ylabel("fraction of frames")
    ax.set_title("CDF")
    ax.grid(True, alpha=0.3)
    ax = axes[1]
    if len(arr):
        hi = float(np.percentile(arr, 99.9)) if len(arr) > 100 else float(arr[-1])
        ax.hist(arr[arr <= hi], bins=80)
    ax.set_xlabel("latency (ms), up to p99.9")
    ax.set_ylabel("frames")
    ax.set_title("histogram")
    ax.grid(True, alpha=0.3)
    plot_per_event(axes[2], per_event, xlabel="publish time since first event (s)")
    save_figure(fig, path, title, dpi=110)


def plot_per_event(
    ax: Any, per_event: Sequence[tuple[float, float, float]], *, xlabel: str, ms: float = 3
) -> None:
    """One panel: per event, (publish time, p50 over sockets, max over sockets) in ms."""
    if per_event:
        t = [p[0] for p in per_event]
        ax.plot(t, [p[1] for p in per_event], ".", ms=ms, label="p50 over sockets")
        ax.plot(t, [p[2] for p in per_event], ".", ms=ms, label="max over sockets")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("latency (ms)")
    ax.set_title("per event")
    ax.grid(True, alpha=0.3)


def subplots(nrows: int, ncols: int, figsize: tuple[float, float]) -> tuple[Any, Any]:
    """A figure and its axes, drawn off-screen (matplotlib's Agg backend); see ``save_figure``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=figsize)


def save_figure(fig: Any, path: Path, title: str, *, dpi: int = 100) -> None:
    """Give a matplotlib figure its title, lay it out, write it as PNG and close it."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Profiling with py-spy
# --------------------------------------------------------------------------------------------


def find_py_spy() -> str | None:
    candidate = VENV_BIN / "py-spy"
    if candidate.exists():
        return str(candidate)
    from shutil import which

    return which("py-spy")


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
    spy = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
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
    # "deliver (gateway/connection.py:139)" -> keep the package-relative file, drop site-packages.
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
    """ "deliver (gateway/connection.py:152)" -> "deliver (gateway/connection.py)"."""
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
    from html import escape

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


def group_by(items: Iterable[tuple[Any, Any]]) -> dict[Any, list[Any]]:
    out: dict[Any, list[Any]] = defaultdict(list)
    for k, v in items:
        out[k].append(v)
    return out


# --------------------------------------------------------------------------------------------
# Result files, /proc memory, client processes, the gateway stack and the benchmarks' main()
# --------------------------------------------------------------------------------------------

CLIENT_SCRIPT = Path(__file__).resolve().parent / "_client.py"
MEMORY_SCRIPT = Path(__file__).resolve().parent / "memory.py"


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


def proc_memory(pid: int | None) -> dict[str, int] | None:
    """Memory of a process in kB from ``/proc/<pid>/status`` (VmRSS, VmHWM, RssAnon, ...)."""
    if pid is None:
        return None
    wanted = ("VmRSS", "VmHWM", "VmSize", "VmData", "RssAnon", "RssFile", "RssShmem", "Threads")
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                name, _, value = line.partition(":")
                if name in wanted:
                    out[name] = int(value.split()[0])
    except OSError:
        return None
    return out


def proc_fd_count(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def kernel_socket_memory() -> dict[str, int]:
    """Machine-wide TCP socket memory from ``/proc/net/sockstat`` (pages of 4 kB) and counts."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError), open("/proc/net/sockstat") as fh:
        for line in fh:
            if line.startswith("TCP:"):
                parts = line.split()[1:]
                for name, value in zip(parts[::2], parts[1::2], strict=False):
                    out[name] = int(value)
    return out


def wait_for_quiet_host(limit: float, threshold: float) -> float:
    """Sample the machine's busy cores each second until below ``threshold`` or ``limit`` s passed.

    Returns the last sample: the load other users put on the host just before the run.
    """
    deadline = time.monotonic() + limit
    while True:
        before = machine_cpu()
        time.sleep(1.0)
        after = machine_cpu()
        busy = round(after[0] - before[0], 2)
        if busy < threshold or time.monotonic() >= deadline:
            if limit > 0:
                log(
                    f"host busy: {busy} cores before the run"
                    + ("" if busy < threshold else " (not quiet)")
                )
            return busy
        log(f"host busy: {busy} cores, waiting for < {threshold}")


def dispatch_stats(metrics: Mapping[str, float]) -> dict[str, float | None]:
    """The gateway's own histogram: from reading an event to its last frame handed to the kernel.

    Mean from sum/count; p50/p99 as the upper bound of the bucket that holds them.
    """
    prefix = "wsgateway_delivery_latency_seconds"
    count = metrics.get(f"{prefix}_count") or 0.0
    total = metrics.get(f"{prefix}_sum") or 0.0
    buckets = sorted(
        (float(name.split('le="', 1)[1].rstrip('"}')), value)
        for name, value in metrics.items()
        if name.startswith(f"{prefix}_bucket") and "+Inf" not in name
    )

    def upper(q: float) -> float | None:
        for le, cumulative in buckets:
            if count and cumulative >= q * count:
                return round(le * 1000, 2)
        return None

    return {
        "events": count,
        "mean": round(total / count * 1000, 2) if count else None,
        "p50_le": upper(0.5),
        "p99_le": upper(0.99),
    }


def metric_sum(metrics: Mapping[str, float], name: str) -> float:
    """Sum of every sample of ``name`` (all label sets), 0 when absent."""
    return sum(v for k, v in metrics.items() if k == name or k.startswith(name + "{"))


class ClientProcess:
    """One ``_client.py`` process; a thread turns its stdout lines into items of ``inbox``."""

    def __init__(
        self,
        k: int,
        cfg: Mapping[str, Any],
        inbox: Any,  # queue.Queue[tuple[int, dict[str, Any]]]
        log_dir: str,
    ) -> None:
        import threading

        self.k = k
        self.stderr_path = os.path.join(log_dir, f"client-{k}.log")
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [python_exe(), str(CLIENT_SCRIPT)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=str(ROOT),
                start_new_session=True,
            )
        self.send((json.dumps(dict(cfg)) + "\n").encode())
        self.thread = threading.Thread(target=self._read, args=(inbox,), daemon=True)
        self.thread.start()

    def _read(self, inbox: Any) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with contextlib.suppress(ValueError):
                inbox.put((self.k, json.loads(line)))
        inbox.put((self.k, {"type": "eof"}))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send(self, data: bytes) -> None:
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.write(data)
                self.proc.stdin.flush()

    def go(self) -> None:
        self.send(b"go\n")

    def stop(self) -> None:
        self.send(b"stop\n")

    def log_tail(self) -> str:
        try:
            return Path(self.stderr_path).read_text(errors="replace")[-2000:]
        except OSError:
            return ""


def stop_clients(clients: Sequence[ClientProcess], timeout: float = 5.0) -> None:
    """Ask every client process to stop, then stop each (by its own handle) if it lingers."""
    for c in clients:
        c.stop()
    for c in clients:
        stop_process(c.proc, timeout=timeout)


def start_clients(
    clients: list[ClientProcess],
    count: int,
    n: int,
    *,
    inbox: Any,
    log_dir: str,
    per_socket: Mapping[str, Sequence[Any]],
    common: Mapping[str, Any],
) -> None:
    """Deal sockets 0..n-1 round-robin to ``count`` client processes, appended to ``clients``.

    ``per_socket``: configuration lists indexed by socket (``tokens``, ``targets``, ...), cut
    per client; ``common``: the rest of every client's configuration.
    """
    for k in range(count):
        idx = list(range(k, n, count))
        cfg = {
            "client": k,
            **{key: [values[i] for i in idx] for key, values in per_socket.items()},
            "indices": idx,
            **common,
        }
        clients.append(ClientProcess(k, cfg, inbox, log_dir))


def wait_connected(
    clients: Sequence[ClientProcess], inbox: Any, gw: GatewayProcess, timeout: float
) -> dict[int, dict[str, Any]]:
    """The ``connected`` report of every client process, by client.

    Raises after ``timeout`` s, when the gateway dies or when a client exits early.
    """
    import queue

    connected: dict[int, dict[str, Any]] = {}
    until = time.monotonic() + timeout
    while len(connected) < len(clients):
        if time.monotonic() > until:
            raise RuntimeError("clients did not report their connections in time")
        if not gw.alive():
            raise RuntimeError(f"gateway died while sockets opened; log:\n{gw.log_tail()}")
        with contextlib.suppress(queue.Empty):
            k, msg = inbox.get(timeout=0.2)
            if msg["type"] == "connected":
                connected[k] = msg
            elif msg["type"] == "eof":
                raise RuntimeError(f"client {k} exited early:\n{clients[k].log_tail()}")
    return connected


class Opening:
    """Opening the sockets, timed: create it just before the clients start, ``wait`` after."""

    def __init__(self, gw: GatewayProcess) -> None:
        self.gw = gw
        self.cpu0 = CpuSnapshot({"gateway": gw.pid})
        self.t0 = time.monotonic()
        self.connected: dict[int, dict[str, Any]] = {}  # client -> its "connected" report
        self.opened = 0
        self.failed = 0
        self.errors: dict[str, int] = {}  # failures by reason
        self.registered = -1  # by the gateway's /ws/health
        self.seconds = 0.0
        self.util: dict[str, Any] = {}  # CpuSnapshot.delta of the gateway

    def wait(
        self,
        clients: Sequence[ClientProcess],
        inbox: Any,
        connect_timeout: float,
        *,
        expect: int | None = None,
        register_timeout: float | None = None,
    ) -> None:
        """Every client's ``connected`` report, then the gateway's count of registered sockets.

        The gateway is given ``register_timeout`` s (default: what is left of
        ``connect_timeout``, at least 10 s) to count ``expect`` (default: the sockets open).
        """
        self.connected = wait_connected(clients, inbox, self.gw, connect_timeout + 15)
        reports = self.connected.values()
        self.opened = sum(m["open"] for m in reports)
        self.failed = sum(m["failed"] for m in reports)
        errors: dict[str, int] = defaultdict(int)
        for m in reports:
            for e, n in m.get("errors", {}).items():
                errors[e] += n
        self.errors = dict(errors)
        if register_timeout is None:
            register_timeout = max(connect_timeout - (time.monotonic() - self.t0), 10)
        target = self.opened if expect is None else expect
        self.registered, _ = wait_registered(self.gw, target, timeout=register_timeout)
        self.seconds = time.monotonic() - self.t0
        self.util = self.cpu0.delta(CpuSnapshot({"gateway": self.gw.pid}))

    @property
    def gateway_cpu_ms_per_socket(self) -> float:
        cpu_s: float = self.util["cpu_s"].get("gateway", 0.0)
        return round(cpu_s / max(self.opened, 1) * 1000, 3)

    def describe(self) -> str:
        return (
            f"{self.opened} open, {self.failed} failed, {self.registered} registered "
            f"in {self.seconds:.1f} s"
        )

    def summary(self) -> dict[str, Any]:
        """The ``connect`` of a result."""
        return {
            "opened": self.opened,
            "failed": self.failed,
            "registered": self.registered,
            "seconds": round(self.seconds, 2),
            "gateway_cpu_ms_per_socket": self.gateway_cpu_ms_per_socket,
            "errors": self.errors,
        }


class ClientInbox:
    """What the client processes report while events flow: frames so far, done, exited, results."""

    def __init__(self, inbox: Any, clients: Sequence[ClientProcess]) -> None:
        self.inbox = inbox
        self.progress: dict[int, int] = {c.k: 0 for c in clients}
        self.done: dict[int, float] = {}  # client -> time.monotonic() of its "done"
        self.eof: set[int] = set()
        self.results: dict[int, dict[str, Any]] = {}

    def pump(self, timeout: float) -> None:
        """Take client messages for up to ``timeout`` seconds."""
        import queue

        end = time.monotonic() + timeout
        while True:
            remaining = end - time.monotonic()
            try:
                k, msg = (
                    self.inbox.get(timeout=remaining) if remaining > 0 else self.inbox.get_nowait()
                )
            except queue.Empty:
                return
            kind = msg["type"]
            if kind == "progress":
                self.progress[k] = msg["frames"]
            elif kind == "done":
                self.progress[k] = msg["frames"]
                self.done[k] = time.monotonic()
            elif kind == "eof":
                self.eof.add(k)
            elif kind == "result":
                self.results[k] = msg

    def frames(self) -> int:
        return sum(self.progress.values())

    def finished(self, active: Iterable[int]) -> bool:
        """Every client of ``active`` got all its frames or exited."""
        return all(k in self.done or k in self.eof for k in active)

    def wait_until(self, scheduled: float) -> float:
        """Take messages until ``time.monotonic()`` reaches ``scheduled``; returns the lateness, s."""
        while True:
            delay = scheduled - time.monotonic()
            if delay <= 0:
                break
            self.pump(min(delay, 0.05))
        return time.monotonic() - scheduled

    def drain(
        self,
        active: Sequence[int],
        timeout: float,
        expected_frames: int,
        tick: Callable[[], None] | None = None,
    ) -> None:
        """After the last publish: take messages until ``active`` are finished or ``timeout`` s.

        ``tick`` is called after every pump (progress reports, samples).
        """
        until = time.monotonic() + timeout
        while not self.finished(active):
            if time.monotonic() >= until:
                log(f"drain timeout: {self.frames()}/{expected_frames} frames received")
                break
            self.pump(0.02)
            if tick is not None:
                tick()

    def collect(self, clients: Sequence[ClientProcess], timeout: float) -> None:
        """Stop the clients and wait for each one's ``result`` (raises when one is missing)."""
        for c in clients:
            c.stop()
        collect_until = time.monotonic() + timeout
        while len(self.results) < len(clients) and time.monotonic() < collect_until:
            self.pump(0.2)
            if all(k in self.results or k in self.eof for k in range(len(clients))):
                break
        missing_clients = [k for k in range(len(clients)) if k not in self.results]
        if missing_clients:
            raise RuntimeError(f"no result from clients {missing_clients}")


def finish_log_dir(
    log_dir: str, ok: bool, what: str = "logs of the gateway and the clients"
) -> None:
    """Remove the run's log directory after a good run; keep it (and say where) otherwise."""
    if ok:
        shutil.rmtree(log_dir, ignore_errors=True)
    else:
        log(f"{what} kept in {log_dir}")


class Stack:
    """A private redis-server and the gateway as its own process; ``close`` stops both.

    ``env`` is added to the gateway's environment (``REDIS_URL``, ``LOG_LEVEL=WARNING`` and
    ``GATEWAY_INSTANCE_ID`` are set here); ``gateway_ref`` runs a ``git archive`` snapshot.
    """

    def __init__(
        self,
        env: Mapping[str, str],
        *,
        log_dir: str,
        gateway_ref: str | None = None,
        cmd_factory: Callable[[int], list[str]] | None = None,  # port -> the gateway command
    ) -> None:
        self.env = dict(env)
        self.log_dir = log_dir
        self.gateway_ref = gateway_ref
        self.cmd_factory = cmd_factory
        self.redis: Any = None
        self.gw: GatewayProcess | None = None
        self.code_identity: dict[str, Any] = {}

    def start(self) -> GatewayProcess:
        from gateway.redis_server import RedisConfig, RedisProcess, free_port

        self.redis = RedisProcess(RedisConfig(port=0))
        self.redis.start()
        log(f"redis-server {self.redis.url} (pid {self.redis.pid})")
        port = free_port()
        env = {
            "REDIS_URL": self.redis.url,
            "LOG_LEVEL": "WARNING",
            "GATEWAY_INSTANCE_ID": f"bench-{os.getpid()}",
            **self.env,
        }
        source = None
        if self.gateway_ref:
            source = os.path.join(self.log_dir, "src")
            ref = export_gateway(self.gateway_ref, source)
            self.code_identity = gateway_code_identity(ref, source)
            log(f"gateway code: {self.gateway_ref} = {ref} (snapshot in {source})")
        else:
            self.code_identity = gateway_code_identity()
        cmd = self.cmd_factory(port) if self.cmd_factory is not None else None
        self.gw = GatewayProcess(port=port, env=env, log_dir=self.log_dir, source=source, cmd=cmd)
        self.gw.start()
        self.gw.wait_healthy(timeout=30)
        log(f"gateway {self.gw.base_url} (pid {self.gw.pid})")
        return self.gw

    @property
    def redis_pid(self) -> int | None:
        return self.redis.pid if self.redis is not None else None

    def close(self) -> None:
        try:
            if self.gw is not None:
                self.gw.stop()
        finally:
            if self.redis is not None:
                self.redis.close()


def wait_registered(
    gw: GatewayProcess, count: int, timeout: float, *, stall: float = 10.0, poll: float = 0.1
) -> tuple[int, float]:
    """Poll ``/ws/health`` until ``total_connections`` >= count; returns (registered, seconds).

    Gives up after ``timeout`` s, or after ``stall`` s without any change of the count.
    """
    t0 = time.monotonic()
    registered = -1
    last_change = t0
    while True:
        now = time.monotonic()
        if now - t0 >= timeout or now - last_change >= stall:
            break
        try:
            value = int(gw.health().get("total_connections", -1))
        except (OSError, urllib.error.URLError, ValueError):
            value = registered
        if value != registered:
            registered, last_change = value, time.monotonic()
        if registered >= count:
            break
        time.sleep(poll)
    return registered, time.monotonic() - t0


def host_info(*, fd_limit: bool = True) -> dict[str, Any]:
    """CPUs, Python version and machine type (and the open-file limit unless ``fd_limit=False``)."""
    import platform
    import resource

    out: dict[str, Any] = {
        "cpus": os.cpu_count() or 1,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    if fd_limit:
        out["fd_limit"] = list(resource.getrlimit(resource.RLIMIT_NOFILE))
    return out


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


def tcp_counters() -> dict[str, int]:
    """Machine-wide TCP counters that show an overflowing listen queue or retransmitted SYNs.

    From ``/proc/net/netstat`` (TcpExt) and ``/proc/net/snmp`` (Tcp); other users of the host
    count too, so compare a delta over a short window.
    """
    wanted = {
        "ListenOverflows",
        "ListenDrops",
        "TCPSynRetrans",
        "TCPReqQFullDrop",
        "TCPReqQFullDoCookies",
        "SyncookiesSent",
        "TCPBacklogDrop",
        "RetransSegs",
        "AttemptFails",
        "EstabResets",
        "ActiveOpens",
        "PassiveOpens",
    }
    out: dict[str, int] = {}
    for path in ("/proc/net/netstat", "/proc/net/snmp"):
        try:
            with open(path) as fh:
                lines = fh.read().splitlines()
        except OSError:
            continue
        for head, values in zip(lines[::2], lines[1::2], strict=False):
            names = head.split()[1:]
            nums = values.split()[1:]
            for name, num in zip(names, nums, strict=False):
                if name in wanted:
                    with contextlib.suppress(ValueError):
                        out[name] = int(num)
    return out


def counter_delta(before: Mapping[str, int], after: Mapping[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in sorted(after)}


class HealthPoller:
    """``GET /ws/health`` over one keep-alive connection (a storm should not get extra sockets)."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.port = port
        self.timeout = timeout
        self.conn: Any = None

    def total(self) -> int | None:
        """``total_connections``, or None when the gateway did not answer (twice)."""
        import http.client

        for _attempt in range(2):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection(
                        "127.0.0.1", self.port, timeout=self.timeout
                    )
                self.conn.request("GET", "/ws/health")
                body = json.loads(self.conn.getresponse().read())
                return int(body.get("total_connections", -1))
            except (OSError, ValueError, http.client.HTTPException):
                self.close()
        return None

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None


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
