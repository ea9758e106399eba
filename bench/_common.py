"""Shared pieces of the benchmarks: the gateway as its own process, CPU accounting from /proc,
a minimal synchronous Redis client, statistics, result files, plots and py-spy profiles.

Everything here is bounded: every wait has a timeout, and every process started is stopped by
its owner in a ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
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


def gateway_code_identity(ref: str | None = None, source: str | None = None) -> dict[str, Any]:
    """Which gateway code ran: HEAD commit, whether gateway/ differs from it, a digest of gateway/*.py.

    Read-only git commands; the tree is shared and edited while benchmarks run.
    """
    import hashlib

    out: dict[str, Any] = {}
    if ref is not None and source is not None:
        import hashlib

        digest = hashlib.sha256()
        for path in sorted((Path(source) / "gateway").glob("*.py")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
        return {
            "ref": ref,
            "commit": ref,
            "gateway_dirty": False,
            "gateway_sha256": digest.hexdigest()[:12],
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
    digest = hashlib.sha256()
    for path in sorted((ROOT / "gateway").glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    out["gateway_sha256"] = digest.hexdigest()[:12]
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
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(5)
        self.proc = None


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    arr = np.sort(np.asarray(latencies_ms, dtype=float))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
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
    ax = axes[2]
    if per_event:
        t = [p[0] for p in per_event]
        ax.plot(t, [p[1] for p in per_event], ".", ms=3, label="p50 over sockets")
        ax.plot(t, [p[2] for p in per_event], ".", ms=3, label="max over sockets")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_xlabel("publish time since first event (s)")
    ax.set_ylabel("latency (ms)")
    ax.set_title("per event")
    ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
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
    pid: int, duration: int, out_path: Path, rate: int = 200
) -> subprocess.Popen[bytes] | None:
    """``py-spy record`` of ``pid`` for ``duration`` s, collapsed stacks (``--format raw``).

    Raw output keeps the numbers for the hot-spot tables; ``render_flamegraph`` draws the SVG.
    Frames carry the line being run (no ``--function``), so a C call such as ``os.write`` shows as
    the line that makes it; the tables aggregate per function and also list the hottest lines.
    """
    exe = find_py_spy()
    if exe is None:
        log("py-spy not found: profiling skipped (.venv/bin/pip install py-spy)")
        return None
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
    return subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


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
# Shared by routed.py, storm.py, memory.py and soak.py (fanout.py keeps its own copies)
# --------------------------------------------------------------------------------------------

CLIENT_SCRIPT = Path(__file__).resolve().parent / "_client.py"


def rel(path: Path) -> str:
    """A path relative to the repository when it is inside it."""
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


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
        cmd_factory: Any = None,  # Callable[[int], list[str]] | None: the gateway command
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


def host_info() -> dict[str, Any]:
    import platform
    import resource

    return {
        "cpus": os.cpu_count() or 1,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "fd_limit": list(resource.getrlimit(resource.RLIMIT_NOFILE)),
    }


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


def finish_profile(spy: subprocess.Popen[bytes], results_dir: Path, name: str) -> dict[str, Any]:
    """Wait for py-spy's output; write the hot-spot table and a flame graph next to the JSON."""
    try:
        _, err = spy.communicate(timeout=60)
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
