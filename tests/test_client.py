"""gateway_client: sans-I/O parts at unit level, the client itself against the real gateway."""

from __future__ import annotations

import json
import random
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import pytest
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage
from wsproto.utilities import RemoteProtocolError

from gateway.core import closecodes
from gateway.core.tokens import mint_legacy_table_token, mint_table_token
from gateway_client import (
    FINAL_CLOSE_CODES,
    Backoff,
    CloseAction,
    ConnectionState,
    Event,
    GatewayClient,
    Listeners,
    RecentKeys,
    ReconnectPolicy,
    Throttle,
    event_key,
    http_get,
    session_id_from_table_token,
)
from gateway_testing import DEFAULT_ORIGIN, GatewayHandle, Publisher

Factory = Callable[..., Awaitable[GatewayHandle]]
S = ConnectionState


@contextmanager
def bounded(seconds: float = 9.0) -> Iterator[None]:
    with trio.fail_after(seconds):
        yield


async def until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    with trio.fail_after(within):
        while not predicate():  # noqa: ASYNC110 - polls state owned by other tasks and the gateway
            await trio.sleep(0.01)


def make_client(url: str, token: str, endpoint: str = "waiter", **overrides: Any) -> GatewayClient:
    options: dict[str, Any] = {
        "origin": DEFAULT_ORIGIN,
        "branch_id": 2 if endpoint != "diner" else None,
        "ping_interval": 0.2,
        "pong_timeout": 0.3,
        "backoff_base": 0.05,
        "backoff_cap": 0.2,
        "rng": random.Random(7),
        "close_timeout": 0.5,
        "connect_timeout": 2.0,
    }
    options.update(overrides)
    return GatewayClient(url, endpoint, token, **options)


def numbered(publisher: Publisher, n: int, event_type: str = "ROUND_PENDING") -> dict[str, object]:
    return publisher.envelope(event_type, 1, 2, table_id=5, session_id=9, entity={"n": n})


def numbers(events: list[Event]) -> list[int]:
    return [e["entity"]["n"] for e in events]


# --- backoff and reconnect policy (unit level, no clock) ----------------------------------------


def test_backoff_bounds_follow_1s_to_30s_with_30_percent_jitter() -> None:
    backoff = Backoff()
    assert [backoff.nominal(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff.nominal(10_000) == 30  # no overflow
    for n in range(1, 60):
        low, high = backoff.bounds(n)
        assert high == pytest.approx(low * 1.3)
        assert backoff.delay(n, 0.0) == low
        assert low <= backoff.delay(n, 0.999999) < high + 1e-9
    with pytest.raises(ValueError):
        backoff.nominal(0)
    with pytest.raises(ValueError):
        Backoff(jitter=1.5)


def test_policy_gives_up_after_50_attempts_and_resets_on_open() -> None:
    policy = ReconnectPolicy(rng=random.Random(1))
    delays = []
    for attempt in range(1, 51):
        decision = policy.on_close(1006)
        assert decision.action is CloseAction.RECONNECT
        assert decision.attempt == attempt
        low, high = policy.backoff.bounds(attempt)
        assert low <= decision.delay <= high
        delays.append(decision.delay)
    assert policy.on_close(1006).action is CloseAction.GIVE_UP
    assert policy.on_close(1012).action is CloseAction.GIVE_UP
    assert delays[0] < 1.3 and all(30 <= d <= 39 for d in delays[5:])
    assert sum(delays) > 22 * 60  # about 23 minutes before giving up, like the TS clients
    assert policy.opened() is True  # it was a reconnect
    assert policy.attempts == 0
    assert policy.on_close(1000).attempt == 1
    assert policy.opened() is True and policy.opened() is False


def test_policy_final_codes_never_reconnect() -> None:
    assert frozenset({4001, 4003, 4029}) == FINAL_CLOSE_CODES == closecodes.FINAL_CODES
    policy = ReconnectPolicy(max_attempts=50, backoff=Backoff(base=0, cap=0))
    for code in (4001, 4003, 4029):
        assert policy.on_close(code).action is CloseAction.FINAL
    assert policy.attempts == 0
    for other in (1000, 1001, 1006, 1008, 1009, 1012, 1013, 4000, None):
        assert policy.on_close(other).action is CloseAction.RECONNECT
    zero = ReconnectPolicy(max_attempts=0)
    assert zero.on_close(1006).action is CloseAction.GIVE_UP


# --- listeners, throttling, de-duplication -------------------------------------------------------


def test_listener_registry_is_empty_after_10000_subscribe_unsubscribe_cycles() -> None:
    client = make_client("ws://127.0.0.1:1", "t")
    types = ["ROUND_READY", "CART_ITEM_ADDED", "*", "TABLE_CLEARED"]
    calls: list[Event] = []
    for i in range(10_000):
        kind = types[i % len(types)]
        if i % 3 == 0:
            unsubscribe = client.on_throttled(kind, calls.append, interval=0.05)
        else:
            unsubscribe = client.on(kind, calls.append)
        assert client.listeners.count(kind) == 1
        unsubscribe()
        unsubscribe()  # idempotent
    assert len(client.listeners) == 0
    assert client.listeners.event_types == frozenset()
    assert client.listeners._by_type == {}
    assert client._throttle_timers == {}
    assert client.listeners.dispatch({"type": "ROUND_READY"}) == 0


def test_listeners_dispatch_order_errors_and_own_unsubscribe() -> None:
    listeners = Listeners()
    seen: list[str] = []

    def boom(event: Event) -> None:
        raise RuntimeError("listener bug")

    listeners.add("*", lambda e: seen.append("star"))
    listeners.add("ROUND_READY", boom)
    first = listeners.add("ROUND_READY", lambda e: seen.append("typed"))
    again = listeners.add("ROUND_READY", lambda e: seen.append("typed-2"))
    assert listeners.dispatch({"type": "ROUND_READY"}) == 4
    assert seen == ["typed", "typed-2", "star"]
    first()
    seen.clear()
    listeners.dispatch({"type": "ROUND_READY"})
    assert seen == ["typed-2", "star"]
    again()
    assert listeners.count("ROUND_READY") == 1  # boom is still there
    seen.clear()
    listeners.dispatch({"type": "OTHER"})
    listeners.dispatch({"no": "type"})
    assert seen == ["star", "star"]
    with pytest.raises(ValueError):
        listeners.add("", lambda e: None)


def test_throttle_leading_then_trailing_with_the_latest_event() -> None:
    calls: list[int] = []
    throttle = Throttle(lambda e: calls.append(e["n"]), interval=0.1)
    assert throttle.offer({"n": 1}, now=10.0) is None  # leading: at once
    assert calls == [1]
    deadline = throttle.offer({"n": 2}, now=10.01)
    assert deadline == pytest.approx(10.1)
    assert throttle.offer({"n": 3}, now=10.05) is None  # timer already armed
    assert throttle.offer({"n": 4}, now=10.09) is None
    assert calls == [1]
    throttle.fire(now=10.1)
    assert calls == [1, 4]  # the latest, not the first suppressed one
    # the trailing call opened a new interval
    assert throttle.offer({"n": 5}, now=10.15) == pytest.approx(10.2)
    throttle.fire(now=10.2)
    assert calls == [1, 4, 5]
    throttle.fire(now=10.5)  # nothing pending: no call
    assert throttle.offer({"n": 6}, now=10.5) is None  # quiet for an interval: leading again
    assert calls == [1, 4, 5, 6]
    throttle.offer({"n": 7}, now=10.55)
    throttle.cancel()
    throttle.fire(now=10.6)
    assert calls == [1, 4, 5, 6]


def test_recent_keys_are_bounded_and_event_key_is_canonical() -> None:
    keys = RecentKeys(maxlen=3)
    assert keys.add(b"a") and keys.add(b"b") and keys.add(b"c")
    assert not keys.add(b"a")
    assert keys.add(b"d")  # forgets b (a was refreshed)
    assert len(keys) == 3 and b"b" not in keys and b"a" in keys
    one = {"type": "X", "tenant_id": 1, "entity": {"é": 1}, "ts": "t"}
    reordered = {"ts": "t", "entity": {"é": 1}, "tenant_id": 1, "type": "X", "_enqueued_at": 1.5}
    assert event_key(one) == event_key(reordered)
    assert event_key(one) != event_key({**one, "ts": "u"})


def test_session_id_from_table_tokens_and_urls() -> None:
    jwt_token = mint_table_token(secret="s" * 32, tenant_id=1, branch_id=2, table_id=5, session_id=987654)
    assert session_id_from_table_token(jwt_token) == 987654
    legacy = mint_legacy_table_token(secret="s", tenant_id=1, branch_id=2, table_id=5, session_id=42)
    assert session_id_from_table_token(legacy) == 42
    assert session_id_from_table_token("garbage") is None
    assert session_id_from_table_token("a.!!!.c") is None

    diner = GatewayClient("wss://gw.example/", "/ws/diner", legacy)
    assert diner.url.startswith("wss://gw.example/ws/diner?table_token=1%3A2%3A5%3A42%3A")
    url = diner.catchup_url(legacy, 1700000000.5)
    assert url is not None and url.startswith("https://gw.example/ws/catchup/session?session_id=42&since=1700000000.500&")
    staff = GatewayClient("http://localhost:8001", "kitchen", lambda: "tok", branch_id=3)
    assert staff.url == "ws://localhost:8001/ws/kitchen?token=tok"
    assert staff.catchup_url("tok", 5.0) == "http://localhost:8001/ws/catchup?branch_id=3&since=5.000&token=tok"
    assert GatewayClient("ws://h", "waiter", "t").catchup_url("t", 5.0) is None  # no branch: no catch-up
    with pytest.raises(ValueError):
        GatewayClient("ftp://h", "waiter", "t")
    with pytest.raises(ValueError):
        GatewayClient("ws://h", "nope", "t")


# --- the client against the real gateway -------------------------------------------------------------


async def test_max_attempts_then_on_max_reconnect(nursery: trio.Nursery) -> None:
    with bounded():
        # A port with nothing listening: every attempt is refused at once.
        sock = trio.socket.socket()
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        states: list[ConnectionState] = []
        gave_up: list[bool] = []
        client = make_client(f"ws://127.0.0.1:{port}", "t", max_attempts=3, backoff_base=0.0, backoff_cap=0.0,
                             on_state=states.append, on_max_reconnect=lambda: gave_up.append(True))
        await client.run()
        assert gave_up == [True]
        assert states == [S.CONNECTING, S.RECONNECTING, S.CLOSED]
        assert client.policy.attempts == 3  # 1 first attempt + 3 reconnect attempts, then give up
        assert client.last_close is not None and client.last_close.code == 1006 and not client.last_close.opened
        assert client.opens == 0


async def test_a_garbage_handshake_answer_is_a_failed_attempt(nursery: trio.Nursery) -> None:
    with bounded():
        async def garbage(stream: trio.SocketStream) -> None:
            async with stream:
                await stream.receive_some(65536)
                await stream.send_all(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")

        listeners = await nursery.start(trio.serve_tcp, garbage, 0)
        port = listeners[0].socket.getsockname()[1]
        gave_up: list[bool] = []
        client = make_client(f"ws://127.0.0.1:{port}", "t", max_attempts=2, backoff_base=0.0,
                             on_max_reconnect=lambda: gave_up.append(True))
        await client.run()
        assert gave_up == [True] and client.opens == 0 and client.state is S.CLOSED
        assert client.last_close is not None and client.last_close.code == 1006


@pytest.mark.parametrize(("token_ok", "origin", "code", "reason"), [
    (False, DEFAULT_ORIGIN, 4001, "Authentication failed"),
    (True, "http://evil.example", 4003, "Origin not allowed"),
])
async def test_final_close_stops_the_client(gateway: GatewayHandle, token_ok: bool, origin: str, code: int,
                                            reason: str) -> None:
    with bounded():
        states: list[ConnectionState] = []
        finals: list[tuple[int, str]] = []
        gave_up: list[bool] = []
        token = gateway.staff_token() if token_ok else "not-a-token"
        client = make_client(gateway.ws_url, token, origin=origin, on_state=states.append,
                             on_final_close=lambda c, r: finals.append((c, r)),
                             on_max_reconnect=lambda: gave_up.append(True))
        await client.run()  # returns by itself: a final code
        assert finals == [(code, reason)]
        assert client.final_close == (code, reason)
        assert client.state is S.CLOSED
        assert states == [S.CONNECTING, S.CONNECTED, S.CLOSED]  # the gateway closes after the handshake (D1)
        assert client.opens == 1 and client.policy.attempts == 0 and not gave_up
        await trio.sleep(0.3)
        assert client.opens == 1  # no further attempts


@pytest.mark.parametrize("protocol", [1, 2])
async def test_server_restart_reconnects_and_delivers_missed_events_once(
    gateway_factory: Factory, publisher: Publisher, nursery: trio.Nursery, protocol: int
) -> None:
    with bounded():
        instance = "client-restart"
        first = await gateway_factory(instance_id=instance, drain_period=0.0, shutdown_timeout=2.0)
        port = first.port
        received: list[Event] = []
        states: list[ConnectionState] = []
        client = make_client(first.ws_url, first.staff_token(), on_state=states.append, protocol=protocol)
        client.on("*", received.append)
        nursery.start_soon(client.run)
        await client.wait_state(S.CONNECTED)
        await first.connected(1)
        await publisher.stream_event(numbered(publisher, 1))
        await until(lambda: numbers(received) == [1])

        first.gw.request_stop()  # every socket gets 1012 "Server restart"
        await until(lambda: client.state is S.RECONNECTING)
        assert client.last_close is not None
        assert (client.last_close.code, client.last_close.reason) == (1012, "Server restart")
        await until(lambda: first.gw.draining and not first.gw.sockets)

        # Published while no gateway runs.
        for n in (2, 3, 4):
            await publisher.stream_event(numbered(publisher, n))

        second = await start_on_port(gateway_factory, port, instance_id=instance)
        await until(lambda: len(received) >= 4, within=6)
        await trio.sleep(0.4)  # nothing else (no duplicates) arrives
        assert (client.state, client.opens) == (S.CONNECTED, 2)
        if protocol == 1:
            assert sorted(numbers(received)) == [1, 2, 3, 4]
            # Event 1 came back in the catch-up window and was recognised.
            assert client.duplicates_dropped >= 1
        else:
            # v2 resumes by position: in order, each once, nothing for the client to drop.
            assert client.speaking_v2 and numbers(received) == [1, 2, 3, 4]
            assert client.duplicates_dropped == 0 and client.catchup_events == 0
        assert S.RECONNECTING in states and states[-1] is S.CONNECTED
        await second.connected(1)
        await client.close()
        assert client.state is S.CLOSED
        await second.connected(0)


async def start_on_port(factory: Factory, port: int, **overrides: Any) -> GatewayHandle:
    """Start a gateway on ``port`` once the previous one has let it go."""
    deadline = trio.current_time() + 5
    while True:
        try:
            return await factory(port=port, **overrides)
        except (OSError, BaseExceptionGroup) as exc:
            if not _is_address_in_use(exc) or trio.current_time() > deadline:
                raise
        await trio.sleep(0.05)


def _is_address_in_use(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return any(_is_address_in_use(e) for e in exc.exceptions)
    return isinstance(exc, OSError)


@pytest.mark.parametrize("protocol", [1, 2])
@pytest.mark.parametrize("endpoint", ["waiter", "diner"])
async def test_catch_up_after_a_reconnect_dispatches_missed_events_in_order(
    gateway: GatewayHandle, publisher: Publisher, nursery: trio.Nursery, endpoint: str, protocol: int
) -> None:
    with bounded():
        token = gateway.staff_token() if endpoint == "waiter" else gateway.table_token(session=9)
        received: list[Event] = []
        # The first reconnect waits 1 s: long enough to publish while the client is away.
        client = make_client(gateway.ws_url, token, endpoint, backoff_base=1.0, backoff_cap=1.0, jitter=0.0,
                             protocol=protocol)
        client.on("ROUND_READY", received.append)
        nursery.start_soon(client.run)
        await client.wait_state(S.CONNECTED)
        await gateway.connected(1)
        await publisher.stream_event(numbered(publisher, 0, "ROUND_READY"))
        await until(lambda: numbers(received) == [0])

        for conn in list(gateway.gw.sockets):
            conn.begin_close(closecodes.SERVER_RESTART)
        await until(lambda: client.state is S.RECONNECTING)
        await gateway.connected(0)
        for n in (1, 2, 3):
            await publisher.stream_event(numbered(publisher, n, "ROUND_READY"))
        await until(lambda: len(received) == 4, within=5)
        await trio.sleep(0.3)
        assert numbers(received) == [0, 1, 2, 3]  # in order, each once
        if protocol == 1:
            assert client.catchup_events == 3
            assert client.duplicates_dropped == 1  # event 0 is in the catch-up window too
        else:
            assert client.v2 is not None and client.v2.replayed == 3  # resumed after event 0
            assert client.catchup_events == 0 and client.duplicates_dropped == 0
        await client.close()


async def test_heartbeat_keeps_a_healthy_socket_open(gateway: GatewayHandle, nursery: trio.Nursery) -> None:
    with bounded():
        client = make_client(gateway.ws_url, gateway.staff_token())
        nursery.start_soon(client.run)
        await client.wait_state(S.CONNECTED)
        # Extra pings on top of the interval ones (the visibility case): each has its own timer,
        # each pong cancels one, so none can close the healthy socket later.
        for _ in range(3):
            assert await client.ping()
        assert client.outstanding_pings >= 1
        await trio.sleep(1.2)  # several intervals and pong timeouts
        assert client.heartbeat_timeouts == 0
        assert client.opens == 1 and client.state is S.CONNECTED
        assert client.outstanding_pings <= 1
        await client.close()
        assert client.outstanding_pings == 0
        assert not await client.ping()


@attrs.define
class SilentServer:
    """Accepts the WebSocket handshake (wsproto) and never answers a ping."""

    port: int = 0
    connections: int = 0
    texts: list[str] = attrs.Factory(list)
    closes: list[tuple[int, str]] = attrs.Factory(list)

    async def serve(self, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self.port)
        await trio.serve_listeners(self.handle, listeners)

    async def handle(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        ws = WSConnection(ConnectionType.SERVER)
        async with stream:
            try:
                while True:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    ws.receive_data(data)
                    for event in ws.events():
                        if isinstance(event, Request):
                            await stream.send_all(ws.send(AcceptConnection()))
                        elif isinstance(event, TextMessage):
                            self.texts.append(str(event.data))
                        elif isinstance(event, CloseConnection):
                            self.closes.append((event.code, event.reason or ""))
                            await stream.send_all(ws.send(event.response()))
                            return
            except (trio.BrokenResourceError, trio.ClosedResourceError, RemoteProtocolError):
                return


async def test_close_before_run_started_stops_that_run(nursery: trio.Nursery) -> None:
    with bounded(2):
        client = make_client("ws://127.0.0.1:1", "t")
        nursery.start_soon(client.run)
        await client.close()  # run() has not started yet
        await trio.sleep(0.05)
        assert client.state is S.CLOSED and not client._running
        assert client.opens == 0 and client.last_close is None


async def test_heartbeat_timeout_closes_with_4000_and_reconnects(nursery: trio.Nursery) -> None:
    with bounded():
        server = SilentServer()
        port = await nursery.start(server.serve)
        client = make_client(f"ws://127.0.0.1:{port}", "t", jitter=0.0, branch_id=None)  # no catch-up
        nursery.start_soon(client.run)
        await until(lambda: server.connections >= 2)  # closed for the timeout, then reconnected
        assert server.closes[0] == (4000, "Heartbeat timeout")
        assert server.texts and set(server.texts) == {'{"type":"ping"}'}
        assert client.heartbeat_timeouts >= 1
        assert client.last_close is not None and client.last_close.code == 4000 and client.last_close.by_client
        await client.close()
        assert client.state is S.CLOSED


async def test_throttled_listener_gets_leading_and_latest_trailing(
    gateway: GatewayHandle, publisher: Publisher, nursery: trio.Nursery
) -> None:
    with bounded():
        client = make_client(gateway.ws_url, gateway.staff_token())
        every: list[Event] = []
        throttled: list[Event] = []
        client.on("ROUND_PENDING", every.append)
        client.on_throttled("ROUND_PENDING", throttled.append, interval=0.5)
        nursery.start_soon(client.run)
        await client.wait_state(S.CONNECTED)
        await gateway.connected(1)
        await publisher.many([(None, numbered(publisher, n)) for n in range(5)])
        await until(lambda: len(every) == 5)
        assert numbers(throttled) == numbers(every)[:1]  # leading call at once
        await until(lambda: len(throttled) == 2, within=2)
        assert numbers(throttled) == [numbers(every)[0], numbers(every)[-1]]  # trailing: the latest
        await trio.sleep(0.6)
        assert len(throttled) == 2
        await client.close()


async def test_update_token_reconnects_and_keeps_listeners(
    gateway: GatewayHandle, publisher: Publisher, nursery: trio.Nursery
) -> None:
    with bounded():
        states: list[ConnectionState] = []
        received: list[Event] = []
        client = make_client(gateway.ws_url, gateway.staff_token(), on_state=states.append)
        client.on("ROUND_PENDING", received.append)
        nursery.start_soon(client.run)
        await client.wait_state(S.CONNECTED)
        await gateway.connected(1)
        fresh = gateway.staff_token()
        client.update_token(fresh)
        await until(lambda: client.opens == 2 and client.state is S.CONNECTED)
        await gateway.connected(1)
        assert client.token == fresh
        assert [c.token for c in gateway.gw.index] == [fresh]
        assert client.last_close is not None and (client.last_close.code, client.last_close.reason) == (
            1000, "Soft disconnect")
        assert states == [S.CONNECTING, S.CONNECTED, S.CONNECTING, S.CONNECTED]
        assert client.policy.attempts == 0  # an intentional reconnect is not a failure
        await publisher.stream_event(numbered(publisher, 1))
        await until(lambda: numbers(received) == [1])
        await client.close()
        await gateway.connected(0)


async def test_http_get_reads_the_catch_up_endpoint(gateway: GatewayHandle) -> None:
    with bounded():
        response = await http_get(f"{gateway.url}/ws/catchup?branch_id=2&since=0&token=bad")
        assert response.status == 401
        assert json.loads(response.body) == {"detail": "Invalid token"}
        ok = await http_get(f"{gateway.url}/ws/catchup?branch_id=2&since=0&token={gateway.staff_token()}")
        assert ok.status == 200 and ok.json() == {"events": [], "count": 0}


async def test_a_refusal_before_the_upgrade_is_waited_out_for_its_retry_after(
    gateway: GatewayHandle, nursery: trio.Nursery
) -> None:
    # D22: at its limit, a user's next socket is refused 429 with Retry-After: 5. The client's own
    # backoff here is 0.05-0.2 s; the refusal's Retry-After is the floor under it.
    token = gateway.staff_token(user=7)
    for _ in range(3):
        await gateway.connect("waiter", token)
    await gateway.connected(3)
    client = make_client(gateway.ws_url, token)
    nursery.start_soon(client.run)
    await until(lambda: client.last_close is not None)
    assert client.last_close is not None
    assert client.last_close.retry_after == 5.0
    assert "HTTP 429" in client.last_close.reason
    assert not client.last_close.opened
    await trio.sleep(1.0)
    # Still waiting out the 5 s: one attempt so far, however short its own backoff.
    assert gateway.gw.metrics.rejections.labels("limit_user")._value.get() == 1
    await client.close()
