"""The sweepers on a virtual clock (trio.testing.MockClock with autojump): no real sleeps."""

from __future__ import annotations

import attrs
import trio

from gateway.core.closecodes import Close
from gateway.core.model import Principal
from gateway.core.pending import PendingConnections
from gateway.serving.registry import SocketRegistry
from gateway.serving.sweepers import drain, heartbeat_sweeper


@attrs.define(eq=False)
class Sock:
    """What the sweepers use of a socket: when it last spoke, and how to close it."""

    registry: SocketRegistry
    last_seen: float = 0.0
    closed: list[tuple[float, Close]] = attrs.Factory(list)
    closing: bool = False
    #: A socket whose close never completes stays in the registry.
    stuck: bool = False

    def begin_close(self, close: Close) -> None:
        if not self.closing:
            self.closing = True
            self.closed.append((trio.current_time(), close))
            if not self.stuck:
                self.registry.sockets.discard(self)  # type: ignore[arg-type]
                self.registry.index.remove(self)  # type: ignore[arg-type]

    def log_context(self) -> dict[str, object]:
        return {}


def registry_with(count: int) -> tuple[SocketRegistry, list[Sock]]:
    registry = SocketRegistry(PendingConnections(10, 10))
    socks = [Sock(registry, last_seen=trio.current_time()) for _ in range(count)]
    for i, sock in enumerate(socks):
        registry.sockets.add(sock)  # type: ignore[arg-type]
        registry.index.add(sock, Principal("waiter", 1, i + 1, frozenset({2})))  # type: ignore[arg-type]
    return registry, socks


async def test_heartbeat_sweep_closes_only_silent_sockets(autojump_clock: trio.testing.MockClock) -> None:
    registry, (quiet, chatty) = registry_with(2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: heartbeat_sweeper(registry, silence=60, interval=30))
        for _ in range(5):  # chatty speaks every 20 s; quiet never does
            await trio.sleep(20)
            chatty.last_seen = trio.current_time()
        # Quiet is found by the first sweep after 60 s of silence (t=90), with 1001.
        assert [(t, c.code) for t, c in quiet.closed] == [(90.0, 1001)]
        assert chatty.closed == []
        await trio.sleep(100)
        assert [c.code for _, c in chatty.closed] == [1001]
        nursery.cancel_scope.cancel()


async def test_drain_spreads_1012_over_the_period_and_waits_for_every_socket(
    autojump_clock: trio.testing.MockClock,
) -> None:
    from gateway.metrics import Metrics

    registry, socks = registry_with(4)
    start = trio.current_time()
    await drain(registry, Metrics(), period=2.0, bound=10.0)
    assert registry.draining
    assert sorted(round(t - start, 3) for s in socks for t, _ in s.closed) == [0.0, 0.5, 1.0, 1.5]
    assert {c.code for s in socks for _, c in s.closed} == {1012}
    assert not registry.sockets


async def test_drain_gives_up_at_its_bound(autojump_clock: trio.testing.MockClock) -> None:
    from gateway.metrics import Metrics

    registry, socks = registry_with(2)
    socks[0].stuck = True
    start = trio.current_time()
    await drain(registry, Metrics(), period=1.0, bound=3.0)
    assert trio.current_time() - start == 3.0
    assert all(s.closed for s in socks)
