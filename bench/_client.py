"""One benchmark client process: opens many WebSockets and timestamps every frame it receives.

Started by the benchmarks (``bench/fanout.py``), never by hand. Protocol, one JSON object per line:

- stdin, first line: the configuration ``{"client": k, "url": "ws://127.0.0.1:P/ws/waiter",
  "tokens": [...], "indices": [...], "events": E, "connect_timeout": s, "deadline": s,
  "impl": "raw" | "trio-websocket"}``; later lines: ``stop`` (or EOF) ends the run;
- stdout: ``{"type": "connected", ...}`` once every socket is open or failed, ``{"type":
  "progress", "frames": n}`` about every 0.25 s while frames arrive, ``{"type": "done"}`` when
  every open socket has received ``events`` event frames, and finally ``{"type": "result", ...}``
  with, per socket, the sequence numbers received and their receive times (``time.monotonic()``:
  CLOCK_MONOTONIC is one clock for every process of the machine and, unlike ``time.time()``,
  never steps, so a publish→receive difference cannot go negative).

Optional configuration keys (``raw`` only; used by ``routed.py``, ``storm.py``, ``memory.py`` and
``soak.py``; without them the client behaves as ``fanout.py`` expects):

- ``targets``: per socket, the request target (``/ws/diner?table_token=…``) instead of
  ``<url path>?token=<token>``, so one process can hold sockets of every endpoint;
- ``expected``: per socket, how many event frames make it complete (instead of ``events`` for
  all); a socket expecting 0 is complete once open;
- ``max_connecting``: handshakes in flight at once (default 64; 0 = all at once, a storm);
- ``wait_go``: build every request, print ``{"type": "ready"}`` and wait (at most ``go_timeout``
  s) for ``go`` on stdin before the first ``connect``, so several processes start together;
- ``ping_on_open``: send ``ping`` right after the 101; a socket counts as connected when its
  ``{"type":"pong"}`` arrives (the gateway reads messages only once the socket is authenticated
  and registered, so the pong marks the end of admission);
- ``ping_interval``: every open socket sends ``ping`` this often (seconds; spread over sockets),
  as the TS clients do every 30 s.

Per socket the result also carries ``t_start`` (before ``connect``), ``t_open`` (101 received),
``t_pong`` (first pong received), all ``time.monotonic()``, and ``pongs``.

Two implementations:

- ``raw`` (default): one thread, epoll over non-blocking sockets, a minimal RFC 6455 client
  (server frames are never masked, so reading them is a few lines). It is the cheapest client
  per frame, which matters on a 2-core machine where clients and gateway share the CPU.
- ``trio-websocket``: one Trio task per socket on trio-websocket/wsproto, as a real Python client
  would be written; several times more CPU per frame.

A frame's sequence number and publish time are in its envelope's ``entity``; the payload bytes of
one event are identical on every socket, so each distinct payload is parsed once per process.
Every wait is bounded by ``connect_timeout`` and ``deadline``; the process exits by itself.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import resource
import select
import socket
import sys
import time
from typing import Any
from urllib.parse import urlsplit

ORIGIN = "http://localhost:5173"
MAX_CONNECTING = 64
PROGRESS_INTERVAL = 0.25
PONG = b'{"type":"pong"}'


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Decoder:
    """Payload bytes -> event sequence number (None: not a benchmark event), cached."""

    def __init__(self) -> None:
        self.cache: dict[bytes, int | None] = {}

    def seq(self, payload: bytes) -> int | None:
        try:
            return self.cache[payload]
        except KeyError:
            pass
        value: int | None = None
        try:
            data = json.loads(payload)
            entity = data.get("entity") if isinstance(data, dict) else None
            if isinstance(entity, dict) and isinstance(entity.get("seq"), int):
                value = entity["seq"]
        except ValueError:
            value = None
        if len(self.cache) < 200_000:
            self.cache[payload] = value
        return value


class Sock:
    __slots__ = (
        "buf",
        "close_code",
        "error",
        "handshake",
        "i",
        "next_ping",
        "other",
        "pongs",
        "seqs",
        "settled",
        "sock",
        "state",
        "t_open",
        "t_pong",
        "t_start",
        "times",
        "want",
    )

    def __init__(self, i: int) -> None:
        self.i = i
        self.sock: socket.socket | None = None
        self.state = "new"  # new, connecting, handshake, open, closed, failed
        self.handshake = b""
        self.buf = b""
        self.seqs: list[int] = []
        self.times: list[float] = []
        self.other = 0
        self.close_code: int | None = None
        self.error: str | None = None
        self.want = 0  # event frames expected; 0: complete as soon as open
        self.settled = False  # open (and ponged, with ping_on_open), closed or failed
        self.pongs = 0
        self.next_ping = 0.0
        self.t_start: float | None = None  # time.monotonic() before connect()
        self.t_open: float | None = None  # after the recv that completed the 101
        self.t_pong: float | None = None  # after the recv that returned the first pong


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A masked client frame with a short payload (close, pong)."""
    assert len(payload) < 126
    key = os.urandom(4)
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + key + masked


# --------------------------------------------------------------------------------------------
# raw: epoll, one thread
# --------------------------------------------------------------------------------------------


def run_raw(cfg: dict[str, Any]) -> dict[str, Any]:
    parts = urlsplit(cfg["url"])
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path
    tokens: list[str] = cfg["tokens"]
    indices: list[int] = cfg["indices"]
    targets: list[str] | None = cfg.get("targets")
    wants: list[int] | None = cfg.get("expected")
    max_connecting = int(cfg.get("max_connecting", MAX_CONNECTING)) or 1 << 30
    ping_on_open = bool(cfg.get("ping_on_open"))
    ping_interval = float(cfg.get("ping_interval") or 0.0)

    # epoll directly (not ``selectors``): fewer Python objects per ready socket.
    ep = select.epoll()
    by_fd: dict[int, Sock] = {}
    stdin_fd = sys.stdin.fileno()
    os.set_blocking(stdin_fd, False)
    ep.register(stdin_fd, select.EPOLLIN)
    conns = [Sock(i) for i in indices]
    for n, c in enumerate(conns):
        c.want = int(cfg["events"]) if wants is None else int(wants[n])
    todo = list(range(len(conns)))
    todo.reverse()
    connecting = 0
    opened = failed = settled = 0
    connected_sent = False
    done_sent = False
    complete = 0
    total_frames = 0
    decoder = Decoder()
    last_progress = 0.0
    last_reported = -1
    stop = False
    stdin_buf = b""
    cpu_at_connected = None
    # Request heads are built before the start signal, so a storm's sockets start together.
    requests: list[bytes] = []
    for n, token in enumerate(tokens):
        target = targets[n] if targets is not None else f"{path}?token={token}"
        key = base64.b64encode(os.urandom(16)).decode()
        requests.append(
            (
                f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                f"Origin: {ORIGIN}\r\n\r\n"
            ).encode()
        )
    ping = client_frame(0x1, b"ping")

    def read_stdin() -> bool:
        """Add what the parent wrote to ``stdin_buf``; False once stdin is closed."""
        nonlocal stdin_buf
        try:
            chunk = os.read(stdin_fd, 4096)
        except BlockingIOError:
            return True
        stdin_buf += chunk
        return bool(chunk)

    if cfg.get("wait_go"):
        # Ready: wait (bounded) for "go" on stdin, so several processes start at one instant.
        emit({"type": "ready", "client": cfg["client"]})
        go_deadline = time.monotonic() + float(cfg.get("go_timeout", 60.0))
        while b"go" not in stdin_buf and b"stop" not in stdin_buf:
            if time.monotonic() >= go_deadline or not ep.poll(0.5):
                if time.monotonic() >= go_deadline:
                    stop = True
                    break
                continue
            if not read_stdin():
                stop = True
                break
        stop = stop or b"stop" in stdin_buf
        stdin_buf = b""
    started = time.monotonic()
    connect_deadline = started + float(cfg["connect_timeout"])
    hard_deadline = started + float(cfg["deadline"])

    def settle(c: Sock) -> None:
        nonlocal settled
        if not c.settled:
            c.settled = True
            settled += 1

    def fail(c: Sock, why: str) -> None:
        nonlocal connecting, failed
        if c.state in ("connecting", "handshake"):
            connecting -= 1
        c.state = "failed"
        c.error = why
        failed += 1
        settle(c)
        if c.sock is not None:
            unwatch(c)

    def unwatch(c: Sock) -> None:
        assert c.sock is not None
        fd = c.sock.fileno()
        by_fd.pop(fd, None)
        with contextlib.suppress(OSError, ValueError):
            ep.unregister(fd)
        c.sock.close()
        c.sock = None

    def start_more() -> None:
        nonlocal connecting
        while todo and connecting < max_connecting:
            c = conns[todo.pop()]
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            c.sock = s
            c.t_start = time.monotonic()
            rc = s.connect_ex((host, port))
            if rc not in (0, errno.EINPROGRESS):
                c.state = "connecting"
                connecting += 1
                fail(c, f"connect: {os.strerror(rc)}")
                continue
            c.state = "connecting"
            connecting += 1
            by_fd[s.fileno()] = c
            ep.register(s.fileno(), select.EPOLLOUT)

    def on_writable(c: Sock, n: int) -> None:
        assert c.sock is not None
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            fail(c, f"connect: {os.strerror(err)}")
            return
        request = requests[n]
        try:
            sent = c.sock.send(request)
        except OSError as exc:
            fail(c, f"send: {exc}")
            return
        if sent != len(request):
            fail(c, "short handshake write")
            return
        c.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.state = "handshake"
        ep.modify(c.sock.fileno(), select.EPOLLIN)

    def on_frames(c: Sock, data: bytes, now: float) -> None:
        nonlocal complete, total_frames
        buf = c.buf + data if c.buf else data
        n = len(buf)
        pos = 0
        seqs = c.seqs
        before = len(seqs)
        while n - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            ln = b1 & 0x7F
            hdr = 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 4], "big")
                hdr = 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln = int.from_bytes(buf[pos + 2 : pos + 10], "big")
                hdr = 10
            if b1 & 0x80:
                c.error = "masked server frame"
                hdr += 4
            end = pos + hdr + ln
            if end > n:
                break
            opcode = b0 & 0x0F
            if opcode == 1:
                payload = buf[pos + hdr : end]
                seq = decoder.seq(payload)
                if seq is None:
                    if payload == PONG:
                        c.pongs += 1
                        if c.t_pong is None:
                            c.t_pong = now
                            if ping_on_open:
                                settle(c)
                    else:
                        c.other += 1
                else:
                    seqs.append(seq)
                    c.times.append(now)
            elif opcode == 8:
                payload = buf[pos + hdr : end]
                c.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                c.state = "closed"
                settle(c)
            elif opcode == 9 and c.sock is not None:
                with contextlib.suppress(OSError):
                    c.sock.send(client_frame(0xA, buf[pos + hdr : end]))
            else:
                c.other += 1
            pos = end
        c.buf = buf[pos:] if pos < n else b""
        got = len(seqs) - before
        if got:
            total_frames += got
            if before < c.want <= len(seqs):
                complete += 1

    def on_readable(c: Sock) -> None:
        nonlocal connecting, opened, complete
        assert c.sock is not None
        try:
            data = c.sock.recv(262144)
        except BlockingIOError:
            return
        except OSError as exc:
            data = b""
            c.error = c.error or f"recv: {exc}"
        # Taken after recv returned, never before: a process preempted between a timestamp and
        # its recv would otherwise date frames that arrived meanwhile before they were published.
        now = time.monotonic()
        if not data:
            if c.state == "handshake":
                fail(c, "closed during handshake")
                return
            if c.state == "open":
                c.state = "closed"
                if c.close_code is None:
                    c.close_code = 1006
                settle(c)
            unwatch(c)
            return
        if c.state == "handshake":
            c.handshake += data
            end = c.handshake.find(b"\r\n\r\n")
            if end < 0:
                if len(c.handshake) > 16384:
                    fail(c, "handshake response too large")
                return
            head = c.handshake[:end]
            rest = c.handshake[end + 4 :]
            c.handshake = b""
            status = head.split(b"\r\n", 1)[0]
            if b" 101 " not in status + b" ":
                fail(c, f"handshake: {status.decode(errors='replace')}")
                return
            c.state = "open"
            c.t_open = now
            connecting -= 1
            opened += 1
            if c.want <= 0:
                complete += 1
            if ping_on_open:
                try:
                    c.sock.send(ping)
                except OSError as exc:
                    c.error = f"ping: {exc}"
            else:
                settle(c)
            if ping_interval > 0:
                # Spread the periodic pings over the interval.
                c.next_ping = now + ping_interval * (0.5 + (c.i * 0.618034) % 1.0)
            if rest:
                on_frames(c, rest, now)
            return
        on_frames(c, data, now)

    def ping_due(now: float) -> None:
        for c in conns:
            if c.state == "open" and c.sock is not None and 0 < c.next_ping <= now:
                c.next_ping = now + ping_interval
                with contextlib.suppress(OSError):
                    c.sock.send(ping)

    index_of = {c.i: n for n, c in enumerate(conns)}
    next_ping_sweep = started + 1.0
    if not stop:
        start_more()
    while not stop:
        now_m = time.monotonic()
        if now_m >= hard_deadline:
            break
        if not connected_sent and (settled == len(conns) or now_m >= connect_deadline):
            for c in conns:
                if c.state in ("new", "connecting", "handshake"):
                    if c.state == "new":
                        c.state = "connecting"
                        connecting += 1
                    fail(c, "connect timeout")
                elif c.state == "open" and not c.settled:
                    c.error = "no pong before the connect timeout"
                    settle(c)
            todo.clear()
            errors: dict[str, int] = {}
            for c in conns:
                if c.state == "failed":
                    errors[c.error or "?"] = errors.get(c.error or "?", 0) + 1
                elif c.state == "closed":
                    key = f"closed {c.close_code}"
                    errors[key] = errors.get(key, 0) + 1
            emit(
                {
                    "type": "connected",
                    "client": cfg["client"],
                    "open": opened,
                    "failed": failed,
                    "errors": errors,
                    "seconds": round(now_m - started, 3),
                }
            )
            connected_sent = True
            cpu_at_connected = cpu_seconds()
        events = ep.poll(0.05)
        for fd, _mask in events:
            target = by_fd.get(fd)
            if target is None:
                if fd != stdin_fd:
                    continue
                if not read_stdin():
                    stop = True
                    with contextlib.suppress(Exception):
                        ep.unregister(stdin_fd)
                    continue
                if b"stop" in stdin_buf:
                    stop = True
                continue
            if target.state == "connecting":  # writable, or an error: on_writable reads SO_ERROR
                on_writable(target, index_of[target.i])
            elif target.sock is not None:
                on_readable(target)
        if todo and connecting < max_connecting:
            start_more()
        now_m = time.monotonic()
        if ping_interval > 0 and now_m >= next_ping_sweep:
            ping_due(now_m)
            next_ping_sweep = now_m + 1.0
        if (
            connected_sent
            and total_frames != last_reported
            and now_m - last_progress >= PROGRESS_INTERVAL
        ):
            emit(
                {
                    "type": "progress",
                    "client": cfg["client"],
                    "frames": total_frames,
                    "complete": complete,
                }
            )
            last_reported = total_frames
            last_progress = now_m
        if connected_sent and not done_sent and opened and complete >= opened:
            emit(
                {"type": "done", "client": cfg["client"], "frames": total_frames, "t": time.time()}
            )
            done_sent = True

    cpu_end = cpu_seconds()
    # Close politely: a masked close frame, then hang up.
    close = client_frame(0x8, (1000).to_bytes(2, "big"))
    for c in conns:
        if c.sock is not None:
            with contextlib.suppress(OSError):
                c.sock.send(close)
            with contextlib.suppress(OSError):
                c.sock.close()
    ep.close()
    return {
        "open": opened,
        "failed": failed,
        "cpu_s_receive": round(cpu_end - (cpu_at_connected or cpu_end), 3),
        "cpu_s_total": round(cpu_end, 3),
        "started": started,
        "sockets": [
            {
                "i": c.i,
                "seq": c.seqs,
                "t": c.times,
                "other": c.other,
                "pongs": c.pongs,
                "close": c.close_code,
                "state": c.state,
                "error": c.error,
                "t_start": c.t_start,
                "t_open": c.t_open,
                "t_pong": c.t_pong,
            }
            for c in conns
        ],
    }


# --------------------------------------------------------------------------------------------
# trio-websocket: a task per socket
# --------------------------------------------------------------------------------------------


def run_trio(cfg: dict[str, Any]) -> dict[str, Any]:
    import trio
    from trio_websocket import ConnectionClosed, HandshakeError, connect_websocket_url

    tokens: list[str] = cfg["tokens"]
    indices: list[int] = cfg["indices"]
    expected = int(cfg["events"])
    conns = [Sock(i) for i in indices]
    decoder = Decoder()
    state: dict[str, Any] = {
        "opened": 0,
        "failed": 0,
        "frames": 0,
        "complete": 0,
        "cpu_at_connected": None,
    }

    async def main() -> None:
        limiter = trio.CapacityLimiter(MAX_CONNECTING)
        all_settled = trio.Event()
        settled = 0

        def settle() -> None:
            nonlocal settled
            settled += 1
            if settled == len(conns):
                all_settled.set()

        async def one(c: Sock, token: str, nursery: trio.Nursery) -> None:
            url = f"{cfg['url']}?token={token}"
            try:
                async with limiter:
                    with trio.fail_after(cfg["connect_timeout"]):
                        ws = await connect_websocket_url(
                            nursery,
                            url,
                            extra_headers=[(b"Origin", ORIGIN.encode())],
                            message_queue_size=100_000,
                        )
            except (OSError, HandshakeError, trio.TooSlowError, ConnectionClosed) as exc:
                c.state, c.error = "failed", f"{type(exc).__name__}: {exc}"[:120]
                state["failed"] += 1
                settle()
                return
            c.state = "open"
            state["opened"] += 1
            settle()
            seqs, times = c.seqs, c.times
            try:
                while True:
                    message = await ws.get_message()
                    now = time.monotonic()
                    payload = message.encode() if isinstance(message, str) else message
                    seq = decoder.seq(payload)
                    if seq is None:
                        c.other += 1
                        continue
                    seqs.append(seq)
                    times.append(now)
                    state["frames"] += 1
                    if len(seqs) == expected:
                        state["complete"] += 1
            except ConnectionClosed as exc:
                c.state = "closed"
                c.close_code = exc.reason.code if exc.reason else 1006
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(1):
                    await ws.aclose()

        async def control(cancel: trio.CancelScope) -> None:
            stream = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
            buf = b""
            async with stream:
                while b"stop" not in buf:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        break
                    buf += chunk
            cancel.cancel()

        async def reporter() -> None:
            await all_settled.wait()
            emit(
                {
                    "type": "connected",
                    "client": cfg["client"],
                    "open": state["opened"],
                    "failed": state["failed"],
                    "errors": _errors(conns),
                }
            )
            state["cpu_at_connected"] = cpu_seconds()
            last = -1
            done = False
            while True:
                await trio.sleep(PROGRESS_INTERVAL)
                if state["frames"] != last:
                    last = state["frames"]
                    emit(
                        {
                            "type": "progress",
                            "client": cfg["client"],
                            "frames": last,
                            "complete": state["complete"],
                        }
                    )
                if not done and state["opened"] and state["complete"] >= state["opened"]:
                    emit(
                        {"type": "done", "client": cfg["client"], "frames": last, "t": time.time()}
                    )
                    done = True

        with trio.move_on_after(cfg["deadline"]) as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(control, scope)
                nursery.start_soon(reporter)
                for c, token in zip(conns, tokens, strict=True):
                    nursery.start_soon(one, c, token, nursery)

    trio.run(main)
    return {
        "open": state["opened"],
        "failed": state["failed"],
        "cpu_s_receive": round(cpu_seconds() - (state["cpu_at_connected"] or cpu_seconds()), 3),
        "sockets": [
            {
                "i": c.i,
                "seq": c.seqs,
                "t": c.times,
                "other": c.other,
                "close": c.close_code,
                "state": c.state,
                "error": c.error,
            }
            for c in conns
        ],
    }


def _errors(conns: list[Sock]) -> dict[str, int]:
    out: dict[str, int] = {}
    for c in conns:
        if c.state == "failed":
            out[c.error or "?"] = out.get(c.error or "?", 0) + 1
    return out


def main() -> int:
    line = sys.stdin.buffer.readline()
    if not line:
        return 2
    cfg = json.loads(line)
    impl = cfg.get("impl", "raw")
    result = run_trio(cfg) if impl == "trio-websocket" else run_raw(cfg)
    emit({"type": "result", "client": cfg["client"], "impl": impl, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
