"""DLQ inspection and replay against a real Redis, through the real gateway."""

import json
import sys

import coredis
import trio

from gateway.ingest.dlq import list_dead_letters, replay_dead_letters
from gateway_testing import GatewayHandle, Publisher


async def test_invalid_entry_is_dead_lettered_then_replayed_after_repair(
    gateway: GatewayHandle, publisher: Publisher, redis_url: str
) -> None:
    admin = await gateway.connect("admin", gateway.staff_token(user=1, roles=("ADMIN",)))
    await gateway.connected(1)
    await publisher.stream_event(b'{"type":"ROUND_READY","tenant_id":"1","branch_id":2}')
    client = coredis.Redis.from_url(redis_url)
    async with client:
        for _ in range(200):  # the entry is dead-lettered asynchronously
            letters = await list_dead_letters(client, "events:dlq")
            if letters:
                break
            await trio.sleep(0.02)
        assert len(letters) == 1
        letter = letters[0]
        assert letter.fields["original_stream"] == "events:critical"
        assert letter.fields["error"] == "invalid: bad_tenant"
        assert json.loads(letter.data)["tenant_id"] == "1"
        # Replay re-appends the data verbatim; still invalid, it comes back as a new letter.
        replayed = await replay_dead_letters(client, "events:dlq", "events:critical", [letter.id])
        assert replayed == [letter.id]
        with trio.fail_after(5):
            while True:
                again = await list_dead_letters(client, "events:dlq")
                if again:
                    break
                await trio.sleep(0.02)
        assert [d.id for d in again] != [letter.id]
        assert again[0].data == letter.data
    await admin.expect_nothing(0.3)  # never valid: the admin never sees it
    assert gateway.gw.metrics.dlq.labels("invalid")._value.get() == 2


async def test_dlq_command_lists_and_replays(gateway: GatewayHandle, publisher: Publisher, redis_url: str) -> None:
    await publisher.stream_event(b"not json at all")
    client = coredis.Redis.from_url(redis_url)
    async with client:
        with trio.fail_after(5):
            while not await list_dead_letters(client, "events:dlq"):  # noqa: ASYNC110 - written asynchronously
                await trio.sleep(0.02)
    env = {"REDIS_URL": redis_url, "PATH": "/usr/bin:/bin"}
    listed = await trio.run_process([sys.executable, "-m", "gateway", "dlq", "list"], capture_stdout=True, env=env)
    letters = [json.loads(line) for line in listed.stdout.decode().splitlines()]
    assert [d["error"] for d in letters] == ["invalid: not_json"]
    assert letters[0]["data"] == "not json at all"
    refused = await trio.run_process([sys.executable, "-m", "gateway", "dlq", "replay"], env=env, check=False,
                                     capture_stderr=True)
    assert refused.returncode == 2 and b"--all" in refused.stderr
    replayed = await trio.run_process([sys.executable, "-m", "gateway", "dlq", "replay", letters[0]["id"]],
                                      capture_stdout=True, env=env)
    assert replayed.stdout.decode().startswith(f"replayed {letters[0]['id']}")
