"""The accept loop: every connection waiting in the kernel's queue is taken at one wake-up.

``trio.serve_listeners`` accepts one connection per pass, with two scheduler round trips around
each ``accept`` (a checkpoint before, a cancel-shielded one after). In a reconnect storm the
accept queue holds thousands of connections: here one readiness wake-up drains up to
``ACCEPT_BATCH`` of them with plain non-blocking ``accept`` calls and starts a handler task for
each. Errors are treated as Trio treats them: routine ones (a peer that reset before it was
accepted) are skipped, resource exhaustion (EMFILE and the like) is logged and retried after
100 ms, anything else ends the loop.

The listening sockets are Trio's (``trio.open_tcp_listeners``, whose backlog is the most the
kernel allows: ``net.core.somaxconn`` caps it, see docs/operations.md); the loop accepts on a
duplicate of each descriptor, and closes both when it ends (a draining gateway stops listening).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable

import trio

log = logging.getLogger("gateway.accept")

#: Connections accepted per wake-up at most, so one storm cannot starve every other task.
ACCEPT_BATCH = 64
#: Trio's own choice (``trio._highlevel_serve_listeners``).
CAPACITY_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})
CAPACITY_PAUSE = 0.1
#: The errors ``trio.SocketListener.accept`` skips: the connection died before it was accepted.
IGNORED_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "EPERM", "ECONNABORTED", "EPROTO", "ENETDOWN", "ENOPROTOOPT", "EHOSTDOWN", "ENONET",
        "EHOSTUNREACH", "EOPNOTSUPP", "ENETUNREACH", "ENOSR", "ESOCKTNOSUPPORT", "EPROTONOSUPPORT",
        "ETIMEDOUT", "ECONNRESET",
    ) if hasattr(errno, name)
)

Handler = Callable[[trio.SocketStream], Awaitable[object]]


async def serve_listeners(handler: Handler, listeners: list[trio.SocketListener], handler_nursery: trio.Nursery) -> None:
    """Accept on every listener until cancelled; each connection runs ``handler`` in ``handler_nursery``."""
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(accept_loop, handler, listener, handler_nursery)


async def accept_loop(handler: Handler, listener: trio.SocketListener, handler_nursery: trio.Nursery) -> None:
    """Accept on ``listener`` until cancelled, then close it (as ``trio.serve_listeners`` does)."""
    sock = socket.socket(fileno=os.dup(listener.socket.fileno()))
    sock.setblocking(False)
    try:
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(ACCEPT_BATCH):
                try:
                    conn, _address = sock.accept()
                except BlockingIOError:
                    break
                except OSError as exc:
                    if exc.errno in IGNORED_ERRNOS:
                        continue
                    if exc.errno not in CAPACITY_ERRNOS:
                        raise
                    log.error("accept returned %s (%s); retrying in %s seconds",
                              errno.errorcode.get(exc.errno or 0, "?"), os.strerror(exc.errno or 0), CAPACITY_PAUSE)
                    await trio.sleep(CAPACITY_PAUSE)
                    break
                conn.setblocking(False)
                handler_nursery.start_soon(handler, trio.SocketStream(trio.socket.from_stdlib_socket(conn)))
    finally:
        sock.close()
        with trio.CancelScope(shield=True):
            await listener.aclose()
