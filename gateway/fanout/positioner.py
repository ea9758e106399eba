"""Positions before fan-out (protocol v2, D20): one task between the readers and the broadcaster.

It takes the jobs waiting on its channel (up to a chunk), has the store append their events and
return their positions in one round trip, and passes the jobs on in the same order. The v2 frame
of an event needs the entry's id, so the append that used to ride in the stream batch's
acknowledgement now happens before delivery: it costs one Redis round trip per batch of events
(see docs/performance.md), and batches grow by themselves when events arrive faster than that.

A copy of an event seen moments ago (the same logical event through pub/sub and the stream, D10)
gets no new entry: the broadcaster drops it anyway, and a stored copy would be replayed.
"""

from __future__ import annotations

import logging

import attrs
import trio

from gateway.catchup.positions import ASSIGN_CHUNK, PositionStore
from gateway.core.dedup import Deduper
from gateway.fanout.broadcast import Job

log = logging.getLogger("gateway.positions")


@attrs.define(eq=False)
class Positioner:
    store: PositionStore
    deduper: Deduper
    assigned: int = 0

    async def run(self, jobs: trio.MemoryReceiveChannel[Job], out: trio.MemorySendChannel[Job]) -> None:
        try:
            await self._run(jobs, out)
        finally:
            await self.store.close()

    async def _run(self, jobs: trio.MemoryReceiveChannel[Job], out: trio.MemorySendChannel[Job]) -> None:
        async with out:
            async for first in jobs:
                batch = [first]
                while sum(len(job.events) for job in batch) < ASSIGN_CHUNK:
                    try:
                        batch.append(jobs.receive_nowait())
                    except trio.WouldBlock:
                        # A reader puts a batch on the channel one job per checkpoint: let it go
                        # on while it does, so one round trip places the whole batch.
                        await trio.lowlevel.checkpoint()
                        try:
                            batch.append(jobs.receive_nowait())
                        except trio.WouldBlock:
                            break
                try:
                    await self.place(batch)
                except Exception:
                    # A bug here must not stop delivery: these events go out without positions.
                    log.exception("placing events failed", extra={"events": len(batch)})
                for job in batch:
                    # Without a checkpoint between them while there is room, so the broadcaster
                    # finds the whole batch at one wake-up (one write per socket for all of it).
                    try:
                        out.send_nowait(job)
                    except trio.WouldBlock:
                        await out.send(job)

    async def place(self, batch: list[Job]) -> None:
        now = trio.current_time()
        fresh: list[tuple[Job, int]] = []
        for job in batch:
            job.positions = [None] * len(job.events)
            fresh.extend((job, i) for i, event in enumerate(job.events)
                         if self.deduper.first_sighting(event.dedup_key, event.ts_epoch, now))
        positions = await self.store.assign([job.events[i] for job, i in fresh])
        for (job, i), position in zip(fresh, positions, strict=True):
            job.positions[i] = position
        self.assigned += len(fresh)
