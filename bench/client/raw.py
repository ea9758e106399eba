"""The ``raw`` client: one thread, epoll over non-blocking sockets, a minimal RFC 6455 reader
(server frames are never masked). The cheapest client per frame."""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import select
import socket
import sys
import time
from typing import Any
from urllib.parse import urlsplit

from bench.client.protocol import (
    MAX_CONNECTING,
    ORIGIN,
    PONG,
    PROGRESS_INTERVAL,
    SUBPROTOCOL_V2,
    Decoder,
    Sock,
    client_frame,
    cpu_seconds,
    emit,
)


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
    # Protocol v2 (D20): offer the subprotocol; the 101 must select it, the first frame is the
    # welcome and every event frame carries ``_pos``.
    v2 = int(cfg.get("protocol", 1)) == 2
    offer = f"Sec-WebSocket-Protocol: {SUBPROTOCOL_V2}\r\n" if v2 else ""
    selected = f"sec-websocket-protocol: {SUBPROTOCOL_V2}".encode()

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
    decoder = Decoder(v2)
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
                f"Origin: {ORIGIN}\r\n{offer}\r\n"
            ).encode()
        )
    ping = client_frame(0x1, b"ping")
    # A v2 client's first message (docs/protocol.md §10): nothing to resume. Until the first
    # message (at most 2 s) the gateway holds the socket's live events.
    resume = client_frame(0x1, b'{"type":"resume","positions":{}}')

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
                if v2 and not c.welcome:
                    c.welcome = 1 if seq is None and payload.startswith(b'{"type":"welcome"') else -1
                    if c.welcome == 1:
                        pos = end
                        continue
                if seq is None:
                    if v2 and payload.startswith(b'{"type":"resumed"'):
                        pass
                    elif payload == PONG:
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
            if v2 and selected not in head.lower():
                fail(c, "handshake: integrador.v2 not selected")
                return
            c.state = "open"
            c.t_open = now
            connecting -= 1
            opened += 1
            if c.want <= 0:
                complete += 1
            if v2:
                try:
                    c.sock.send(resume)
                except OSError as exc:
                    c.error = f"resume: {exc}"
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
            ready = by_fd.get(fd)
            if ready is None:
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
            if ready.state == "connecting":  # writable, or an error: on_writable reads SO_ERROR
                on_writable(ready, index_of[ready.i])
            elif ready.sock is not None:
                on_readable(ready)
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
                **({"welcome": c.welcome} if v2 else {}),
            }
            for c in conns
        ],
        **({"v2": decoder.v2_report()} if v2 else {}),
    }
