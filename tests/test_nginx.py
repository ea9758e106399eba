"""Two gateway instances behind the nginx configuration we ship (docs/deploy/nginx.conf).

A real nginx on loopback, with only the lines marked "@upstream", "@listen" and "@runtime"
rewritten, proxies to two ``gateway serve`` subprocesses (distinct GATEWAY_INSTANCE_ID, one shared
private redis-server). Checked end to end:

1. the WebSocket upgrade and its headers (Origin, the token in the query) pass through nginx;
2. every stream event reaches the clients of both instances, once each;
3. SIGTERM on one instance: its clients get 1012, reconnect through nginx to the other one (a new
   upgrade that nginx sends to the draining instance gets 503 and is retried on the other), catch
   up, and end with every event exactly once while events are published throughout; the drained
   process exits 0;
4. the client address in the gateway's log lines is the one nginx forwards in X-Forwarded-For,
   and a forged X-Forwarded-For from an untrusted peer is ignored;
5. nginx never writes a token to its logs, even when an upstream fails.

These tests need nginx; without it they fail (scripts/test installs it where it can).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import trio
from helpers import dev_staff_token
from trio_websocket import ConnectionClosed, WebSocketConnection, connect_websocket_url

from gateway.core.events import encode_envelope, envelope
from gateway.redisio.client import STREAM_MAXLEN, make_client, xadd_capped
from gateway.redisio.embedded_config import free_port
from gateway.settings import settings_fields
from gateway_client import ConnectionState, GatewayClient, HttpError, http_get
from gateway_testing import DEFAULT_ORIGIN

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "docs" / "deploy" / "nginx.conf"
STREAM = "events:critical"
TENANT, BRANCH = 1, 2
START_TIMEOUT = 30.0
EXIT_TIMEOUT = 15.0
STEP_TIMEOUT = 10.0
POLL = 0.02
FORWARDED = "203.0.113.9"

T = TypeVar("T")


# --- nginx --------------------------------------------------------------------------------------


def nginx_binary() -> str:
    """The nginx executable; the test fails (it does not skip) when there is none."""
    found = shutil.which("nginx")
    if found is None:
        for candidate in ("/usr/sbin/nginx", "/usr/local/sbin/nginx"):
            if os.access(candidate, os.X_OK):
                found = candidate
                break
    if found is None:
        pytest.fail("the nginx tests need nginx, which is not installed: install it (e.g. "
                    "'apt-get install nginx-light'; scripts/test does so when run as root)", pytrace=False)
    return found


def render_nginx_conf(upstream_ports: Sequence[int], listen_port: int, pid_file: Path) -> str:
    """docs/deploy/nginx.conf with only the "@upstream", "@listen" and "@runtime" lines rewritten."""
    original = NGINX_CONF.read_text().splitlines(keepends=True)
    ports = list(upstream_ports)
    upstream_lines = [line for line in original if "# @upstream" in line]
    assert len(upstream_lines) == len(ports), f"nginx.conf has {len(upstream_lines)} @upstream lines"
    out: list[str] = []
    for line in original:
        new = line
        if "# @upstream" in line:
            new = re.sub(r"\bserver\s+\S+", f"server 127.0.0.1:{ports.pop(0)}", line, count=1)
        elif "# @listen" in line:
            new = re.sub(r"\blisten\s+[^;]+;", f"listen 127.0.0.1:{listen_port};", line, count=1)
        elif "# @runtime" in line:
            new = re.sub(r"\bpid\s+[^;]+;", f"pid {pid_file};", line, count=1)
        assert ("# @" in line) == (new != line), f"marked line not rewritten: {line!r}"
        out.append(new)
    return "".join(out)


def nginx_workers() -> int:
    match = re.search(r"^\s*worker_processes\s+(\w+)\s*;", NGINX_CONF.read_text(), re.M)
    value = match.group(1) if match else "1"
    return int(value) if value.isdigit() else os.cpu_count() or 1


# --- processes ----------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    out: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def command_name(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.index("(") + 1 : stat.rindex(")")]


async def stop_process(process: trio.Process, signum: int = signal.SIGKILL, *, grace: float = 5.0) -> None:
    """Send ``signum``; SIGKILL the process if it is still there after ``grace`` (and then its
    children of the same name too: nginx workers outlive a killed master)."""
    with trio.CancelScope(shield=True):
        if process.poll() is not None:
            return
        kids = {pid: command_name(pid) for pid in children(process.pid)}
        process.send_signal(signum)
        with trio.move_on_after(grace):
            await process.wait()
        if process.poll() is None:
            name = command_name(process.pid)
            process.kill()
            await process.wait()
            for pid, kid_name in kids.items():
                if kid_name == name and command_name(pid) == name:
                    with suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)


def gateway_env(**variables: str) -> dict[str, str]:
    """The caller's environment minus every gateway setting, plus ``variables``."""
    names = {f.metadata["env"] for f in settings_fields()} | {"GATEWAY_TEST_REDIS_URL"}
    env = {k: v for k, v in os.environ.items() if k not in names}
    env.update(variables)
    return env


def log_records(path: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


@attrs.define(eq=False)
class Instance:
    name: str
    process: trio.Process
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    async def connections(self) -> int:
        """``total_connections`` of /ws/health (also answered, with 503, while draining); 0 once
        the instance no longer listens."""
        try:
            with trio.fail_after(2.0):
                response = await http_get(f"{self.url}/ws/health")
        except (OSError, HttpError, trio.TooSlowError):
            return 0
        return int(response.json()["total_connections"])

    async def wait_log(self, predicate: Callable[[dict[str, Any]], bool],
                       within: float = STEP_TIMEOUT) -> dict[str, Any]:
        with trio.move_on_after(within):
            while True:
                for record in log_records(self.log):
                    if predicate(record):
                        return record
                await trio.sleep(POLL)
        raise AssertionError(f"no matching log line from {self.name} within {within} s:\n{self.output()}")


async def status_of(url: str) -> int | None:
    try:
        with trio.fail_after(2.0):
            return (await http_get(url)).status
    except (OSError, HttpError, trio.TooSlowError):
        return None


async def start_gateway(tmp_path: Path, name: str, redis_url: str, procs: list[trio.Process], *,
                        trusted_proxies: str = "127.0.0.1", drain_period: float = 0.5) -> Instance:
    port = free_port()
    log = tmp_path / f"{name}.log"
    env = gateway_env(
        ENVIRONMENT="development",
        REDIS_URL=redis_url,
        GATEWAY_INSTANCE_ID=f"{name}-{uuid.uuid4().hex[:8]}",
        GATEWAY_TRUSTED_PROXIES=trusted_proxies,
        GATEWAY_DRAIN_PERIOD=str(drain_period),
        WS_MAX_CONNECTIONS_PER_USER="100",
        # Both instances write every event they deliver to the catch-up store: room for the test's.
        GATEWAY_CATCHUP_MAX_EVENTS="2000",
        LOG_FORMAT="json",
        LOG_LEVEL="DEBUG",  # "socket registered" lines carry the client address
    )
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "gateway", "serve", "--port", str(port), "--host", "127.0.0.1"],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
        )
    procs.append(process)
    instance = Instance(name, process, port, log)
    with trio.move_on_after(START_TIMEOUT):
        while await status_of(f"{instance.url}/ws/health") != 200:
            assert process.poll() is None, f"{name} exited with {process.returncode}:\n{instance.output()}"
            await trio.sleep(0.05)
        return instance
    raise AssertionError(f"{name} not healthy within {START_TIMEOUT} s:\n{instance.output()}")


@attrs.define(eq=False)
class Cluster:
    instances: list[Instance]
    nginx: trio.Process
    nginx_port: int
    nginx_log: Path
    extra: list[Instance]

    @property
    def ws_base(self) -> str:
        return f"ws://127.0.0.1:{self.nginx_port}"

    @property
    def http_base(self) -> str:
        return f"http://127.0.0.1:{self.nginx_port}"

    async def counts(self) -> list[int]:
        return [await i.connections() for i in self.instances]

    def diagnostics(self) -> str:
        parts = [f"--- nginx:\n{self.nginx_log.read_text(errors='replace')[-4000:]}"]
        parts += [f"--- {i.name}:\n{i.output()[-4000:]}" for i in [*self.instances, *self.extra]]
        return "\n".join(parts)


@asynccontextmanager
async def cluster(tmp_path: Path, redis_url: str, *, untrusted_extra: bool = False,
                  drain_period: float = 0.5) -> AsyncIterator[Cluster]:
    """nginx in front of two gateways (plus, optionally, one that trusts no proxy, not behind nginx)."""
    binary = nginx_binary()
    procs: list[trio.Process] = []
    nginx_proc: trio.Process | None = None
    try:
        instances: dict[str, Instance] = {}

        async def start(name: str, trusted: str) -> None:
            instances[name] = await start_gateway(tmp_path, name, redis_url, procs, trusted_proxies=trusted,
                                                  drain_period=drain_period)

        async with trio.open_nursery() as starting:
            starting.start_soon(start, "gw1", "127.0.0.1")
            starting.start_soon(start, "gw2", "127.0.0.1")
            if untrusted_extra:
                starting.start_soon(start, "direct", "")
        upstream = [instances["gw1"], instances["gw2"]]

        prefix = tmp_path / "nginx"
        prefix.mkdir()
        listen = free_port()
        conf = prefix / "nginx.conf"
        conf.write_text(render_nginx_conf([i.port for i in upstream], listen, prefix / "nginx.pid"))
        nginx_log = tmp_path / "nginx.log"
        with nginx_log.open("wb") as out:
            nginx_proc = await trio.lowlevel.open_process(
                [binary, "-p", f"{prefix}/", "-c", str(conf), "-e", "stderr", "-g", "daemon off;"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            )
        with trio.move_on_after(START_TIMEOUT) as waiting:
            while await status_of(f"http://127.0.0.1:{listen}/ws/health") != 200:
                assert nginx_proc.poll() is None, f"nginx exited:\n{nginx_log.read_text(errors='replace')}"
                await trio.sleep(0.05)
        assert not waiting.cancelled_caught, f"nginx not answering:\n{nginx_log.read_text(errors='replace')}"
        extra = [instances["direct"]] if untrusted_extra else []
        handle = Cluster(upstream, nginx_proc, listen, nginx_log, extra)
        try:
            yield handle
        except BaseException as exc:
            if not isinstance(exc, trio.Cancelled):
                exc.add_note(handle.diagnostics())
            raise
    finally:
        if nginx_proc is not None:
            await stop_process(nginx_proc, signal.SIGTERM)  # fast shutdown, workers included
        for process in procs:
            await stop_process(process)


# --- clients ------------------------------------------------------------------------------------


async def open_ws(nursery: trio.Nursery, base: str, query: str, *, origin: str | None = DEFAULT_ORIGIN,
                  headers: Sequence[tuple[bytes, bytes]] = ()) -> WebSocketConnection:
    extra = [(b"Origin", origin.encode())] if origin is not None else []
    with trio.fail_after(STEP_TIMEOUT):
        return await connect_websocket_url(nursery, f"{base}/ws/waiter?{query}",
                                           extra_headers=[*extra, *headers], message_queue_size=1000)


async def pong(ws: WebSocketConnection) -> None:
    """A pong proves the socket passed authentication and is registered."""
    await ws.send_message('{"type":"ping"}')
    with trio.fail_after(STEP_TIMEOUT):
        while True:
            message = await ws.get_message()
            if json.loads(message).get("type") == "pong":
                return


async def close_of(ws: WebSocketConnection) -> tuple[int | None, str | None]:
    with trio.fail_after(STEP_TIMEOUT):
        try:
            while True:
                await ws.get_message()
        except ConnectionClosed as exc:
            return (exc.reason.code, exc.reason.reason) if exc.reason else (None, None)


async def placed(c: Cluster, connect: Callable[[], Awaitable[T]]) -> tuple[T, int]:
    """Connect one more socket through nginx and find the instance it landed on: the one whose
    ``total_connections`` went up (sockets are opened one at a time)."""
    before = await c.counts()
    item = await connect()
    with trio.move_on_after(STEP_TIMEOUT):
        while True:
            after = await c.counts()
            if sum(after) == sum(before) + 1:
                grew = [i for i, (a, b) in enumerate(zip(after, before, strict=True)) if a == b + 1]
                assert len(grew) == 1, (before, after)
                return item, grew[0]
            await trio.sleep(POLL)
    raise AssertionError(f"socket not registered on either instance: {before} -> {await c.counts()}")


async def spread(c: Cluster, connect: Callable[[], Awaitable[T]], per_instance: int = 2,
                 max_sockets: int = 16) -> list[tuple[T, int]]:
    """Open sockets through nginx until every instance has at least ``per_instance``."""
    out: list[tuple[T, int]] = []
    while any(sum(1 for _, i in out if i == n) < per_instance for n in range(len(c.instances))):
        assert len(out) < max_sockets, f"nginx did not spread {max_sockets} sockets: {[i for _, i in out]}"
        out.append(await placed(c, connect))
    return out


def event(seq: int, run: str) -> dict[str, object]:
    return envelope("ROUND_READY", TENANT, BRANCH, entity={"seq": seq, "run": run})


def seq_of(message: Any, run: str) -> int | None:
    if isinstance(message, dict) and message.get("type") == "ROUND_READY":
        entity = message.get("entity") or {}
        if entity.get("run") == run:
            return int(entity["seq"])
    return None


# --- 1. upgrade and headers through nginx --------------------------------------------------------


async def test_websocket_upgrade_and_headers_pass_through_nginx(tmp_path: Path, redis_url: str,
                                                              nursery: trio.Nursery) -> None:
    async with cluster(tmp_path, redis_url) as c:
        assert await status_of(f"{c.http_base}/ws/health") == 200
        ws = await open_ws(nursery, c.ws_base, f"token={dev_staff_token(7)}")
        await pong(ws)
        await ws.aclose()

        # The token travels in the query string; a bad one is refused by the gateway, and its
        # close frame comes back through nginx.
        bad = await open_ws(nursery, c.ws_base, "token=not-a-token")
        assert await close_of(bad) == (4001, "Authentication failed")
        missing = await open_ws(nursery, c.ws_base, "")
        assert (await close_of(missing))[0] == 4001
        # The Origin header reaches the gateway (without it, development mode would accept).
        foreign = await open_ws(nursery, c.ws_base, f"token={dev_staff_token(7)}", origin="https://evil.example")
        assert await close_of(foreign) == (4003, "Origin not allowed")


# --- 2. fan-out across instances ---------------------------------------------------------------


async def test_every_stream_event_reaches_the_clients_of_both_instances_once(
        tmp_path: Path, redis_url: str, nursery: trio.Nursery) -> None:
    run = uuid.uuid4().hex
    count = 20
    async with cluster(tmp_path, redis_url) as c:
        users = iter(range(100, 200))

        async def connect() -> WebSocketConnection:
            ws = await open_ws(nursery, c.ws_base, f"token={dev_staff_token(next(users))}")
            await pong(ws)
            return ws

        sockets = await spread(c, connect)
        # Sentinel last: each instance dispatches the stream in order, so once it has arrived every
        # earlier event (and any duplicate of one) would have arrived too.
        client = make_client(redis_url)
        async with client, client.pipeline(transaction=False) as pipe:
            for seq in range(count + 1):
                xadd_capped(pipe, STREAM, {"data": encode_envelope(event(seq, run))}, STREAM_MAXLEN)

        received: dict[int, list[int]] = {}

        async def collect(n: int, ws: WebSocketConnection) -> None:
            seqs = received.setdefault(n, [])
            while True:
                seq = seq_of(json.loads(await ws.get_message()), run)
                if seq == count:
                    return
                if seq is not None:
                    seqs.append(seq)

        with trio.fail_after(STEP_TIMEOUT):
            async with trio.open_nursery() as readers:
                for n, (ws, _) in enumerate(sockets):
                    readers.start_soon(collect, n, ws)
        for n, (_, instance) in enumerate(sockets):
            assert sorted(received[n]) == list(range(count)), f"socket {n} on instance {instance}"
        assert {instance for _, instance in sockets} == {0, 1}


# --- 3. drain ------------------------------------------------------------------------------------


@attrs.define(eq=False)
class Tracked:
    client: GatewayClient
    run: str
    seqs: list[int] = attrs.Factory(list)
    closes: list[int] = attrs.Factory(list)

    def on_event(self, message: dict[str, Any]) -> None:
        seq = seq_of(message, self.run)
        if seq is not None:
            self.seqs.append(seq)

    def on_state(self, state: ConnectionState) -> None:
        if state is ConnectionState.RECONNECTING and self.client.last_close is not None:
            self.closes.append(self.client.last_close.code)


async def wait_until(predicate: Callable[[], bool], what: str, within: float = STEP_TIMEOUT) -> None:
    with trio.move_on_after(within):
        while not predicate():  # noqa: ASYNC110 - test helper, bounded
            await trio.sleep(POLL)
        return
    raise AssertionError(f"timed out after {within} s waiting until {what}")


async def test_drain_moves_clients_to_the_other_instance_without_losing_events(
        tmp_path: Path, redis_url: str) -> None:
    run = uuid.uuid4().hex
    published = [0]
    stop_publishing = trio.Event()
    publisher_done = trio.Event()

    async def publish() -> None:
        client = make_client(redis_url)
        try:
            async with client:
                while not stop_publishing.is_set():
                    payload = encode_envelope(event(published[0], run))
                    await xadd_capped(client, STREAM, {"data": payload}, STREAM_MAXLEN)
                    published[0] += 1
                    with trio.move_on_after(0.02):
                        await stop_publishing.wait()
        finally:
            publisher_done.set()

    async with cluster(tmp_path, redis_url) as c, trio.open_nursery() as nursery:
        users = iter(range(300, 400))

        async def connect() -> Tracked:
            client = GatewayClient(c.http_base, "waiter", dev_staff_token(next(users)), origin=DEFAULT_ORIGIN,
                                   branch_id=BRANCH, backoff_base=0.05, backoff_cap=0.5, connect_timeout=5.0)
            tracked = Tracked(client, run)
            client.on("*", tracked.on_event)
            client.on_state = tracked.on_state
            nursery.start_soon(client.run)
            with trio.fail_after(STEP_TIMEOUT):
                await client.wait_state(ConnectionState.CONNECTED)
            return tracked

        clients = await spread(c, connect)
        drained, survivor = c.instances[0], c.instances[1]
        moving = [t for t, i in clients if i == 0]
        staying = [t for t, i in clients if i == 1]

        nursery.start_soon(publish)
        await wait_until(lambda: all(len(t.seqs) >= 5 for t, _ in clients), "every client got events")

        drained.process.send_signal(signal.SIGTERM)
        with trio.fail_after(EXIT_TIMEOUT):
            code = await drained.process.wait()
        assert code == 0, drained.output()
        published_at_exit = published[0]
        await wait_until(lambda: all(t.client.opens == 2 and t.client.state is ConnectionState.CONNECTED
                                     for t in moving), "the drained instance's clients reconnected")
        with trio.fail_after(STEP_TIMEOUT):
            while await survivor.connections() != len(clients):  # noqa: ASYNC110 - polls over HTTP
                await trio.sleep(POLL)

        # Keep publishing until every client has live events from after the move.
        after = published[0] + 5
        await wait_until(lambda: all(t.seqs and max(t.seqs) >= after for t, _ in clients),
                         "every client got events after the drain")
        stop_publishing.set()
        with trio.fail_after(STEP_TIMEOUT):
            await publisher_done.wait()
        total = published[0]
        assert total > published_at_exit > 5

        # Until every client has every event (bounded); what is missing is reported below.
        with trio.move_on_after(STEP_TIMEOUT):
            while not all(len(set(t.seqs)) >= total for t, _ in clients):  # noqa: ASYNC110
                await trio.sleep(POLL)
        for n, (t, instance) in enumerate(clients):
            dupes = sorted({s for s in t.seqs if t.seqs.count(s) > 1})
            missing = sorted(set(range(total)) - set(t.seqs))
            assert not dupes and not missing, (f"client {n} (instance {instance}, closes {t.closes}, "
                                               f"catch-up {t.client.catchup_events}): "
                                               f"missing {missing}, duplicated {dupes}")
        for t, _ in clients:
            # Protocol v2 (the client's default): the move was a resume by position, with no HTTP
            # catch-up and nothing for the client to de-duplicate (D20).
            assert t.client.speaking_v2
            assert t.client.catchup_events == 0 and t.client.duplicates_dropped == 0
            assert t.seqs == sorted(t.seqs), "in order across the move"
        for t in moving:
            assert t.closes == [1012], t.closes
            assert t.client.opens == 2
        for t in staying:
            assert t.closes == [] and t.client.opens == 1
        assert await drained.connections() == 0
        for t, _ in clients:
            await t.client.close()


async def test_new_sockets_during_a_drain_go_to_the_other_instance(tmp_path: Path, redis_url: str,
                                                                    nursery: trio.Nursery) -> None:
    # A long drain: the draining instance keeps listening (and holds sockets) for seconds.
    async with cluster(tmp_path, redis_url, drain_period=6.0) as c:
        draining, other = c.instances
        users = iter(range(600, 700))

        async def connect() -> WebSocketConnection:
            ws = await open_ws(nursery, c.ws_base, f"token={dev_staff_token(next(users))}")
            await pong(ws)
            return ws

        await spread(c, connect, per_instance=3)
        on_draining, on_other = await draining.connections(), await other.connections()
        draining.process.send_signal(signal.SIGTERM)
        with trio.fail_after(STEP_TIMEOUT):
            while await status_of(f"{draining.url}/ws/health") != 503:  # noqa: ASYNC110 - polls over HTTP
                await trio.sleep(POLL)
        # The draining instance answers new upgrades with 503 and nginx retries them on the other.
        # least_conn counts per worker (the config has no shared zone): a worker sends a socket to
        # the draining instance once it has fewer sockets there than on the other one. A worker
        # that gets on_draining + 2 new sockets must do so; this many make one worker get that many.
        fresh = [await connect() for _ in range(nginx_workers() * (on_draining + 1) + 1)]
        assert await other.connections() == on_other + len(fresh)
        # Still within the drain (sockets left on the draining instance): the 503 path was live.
        assert await status_of(f"{draining.url}/ws/health") == 503
        assert await draining.connections() > 0
        for ws in fresh:
            await ws.aclose()
        # nginx writes a socket's access line when it ends; $upstream_addr lists every try.
        retried = f"up=127.0.0.1:{draining.port}, 127.0.0.1:{other.port}"
        with trio.move_on_after(STEP_TIMEOUT):
            while c.nginx_log.read_text(errors="replace").count('"GET /ws/waiter" 101') < len(fresh):  # noqa: ASYNC110
                await trio.sleep(POLL)
        access = [line for line in c.nginx_log.read_text(errors="replace").splitlines() if "/ws/waiter" in line]
        assert any('" 101 ' in line and retried in line for line in access), "\n".join(access)


async def test_nginx_never_logs_a_token_when_an_upstream_fails(tmp_path: Path, redis_url: str,
                                                              nursery: trio.Nursery) -> None:
    async with cluster(tmp_path, redis_url) as c:
        dead, alive = c.instances
        await stop_process(dead.process)  # SIGKILL: nginx's connects to it are refused
        start = len(c.nginx_log.read_bytes())

        def since_kill() -> str:
            return c.nginx_log.read_bytes()[start:].decode(errors="replace")

        tokens: list[str] = []
        # Connect until nginx has tried the dead upstream (its error line or an access line
        # naming it), then look for tokens in everything nginx wrote.
        with trio.move_on_after(STEP_TIMEOUT):
            while f"127.0.0.1:{dead.port}" not in since_kill():
                tokens.append(dev_staff_token(800 + len(tokens)))
                ws = await open_ws(nursery, c.ws_base, f"token={tokens[-1]}")
                await pong(ws)
                await ws.aclose()
        output = c.nginx_log.read_text(errors="replace")
        assert f"127.0.0.1:{dead.port}" in since_kill(), f"nginx never tried the dead upstream:\n{output}"
        assert await alive.connections() == 0
        leaked = [line for line in output.splitlines() if "token=" in line or any(t in line for t in tokens)]
        assert not leaked, "\n".join(leaked)


# --- 4. client address ---------------------------------------------------------------------------


def registered(user: int) -> Callable[[dict[str, Any]], bool]:
    return lambda r: r.get("msg") == "socket registered" and r.get("user") == user


async def test_client_address_is_the_forwarded_one_and_forgery_is_ignored(
        tmp_path: Path, redis_url: str, nursery: trio.Nursery) -> None:
    async with cluster(tmp_path, redis_url, untrusted_extra=True) as c:
        # Through nginx: it appends its peer (127.0.0.1, trusted) to the client's header, so the
        # right-most untrusted hop is the address the client sent.
        async def connect(user: int, headers: Sequence[tuple[bytes, bytes]] = ()) -> WebSocketConnection:
            ws = await open_ws(nursery, c.ws_base, f"token={dev_staff_token(user)}", headers=headers)
            await pong(ws)
            return ws

        _, landed = await placed(c, lambda: connect(501, [(b"X-Forwarded-For", FORWARDED.encode())]))
        record = await c.instances[landed].wait_log(registered(501))
        assert record["client"] == FORWARDED

        # Through nginx without a header of its own: the client is nginx's peer, 127.0.0.1.
        _, landed = await placed(c, lambda: connect(502))
        record = await c.instances[landed].wait_log(registered(502))
        assert record["client"] == "127.0.0.1"

        # Straight to a gateway that trusts no proxy, with a forged header: not believed.
        direct = c.extra[0]
        forged = await open_ws(nursery, f"ws://127.0.0.1:{direct.port}", f"token={dev_staff_token(503)}",
                               headers=[(b"X-Forwarded-For", FORWARDED.encode())])
        await pong(forged)
        record = await direct.wait_log(registered(503))
        assert record["client"] == "127.0.0.1"
