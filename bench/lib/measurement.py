"""What the machine and the processes did, from /proc: CPU time, memory, sockets, TCP counters,
and which resource limited a run."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Mapping
from typing import Any

from bench.lib.log import log

CLK_TCK = os.sysconf("SC_CLK_TCK")


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
