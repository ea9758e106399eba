"""The closing handshake as plain state: what to send, and what is known afterwards."""

from __future__ import annotations

import pytest

from gateway.core import closecodes
from gateway.core.closecodes import Close
from gateway.core.closing import Closing, echo_code


def test_our_close_is_sent_once() -> None:
    state = Closing()
    assert not state.started
    assert state.close(closecodes.HEARTBEAT_TIMEOUT)
    assert not state.close(closecodes.SLOW_CONSUMER)
    assert state.sent == closecodes.HEARTBEAT_TIMEOUT
    assert state.started and not state.finished
    state.peer_answered()
    assert state.finished


@pytest.mark.parametrize(("code", "echoed"), [
    (1000, 1000), (1001, 1001), (3000, 3000), (4999, 4999), (1005, 1000), (1006, 1000), (1015, 1000),
    (999, 1000), (5000, 1000),
])
def test_a_client_close_is_echoed(code: int, echoed: int) -> None:
    assert echo_code(code) == echoed
    state = Closing()
    reply = state.peer_started(code)
    assert reply == Close(echoed, "")
    assert state.peer_closed
    assert state.close(reply)


@pytest.mark.parametrize(("code", "close", "label"), [
    (1007, closecodes.INVALID_UTF8, "invalid_utf8"),
    (1009, closecodes.MESSAGE_TOO_LARGE, "too_large"),
    (1002, closecodes.PROTOCOL_ERROR, "protocol"),
])
def test_a_malformed_stream_is_failed_and_never_parsed_again(code: int, close: Close, label: str) -> None:
    state = Closing()
    assert state.malformed(code) == (close, label)
    assert state.unparseable and state.finished


def test_a_lost_transport_counts_once_and_only_without_a_close() -> None:
    state = Closing()
    assert state.lost()
    assert state.started and state.finished
    assert not state.close(closecodes.NORMAL)
    other = Closing()
    other.close(closecodes.SERVER_RESTART)
    assert not other.lost()
    assert other.sent == closecodes.SERVER_RESTART
