"""Which socket must get which event: ``gateway.core.routing.receives`` per routing class."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

from bench.workloads.mix import Planned, routing_event
from bench.workloads.population import SocketSpec, routing_class
from gateway.core import routing
from gateway.core.model import Event, Principal


@dataclass
class Expectation:
    class_of: list[int]  # socket index -> class index
    class_seqs: list[list[int]]  # class index -> expected seqs, ascending
    classes: int
    seconds: float
    sample_checked: int


def expected_audiences(
    population: list[SocketSpec], plans: list[Planned], *, sample: int = 200, seed: int = 1
) -> Expectation:
    """Per socket, the seqs ``gateway.core.routing.receives`` says it must get."""
    t0 = time.monotonic()
    class_index: dict[Principal, int] = {}
    class_of: list[int] = []
    reps: list[Principal] = []
    for spec in population:
        key = routing_class(spec.principal)
        idx = class_index.get(key)
        if idx is None:
            idx = class_index[key] = len(reps)
            reps.append(spec.principal)
        class_of.append(idx)
    class_seqs: list[list[int]] = [[] for _ in reps]
    memo: dict[Event, list[int]] = {}
    events: list[Event] = []
    for p in plans:
        ev = routing_event(p)
        events.append(ev)
        members = memo.get(ev)
        if members is None:
            members = memo[ev] = [c for c, rep in enumerate(reps) if routing.receives(ev, rep)]
        for c in members:
            class_seqs[c].append(p.seq)
    # The class shortcut, checked: sampled sockets with their own principals.
    rng = random.Random(seed)
    picked = rng.sample(range(len(population)), min(sample, len(population)))
    for i in picked:
        own = population[i].principal
        mine = [p.seq for p, ev in zip(plans, events, strict=True) if routing.receives(ev, own)]
        if mine != class_seqs[class_of[i]]:
            raise AssertionError(f"socket {i}: the class shortcut disagrees with receives()")
    return Expectation(class_of, class_seqs, len(reps), time.monotonic() - t0, len(picked))
