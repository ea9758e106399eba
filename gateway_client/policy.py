"""Reconnect decisions, without I/O: final close codes, attempt counting, the backoff delay."""

from __future__ import annotations

import enum
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from gateway.core import closecodes
from gateway.core.backoff import Backoff, RandomSource

__all__ = [
    "ABNORMAL",
    "CLIENT_CLOSED",
    "FINAL_CLOSE_CODES",
    "HEARTBEAT_TIMEOUT",
    "SOFT_DISCONNECT",
    "Backoff",
    "CloseAction",
    "CloseInfo",
    "ConnectionState",
    "Decision",
    "RandomSource",
    "ReconnectPolicy",
    "describe_failure",
]

#: Codes after which a client must not reconnect (the gateway's ``closecodes.FINAL_CODES``).
FINAL_CLOSE_CODES: Final = closecodes.FINAL_CODES
#: What the client sends when a ping went unanswered.
HEARTBEAT_TIMEOUT: Final = closecodes.CLIENT_HEARTBEAT_TIMEOUT
#: Sent when ``update_token()`` replaces the connection.
SOFT_DISCONNECT: Final = closecodes.SOFT_DISCONNECT
#: Sent by ``close()``.
CLIENT_CLOSED: Final = closecodes.CLIENT_CLOSED
#: No close frame was received (refused connection, failed handshake, lost transport).
ABNORMAL: Final = closecodes.ABNORMAL_CLOSURE


class ConnectionState(enum.StrEnum):
    DISCONNECTED = "disconnected"  # created, run() not started yet
    CONNECTING = "connecting"  # first attempt, or reconnect after update_token()
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"  # waiting out the backoff, or an attempt after a failure
    CLOSED = "closed"  # close(), a final close code, or max attempts reached


@dataclass(frozen=True)
class CloseInfo:
    """How the last socket (or attempt) ended."""

    code: int
    reason: str
    by_client: bool  # the client sent the close frame (heartbeat timeout, soft disconnect, close())
    opened: bool  # the handshake had succeeded
    #: Seconds the server asked to wait (``Retry-After`` of a 429/503 refusal, D22).
    retry_after: float | None = None


class CloseAction(enum.Enum):
    RECONNECT = "reconnect"
    FINAL = "final"
    GIVE_UP = "give_up"


@dataclass(frozen=True)
class Decision:
    action: CloseAction
    delay: float = 0.0
    attempt: int = 0


class ReconnectPolicy:
    """What to do after a socket closed or an attempt failed; counts reconnect attempts.

    ``on_close`` is called once per closed socket or failed attempt, ``opened`` once per
    successful open (it resets the counter). Attempt ``n`` waits ``backoff.delay(n, u)``
    (``gateway.core.backoff``: 1 s doubling to 30 s, plus 0–30 %), at most ``max_attempts`` times.
    """

    def __init__(self, *, max_attempts: int = 50, backoff: Backoff | None = None,
                 rng: RandomSource | None = None, final_codes: Iterable[int] = FINAL_CLOSE_CODES) -> None:
        if max_attempts < 0:
            raise ValueError("max_attempts must be >= 0")
        self.max_attempts = max_attempts
        self.backoff = backoff if backoff is not None else Backoff()
        self.rng: RandomSource = rng if rng is not None else random.Random()
        self.final_codes = frozenset(final_codes)
        self.attempts = 0

    def is_final(self, code: int | None) -> bool:
        return code is not None and code in self.final_codes

    def opened(self) -> bool:
        """A socket opened: reset the counter; returns whether it was a reconnect after failures."""
        was_retrying = self.attempts > 0
        self.attempts = 0
        return was_retrying

    def on_close(self, code: int | None) -> Decision:
        if self.is_final(code):
            return Decision(CloseAction.FINAL)
        if self.attempts >= self.max_attempts:
            return Decision(CloseAction.GIVE_UP, attempt=self.attempts)
        self.attempts += 1
        return Decision(CloseAction.RECONNECT, self.backoff.delay(self.attempts, self.rng.random()), self.attempts)

    def reset(self) -> None:
        self.attempts = 0


def retry_after(exc: BaseException) -> float | None:
    """The ``Retry-After`` seconds of a refused handshake, if the server gave one."""
    for name, value in getattr(exc, "headers", None) or ():
        if bytes(name).lower() == b"retry-after":
            try:
                seconds = float(bytes(value).decode("ascii"))
            except (UnicodeDecodeError, ValueError):
                return None
            return seconds if 0 <= seconds <= 3600 else None
    return None


def describe_failure(exc: BaseException) -> str:
    """The ``CloseInfo.reason`` of an attempt that failed or a socket lost without a close frame."""
    status = getattr(exc, "status_code", None)
    if isinstance(status, int):
        return f"handshake rejected: HTTP {status}"
    cause = exc.__cause__ or exc.__context__
    return f"{type(exc).__name__}: {cause!r}" if cause is not None else type(exc).__name__
