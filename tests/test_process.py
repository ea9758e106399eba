"""The gateway as an operator runs it: `./scripts/serve` as the README says, with no Redis
configured (so it starts its own redis-server child, D18), stopped by signals (D7).

Each test starts the real script in a subprocess with an environment that sets no gateway
setting, waits until `/ws/health` answers, and then checks what SIGTERM/SIGINT do to a connected
socket, to the process and to the embedded redis-server child.
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import httpx
import pytest
import trio
from helpers import dev_staff_token
from trio_websocket import ConnectionClosed, WebSocketConnection, connect_websocket_url

from gateway.app import run_gateway
from gateway.redisio.embedded_config import free_port
from gateway.settings import settings_fields
from gateway_testing import DEFAULT_ORIGIN, test_settings

ROOT = Path(__file__).resolve().parent.parent
# Generous: the script may first (re)install the package into .venv.
START_TIMEOUT = 180
# D7: a drained gateway exits within 10 s of the signal.
EXIT_TIMEOUT = 10


def serve_env(**variables: str) -> dict[str, str]:
    """The caller's environment minus every gateway setting: the defaults apply, no REDIS_URL."""
    names = {f.metadata["env"] for f in settings_fields()} | {"GATEWAY_TEST_REDIS_URL"}
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(variables)
    return env


def children(pid: int) -> dict[int, str]:
    """Live child processes of ``pid``: {pid: command name}."""
    out: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if int(ppid) == pid and state != "Z":
            out[int(entry.name)] = comm
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


@attrs.define
class Served:
    process: trio.Process
    port: int
    log: Path
    redis_pid: int
    redis_dir: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")


async def health_status(url: str) -> int | None:
    call = functools.partial(httpx.get, f"{url}/ws/health", timeout=5.0)
    try:
        return (await trio.to_thread.run_sync(call)).status_code
    except httpx.HTTPError:
        return None


@asynccontextmanager
async def served(tmp_path: Path, *extra_args: str, **env: str) -> AsyncIterator[Served]:
    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            ["./scripts/serve", "--port", str(port), "--host", "127.0.0.1", *extra_args],
            cwd=ROOT, env=serve_env(**env), stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )
    redis: list[int] = []
    redis_dir = ""
    try:
        with trio.fail_after(START_TIMEOUT):
            while await health_status(f"http://127.0.0.1:{port}") != 200:
                assert process.poll() is None, f"serve exited with {process.returncode}:\n{log.read_text()}"
                await trio.sleep(0.1)
        redis = [pid for pid, name in children(process.pid).items() if name == "redis-server"]
        assert len(redis) == 1, children(process.pid)
        redis_dir = os.readlink(f"/proc/{redis[0]}/cwd")
        yield Served(process, port, log, redis[0], redis_dir)
    finally:
        # Only matters after a failed test: the redis-server child has its own session, so
        # killing the gateway orphans it and leaves its temp dir behind.
        if process.poll() is None:
            process.kill()
            await process.wait()
        for pid in redis:
            if alive(pid) and _cwd(pid) == redis_dir:
                os.kill(pid, signal.SIGKILL)
        if redis_dir:
            shutil.rmtree(redis_dir, ignore_errors=True)


def _cwd(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


async def open_socket(nursery: trio.Nursery, handle: Served, user: int) -> WebSocketConnection:
    ws = await connect_websocket_url(nursery, f"ws://127.0.0.1:{handle.port}/ws/waiter?token={dev_staff_token(user)}",
                                     extra_headers=[(b"Origin", DEFAULT_ORIGIN.encode())])
    # A pong means the socket passed authentication and is registered.
    await ws.send_message("ping")
    with trio.fail_after(10):
        assert await ws.get_message() == '{"type":"pong"}'
    return ws


async def close_code(ws: WebSocketConnection) -> int | None:
    with trio.fail_after(30):
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed as exc:
            return exc.reason.code if exc.reason else None


def assert_cleaned_up(handle: Served) -> None:
    assert not alive(handle.redis_pid), "the embedded redis-server outlived the gateway"
    assert not os.path.exists(handle.redis_dir), "the embedded redis-server's temp dir was left behind"
    assert "Traceback" not in handle.output(), handle.output()


# --- tests -------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_drains_with_1012_and_exits_0(tmp_path: Path, nursery: trio.Nursery,
                                                   signum: signal.Signals) -> None:
    async with served(tmp_path) as handle:
        ws = await open_socket(nursery, handle, user=7)
        handle.process.send_signal(signum)
        assert await close_code(ws) == 1012
        with trio.fail_after(EXIT_TIMEOUT):
            code = await handle.process.wait()
        assert code == 0, handle.output()
        assert_cleaned_up(handle)


async def test_second_signal_during_the_drain_stops_at_once(tmp_path: Path, nursery: trio.Nursery) -> None:
    # A long drain: the two sockets' closes are spread over a minute.
    async with served(tmp_path, GATEWAY_DRAIN_PERIOD="60", GATEWAY_SHUTDOWN_TIMEOUT="120") as handle:
        sockets = [await open_socket(nursery, handle, user=u) for u in (7, 8)]
        codes: list[int | None] = []
        first_closed = trio.Event()

        async def watch(ws: WebSocketConnection) -> None:
            codes.append(await close_code(ws))
            first_closed.set()

        handle.process.send_signal(signal.SIGTERM)
        async with trio.open_nursery() as watchers:
            for ws in sockets:
                watchers.start_soon(watch, ws)
            # The drain has begun once the first socket got its 1012.
            with trio.fail_after(30):
                await first_closed.wait()
            assert codes == [1012]
            assert handle.process.poll() is None
            handle.process.send_signal(signal.SIGTERM)
            with trio.fail_after(EXIT_TIMEOUT):
                code = await handle.process.wait()
        assert code == 0, handle.output()
        assert len(codes) == 2
        assert_cleaned_up(handle)


async def test_cancelling_a_running_gateway_raises_nothing(redis_url: str) -> None:
    # Cancellation is how the second signal stops the gateway (and how test fixtures end it). An
    # error from coredis' pub/sub clean-up used to escape in about half of the runs, so one try
    # proves little.
    for _ in range(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(run_gateway, test_settings(redis_url))
            nursery.cancel_scope.cancel()


async def test_the_readme_commands_deliver_an_event_to_a_socket(tmp_path: Path, nursery: trio.Nursery) -> None:
    # README: ./scripts/serve, then `gateway publish ...` with no REDIS_URL. The embedded Redis is
    # private, so the event goes through the development gateway's publish API.
    import sys

    async with served(tmp_path) as handle:
        ws = await open_socket(nursery, handle, user=7)
        gateway_bin = str(Path(sys.executable).with_name("gateway"))
        result = await trio.run_process(
            [gateway_bin, "publish", "--type", "ROUND_READY", "--tenant", "1", "--branch", "2", "--session", "9",
             "--gateway", handle.url],
            env=serve_env(), capture_stdout=True, capture_stderr=True, check=False,
        )
        assert result.returncode == 0, result.stderr
        assert b"appended to events:critical" in result.stdout
        with trio.fail_after(10):
            event = await ws.get_message()
        assert '"type":"ROUND_READY"' in event
        handle.process.send_signal(signal.SIGTERM)
        with trio.fail_after(EXIT_TIMEOUT):
            await handle.process.wait()
