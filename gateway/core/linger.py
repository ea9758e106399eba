"""When a Redis reader reads again: at once while events are sparse, after a short pause under load.

Each read from Redis costs the gateway a round trip or a wake-up whatever it returns: at
1,000 events/s, read one at a time, those fixed costs were more than half of the gateway's CPU
per event (docs/performance.md). Under load, pausing ``interval`` between reads lets the events
of that interval arrive together, so they are read, placed and written in one go: one round
trip, one wake-up, one ``writev`` per socket.

The pause is taken only when events are flowing: when the read that brought the batch waited
less than ``interval`` for it. The first event after a quiet spell (the read waited longer) goes
out with no added delay, and so do events at a low steady rate, so latency changes only for
events that arrive less than ``interval`` after the previous read; for those it grows by at most
``interval`` per reader. Zero turns it off.
"""

from __future__ import annotations

import attrs


@attrs.define
class Linger:
    interval: float

    def pause(self, issued: float, returned: float, now: float) -> float:
        """Seconds to wait before the next read, for a read issued at ``issued`` that returned
        events at ``returned``, handled by ``now``. The pause counts from ``returned``, so busy
        reads come ``interval`` apart however long each batch took to handle."""
        if self.interval <= 0 or returned - issued >= self.interval:
            return 0.0
        return max(0.0, returned + self.interval - now)
