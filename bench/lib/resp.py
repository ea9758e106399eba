"""A minimal synchronous Redis client (RESP2), so the publisher adds no event loop of its own."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Sequence
from typing import Any


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
