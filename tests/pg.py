"""A throwaway PostgreSQL cluster for tests: initdb into a temp dir, one postmaster child.

The server runs as the ``postgres`` OS user when the tests run as root (PostgreSQL refuses to run
as root), listens on 127.0.0.1 on a free port with its unix socket in the same temp dir, and can be
stopped and started again on the same port and data (a database outage for the gateway).
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from typing import Any

import pytest

from gateway.redisio.embedded_config import free_port

TABLE_DDL = """
CREATE TABLE waiter_sector_assignment (
    id serial PRIMARY KEY,
    tenant_id int,
    branch_id int,
    sector_id int,
    waiter_id int,
    assignment_date date,
    shift text,
    is_active boolean
)
"""
_START_TIMEOUT = 20.0
_STOP_TIMEOUT = 10.0


def find_pg_bindir() -> str | None:
    """The directory holding ``initdb`` and ``postgres``: Debian's versioned dirs, then PATH."""
    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.access(os.path.join(bindir, "initdb"), os.X_OK) and os.access(
            os.path.join(bindir, "postgres"), os.X_OK
        ):
            return bindir
    initdb = shutil.which("initdb")
    if initdb and shutil.which("postgres"):
        return os.path.dirname(initdb)
    return None


def _run_as() -> pwd.struct_passwd | None:
    """The account the server must run as: ``postgres`` when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip("running as root and there is no 'postgres' OS user to run PostgreSQL as")


class PostgresCluster:
    """``start``/``stop`` any number of times; ``close`` stops it and removes every file."""

    def __init__(self) -> None:
        bindir = find_pg_bindir()
        if bindir is None:
            pytest.skip("PostgreSQL server binaries (initdb, postgres) are not installed")
        try:
            import psycopg  # noqa: F401
        except ImportError:
            pytest.skip("psycopg is not installed (pip install gateway[postgres])")
        self.bindir = bindir
        self.account = _run_as()
        # Not pytest's tmp_path: its parents are private to root, and the server runs as postgres.
        self.tmpdir = tempfile.mkdtemp(prefix="gw-pg-", dir="/tmp" if os.path.isdir("/tmp") else None)
        self.datadir = os.path.join(self.tmpdir, "data")
        self.log_path = os.path.join(self.tmpdir, "postgres.log")
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        if self.account is not None:
            os.chown(self.tmpdir, self.account.pw_uid, self.account.pw_gid)
        self._initdb()

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _user_kwargs(self) -> dict[str, Any]:
        if self.account is None:
            return {}
        return {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": [],
                "env": {**os.environ, "HOME": self.tmpdir, "USER": "postgres", "LOGNAME": "postgres"}}

    def _initdb(self) -> None:
        args = [os.path.join(self.bindir, "initdb"), "-D", self.datadir, "-U", "postgres", "--auth=trust",
                "--no-locale", "-E", "UTF8", "--no-sync"]
        result = subprocess.run(args, cwd=self.tmpdir, capture_output=True, timeout=60, **self._user_kwargs())
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")[-2000:]
            self.close()
            pytest.skip(f"initdb failed (exit {result.returncode}): {output}")

    def start(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("postgres already running")
        args = [
            os.path.join(self.bindir, "postgres"), "-D", self.datadir, "-p", str(self.port), "-k", self.tmpdir,
            "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off", "-c", "synchronous_commit=off",
            "-c", "full_page_writes=off",
        ]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(args, cwd=self.tmpdir, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         **self._user_kwargs())
        deadline = time.monotonic() + _START_TIMEOUT
        while not self._answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"postgres exited with code {self.proc.returncode}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"postgres did not accept connections within {_START_TIMEOUT} s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        import psycopg

        try:
            with psycopg.connect(self.url, connect_timeout=1):
                return True
        except psycopg.OperationalError:
            return False

    def stop(self) -> None:
        """Fast shutdown (SIGINT: open sessions are ended), SIGKILL if it hangs."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGINT)
            try:
                proc.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(_STOP_TIMEOUT)
        self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.tmpdir, ignore_errors=True)

    def log_tail(self, limit: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                return fh.read()[-limit:].decode(errors="replace")
        except OSError:
            return "(no log)"

    # --- data -----------------------------------------------------------------------------------
    def execute(self, sql: str, params: Sequence[Any] | None = None) -> None:
        import psycopg

        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            conn.execute(sql, params)

    def create_schema(self) -> None:
        self.execute("DROP TABLE IF EXISTS waiter_sector_assignment")
        self.execute(TABLE_DDL)

    def assign(self, rows: Iterable[tuple[int, int, int, int, datetime.date, bool]], shift: str = "day") -> None:
        """Insert ``(tenant, branch, sector, waiter, date, is_active)`` rows."""
        import psycopg

        with psycopg.connect(self.url, autocommit=True, connect_timeout=5) as conn:
            for tenant, branch, sector, waiter, day, active in rows:
                conn.execute(
                    "INSERT INTO waiter_sector_assignment "
                    "(tenant_id, branch_id, sector_id, waiter_id, assignment_date, shift, is_active) "
                    "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    (tenant, branch, sector, waiter, day, shift, active),
                )
