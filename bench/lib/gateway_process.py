"""The gateway as its own process, with a private redis-server (``Stack``), and what it reports
over HTTP: health, registered sockets, metrics."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from bench.lib.constants import ROOT, VENV_BIN
from bench.lib.gateway_code import export_gateway, gateway_code_identity
from bench.lib.log import log
from bench.lib.processes import python_exe, spawn, stop_process
from gateway.redisio.embedded import RedisProcess
from gateway.redisio.embedded_config import RedisConfig, free_port
from gateway.settings import settings_fields

#: The instrumented gateway (tracemalloc snapshots, GC pauses); run by path, see its docstring.
INSTRUMENTED = ROOT / "bench" / "lib" / "instrumented.py"


def _settings_env_names() -> set[str]:
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
        # Benchmarks mint tokens with the public development secrets (bench.lib.tokens).
        env["ENVIRONMENT"] = "development"
        # Every load client connects from loopback, all at once: the admission bound on
        # connections not admitted yet is not what these benchmarks measure.
        env["WS_MAX_PENDING_CONNECTIONS"] = env["WS_MAX_PENDING_PER_IP"] = "1000000"
        # For the same reason the per-address attempt rate (D23) is set out of reach, not off: it
        # is still counted, in the process and in Redis, on every admission.
        env["WS_CONNECT_RATE_PER_IP"] = "10000000"
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
            self.proc = spawn(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env, cwd=cwd)

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
        stop_process(self.proc, timeout)
        self.proc = None


def instrumented_gateway(
    *, frames: int = 0, snapshot_dir: str | None = None, gc_log: str | None = None
) -> Callable[[int], list[str]]:
    """A ``Stack`` ``cmd_factory``: ``bench/lib/instrumented.py``, the gateway with
    tracemalloc snapshots on SIGUSR1 (``frames`` > 0 and ``snapshot_dir``) and/or a log of its
    garbage-collector pauses written to ``gc_log`` as it exits."""

    def cmd(port: int) -> list[str]:
        out = [python_exe(), "-P", str(INSTRUMENTED), "--port", str(port)]
        if frames > 0 and snapshot_dir:
            out += ["--tracemalloc-frames", str(frames), "--snapshot-dir", snapshot_dir]
        if gc_log:
            out += ["--gc-log", gc_log]
        return out

    return cmd


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


class HealthPoller:
    """``GET /ws/health`` over one keep-alive connection (a storm should not get extra sockets)."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.port = port
        self.timeout = timeout
        self.conn: Any = None

    def total(self) -> int | None:
        """``total_connections``, or None when the gateway did not answer (twice)."""
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


def health_total(gw: GatewayProcess, timeout: float = 60.0) -> int:
    """``/ws/health`` ``total_connections``, retried: a traced gateway answers slowly."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return int(gw.health().get("total_connections", -1))
        except (OSError, ValueError):
            if time.monotonic() >= deadline:
                return -1
            time.sleep(0.5)


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
