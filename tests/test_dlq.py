"""DLQ inspection and replay against a real Redis, through the real gateway."""

import json

import coredis
import trio

from gateway.dlq import list_dead_letters, replay_dead_letters
from gateway.testing import GatewayHandle, Publisher


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
