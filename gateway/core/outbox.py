"""One socket's outbound queue as plain state: what to write next, and whether it is over budget.

The socket writer (``gateway.serving.connection``) only moves bytes: it asks :meth:`Outbox.pending` for
what to hand the kernel and reports back with :meth:`Outbox.consumed`. Every frame we send, event
frames and our own replies alike (pongs, ``{"type":"pong"}``, close frames), counts in one byte
budget, so what a client can make the gateway hold is bounded whatever it sends. At most one
protocol-level Pong is pending at a time (RFC 6455 §5.5.3 lets an endpoint answer only the most
recent Ping), so a client that pings and never reads cannot queue Pong after Pong.
"""

from __future__ import annotations

#: The most buffers one ``writev`` takes here (Linux IOV_MAX is 1024).
IOV_MAX = 512


class Outbox:
    """A FIFO of encoded frames with an exact byte position inside its first frame."""

    __slots__ = ("_frames", "_head_sent", "_pong_end", "_queued_total", "_written_total", "limit", "queued_bytes")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        # A list, not a deque: an empty deque preallocates a block, and most sockets are idle.
        self._frames: list[bytes] = []
        self._head_sent = 0
        self.queued_bytes = 0
        # Running totals locate the pending Pong without searching the queue.
        self._queued_total = 0
        self._written_total = 0
        self._pong_end = 0

    def __bool__(self) -> bool:
        return bool(self._frames)

    def __len__(self) -> int:
        return len(self._frames)

    @property
    def over_budget(self) -> bool:
        return self.queued_bytes > self.limit

    def push(self, frame: bytes, already_written: int = 0) -> bool:
        """Queue ``frame``; False when the queue is now over its budget (the caller closes).

        ``already_written`` is how much of it a direct write to an idle socket got out: only an
        empty queue may be bypassed, so it always becomes the head's position.
        """
        if already_written:
            assert not self._frames, "only an empty queue is bypassed"
            self._head_sent = already_written
            self._written_total += already_written
        self._frames.append(frame)
        self.queued_bytes += len(frame) - already_written
        self._queued_total += len(frame)
        return self.queued_bytes <= self.limit

    def push_pong(self, frame: bytes) -> bool:
        """Queue a Pong unless one is still unwritten; False when over budget."""
        if self._written_total < self._pong_end:
            return True
        ok = self.push(frame)
        self._pong_end = self._queued_total
        return ok

    @property
    def pong_pending(self) -> bool:
        return self._written_total < self._pong_end

    def pending(self) -> list[bytes | memoryview]:
        """The buffers to hand to one ``writev``, the first one from its unwritten position."""
        frames = self._frames
        iov: list[bytes | memoryview] = [memoryview(frames[0])[self._head_sent :]]
        iov.extend(frames[1:IOV_MAX])
        return iov

    def consumed(self, written: int) -> None:
        """The kernel took ``written`` bytes of :meth:`pending`."""
        self.queued_bytes -= written
        self._written_total += written
        written += self._head_sent
        frames = self._frames
        done = 0
        while done < len(frames) and written >= len(frames[done]):
            written -= len(frames[done])
            done += 1
        del frames[:done]
        self._head_sent = written

    def discard(self) -> None:
        """Drop everything not yet started; a partly written frame is kept so the stream stays whole."""
        frames = self._frames
        if self._head_sent:
            head = frames[0]
            frames.clear()
            frames.append(head)
            self.queued_bytes = len(head) - self._head_sent
            self._queued_total = self._written_total + self.queued_bytes
        else:
            frames.clear()
            self.queued_bytes = 0
            self._queued_total = self._written_total
        self._pong_end = min(self._pong_end, self._queued_total)

    def clear(self) -> None:
        """The transport is gone: nothing will be written any more."""
        self._frames.clear()
        self._head_sent = 0
        self.queued_bytes = 0
        self._queued_total = self._written_total
        self._pong_end = self._written_total
