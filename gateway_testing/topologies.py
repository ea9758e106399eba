"""Real Redis deployments for tests: a master with a replica watched by three sentinels, and a
three-master cluster. Every server is a real ``redis-server`` child on a free port (sentinels are
``redis-sentinel``, or ``redis-server --sentinel`` where that is missing), stopped at the end."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Sequence
from typing import Any

import attrs
import trio
from coredis.exceptions import RedisError

from gateway.redisio import resp
from gateway.redisio.embedded import RedisProcess, stop_process
from gateway.redisio.embedded_config import RedisConfig, find_redis_server, free_port, make_tmpdir

__all__ = ["ClusterSet", "SentinelProcess", "SentinelSet", "command"]

MASTER_NAME = "gwmaster"
_WAIT = 30.0


async def command(port: int, *args: Any) -> Any:
    """One command to the server on 127.0.0.1:``port`` (error replies are raised)."""
    with trio.fail_after(5):
        conn = await resp.connect_tcp("127.0.0.1", port)
        try:
            (reply,) = await conn.call(resp.encode(*args))
            return reply
        finally:
            await conn.aclose()


def _info(reply: bytes) -> dict[str, str]:
    return dict(line.split(":", 1) for line in reply.decode().splitlines() if ":" in line)


async def _wait_for(what: str, check: Any, within: float = _WAIT) -> None:
    """Poll ``check`` (an async callable) until it returns true; fail after ``within`` seconds."""
    with trio.move_on_after(within):
        while True:
            try:
                if await check():
                    return
            except (OSError, EOFError, trio.TooSlowError, trio.BrokenResourceError, RedisError):
                pass
            await trio.sleep(0.1)
    raise TimeoutError(f"timed out waiting for {what}")


def sentinel_command() -> list[str]:
    found = shutil.which("redis-sentinel")
    return [found] if found else [find_redis_server(), "--sentinel"]


class SentinelProcess:
    """One sentinel watching ``MASTER_NAME`` at ``master_port``, with quorum 2."""

    def __init__(self, master_port: int) -> None:
        self.port = free_port()
        self.tmpdir = make_tmpdir()
        self.conf = os.path.join(self.tmpdir, "sentinel.conf")
        self.log = os.path.join(self.tmpdir, "sentinel.log")
        with open(self.conf, "w") as fh:
            fh.write(f"port {self.port}\nbind 127.0.0.1\nprotected-mode no\ndaemonize no\nlogfile \"\"\n"
                     f"dir {self.tmpdir}\nsentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n"
                     f"sentinel down-after-milliseconds {MASTER_NAME} 1000\n"
                     f"sentinel failover-timeout {MASTER_NAME} 10000\n"
                     f"sentinel parallel-syncs {MASTER_NAME} 1\n")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        cmd = sentinel_command()
        # redis-server wants the config file first, then --sentinel.
        args = [cmd[0], self.conf, *cmd[1:]]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def close(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
        shutil.rmtree(self.tmpdir, ignore_errors=True)


@attrs.define(eq=False)
class SentinelSet:
    """A master, one replica and three sentinels."""

    master: RedisProcess
    replica: RedisProcess
    sentinels: list[SentinelProcess]

    @classmethod
    async def start(cls) -> SentinelSet:
        master = RedisProcess(RedisConfig(port=0))
        await trio.to_thread.run_sync(master.start)
        assert master.port is not None
        replica = RedisProcess(RedisConfig(port=0, extra_args=("--replicaof", "127.0.0.1", str(master.port))))
        await trio.to_thread.run_sync(replica.start)
        sentinels = [SentinelProcess(master.port) for _ in range(3)]
        made = cls(master, replica, sentinels)
        try:
            for s in sentinels:
                s.start()
            await made.wait_healthy(master.port)
        except BaseException:
            made.close()
            raise
        return made

    @property
    def sentinel_list(self) -> str:
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    async def master_port(self) -> int:
        """The master the sentinels name now."""
        for s in self.sentinels:
            try:
                reply = await command(s.port, "SENTINEL", "get-master-addr-by-name", MASTER_NAME)
            except (OSError, EOFError, trio.TooSlowError):
                continue
            if reply:
                return int(reply[1])
        raise ConnectionError("no sentinel answered")

    async def wait_healthy(self, master_port: int) -> None:
        """Until the replica is in sync and every sentinel knows it and the two other sentinels."""
        replica_port = self.replica.port
        assert replica_port is not None

        async def synced() -> bool:
            info = _info(await command(replica_port, "INFO", "replication"))
            return info.get("master_link_status") == "up"

        async def sentinels_agree() -> bool:
            for s in self.sentinels:
                flat = await command(s.port, "SENTINEL", "master", MASTER_NAME)
                fields = {resp.text(flat[i]): resp.text(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}
                if (fields.get("port") != str(master_port) or fields.get("num-slaves") != "1"
                        or fields.get("num-other-sentinels") != "2" or "s_down" in fields.get("flags", "")):
                    return False
            return True

        await _wait_for("the replica to sync", synced)
        await _wait_for("the sentinels to see the replica and each other", sentinels_agree)

    async def wait_promoted(self, old_port: int) -> int:
        """Until the sentinels name another master and it answers as one; its port."""
        promoted: list[int] = []

        async def switched() -> bool:
            port = await self.master_port()
            if port == old_port:
                return False
            role = await command(port, "ROLE")
            promoted[:] = [port]
            return bool(role and role[0] == b"master")

        await _wait_for("a replica to be promoted", switched, within=60)
        return promoted[0]

    def close(self) -> None:
        for s in self.sentinels:
            s.close()
        self.replica.close()
        self.master.close()


def _cluster_port() -> int:
    """A free port whose cluster bus port (10000 higher) exists and is free too."""
    while True:
        port = free_port()
        if port <= 55535:
            try:
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
            return port


#: Three masters, slots split evenly.
_RANGES = ((0, 5460), (5461, 10922), (10923, 16383))


@attrs.define(eq=False)
class ClusterSet:
    """Three cluster masters (no replicas), each serving a third of the slots."""

    nodes: list[RedisProcess]

    @classmethod
    async def start(cls, extra_args: Sequence[str] = ()) -> ClusterSet:
        nodes = [RedisProcess(RedisConfig(port=_cluster_port(), extra_args=(
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", "2000",
            # A lost master leaves its slots unserved but the others go on serving theirs.
            "--cluster-require-full-coverage", "no", *extra_args))) for _ in range(3)]
        made = cls(nodes)
        try:
            for node in nodes:
                await trio.to_thread.run_sync(node.start)
            ports = made.ports
            for port, (start, end) in zip(ports, _RANGES, strict=True):
                await command(port, "CLUSTER", "ADDSLOTSRANGE", start, end)
            for port in ports[1:]:
                await command(ports[0], "CLUSTER", "MEET", "127.0.0.1", port)
            await made.wait_ok()
        except BaseException:
            made.close()
            raise
        return made

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes if n.port is not None]

    @property
    def node_list(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.ports)

    async def wait_ok(self) -> None:
        async def ok() -> bool:
            for port in self.ports:
                info = _info(await command(port, "CLUSTER", "INFO"))
                if info.get("cluster_state") != "ok" or info.get("cluster_known_nodes") != "3":
                    return False
                if len(await command(port, "CLUSTER", "SLOTS")) != 3:
                    return False
            return True

        await _wait_for("the cluster to agree", ok)

    async def port_of(self, key: str) -> int:
        slot = await command(self.ports[0], "CLUSTER", "KEYSLOT", key)
        return self.ports[next(i for i, (start, end) in enumerate(_RANGES) if start <= slot <= end)]

    def close(self) -> None:
        for node in self.nodes:
            node.close()
