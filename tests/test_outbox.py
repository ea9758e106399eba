"""The per-socket outbox as plain state, bytes in and bytes out: no socket, no task."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.core.frames import close_frame, pong_frame, text_frame
from gateway.core.outbox import Outbox


def drain(box: Outbox, chunk: int) -> bytes:
    """What a kernel taking at most ``chunk`` bytes per writev would receive, in order."""
    out = b""
    while box:
        data = b"".join(bytes(part) for part in box.pending())[:chunk]
        box.consumed(len(data))
        out += data
    return out


def test_frames_come_out_whole_and_in_order_whatever_the_kernel_takes() -> None:
    box = Outbox(limit=1 << 20)
    frames = [text_frame(b"a" * n) for n in (1, 200, 70000, 3)]
    for frame in frames:
        assert box.push(frame)
    assert box.queued_bytes == sum(map(len, frames))
    assert drain(box, 777) == b"".join(frames)
    assert box.queued_bytes == 0
    assert not box


def test_a_partly_written_direct_frame_continues_at_its_position() -> None:
    box = Outbox(limit=1 << 20)
    frame = text_frame(b"x" * 100)
    assert box.push(frame, already_written=40)
    assert box.queued_bytes == len(frame) - 40
    assert drain(box, 1 << 16) == frame[40:]


def test_replies_count_in_the_budget() -> None:
    box = Outbox(limit=100)
    reply = text_frame(b'{"type":"pong"}')
    pushed = 0
    while box.push(reply):
        pushed += 1
    # The push that crossed the limit says so; the caller closes the socket.
    assert pushed == 100 // len(reply)
    assert box.over_budget


def test_at_most_one_pong_is_pending() -> None:
    box = Outbox(limit=1 << 20)
    pong = pong_frame(b"p" * 125)
    for _ in range(100_000):
        assert box.push_pong(pong)
    assert len(box) == 1
    assert box.queued_bytes == len(pong)
    # Once the kernel took it, the next Ping gets its Pong.
    box.consumed(len(pong))
    assert not box.pong_pending
    assert box.push_pong(pong)
    assert len(box) == 1


def test_a_pong_partly_written_still_counts_as_pending() -> None:
    box = Outbox(limit=1 << 20)
    pong = pong_frame(b"abc")
    box.push_pong(pong)
    box.consumed(2)
    assert box.pong_pending
    box.push_pong(pong)
    assert box.queued_bytes == len(pong) - 2
    box.consumed(len(pong) - 2)
    assert not box.pong_pending


def test_a_pong_behind_events_waits_for_them() -> None:
    box = Outbox(limit=1 << 20)
    event = text_frame(b"e" * 50)
    pong = pong_frame(b"")
    box.push(event)
    box.push_pong(pong)
    box.push_pong(pong)
    box.consumed(len(event))
    assert box.pong_pending
    box.consumed(len(pong))
    assert not box.pong_pending


def test_discard_keeps_the_partly_written_head_so_the_stream_stays_whole() -> None:
    box = Outbox(limit=1 << 20)
    first, second = text_frame(b"1" * 30), text_frame(b"2" * 30)
    box.push(first)
    box.push(second)
    box.consumed(10)
    box.discard()
    box.push(close_frame(1013, "Slow consumer"))
    assert drain(box, 5) == first[10:] + close_frame(1013, "Slow consumer")


def test_discard_with_nothing_started_drops_everything() -> None:
    box = Outbox(limit=1 << 20)
    box.push(text_frame(b"x"))
    box.push_pong(pong_frame(b""))
    box.discard()
    assert not box
    assert box.queued_bytes == 0
    assert not box.pong_pending


def test_clear_forgets_everything() -> None:
    box = Outbox(limit=1 << 20)
    box.push(text_frame(b"x" * 10))
    box.push_pong(pong_frame(b""))
    box.consumed(3)
    box.clear()
    assert not box
    assert box.queued_bytes == 0
    assert not box.pong_pending


@given(
    ops=st.lists(
        st.one_of(
            st.tuples(st.just("event"), st.integers(0, 300)),
            st.tuples(st.just("pong"), st.integers(0, 125)),
            st.tuples(st.just("write"), st.integers(0, 400)),
        ),
        max_size=60,
    )
)
def test_bytes_out_are_the_frames_in_and_the_count_is_exact(ops: list[tuple[str, int]]) -> None:
    box = Outbox(limit=1 << 30)
    expected = b""
    written = b""
    for op, n in ops:
        if op == "event":
            frame = text_frame(b"e" * n)
            box.push(frame)
            expected += frame
        elif op == "pong":
            frame = pong_frame(b"p" * n)
            if not box.pong_pending:
                expected += frame
            box.push_pong(frame)
        elif box:
            data = b"".join(bytes(part) for part in box.pending())[:n]
            box.consumed(len(data))
            written += data
        assert box.queued_bytes == len(expected) - len(written)
    written += drain(box, 1000)
    assert written == expected
