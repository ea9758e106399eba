"""Exponential backoff with jitter: the one formula of every reconnect in this repository.

Attempt ``n`` (1-based, counted since the last success) waits::

    nominal(n) = min(base · 2^(n−1), cap)
    delay(n)   = nominal(n) · (1 + jitter · u)      u uniform in [0, 1)

Two users, two parameter sets:

- the Redis readers (D15): 1 s to 30 s, jitter 0.3, retrying forever; they use the stateful
  side, ``next_delay()`` per failure and ``reset()`` after a success;
- the Python client (audit §5, CLIENT-MED-01): the same defaults, at most 50 attempts; its
  reconnect policy counts the attempts itself and asks for ``delay(n, u)``.
"""

from __future__ import annotations

import math
import random
from typing import Protocol

import attrs

#: Beyond this exponent the cap has long been reached; it keeps 2**n within a float.
_MAX_EXPONENT = 1000


class RandomSource(Protocol):
    """Where jitter comes from: ``random.Random`` or anything with ``random() -> float``."""

    def random(self) -> float: ...


def _rng_or_default(rng: RandomSource | None) -> RandomSource:
    return rng if rng is not None else random.Random()


@attrs.define
class Backoff:
    """The backoff schedule (``nominal``, ``bounds``, ``delay``), plus a cursor over it
    (``next_delay``, ``reset``) for callers that do not count attempts themselves."""

    base: float = 1.0
    cap: float = 30.0
    jitter: float = 0.3
    rng: RandomSource = attrs.field(default=None, converter=_rng_or_default)
    #: Delays handed out by ``next_delay`` since the last ``reset``.
    attempt: int = attrs.field(default=0, init=False)

    def __attrs_post_init__(self) -> None:
        if not (math.isfinite(self.base) and math.isfinite(self.cap) and self.base >= 0):
            raise ValueError("backoff base and cap must be finite and base >= 0")
        if self.cap < self.base:
            raise ValueError("backoff cap must be at least base")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be within [0, 1]")

    def nominal(self, attempt: int) -> float:
        """The delay of attempt ``attempt`` (1-based) without jitter."""
        if attempt < 1:
            raise ValueError("attempts are numbered from 1")
        return min(self.base * 2.0 ** min(attempt - 1, _MAX_EXPONENT), self.cap)

    def bounds(self, attempt: int) -> tuple[float, float]:
        """The shortest and (exclusive) longest delay of attempt ``attempt``."""
        low = self.nominal(attempt)
        return low, low * (1 + self.jitter)

    def delay(self, attempt: int, u: float) -> float:
        """The delay of attempt ``attempt`` for a uniform sample ``u`` in [0, 1)."""
        low = self.nominal(attempt)
        return low + low * self.jitter * min(max(u, 0.0), 1.0)

    def next_delay(self) -> float:
        """The delay before the next attempt, drawing the jitter from ``rng``."""
        self.attempt += 1
        return self.delay(self.attempt, self.rng.random())

    def reset(self) -> None:
        """A success: the next delay is the first one again."""
        self.attempt = 0
