"""The stream consumer's decisions over plain values: no Redis, bytes in and bytes out."""

from __future__ import annotations

import json

import pytest

from gateway.core.events import envelope
from gateway.core.streambatch import (
    MAX_DELIVERIES,
    DeadLetter,
    StaleGroups,
    ack_ids,
    dlq_fields,
    entry_ms,
    group_name,
    idle_times,
    last_entry_id,
    other_instance_group,
    restart_id,
    sort_batch,
    split_claimed,
    text,
)

MAX = 65536


def event_bytes(kind: str = "ROUND_READY", tenant: int = 1, branch: int = 2) -> bytes:
    return json.dumps(envelope(kind, tenant, branch, session_id=9)).encode()


# --- sorting a read batch ---------------------------------------------------------------------


def test_valid_entries_keep_their_ids_and_order() -> None:
    batch = sort_batch([(b"1-0", event_bytes("A")), (b"2-0", event_bytes("B"))], max_size=MAX)
    assert [(entry_id, event.type) for entry_id, event in batch.valid] == [(b"1-0", "A"), (b"2-0", "B")]
    assert batch.invalid == []
    assert batch.dead == []


def test_invalid_entries_become_dead_letters_with_their_reason() -> None:
    batch = sort_batch(
        [(b"1-0", b"not json"), (b"2-0", event_bytes()), (b"3-0", b"[]"), (b"4-0", b"\xff\xfe")],
        max_size=MAX,
    )
    assert [entry_id for entry_id, _ in batch.valid] == [b"2-0"]
    assert [i.reason for i in batch.invalid] == ["not_json", "not_object", "not_utf8"]
    assert batch.dead == [
        DeadLetter(b"1-0", b"not json", "invalid: not_json", 1),
        DeadLetter(b"3-0", b"[]", "invalid: not_object", 1),
        DeadLetter(b"4-0", b"\xff\xfe", "invalid: not_utf8", 1),
    ]


def test_an_entry_without_data_is_dead_lettered_with_empty_data() -> None:
    batch = sort_batch([(b"1-0", b"")], max_size=MAX)
    assert batch.dead == [DeadLetter(b"1-0", b"", "invalid: not_json", 1)]


def test_oversized_entry_is_dead_lettered() -> None:
    raw = event_bytes()
    batch = sort_batch([(b"1-0", raw)], max_size=len(raw) - 1)
    assert batch.valid == []
    assert batch.dead == [DeadLetter(b"1-0", raw, "invalid: too_large", 1)]


def test_text_data_is_validated_but_dead_lettered_as_empty_bytes() -> None:
    # Only a client with decoded responses hands over str; the dead letter then carries b"".
    good = sort_batch([("1-0", event_bytes().decode())], max_size=MAX)
    assert [entry_id for entry_id, _ in good.valid] == ["1-0"]
    bad = sort_batch([("1-0", "not json")], max_size=MAX)
    assert bad.dead == [DeadLetter("1-0", b"", "invalid: not_json", 1)]


def test_empty_batch() -> None:
    batch = sort_batch([], max_size=MAX)
    assert (batch.valid, batch.invalid) == ([], [])
    assert last_entry_id([]) is None


def test_last_entry_id_is_text() -> None:
    assert last_entry_id([(b"1-0", b""), (b"1700000000000-5", b"")]) == "1700000000000-5"
    assert last_entry_id([("7-1", b"")]) == "7-1"


def test_ack_ids_are_the_routed_entries_then_the_dead_letters() -> None:
    dead = [DeadLetter(b"2-0", b"x", "invalid: not_json", 1)]
    assert ack_ids([b"1-0", b"3-0"], dead) == [b"1-0", b"3-0", b"2-0"]
    assert ack_ids([], []) == []


# --- reclaimed entries ------------------------------------------------------------------------


def test_claimed_entries_below_the_limit_are_retried() -> None:
    claimed = [(b"1-0", b"a"), (b"2-0", b"b")]
    retry, dead = split_claimed(claimed, {"1-0": 1, "2-0": MAX_DELIVERIES - 1})
    assert retry == claimed
    assert dead == []


def test_claimed_entries_at_the_limit_are_dead() -> None:
    claimed = [(b"1-0", b"a"), (b"2-0", b"b"), (b"3-0", b"c")]
    retry, dead = split_claimed(claimed, {"1-0": 3, "2-0": 2, "3-0": 7})
    assert retry == [(b"2-0", b"b")]
    assert dead == [
        DeadLetter(b"1-0", b"a", "routing failed 3 times", 3),
        DeadLetter(b"3-0", b"c", "routing failed 3 times", 7),
    ]


def test_claimed_entry_missing_from_the_pending_list_counts_as_delivered_once() -> None:
    retry, dead = split_claimed([(b"1-0", b"a")], {})
    assert (retry, dead) == ([(b"1-0", b"a")], [])
    # With a limit of one delivery it is dead, recorded with no known deliveries.
    retry, dead = split_claimed([(b"1-0", b"a")], {}, max_deliveries=1)
    assert retry == []
    assert dead == [DeadLetter(b"1-0", b"a", "routing failed 1 times", 0)]


def test_delivery_counts_are_looked_up_by_text_id() -> None:
    retry, dead = split_claimed([("5-0", b"a"), (b"6-0", b"b")], {"5-0": 3, "6-0": 3})
    assert retry == []
    assert [d.entry_id for d in dead] == ["5-0", b"6-0"]


# --- dead-letter fields -----------------------------------------------------------------------


def test_dlq_fields_in_wire_order() -> None:
    letter = DeadLetter(b"1700000000000-1", b'{"x":1}', "routing failed 3 times", 3)
    fields = dlq_fields(letter, stream="events:critical", consumer="gw-1", failed_at=1700000001.25)
    assert list(fields.items()) == [
        ("original_id", "1700000000000-1"),
        ("original_stream", "events:critical"),
        ("data", b'{"x":1}'),
        ("retry_count", "3"),
        ("failed_at", "1700000001.25"),
        ("consumer", "gw-1"),
        ("error", "routing failed 3 times"),
    ]


def test_dlq_fields_of_an_invalid_entry() -> None:
    (letter,) = sort_batch([(b"9-0", b"{}")], max_size=MAX).dead
    fields = dlq_fields(letter, stream="s", consumer="c", failed_at=0.5)
    assert (fields["data"], fields["retry_count"], fields["error"]) == (b"{}", "1", "invalid: missing_type")


# --- where a recreated group starts -----------------------------------------------------------


def test_restart_after_the_last_processed_entry_inside_the_window() -> None:
    now = 1_700_000_000.0
    assert restart_id("1699999990000-3", now=now, catchup_window=60) == "1699999990000-3"
    # Exactly at the window's start still counts as inside.
    assert restart_id("1699999940000-0", now=now, catchup_window=60) == "1699999940000-0"


def test_restart_never_before_the_window() -> None:
    now = 1_700_000_000.0
    assert restart_id("1699999939999-9", now=now, catchup_window=60) == "1699999940000-0"
    assert restart_id(None, now=now, catchup_window=60) == "1699999940000-0"
    assert restart_id("garbage", now=now, catchup_window=60) == "1699999940000-0"


def test_restart_window_start_is_truncated_to_milliseconds() -> None:
    assert restart_id(None, now=100.0009, catchup_window=0.5) == "99500-0"


@pytest.mark.parametrize(("entry_id", "ms"), [("1700-0", 1700), ("1700", 1700), ("x-1", 0), ("", 0)])
def test_entry_ms(entry_id: str, ms: int) -> None:
    assert entry_ms(entry_id) == ms


def test_text() -> None:
    assert text(b"0-0") == "0-0"
    assert text(b"\xff") == "\ufffd"
    assert text("1-1") == "1-1"
    assert text(5) == "5"


# --- stale groups of departed instances -------------------------------------------------------


def test_only_other_instances_groups_are_candidates() -> None:
    own = "ws_gateway_group:gw-1"
    assert other_instance_group("ws_gateway_group:gw-2", prefix="ws_gateway_group", own=own)
    assert not other_instance_group(own, prefix="ws_gateway_group", own=own)
    assert not other_instance_group("ws_gateway_groupx:gw-2", prefix="ws_gateway_group", own=own)
    assert not other_instance_group("backend_group", prefix="ws_gateway_group", own=own)


def test_xinfo_replies_with_bytes_or_text_keys() -> None:
    assert group_name({b"name": b"g:1"}) == "g:1"
    assert group_name({"name": "g:2"}) == "g:2"
    assert group_name({}) == ""
    assert idle_times([{b"idle": 5}, {"idle": 7}, {b"idle": None}, {}]) == [5, 7, 0, 0]


def test_group_is_stale_when_every_consumer_idled_long_enough() -> None:
    groups = StaleGroups()
    assert not groups.stale("g", [600_000, 599_999], now=0.0, stale_after=600)
    assert groups.stale("g", [600_000, 700_000], now=0.0, stale_after=600)


def test_consumerless_group_is_timed_from_first_sight() -> None:
    groups = StaleGroups()
    assert not groups.stale("g", [], now=100.0, stale_after=600)
    assert not groups.stale("g", [], now=699.9, stale_after=600)
    assert groups.stale("g", [], now=700.0, stale_after=600)
    # Forgotten once stale: seen again without consumers, it is timed afresh.
    assert not groups.stale("g", [], now=800.0, stale_after=600)
    assert groups.stale("g", [], now=1400.0, stale_after=600)


def test_consumerless_timing_is_per_group_and_survives_a_consumer_appearing() -> None:
    groups = StaleGroups()
    assert not groups.stale("a", [], now=0.0, stale_after=10)
    assert not groups.stale("b", [], now=5.0, stale_after=10)
    # "a" gains a busy consumer: not stale, and its first sighting is kept.
    assert not groups.stale("a", [1], now=6.0, stale_after=10)
    assert groups.stale("a", [], now=10.0, stale_after=10)
    assert not groups.stale("b", [], now=14.9, stale_after=10)
    assert groups.stale("b", [], now=15.0, stale_after=10)
