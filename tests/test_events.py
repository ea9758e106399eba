"""Event envelope validation (§4.1–§4.2, D8, D10, D13)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.core.events import (
    INTERNAL_FIELDS,
    KNOWN_FIELDS,
    MAX_UNKNOWN_FIELDS,
    REASONS,
    InvalidEvent,
    encode_envelope,
    envelope,
    parse_event,
)
from gateway.core.model import Event

MAX = 65536
TS = "2026-01-31T12:00:00.123456+00:00"
TS_EPOCH = 1769860800.123456


def backend_envelope(**overrides: Any) -> dict[str, Any]:
    env: dict[str, Any] = envelope(
        "TABLE_SESSION_STARTED",
        1,
        2,
        table_id=5,
        session_id=9,
        sector_id=3,
        entity={"table_code": "A1"},
        actor={"user_id": 7, "role": "WAITER"},
        ts=TS,
    )
    env.update(overrides)
    return env


def parse(obj: Any) -> Event:
    return parse_event(json.dumps(obj).encode(), max_size=MAX)


def reason_of(raw: bytes | str, max_size: int = MAX) -> str:
    with pytest.raises(InvalidEvent) as info:
        parse_event(raw, max_size=max_size)
    assert info.value.reason in REASONS
    return info.value.reason


def reason_for(obj: Any) -> str:
    return reason_of(json.dumps(obj).encode())


# --- valid events ----------------------------------------------------------------------------


def test_backend_envelope_parses() -> None:
    event = parse_event(encode_envelope(backend_envelope()), max_size=MAX)
    assert event.type == "TABLE_SESSION_STARTED"
    assert (event.tenant_id, event.branch_id) == (1, 2)
    assert (event.table_id, event.session_id, event.sector_id) == (5, 9, 3)
    assert event.ts_epoch == pytest.approx(TS_EPOCH)
    assert len(event.dedup_key) == 16


def test_str_input_is_accepted() -> None:
    raw = encode_envelope(backend_envelope())
    assert parse_event(raw.decode(), max_size=MAX) == parse_event(raw, max_size=MAX)


def test_minimal_event_defaults() -> None:
    event = parse({"type": "X", "tenant_id": 4})
    assert event.branch_id == 0
    assert (event.table_id, event.session_id, event.sector_id) == (None, None, None)
    assert event.ts_epoch is None
    assert event.frame_payload == b'{"type":"X","tenant_id":4}'


def test_null_optional_fields_are_accepted() -> None:
    event = parse(backend_envelope(branch_id=None, table_id=None, session_id=None,
                                   sector_id=None, entity=None, actor=None))
    assert event.branch_id == 0
    assert (event.table_id, event.session_id, event.sector_id) == (None, None, None)


def test_branch_zero_is_tenant_wide() -> None:
    assert parse(backend_envelope(branch_id=0)).branch_id == 0


def test_unknown_type_is_allowed() -> None:
    assert parse(backend_envelope(type="SOMETHING_NEW")).type == "SOMETHING_NEW"


def test_type_of_64_chars_is_allowed() -> None:
    assert parse(backend_envelope(type="T" * 64)).type == "T" * 64


def test_ten_unknown_fields_are_allowed() -> None:
    extra = {f"x{i}": i for i in range(MAX_UNKNOWN_FIELDS)}
    event = parse(backend_envelope(**extra))
    assert b'"x9":9' in event.frame_payload


def test_internal_fields_do_not_count_as_unknown() -> None:
    extra = {f"x{i}": i for i in range(MAX_UNKNOWN_FIELDS)}
    parse(backend_envelope(_enqueued_at=1.5, _retry_count=1, **extra))


def test_known_fields_are_not_unknown() -> None:
    assert len(KNOWN_FIELDS) == 11
    parse(backend_envelope(timestamp="whatever", **{f"x{i}": i for i in range(10)}))


def test_exactly_max_size_is_accepted() -> None:
    raw = encode_envelope(backend_envelope())
    parse_event(raw, max_size=len(raw))


# --- malformed events ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"", "not_json"),
        (b"{", "not_json"),
        (b"not json", "not_json"),
        (b'{"type":"X","tenant_id":1} trailing', "not_json"),
        (b'{"type":"X","tenant_id":1,"n":NaN}', "not_json"),
        (b'{"type":"X","tenant_id":1,"n":Infinity}', "not_json"),
        (b'{"type":"X","tenant_id":1,"n":-Infinity}', "not_json"),
        (b'{"type":"X","tenant_id":1,"n":1e400}', "not_json"),
        (b'{"type":"X","tenant_id":1,"n":' + b"9" * 5000 + b"}", "not_json"),
        (b'{"type":"X","tenant_id":1,"n":"\xff"}', "not_utf8"),
        (b'{"type":"X","tenant_id":1,"n":"\xc3"}', "not_utf8"),
        ('{"type":"X","tenant_id":1}'.encode("utf-16"), "not_utf8"),
        (b'{"type":"X","tenant_id":1,"n":"\\ud800"}', "not_utf8"),
        (b"[]", "not_object"),
        (b'[{"type":"X","tenant_id":1}]', "not_object"),
        (b"42", "not_object"),
        (b'"event"', "not_object"),
        (b"null", "not_object"),
        (b"true", "not_object"),
    ],
)
def test_malformed_raw(raw: bytes, reason: str) -> None:
    assert reason_of(raw) == reason


def test_lone_surrogate_in_str_input() -> None:
    assert reason_of('{"type":"X","tenant_id":1,"n":"\ud800"}') == "not_utf8"


def test_bom_is_not_json() -> None:
    assert reason_of(b"\xef\xbb\xbf" + encode_envelope(backend_envelope())) == "not_json"


@pytest.mark.parametrize("depth", [100_000, 5_000])
def test_deep_nesting(depth: int) -> None:
    raw = b'{"type":"X","tenant_id":1,"entity":{"a":' + b"[" * depth + b"]" * depth + b"}}"
    assert reason_of(raw, max_size=len(raw)) == "not_json"


def test_nesting_around_the_recursion_limit() -> None:
    # Decoding and re-encoding have slightly different depth budgets; either way only
    # InvalidEvent may come out.
    for depth in range(900, 1100, 7):
        raw = b'{"type":"X","tenant_id":1,"entity":{"a":' + b"[" * depth + b"]" * depth + b"}}"
        _check_total(raw)


def test_nesting_within_limits_is_fine() -> None:
    raw = b'{"type":"X","tenant_id":1,"entity":{"a":' + b"[" * 50 + b"]" * 50 + b"}}"
    parse_event(raw, max_size=MAX)


def test_over_size_limit_bytes() -> None:
    raw = encode_envelope(backend_envelope())
    assert reason_of(raw, max_size=len(raw) - 1) == "too_large"


def test_size_is_checked_before_decoding() -> None:
    assert reason_of(b"\xff" * 101, max_size=100) == "too_large"


def test_over_size_limit_str_counts_bytes() -> None:
    env = backend_envelope(entity={"name": "ñ" * 40})
    text = json.dumps(env, ensure_ascii=False)
    size = len(text.encode())
    assert size > len(text)
    assert reason_of(text, max_size=size - 1) == "too_large"
    parse_event(text, max_size=size)
    assert reason_of("x" * 101, max_size=100) == "too_large"


def test_missing_type() -> None:
    env = backend_envelope()
    del env["type"]
    assert reason_for(env) == "missing_type"


@pytest.mark.parametrize("bad", ["", None, 1, 1.5, True, [], {}, ["X"], "T" * 65])
def test_bad_type(bad: Any) -> None:
    assert reason_for(backend_envelope(type=bad)) == "bad_type"


def test_missing_tenant() -> None:
    env = backend_envelope()
    del env["tenant_id"]
    assert reason_for(env) == "missing_tenant"


@pytest.mark.parametrize("bad", ["1", "abc", 1.0, 1.5, True, False, 0, -1, None, [], {}])
def test_bad_tenant(bad: Any) -> None:
    assert reason_for(backend_envelope(tenant_id=bad)) == "bad_tenant"


@pytest.mark.parametrize("field", ["table_id", "session_id", "sector_id"])
@pytest.mark.parametrize("bad", ["5", 5.0, 5.5, True, False, 0, -1, [], {}])
def test_bad_optional_id(field: str, bad: Any) -> None:
    assert reason_for(backend_envelope(**{field: bad})) == "bad_id"


@pytest.mark.parametrize("bad", ["2", 2.0, True, False, -1, [], {}])
def test_bad_branch_id(bad: Any) -> None:
    assert reason_for(backend_envelope(branch_id=bad)) == "bad_id"


@pytest.mark.parametrize("field", ["entity", "actor"])
@pytest.mark.parametrize("bad", ["x", 1, True, [], [{"a": 1}]])
def test_entity_and_actor_must_be_objects(field: str, bad: Any) -> None:
    assert reason_for(backend_envelope(**{field: bad})) == "bad_field"


@pytest.mark.parametrize("bad", ["1", 1.0, True, None, []])
def test_bad_version(bad: Any) -> None:
    assert reason_for(backend_envelope(v=bad)) == "bad_field"


def test_eleven_unknown_fields() -> None:
    extra = {f"x{i}": i for i in range(MAX_UNKNOWN_FIELDS + 1)}
    assert reason_for(backend_envelope(**extra)) == "too_many_unknown_fields"


def test_invalid_event_carries_no_input() -> None:
    with pytest.raises(InvalidEvent) as info:
        parse({"type": "X", "tenant_id": "secret-looking-input"})
    assert str(info.value) == "bad_tenant"
    assert "secret" not in repr(info.value)


# --- frame payload (D13) -----------------------------------------------------------------------


def test_internal_fields_stripped() -> None:
    env = backend_envelope(_enqueued_at=1769860800.1234, _retry_count=2)
    event = parse(env)
    assert {"_enqueued_at", "_retry_count"} == INTERNAL_FIELDS
    assert b"_enqueued_at" not in event.frame_payload
    assert b"_retry_count" not in event.frame_payload
    assert event.frame_payload == parse(backend_envelope()).frame_payload


def test_compact_output_of_backend_serialisation() -> None:
    env = backend_envelope(entity={"table_code": "A1", "items": [1, 2, {"k": None}]})
    event = parse_event(encode_envelope(env), max_size=MAX)
    expected = json.dumps(env, separators=(",", ":"), ensure_ascii=False).encode()
    assert event.frame_payload == expected
    assert b", " not in event.frame_payload and b": " not in event.frame_payload
    assert json.loads(event.frame_payload) == env


def test_frame_matches_documented_example() -> None:
    raw = (
        '{"type": "TABLE_SESSION_STARTED", "tenant_id": 1, "branch_id": 2, "table_id": 5, '
        '"session_id": 9, "sector_id": 3, "entity": {"table_code": "A1"}, '
        '"actor": {"user_id": 7, "role": "WAITER"}, "ts": "2026-01-31T12:00:00.123456+00:00", '
        '"v": 1, "_enqueued_at": 1769860800.1234}'
    )
    assert parse_event(raw, max_size=MAX).frame_payload == (
        b'{"type":"TABLE_SESSION_STARTED","tenant_id":1,"branch_id":2,"table_id":5,'
        b'"session_id":9,"sector_id":3,"entity":{"table_code":"A1"},'
        b'"actor":{"user_id":7,"role":"WAITER"},"ts":"2026-01-31T12:00:00.123456+00:00","v":1}'
    )


def test_key_order_kept() -> None:
    raw = b'{"v":1,"entity":{"z":1,"a":2},"tenant_id":1,"zz":0,"type":"X","aa":0}'
    assert parse_event(raw, max_size=MAX).frame_payload == raw


def test_non_ascii_kept_unescaped() -> None:
    env = backend_envelope(entity={"name": "Mesa ñandú 🍕"})
    for raw in (encode_envelope(env), json.dumps(env).encode()):
        payload = parse_event(raw, max_size=MAX).frame_payload
        assert "Mesa ñandú 🍕".encode() in payload
        assert b"\\u" not in payload


def test_whitespace_removed() -> None:
    raw = json.dumps(backend_envelope(), indent=2).encode()
    assert parse_event(raw, max_size=MAX).frame_payload == parse(backend_envelope()).frame_payload


# --- dedup key (D10) ---------------------------------------------------------------------------


def test_dedup_key_ignores_ts_separators_and_key_order() -> None:
    env = backend_envelope()
    reordered = dict(reversed(list(backend_envelope(ts="2026-01-31T12:00:00.900000+00:00").items())))
    reordered["entity"] = {"table_code": "A1"}
    reordered["actor"] = {"role": "WAITER", "user_id": 7}
    first = parse_event(encode_envelope(env), max_size=MAX)
    second = parse_event(json.dumps(reordered, separators=(",", ":")).encode(), max_size=MAX)
    assert first.frame_payload != second.frame_payload
    assert first.dedup_key == second.dedup_key


def test_dedup_key_ignores_internal_fields_and_missing_ts() -> None:
    env = backend_envelope()
    stamped = parse(backend_envelope(_enqueued_at=1.0, _retry_count=1))
    no_ts = dict(env)
    del no_ts["ts"]
    assert parse(env).dedup_key == stamped.dedup_key == parse(no_ts).dedup_key


@pytest.mark.parametrize(
    "change",
    [
        {"entity": {"table_code": "A2"}},
        {"actor": {"user_id": 8, "role": "WAITER"}},
        {"type": "TABLE_CLEARED"},
        {"tenant_id": 2},
        {"branch_id": 3},
        {"session_id": 10},
        {"timestamp": "x"},
    ],
)
def test_dedup_key_differs_when_content_differs(change: dict[str, Any]) -> None:
    assert parse(backend_envelope()).dedup_key != parse(backend_envelope(**change)).dedup_key


# --- ts ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ts", "expected"),
    [
        (TS, TS_EPOCH),
        ("2026-01-31T12:00:00.123456Z", TS_EPOCH),
        ("2026-01-31T12:00:00.123456", TS_EPOCH),
        ("2026-01-31T09:00:00.123456-03:00", TS_EPOCH),
        ("2026-01-31T12:00:00+00:00", 1769860800.0),
        ("2026-01-31 12:00:00", 1769860800.0),
        ("2026-01-31", datetime(2026, 1, 31, tzinfo=UTC).timestamp()),
        ("not a date", None),
        ("", None),
        ("2026-13-01T00:00:00", None),
        (1769860800, None),
        (None, None),
        ({"t": 1}, None),
    ],
)
def test_ts_parsing(ts: Any, expected: float | None) -> None:
    event = parse(backend_envelope(ts=ts))
    if expected is None:
        assert event.ts_epoch is None
    else:
        assert event.ts_epoch == pytest.approx(expected)


def test_ts_absent() -> None:
    env = backend_envelope()
    del env["ts"]
    assert parse(env).ts_epoch is None


# --- envelope builder --------------------------------------------------------------------------


def test_envelope_shape() -> None:
    env = envelope("X", 1)
    assert list(env) == [
        "type", "tenant_id", "branch_id", "table_id", "session_id", "sector_id",
        "entity", "actor", "ts", "v",
    ]
    assert env["branch_id"] == 0 and env["entity"] == {} and env["actor"] == {} and env["v"] == 1
    ts = env["ts"]
    assert isinstance(ts, str)
    assert datetime.fromisoformat(ts).utcoffset() is not None


def test_envelope_copies_mappings() -> None:
    entity = {"a": 1}
    env = envelope("X", 1, entity=entity)
    entity["b"] = 2
    assert env["entity"] == {"a": 1}


def test_encode_envelope_is_backend_format() -> None:
    env = envelope("X", 1, entity={"n": "ñ"}, ts=TS)
    assert encode_envelope(env) == (
        '{"type": "X", "tenant_id": 1, "branch_id": 0, "table_id": null, "session_id": null, '
        '"sector_id": null, "entity": {"n": "ñ"}, "actor": {}, '
        '"ts": "2026-01-31T12:00:00.123456+00:00", "v": 1}'
    ).encode()


# --- nothing but InvalidEvent escapes ------------------------------------------------------------


def _check_total(raw: bytes | str) -> None:
    try:
        event = parse_event(raw, max_size=MAX)
    except InvalidEvent as exc:
        assert exc.reason in REASONS
    else:
        assert json.loads(event.frame_payload)["tenant_id"] == event.tenant_id


@given(st.binary(max_size=512))
def test_arbitrary_bytes(raw: bytes) -> None:
    _check_total(raw)


@given(st.text(max_size=512))
def test_arbitrary_text(raw: str) -> None:
    _check_total(raw)


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(
    st.dictionaries(
        st.sampled_from(sorted(KNOWN_FIELDS | INTERNAL_FIELDS)) | st.text(max_size=6),
        _json,
        max_size=14,
    )
)
def test_arbitrary_objects(obj: dict[str, Any]) -> None:
    _check_total(json.dumps(obj))
