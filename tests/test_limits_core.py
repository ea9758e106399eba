"""The pure part of the cluster-wide limits (D23): key names, the rate window, the lease book."""

from __future__ import annotations

import pytest
from helpers import diner

from gateway.core.limits import (
    LeaseBook,
    LocalRates,
    admits,
    estimate,
    ip_tag,
    limit_tag,
    rate_key,
    retry_after,
    retry_seconds,
)
from gateway.core.model import Principal


def staff(user: int, tenant: int = 1) -> Principal:
    return Principal(endpoint="waiter", tenant_id=tenant, user_id=user, branch_ids=frozenset({2}))


def slot_tag(key: str) -> str:
    """What Redis Cluster hashes: the part between the first { and the next }."""
    start = key.index("{")
    return key[start + 1 : key.index("}", start)]


def test_every_key_of_one_script_shares_its_hash_tag() -> None:
    tag = limit_tag(staff(7))
    assert tag == "{gw:limits:user:1:7}"
    assert slot_tag(tag) == slot_tag(rate_key(tag)) == "gw:limits:user:1:7"
    session = limit_tag(diner(1, 2, 9))
    assert session == "{gw:limits:session:1:9}"
    assert slot_tag(rate_key(session)) == "gw:limits:session:1:9"
    assert slot_tag(rate_key(ip_tag("203.0.113.5"))) == "gw:limits:ip:203.0.113.5"
    # Tenants and users never share a key.
    assert len({limit_tag(staff(7, 1)), limit_tag(staff(7, 2)), limit_tag(staff(8, 1))}) == 3


@pytest.mark.parametrize(("prev", "cur", "elapsed", "expected"), [
    (0, 0, 0.0, 0.0),
    (10, 0, 0.0, 10.0),     # the whole previous window still counts
    (10, 0, 30.0, 5.0),     # half of it
    (10, 4, 45.0, 6.5),
    (10, 4, 60.0, 4.0),
])
def test_sliding_estimate(prev: int, cur: int, elapsed: float, expected: float) -> None:
    assert estimate(prev, cur, elapsed, 60.0) == pytest.approx(expected)


def test_retry_after_is_when_the_estimate_drops_below_the_limit() -> None:
    limit, window = 10, 60.0
    # Over on the current window alone: only the next one admits, once enough of it has passed.
    wait = retry_after(0, 10, 15.0, limit, window)
    assert wait == pytest.approx(45.0 + 0.0)
    wait = retry_after(0, 20, 15.0, limit, window)
    assert wait == pytest.approx(45.0 + 30.0)
    assert estimate(20, 0, 30.0 + 1e-9, window) < limit
    # Over because of the previous window: wait until enough of it has slid out.
    wait = retry_after(12, 4, 10.0, limit, window)
    assert estimate(12, 4, 10.0 + wait + 1e-9, window) < limit
    assert estimate(12, 4, 10.0 + wait - 1e-3, window) >= limit
    assert retry_after(0, 3, 10.0, limit, window) == 0.0
    assert retry_seconds(0.01) == 1
    assert retry_seconds(4.2) == 5


def test_attempts_arriving_together_pass_as_if_one_after_the_other() -> None:
    limit, window = 10, 60.0
    for prev, cur, elapsed in [(0, 0, 0.0), (0, 7, 5.0), (12, 3, 20.0), (4, 9, 59.0), (30, 0, 1.0)]:
        for attempts in range(0, 15):
            one_by_one, c = 0, cur
            for _ in range(attempts):
                if estimate(prev, c, elapsed, window) < limit:
                    one_by_one += 1
                    c += 1
            assert admits(prev, cur, elapsed, limit, window, attempts) == one_by_one, (prev, cur, elapsed, attempts)


def test_local_rates_refuse_beyond_the_limit_without_counting_refusals() -> None:
    rates = LocalRates(limit=3, window=10.0)
    now = 1000.0
    assert [rates.attempt("a", now) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = rates.attempt("a", now)
    assert wait > 0
    # Another key is not affected.
    assert rates.attempt("b", now) == 0.0
    # Refused attempts are not counted: the wait does not grow however often "a" tries.
    for _ in range(100):
        assert rates.attempt("a", now) == pytest.approx(wait)
    # Next window: the previous count slides out.
    assert rates.attempt("a", now + wait + 1e-6) == 0.0


def test_local_rates_blocked_until_redis_said() -> None:
    rates = LocalRates(limit=100, window=10.0)
    rates.block("a", until=1005.0)
    assert rates.attempt("a", 1001.0) == pytest.approx(4.0)
    assert rates.attempt("a", 1005.0) == 0.0


def test_local_rates_forget_idle_keys_when_the_window_turns() -> None:
    rates = LocalRates(limit=5, window=10.0)
    for i in range(50):
        rates.attempt(f"client-{i}", 1000.0)
    rates.block("blocked", 1003.0)
    assert len(rates) == 51
    rates.attempt("x", 1010.0)  # next window: the last one's keys are still needed
    assert len(rates) == 51
    rates.attempt("x", 1020.0)  # two windows on: only "x" is left
    assert len(rates) == 1


def test_local_rates_off() -> None:
    rates = LocalRates(limit=0, window=10.0)
    assert all(rates.attempt("a", 1000.0) == 0.0 for _ in range(1000))
    assert len(rates) == 0
    with pytest.raises(ValueError, match="window"):
        LocalRates(limit=1, window=0)


def test_lease_book() -> None:
    book = LeaseBook()
    book.add("{k1}", "i:1")
    book.add("{k1}", "i:2")
    book.add("{k2}", "i:3")
    assert len(book) == 3
    assert book.keys() == ["{k1}", "{k2}"]
    assert book.members("{k1}") == ["i:1", "i:2"]
    assert book.discard("{k1}", "i:1")
    assert not book.discard("{k1}", "i:1")
    assert not book.discard("{nope}", "i:1")
    assert book.discard("{k2}", "i:3")
    assert book.keys() == ["{k1}"]
    assert book.members("{k2}") == []
    assert len(book) == 1
