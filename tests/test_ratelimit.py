"""Per-socket sliding-window message limit (D6)."""

from __future__ import annotations

import pytest

from gateway.core.ratelimit import SlidingWindow


def test_allows_limit_then_rejects() -> None:
    limiter = SlidingWindow(30, 1.0)
    assert all(limiter.allow(100.0 + i * 0.01) for i in range(30))
    assert not limiter.allow(100.5)


def test_burst_at_one_instant() -> None:
    limiter = SlidingWindow(3, 1.0)
    assert [limiter.allow(5.0) for _ in range(4)] == [True, True, True, False]


def test_window_slides() -> None:
    limiter = SlidingWindow(3, 1.0)
    # Binary-exact times, so the boundary is exactly `window`.
    for t in (0.0, 0.25, 0.75):
        assert limiter.allow(t)
    assert not limiter.allow(0.875)
    assert limiter.allow(1.0)  # the message at 0.0 has left the window
    assert not limiter.allow(1.125)
    assert limiter.allow(1.25)
    assert limiter.allow(1.75)
    assert not limiter.allow(1.875)


def test_rejected_messages_are_not_recorded() -> None:
    limiter = SlidingWindow(2, 1.0)
    assert limiter.allow(0.0)
    assert limiter.allow(0.1)
    for i in range(100):
        assert not limiter.allow(0.2 + i * 0.008)
    # Had the rejections counted, the window would still be full here.
    assert limiter.allow(1.0)
    assert limiter.allow(1.1)


def test_never_more_than_limit_in_any_window() -> None:
    limit, window = 5, 1.0
    limiter = SlidingWindow(limit, window)
    accepted = [t / 100 for t in range(1000) if limiter.allow(t / 100)]
    for i, start in enumerate(accepted):
        in_window = [t for t in accepted[i:] if t < start + window]
        assert len(in_window) <= limit
    assert len(accepted) == 50


def test_steady_rate_under_limit_is_never_rejected() -> None:
    limiter = SlidingWindow(30, 1.0)
    assert all(limiter.allow(i / 29) for i in range(1000))


def test_memory_is_bounded() -> None:
    limiter = SlidingWindow(4, 1.0)
    for i in range(1000):
        limiter.allow(i * 0.3)
    assert len(limiter._stamps) <= 4


def test_no_instance_dict() -> None:
    assert not hasattr(SlidingWindow(1, 1.0), "__dict__")


@pytest.mark.parametrize(("limit", "window"), [(0, 1.0), (-1, 1.0), (1, 0.0), (1, -1.0)])
def test_invalid_parameters(limit: int, window: float) -> None:
    with pytest.raises(ValueError):
        SlidingWindow(limit, window)
