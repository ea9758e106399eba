"""Deduper (D10): one delivery per logical event across channels and the stream."""

from __future__ import annotations

import pytest

from gateway.core.dedup import Deduper


def test_copy_within_the_window_is_dropped() -> None:
    d = Deduper(window=10.0, ts_tolerance=1.0)
    assert d.first_sighting(b"a", 1000.0, now=0.0)
    assert not d.first_sighting(b"a", 1000.0, now=0.1)
    assert not d.first_sighting(b"a", 1000.0, now=9.9)
    assert d.first_sighting(b"b", 1000.0, now=9.9)


def test_copy_after_the_window_is_kept() -> None:
    d = Deduper(window=10.0, ts_tolerance=1.0)
    assert d.first_sighting(b"a", 1000.0, now=0.0)
    assert d.first_sighting(b"a", 1000.0, now=10.5)
    assert not d.first_sighting(b"a", 1000.0, now=11.0)


def test_copies_do_not_extend_the_window() -> None:
    d = Deduper(window=10.0, ts_tolerance=1.0)
    assert d.first_sighting(b"a", 1000.0, now=0.0)
    assert not d.first_sighting(b"a", 1000.0, now=8.0)
    assert d.first_sighting(b"a", 1000.0, now=10.1)


def test_ts_within_tolerance_is_a_copy() -> None:
    d = Deduper(window=10.0, ts_tolerance=1.0)
    assert d.first_sighting(b"a", 1000.0, now=0.0)
    assert not d.first_sighting(b"a", 1000.9, now=0.1)
    assert not d.first_sighting(b"a", 999.1, now=0.1)
    assert not d.first_sighting(b"a", 1001.0, now=0.1)


def test_ts_beyond_tolerance_is_a_distinct_event_and_is_remembered() -> None:
    d = Deduper(window=10.0, ts_tolerance=1.0)
    assert d.first_sighting(b"a", 1000.0, now=0.0)
    assert d.first_sighting(b"a", 1005.0, now=1.0)
    assert len(d) == 2
    # Copies of either one are recognised.
    assert not d.first_sighting(b"a", 1005.2, now=2.0)
    assert not d.first_sighting(b"a", 1000.2, now=2.0)
    assert d.first_sighting(b"a", 1003.0, now=2.0)
    # The first one expires before the second.
    assert d.first_sighting(b"a", 1000.0, now=10.5)
    assert not d.first_sighting(b"a", 1005.0, now=10.5)


def test_none_ts_lets_the_key_decide() -> None:
    d = Deduper(window=10.0, ts_tolerance=1.0)
    assert d.first_sighting(b"a", None, now=0.0)
    assert not d.first_sighting(b"a", 5000.0, now=1.0)
    assert not d.first_sighting(b"a", None, now=1.0)

    d = Deduper(window=10.0, ts_tolerance=1.0)
    assert d.first_sighting(b"b", 1000.0, now=0.0)
    assert not d.first_sighting(b"b", None, now=1.0)
    assert d.first_sighting(b"b", None, now=11.0)


def test_zero_tolerance_needs_the_same_ts() -> None:
    d = Deduper(window=10.0, ts_tolerance=0.0)
    assert d.first_sighting(b"a", 1000.0, now=0.0)
    assert not d.first_sighting(b"a", 1000.0, now=0.1)
    assert d.first_sighting(b"a", 1000.001, now=0.1)


def test_window_zero_disables_dedup() -> None:
    d = Deduper(window=0.0, ts_tolerance=1.0)
    for _ in range(5):
        assert d.first_sighting(b"a", 1000.0, now=0.0)
    assert d.first_sighting(b"a", None, now=0.0)
    assert len(d) == 0


def test_entries_expire_lazily() -> None:
    d = Deduper(window=10.0, ts_tolerance=1.0)
    for i in range(100):
        assert d.first_sighting(str(i).encode(), float(i), now=i * 0.01)
    assert len(d) == 100
    assert d.first_sighting(b"late", None, now=100.0)
    assert len(d) == 1


def test_max_entries_evicts_the_oldest() -> None:
    d = Deduper(window=10.0, ts_tolerance=1.0, max_entries=2)
    assert d.first_sighting(b"a", 1.0, now=0.0)
    assert d.first_sighting(b"b", 1.0, now=0.0)
    assert d.first_sighting(b"c", 1.0, now=0.0)
    assert len(d) == 2
    assert not d.first_sighting(b"c", 1.0, now=0.0)
    assert not d.first_sighting(b"b", 1.0, now=0.0)
    assert d.first_sighting(b"a", 1.0, now=0.0)


def test_memory_is_bounded_by_max_entries() -> None:
    d = Deduper(window=3600.0, ts_tolerance=1.0, max_entries=1000)
    for i in range(100_000):
        assert d.first_sighting(i.to_bytes(8, "big"), float(i), now=0.0)
        assert len(d) <= 1000
    assert len(d) == 1000
    # The per-key map must shrink with the order queue, not just the reported length.
    assert len(d._sightings) == 1000
    assert not d.first_sighting((99_999).to_bytes(8, "big"), 99_999.0, now=0.0)
    assert d.first_sighting((0).to_bytes(8, "big"), 0.0, now=0.0)


def test_memory_is_bounded_by_the_window() -> None:
    d = Deduper(window=1.0, ts_tolerance=1.0)
    for i in range(100_000):
        assert d.first_sighting(i.to_bytes(8, "big"), None, now=i * 0.001)
    assert len(d) <= 1001
    assert len(d._sightings) == len(d)


def test_repeated_distinct_events_under_one_key_stay_bounded() -> None:
    d = Deduper(window=10.0, ts_tolerance=0.5, max_entries=50)
    for i in range(10_000):
        assert d.first_sighting(b"same", float(i), now=0.0)
    assert len(d) == 50
    assert len(d._sightings[b"same"]) == 50


@pytest.mark.parametrize(
    ("window", "tolerance", "max_entries"),
    [(-1.0, 1.0, 10), (1.0, -1.0, 10), (1.0, 1.0, 0)],
)
def test_invalid_arguments(window: float, tolerance: float, max_entries: int) -> None:
    with pytest.raises(ValueError):
        Deduper(window, tolerance, max_entries)


def test_retract_lets_a_failed_delivery_be_retried() -> None:
    d = Deduper(window=10.0, ts_tolerance=1.0)
    assert d.first_sighting(b"k", 100.0, now=0.0)
    d.retract(b"k")
    assert len(d) == 0
    assert d.first_sighting(b"k", 100.0, now=1.0)
    assert not d.first_sighting(b"k", 100.0, now=2.0)


def test_retract_only_takes_back_the_latest_sighting_of_that_key() -> None:
    d = Deduper(window=10.0, ts_tolerance=1.0)
    assert d.first_sighting(b"a", None, now=0.0)
    assert d.first_sighting(b"b", None, now=0.1)
    d.retract(b"a")  # not the latest: nothing to take back
    assert not d.first_sighting(b"a", None, now=0.2)
