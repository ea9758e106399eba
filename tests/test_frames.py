"""Server frames, checked by decoding them as a wsproto client would."""

from __future__ import annotations

import pytest
from wsproto.connection import Connection, ConnectionType
from wsproto.events import CloseConnection, Event, Pong, TextMessage

from gateway.core import closecodes
from gateway.core.frames import PONG_TEXT, close_frame, pong_frame, text_frame


def client_events(data: bytes) -> list[Event]:
    conn = Connection(ConnectionType.CLIENT)
    conn.receive_data(data)
    return list(conn.events())


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_text_frame_lengths(length: int) -> None:
    payload = (b"0123456789" * (length // 10 + 1))[:length]
    frame = text_frame(payload)
    header = 2 if length < 126 else 4 if length < 65536 else 10
    assert len(frame) == header + length
    assert frame[0] == 0x81
    assert frame[1] & 0x80 == 0  # server frames are never masked
    (event,) = client_events(frame)
    assert isinstance(event, TextMessage)
    assert event.message_finished
    assert event.data == payload.decode()


def test_text_frame_non_ascii() -> None:
    payload = '{"name":"ñandú 🍕"}'.encode()
    (event,) = client_events(text_frame(payload))
    assert isinstance(event, TextMessage)
    assert event.data == '{"name":"ñandú 🍕"}'


def test_frames_back_to_back() -> None:
    data = text_frame(b"a") + text_frame(b"b" * 300) + PONG_TEXT
    events = client_events(data)
    assert [e.data for e in events if isinstance(e, TextMessage)] == ["a", "b" * 300, '{"type":"pong"}']


def test_pong_text() -> None:
    (event,) = client_events(PONG_TEXT)
    assert isinstance(event, TextMessage)
    assert event.data == '{"type":"pong"}'


@pytest.mark.parametrize("close", [closecodes.NORMAL, closecodes.RATE_LIMITED, closecodes.SLOW_CONSUMER,
                                   closecodes.SERVER_RESTART, closecodes.TOKEN_EXPIRED_OR_REVOKED])
def test_close_frame(close: closecodes.Close) -> None:
    (event,) = client_events(close_frame(close.code, close.reason))
    assert isinstance(event, CloseConnection)
    assert event.code == close.code
    assert event.reason == close.reason


def test_close_frame_default_reason() -> None:
    frame = close_frame(1000)
    assert frame == b"\x88\x02\x03\xe8"


@pytest.mark.parametrize("reason", ["x" * 200, "ñ" * 100, "a" + "🍕" * 40, "é" * 61 + "x"])
def test_close_reason_truncated_on_char_boundary(reason: str) -> None:
    frame = close_frame(4029, reason)
    assert len(frame) <= 2 + 125
    (event,) = client_events(frame)
    assert isinstance(event, CloseConnection)
    assert event.code == 4029
    assert event.reason is not None
    assert reason.startswith(event.reason)
    assert 123 - 4 < len(event.reason.encode()) <= 123


def test_close_reason_of_exactly_123_bytes_is_kept() -> None:
    reason = "r" * 123
    (event,) = client_events(close_frame(1000, reason))
    assert isinstance(event, CloseConnection)
    assert event.reason == reason


@pytest.mark.parametrize("code", [0, 999, 5000, 70000, -1])
def test_close_code_out_of_range(code: int) -> None:
    with pytest.raises(ValueError):
        close_frame(code)


@pytest.mark.parametrize("payload", [b"", b"x", b"p" * 125])
def test_pong_frame(payload: bytes) -> None:
    (event,) = client_events(pong_frame(payload))
    assert isinstance(event, Pong)
    assert event.payload == payload


def test_pong_frame_too_long() -> None:
    with pytest.raises(ValueError):
        pong_frame(b"p" * 126)
