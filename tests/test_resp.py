"""The stream reader's and pub/sub reader's own RESP connection, against a real Redis."""

from __future__ import annotations

import coredis
import pytest
import trio
from coredis.exceptions import StreamConsumerGroupError

from gateway.redisio import resp
from gateway.redisio.client import make_client, xadd_capped


async def test_commands_round_trip_and_queue_like_a_pipeline(redis_url: str) -> None:
    conn = await resp.open_connection(redis_url)
    try:
        assert await conn.call(resp.encode("SET", "k", b"v\r\n"), resp.encode("GET", "k")) == [b"OK", b"v\r\n"]
        commands = resp.Commands()
        xadd_capped(commands, "s", {"data": b"x", "n": "1"}, 10)
        commands.eval("return #KEYS + #ARGV", keys=["a", "b"], args=[1, b"two"])
        commands.xack("s", "g", [b"1-0"])
        first_id, evaluated, acked = await conn.call(*commands.queued)
        assert evaluated == 4 and acked == 0
    finally:
        await conn.aclose()
    client: coredis.Redis[bytes] = make_client(redis_url)
    async with client:
        entries = await client.xrange("s")
        assert [(e.identifier, dict(e.field_values)) for e in entries] == [(first_id, {b"data": b"x", b"n": b"1"})]


async def test_error_replies_are_coredis_exceptions(redis_url: str) -> None:
    conn = await resp.open_connection(redis_url)
    try:
        with pytest.raises(StreamConsumerGroupError):
            await conn.call(resp.encode("XREADGROUP", "GROUP", "nope", "c", "COUNT", 1, "STREAMS", "missing", ">"))
        assert await conn.call(resp.encode("PING")) == [b"PONG"]  # the connection is still usable
    finally:
        await conn.aclose()


async def test_pushes_split_across_reads_are_parsed_whole(redis_url: str) -> None:
    sub = await resp.open_connection(redis_url)
    pub = await resp.open_connection(redis_url)
    try:
        await sub.send(resp.encode("PSUBSCRIBE", "branch:*:waiters"))
        assert (await sub.receive())[0] == [b"psubscribe", b"branch:*:waiters", 1]
        payloads = [b"a" * 70000, b"b", b"c" * 3]
        await pub.call(*(resp.encode("PUBLISH", "branch:2:waiters", p) for p in payloads))
        got: list[bytes] = []
        with trio.fail_after(5):
            while len(got) < len(payloads):
                got += [r[3] for r in await sub.receive()]
        assert got == payloads
    finally:
        await sub.aclose()
        await pub.aclose()


async def test_unix_socket_url_and_database() -> None:
    from gateway.redisio.embedded import RedisProcess
    from gateway.redisio.embedded_config import RedisConfig

    with RedisProcess(RedisConfig()) as proc:
        assert proc.url.startswith("unix://")
        conn = await resp.open_connection(proc.url + "?db=3")
        try:
            await conn.call(resp.encode("SET", "k", "in 3"))
        finally:
            await conn.aclose()
        client: coredis.Redis[bytes] = make_client(proc.url + "?db=3")
        async with client:
            assert await client.get("k") == b"in 3"
