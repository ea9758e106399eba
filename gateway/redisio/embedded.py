"""Run a private ``redis-server`` (D18) and stop it again.

Three users: the gateway's embedded default (``run_embedded_redis``, a Trio task in the root
nursery), the test suite and the benchmarks (``RedisProcess``, synchronous control that can also
kill -9 and restart the server for fault tests). Which binary and arguments: ``gateway.redisio.embedded_config``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import weakref
from types import TracebackType
from typing import BinaryIO

import attrs
import trio

from gateway.redisio.embedded_config import (
    LOG_NAME,
    SOCKET_NAME,
    RedisConfig,
    RedisUnavailable,
    find_redis_server,
    free_port,
    make_tmpdir,
    read_log_tail,
    server_args,
)

__all__ = [
    "RedisProcess",
    "run_embedded_redis",
    "stop_process",
]

_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0
_POLL_INTERVAL = 0.02


def _answered(reply: bytes) -> bool:
    # A server that demands a password is up; authenticating is the caller's business.
    # -LOADING (AOF replay in progress) is not an answer yet.
    return reply.startswith((b"+PONG", b"-NOAUTH"))


def _ping_sync(family: socket.AddressFamily, address: str | tuple[str, int]) -> bool:
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            sock.connect(address)
            sock.sendall(b"PING\r\n")
            reply = b""
            while b"\r\n" not in reply:
                chunk = sock.recv(256)
                if not chunk:
                    return False
                reply += chunk
            return _answered(reply)
    except OSError:
        return False


async def _ping_unix(path: str) -> bool:
    sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
    try:
        with trio.move_on_after(0.5):
            await sock.connect(path)
            await sock.send(b"PING\r\n")
            reply = b""
            while b"\r\n" not in reply:
                chunk = await sock.recv(256)
                if not chunk:
                    return False
                reply += chunk
            return _answered(reply)
        return False
    except OSError:
        return False
    finally:
        sock.close()


# --------------------------------------------------------------------------------------------
# Synchronous control: tests, fault tests, benchmarks
# --------------------------------------------------------------------------------------------


def stop_process(proc: subprocess.Popen[bytes], timeout: float = _STOP_TIMEOUT) -> None:
    """SIGTERM, wait up to ``timeout``, then SIGKILL; a process already gone is fine."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(_STOP_TIMEOUT)


@attrs.define
class _Owned:
    """What a RedisProcess owns, kept apart from it so a finalizer can clean up without it."""

    tmpdir: str
    proc: subprocess.Popen[bytes] | None = None

    def stop(self, timeout: float = _STOP_TIMEOUT) -> None:
        if self.proc is not None:
            stop_process(self.proc, timeout)
        self.proc = None

    def kill(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(_STOP_TIMEOUT)
        self.proc = None


def _cleanup(owned: _Owned) -> None:
    try:
        owned.stop()
    finally:
        shutil.rmtree(owned.tmpdir, ignore_errors=True)


class RedisProcess:
    """A private redis-server child, controlled synchronously.

    The URL is known before ``start`` (a free port is chosen up front for ``port=0``) and stays
    the same across ``kill``/``restart``. The server is stopped and its temp dir removed by
    ``close``/``__exit__``, when the object is garbage-collected, or at interpreter exit.
    """

    def __init__(self, config: RedisConfig | None = None) -> None:
        self.config = config if config is not None else RedisConfig()
        self._auto_port = self.config.port == 0
        self.port: int | None = free_port() if self._auto_port else self.config.port
        self._owned = _Owned(tmpdir=make_tmpdir())
        self._finalizer = weakref.finalize(self, _cleanup, self._owned)
        self.unix_socket: str | None = self.config.unix_socket
        if self.unix_socket is None and self.port is None:
            self.unix_socket = os.path.join(self._owned.tmpdir, SOCKET_NAME)
        self.log_path = os.path.join(self._owned.tmpdir, LOG_NAME)
        self._executable: str | None = None
        self._started_once = False

    @property
    def url(self) -> str:
        if self.port is not None:
            return f"redis://127.0.0.1:{self.port}"
        assert self.unix_socket is not None
        return f"unix://{self.unix_socket}"

    @property
    def tmpdir(self) -> str:
        return self._owned.tmpdir

    @property
    def pid(self) -> int | None:
        proc = self._owned.proc
        if proc is None or proc.poll() is not None:
            return None
        return proc.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    def start(self, timeout: float = _START_TIMEOUT) -> None:
        if not self._finalizer.alive:
            raise RuntimeError("RedisProcess is closed")
        if self.running:
            raise RuntimeError(f"redis-server already running (pid {self.pid})")
        self._owned.proc = None
        if self._executable is None:
            self._executable = find_redis_server()
        # Another process can take the port chosen up front before redis binds it; pick again,
        # but only before the first successful start so a restart keeps its URL.
        attempts = 3 if self._auto_port and not self._started_once else 1
        for attempt in range(attempts):
            try:
                self._spawn_and_wait(self._executable, timeout)
            except _EarlyExit as exc:
                if attempt + 1 < attempts and "in use" in str(exc):
                    self.port = free_port()
                    continue
                raise RedisUnavailable(str(exc)) from None
            self._started_once = True
            return

    def _spawn_and_wait(self, executable: str, timeout: float) -> None:
        if self.config.data_dir is not None:
            os.makedirs(self.config.data_dir, exist_ok=True)
        args = server_args(
            executable,
            workdir=self._owned.tmpdir,
            port=self.port,
            unix_socket=self.unix_socket,
            data_dir=self.config.data_dir,
            extra_args=self.config.extra_args,
        )
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._owned.tmpdir,
                # Own session: a terminal's Ctrl-C goes to the Python process, which then stops
                # the server in order instead of both racing.
                start_new_session=True,
            )
        self._owned.proc = proc
        family, address = self._address()
        deadline = time.monotonic() + timeout
        while True:
            code = proc.poll()
            if code is not None:
                self._owned.proc = None
                raise _EarlyExit(
                    f"redis-server exited with code {code} during startup; log:\n"
                    f"{read_log_tail(self.log_path)}"
                )
            if _ping_sync(family, address):
                return
            if time.monotonic() >= deadline:
                self._owned.kill()
                raise RedisUnavailable(
                    f"redis-server did not answer PING on {self.url} within {timeout:g} s; log:\n"
                    f"{read_log_tail(self.log_path)}"
                )
            time.sleep(_POLL_INTERVAL)

    def _address(self) -> tuple[socket.AddressFamily, str | tuple[str, int]]:
        if self.port is not None:
            return socket.AF_INET, ("127.0.0.1", self.port)
        assert self.unix_socket is not None
        return socket.AF_UNIX, self.unix_socket

    def stop(self) -> None:
        """SIGTERM, up to 5 s for a clean shutdown (AOF flushed), then SIGKILL. Idempotent."""
        self._owned.stop()

    def kill(self) -> None:
        """SIGKILL now, no shutdown work: what a crash looks like to clients."""
        self._owned.kill()

    def restart(self, timeout: float = _START_TIMEOUT) -> None:
        """Start again on the same port or socket and data dir (the AOF replays)."""
        self.stop()
        self.start(timeout)

    def close(self) -> None:
        """Stop the server and remove the temp dir. The object cannot be started again."""
        self._finalizer()

    def log_tail(self) -> str:
        return read_log_tail(self.log_path)

    def __enter__(self) -> RedisProcess:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<RedisProcess {self.url} pid={self.pid}>"


class _EarlyExit(Exception):
    pass


# --------------------------------------------------------------------------------------------
# Embedded default for the gateway supervisor (D18)
# --------------------------------------------------------------------------------------------


async def run_embedded_redis(
    *,
    data_dir: str | None = None,
    task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a private redis-server for the life of the calling task.

    Reports ``unix:///.../redis.sock`` through ``task_status`` once it answers PING. On
    cancellation the server is stopped (SIGTERM, then SIGKILL after 5 s) and its temp dir
    removed. If it exits on its own, ``RedisUnavailable`` is raised: a gateway without its
    broker must fail, not limp on.
    """
    executable = find_redis_server()
    tmpdir: str | None = None
    process: trio.Process | None = None
    try:
        tmpdir = await trio.to_thread.run_sync(make_tmpdir)
        sock_path = os.path.join(tmpdir, SOCKET_NAME)
        log_path = os.path.join(tmpdir, LOG_NAME)
        args = server_args(
            executable, workdir=tmpdir, port=None, unix_socket=sock_path, data_dir=data_dir,
        )
        log = await trio.to_thread.run_sync(_open_embedded_log, log_path, data_dir)
        try:
            process = await trio.lowlevel.open_process(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=tmpdir,
                start_new_session=True,
            )
        finally:
            log.close()
        await _wait_until_answers(process, sock_path, log_path)
        task_status.started(f"unix://{sock_path}")
        code = await process.wait()
        raise RedisUnavailable(
            f"embedded redis-server exited with code {code}; log:\n{read_log_tail(log_path)}"
        )
    finally:
        with trio.CancelScope(shield=True):
            if process is not None:
                await _terminate(process)
            if tmpdir is not None:
                await trio.to_thread.run_sync(_remove_tree, tmpdir)


def _open_embedded_log(log_path: str, data_dir: str | None) -> BinaryIO:
    if data_dir is not None:
        os.makedirs(data_dir, exist_ok=True)
    return open(log_path, "ab")


def _remove_tree(path: str) -> None:
    shutil.rmtree(path, ignore_errors=True)


async def _wait_until_answers(process: trio.Process, sock_path: str, log_path: str) -> None:
    with trio.move_on_after(_START_TIMEOUT):
        while True:
            if process.poll() is not None:
                raise RedisUnavailable(
                    f"embedded redis-server exited with code {process.returncode} during "
                    f"startup; log:\n{read_log_tail(log_path)}"
                )
            if await _ping_unix(sock_path):
                return
            await trio.sleep(_POLL_INTERVAL)
    raise RedisUnavailable(
        f"embedded redis-server did not answer PING within {_START_TIMEOUT:g} s; log:\n"
        f"{read_log_tail(log_path)}"
    )


async def _terminate(process: trio.Process) -> None:
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    with trio.move_on_after(_STOP_TIMEOUT):
        await process.wait()
        return
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    await process.wait()
