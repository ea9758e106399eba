"""Fan-out: one validated event in, one encoded frame out to each member of its audience.

Redis readers put :class:`Job` objects (the events of one read) on a bounded memory channel; one
broadcast worker takes every job queued at a wake-up, in order, and hands them to
:meth:`Broadcaster.run_jobs`: a lone event is dispatched at once (:meth:`Broadcaster.dispatch`);
several are routed first and each socket then gets all its frames of them in one write. Both are
synchronous (they never checkpoint), so each socket sees events in the order they were read, and
the index and dedup state need no locks. It is one task on purpose: the work is CPU-bound on one thread,
and Trio may run two woken workers in either order, which would reorder events.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

import attrs
import trio

from gateway.core.dedup import Deduper
from gateway.core.frames import text_frame
from gateway.core.routing import audience
from gateway.fanout.v2frames import V2Frames
from gateway.serving.connection import WRITTEN

if TYPE_CHECKING:
    from gateway.core.index import ConnectionIndex
    from gateway.core.model import Event
    from gateway.core.positions import Position
    from gateway.metrics import Metrics
    from gateway.serving.connection import Connection

log = logging.getLogger("gateway.broadcast")

#: Events per job at most from pub/sub (a stream job is one XREADGROUP batch).
JOB_EVENTS = 100


@attrs.define(eq=False)
class Job:
    """Events read together (one XREADGROUP batch, or the pub/sub messages that were ready at one
    wake-up), dispatched in order in one pass of the worker."""

    events: list[Event]
    source: str
    #: ``trio.current_time()`` when the events were read, for the delivery latency histogram.
    received_at: float
    #: Called once every event was dispatched, with one flag per event: True once it reached its
    #: sockets' send queues (the stream acknowledges it then), False when routing raised (the entry
    #: stays pending and is retried).
    on_done: Callable[[list[bool]], None] | None = None
    #: Where each event is stored, for its v2 frame (set before fan-out when it could be stored).
    positions: list[Position | None] = attrs.Factory(list)


@attrs.define(eq=False)
class Broadcaster:
    index: ConnectionIndex[Connection]
    metrics: Metrics
    deduper: Deduper
    #: Called with every delivered logical event (catch-up store, statistics).
    on_delivered: Callable[[Event], None] | None = None
    delivered_events: int = 0
    duplicate_events: int = 0

    def _route(self, event: Event, source: str) -> Collection[Connection] | None:
        """Dedup and audience of one event; None for a duplicate. Counts the event."""
        now = trio.current_time()
        if not self.deduper.first_sighting(event.dedup_key, event.ts_epoch, now):
            self.duplicate_events += 1
            self.metrics.events_duplicate.labels(source).inc()
            return None
        try:
            targets = audience(event, self.index)
        except Exception:
            self.deduper.retract(event.dedup_key)
            raise
        self.metrics.events_routed.labels(source).inc()
        self.delivered_events += 1
        if self.on_delivered is not None:
            self.on_delivered(event)
        if not targets:
            self.metrics.events_unrouted.inc()
        return targets

    def dispatch(self, event: Event, source: str, received_at: float, position: Position | None = None) -> int:
        """Deliver ``event`` to its audience; returns the number of frames handed over."""
        targets = self._route(event, source)
        if not targets:
            return 0
        frame = text_frame(event.frame_payload)
        v2 = V2Frames(event.frame_payload, position)  # encoded once, on the first v2 recipient
        sent = direct = 0
        for conn in targets:
            result = conn.deliver(frame) if conn.v2 is None else v2.deliver(conn)
            if result:
                sent += 1
                if result == WRITTEN:
                    direct += 1
        self.metrics.frames_delivered.inc(sent)
        self.metrics.direct_writes.inc(direct)
        self.metrics.delivery_latency.observe(trio.current_time() - received_at)
        return sent

    def run_job(self, job: Job) -> None:
        """Dispatch a job's events in order and report how each went."""
        self.run_jobs([job])

    def run_jobs(self, jobs: list[Job]) -> None:
        """Dispatch the events of ``jobs`` in order, then report how each went, job by job.

        Jobs of several events are routed event by event first, collecting each socket's frames in
        event order; then every socket gets all its frames in one write
        (:meth:`Connection.deliver_many`). Nothing checkpoints in between, so no other task sees a
        socket between two of its frames, and each socket still receives events in the order read.
        """
        if len(jobs) == 1 and len(jobs[0].events) == 1:
            self._run_one(jobs[0])
            return
        frames_of: dict[Connection, list[bytes]] = {}
        results: list[list[bool]] = []
        reached: list[int] = []
        for job in jobs:
            results.append(self._collect(job, frames_of, reached))
        sent = direct = 0
        for conn, frames in frames_of.items():
            handed, whole = conn.deliver_many(frames)
            sent += handed
            direct += whole
        if frames_of:
            self.metrics.frames_delivered.inc(sent)
            self.metrics.direct_writes.inc(direct)
        now = trio.current_time()
        for job, count in zip(jobs, reached, strict=True):
            for _ in range(count):
                self.metrics.delivery_latency.observe(now - job.received_at)
        for job, outcomes in zip(jobs, results, strict=True):
            if job.on_done is not None:
                job.on_done(outcomes)

    def _collect(self, job: Job, frames_of: dict[Connection, list[bytes]], reached: list[int]) -> list[bool]:
        """Route a job's events, appending each recipient's frame to ``frames_of``."""
        outcomes: list[bool] = []
        positions = job.positions
        count = 0
        for i, event in enumerate(job.events):
            try:
                targets = self._route(event, job.source)
            except Exception:
                # A routing bug must not take the worker (and every socket's feed) down.
                log.exception("dispatch failed", extra={"event_type": event.type})
                outcomes.append(False)
                continue
            outcomes.append(True)
            if not targets:
                continue
            count += 1
            frame = text_frame(event.frame_payload)
            v2: V2Frames | None = None
            for conn in targets:
                if conn.v2 is None:
                    out = frame
                else:
                    if v2 is None:
                        v2 = V2Frames(event.frame_payload, positions[i] if i < len(positions) else None)
                    held = v2.frame_for(conn)
                    if held is None:
                        continue
                    out = held
                pending = frames_of.get(conn)
                if pending is None:
                    frames_of[conn] = [out]
                else:
                    pending.append(out)
        reached.append(count)
        return outcomes

    def _run_one(self, job: Job) -> None:
        event = job.events[0]
        try:
            self.dispatch(event, job.source, job.received_at, job.positions[0] if job.positions else None)
        except Exception:
            log.exception("dispatch failed", extra={"event_type": event.type})
            ok = False
        else:
            ok = True
        if job.on_done is not None:
            job.on_done([ok])

    async def worker(self, jobs: trio.MemoryReceiveChannel[Job]) -> None:
        async for job in jobs:
            # Whatever else is already queued goes in the same wake-up, in order, and each socket
            # gets its frames of all of them in one write.
            batch = [job]
            ended = False
            while True:
                try:
                    batch.append(jobs.receive_nowait())
                except trio.WouldBlock:
                    break
                except trio.EndOfChannel:
                    ended = True
                    break
            self.run_jobs(batch)
            if ended:
                return
