"""The pure side of protocol v2 positions: names, offsets, the v2 payload and the resume state."""

from __future__ import annotations

import json

import pytest

from gateway.core.positions import (
    Position,
    ResumeState,
    make_offset,
    parse_client_message,
    parse_offset,
    parse_stream_name,
    positioned_payload,
    stream_name,
    welcome_message,
)


def test_names_and_offsets_round_trip() -> None:
    assert stream_name(1, 2) == "1:2" and stream_name(1, 0) == "1:0" and stream_name(1, -5) == "1:0"
    assert parse_stream_name("1:2") == (1, 2) and parse_stream_name("3:0") == (3, 0)
    off = make_offset("ab12", (1733000000000, 7))
    assert parse_offset(off) == ("ab12", (1733000000000, 7))


@pytest.mark.parametrize("bad", [None, 5, "", "1", "0:2", "a:b", "1:-2", "１:2", "1:2:3", "x" * 100, {"a": 1}])
def test_garbage_stream_names_are_refused(bad: object) -> None:
    assert parse_stream_name(bad) is None


@pytest.mark.parametrize("bad", [None, 3, "", "1-0", ":1-0", "ab:", "ab:1", "ab:1-", "ab:-1", "a b:1-0",
                                 "ab:99999999999999999999999-0", "é:1-0", "ab:1-0" + "0" * 100])
def test_garbage_offsets_are_refused(bad: object) -> None:
    assert parse_offset(bad) is None


def test_the_v2_payload_is_the_envelope_plus_pos() -> None:
    env = b'{"type":"X","tenant_id":1,"entity":{"a":"}"}}'
    out = positioned_payload(env, Position("1:2", (5, 0), "e:5-0"))
    value = json.loads(out)
    assert out.startswith(env[:-1] + b",")
    assert value.pop("_pos") == {"stream": "1:2", "offset": "e:5-0"}
    assert value == json.loads(env)
    assert list(json.loads(out))[-1] == "_pos"


def test_messages() -> None:
    assert welcome_message(float("inf")) == b'{"type":"welcome","protocol":2,"exp":null}'
    assert welcome_message(1700000000.0) == b'{"type":"welcome","protocol":2,"exp":1700000000}'
    assert parse_client_message('{"type":"resume","positions":{"1:2":"a:1-0"}}') == ("resume", {"1:2": "a:1-0"})
    assert parse_client_message('{"type":"resume","positions":[1]}') == ("resume", {})
    assert parse_client_message('{"type":"refresh","token":5}') == ("refresh", "")
    assert parse_client_message('{"type":"ping"}') is None
    assert parse_client_message('["resume"]') is None
    assert parse_client_message('{"type":"resume"' + "[" * 5000) is None


def pos(seq: int, stream: str = "1:2") -> Position:
    return Position(stream, (100, seq), f"e:100-{seq}")


def test_a_new_socket_holds_until_its_first_message() -> None:
    state = ResumeState()
    assert not state.offer(pos(1), b"1") and not state.offer(None, b"x")
    assert state.release() == [b"1", b"x"]
    assert state.offer(pos(2), b"2")
    assert state.first_live == {"1:2": (100, 1)}  # the first one delivered live
    assert state.release() == []


def test_resume_releases_what_the_replay_did_not_cover() -> None:
    state = ResumeState()
    state.offer(pos(3), b"3")  # arrived before the resume: the replay covers it
    state.begin_replay()
    state.offer(pos(4), b"4")
    state.offer(pos(5), b"5")
    state.offer(pos(1, "1:0"), b"t1")
    assert state.end_replay({"1:2": (100, 4)}) == [b"5", b"t1"]
    assert not state.offer(pos(4), b"4 again")  # a late copy of a replayed entry
    assert state.offer(pos(6), b"6")
    assert not state.waiting and state.release() == []
