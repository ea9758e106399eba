from gateway_testing import GatewayHandle, Publisher


async def test_stream_event_reaches_waiter(gateway: GatewayHandle, publisher: Publisher) -> None:
    waiter = await gateway.connect("waiter", gateway.staff_token())
    await gateway.connected(1)
    await publisher.stream_event(publisher.envelope("ROUND_PENDING", 1, 2, table_id=5, session_id=9))
    event = await waiter.expect("ROUND_PENDING")
    assert event["tenant_id"] == 1
    await publisher.channel_event("branch:2:waiters", publisher.envelope("SERVICE_CALL_CREATED", 1, 2))
    await waiter.expect("SERVICE_CALL_CREATED")
