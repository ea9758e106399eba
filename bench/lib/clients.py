"""The client processes (``python -m bench.client``): starting them with their share of the
sockets, and what they report while the sockets open and the events flow."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.lib.constants import ROOT
from bench.lib.gateway_process import GatewayProcess, wait_registered
from bench.lib.log import log
from bench.lib.measurement import CpuSnapshot
from bench.lib.processes import python_exe, spawn, stop_process

#: Messages of the client processes: (client number, the JSON object of one stdout line).
Inbox = queue.Queue[tuple[int, dict[str, Any]]]


class ClientProcess:
    """One ``_client.py`` process; a thread turns its stdout lines into items of ``inbox``."""

    def __init__(
        self,
        k: int,
        cfg: Mapping[str, Any],
        inbox: Inbox,
        log_dir: str,
    ) -> None:
        self.k = k
        self.stderr_path = os.path.join(log_dir, f"client-{k}.log")
        with open(self.stderr_path, "wb") as err:
            self.proc = spawn(
                [python_exe(), "-m", "bench.client"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                cwd=str(ROOT),
            )
        self.send((json.dumps(dict(cfg)) + "\n").encode())
        self.thread = threading.Thread(target=self._read, args=(inbox,), daemon=True)
        self.thread.start()

    def _read(self, inbox: Inbox) -> None:
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
    inbox: Inbox,
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
    clients: Sequence[ClientProcess], inbox: Inbox, gw: GatewayProcess, timeout: float
) -> dict[int, dict[str, Any]]:
    """The ``connected`` report of every client process, by client.

    Raises after ``timeout`` s, when the gateway dies or when a client exits early.
    """
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
        inbox: Inbox,
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

    def __init__(self, inbox: Inbox, clients: Sequence[ClientProcess]) -> None:
        self.inbox = inbox
        self.progress: dict[int, int] = {c.k: 0 for c in clients}
        self.done: dict[int, float] = {}  # client -> time.monotonic() of its "done"
        self.eof: set[int] = set()
        self.results: dict[int, dict[str, Any]] = {}

    def pump(self, timeout: float) -> None:
        """Take client messages for up to ``timeout`` seconds."""
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
