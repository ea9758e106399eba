"""Protocol v2 on the client side (D20, D21): positions kept per stream, resume, in-band refresh.

``V2Session`` outlives the sockets of one ``GatewayClient``: it keeps the last ``_pos`` offset seen
per stream (never parsed), builds the ``resume`` message each new v2 socket sends first, reads
the gateway's v2 replies, and refreshes the credential in-band before it expires. Against a
gateway that does not select ``integrador.v2`` the client falls back to v1 and HTTP catch-up.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

SUBPROTOCOL = "integrador.v2"
#: How long to wait for ``refreshed``/``refresh_failed`` before trying again.
REFRESH_REPLY_TIMEOUT = 5.0

log = logging.getLogger("gateway_client")

RecoveryFailed = Callable[[list[str]], None]


class V2Session:
    """What a v2 client remembers across its sockets."""

    def __init__(self, *, on_recovery_failed: RecoveryFailed | None = None, refresh_margin: float = 30.0) -> None:
        self.on_recovery_failed = on_recovery_failed
        self.refresh_margin = refresh_margin
        #: The last offset seen per stream: what the next socket resumes from.
        self.positions: dict[str, str] = {}
        #: The credential's expiry (Unix seconds) as the gateway last announced it.
        self.exp: float | None = None
        self.recovery_failures = 0
        self.replayed = 0
        self.refreshes = 0
        self.refresh_failures: list[str] = []
        self._exp_changed = trio.Event()

    def resume_message(self) -> str:
        return json.dumps({"type": "resume", "positions": self.positions}, separators=(",", ":"))

    def handle(self, value: dict[str, Any]) -> bool:
        """Read one message of a v2 socket; True when it was a v2 reply (not an event)."""
        kind = value.get("type")
        if kind in ("welcome", "refreshed"):
            self._set_exp(value.get("exp"))
            if kind == "refreshed":
                self.refreshes += 1
            return True
        if kind == "refresh_failed":
            self.refresh_failures.append(str(value.get("reason", "")))
            log.warning("credential refresh refused", extra={"reason": value.get("reason")})
            self._exp_changed.set()
            self._exp_changed = trio.Event()
            return True
        if kind == "resumed":
            self._resumed(value.get("streams"))
            return True
        pos = value.get("_pos")
        if isinstance(pos, dict) and isinstance(pos.get("stream"), str) and isinstance(pos.get("offset"), str):
            self.positions[pos["stream"]] = pos["offset"]
        return False

    def _resumed(self, streams: object) -> None:
        if not isinstance(streams, dict):
            return
        failed = [s for s, r in streams.items() if not (isinstance(r, dict) and r.get("recovered") is True)]
        self.replayed += sum(int(r.get("replayed", 0)) for r in streams.values() if isinstance(r, dict))
        for stream in failed:
            # That position can never be resumed again; the app refetches, live events go on.
            self.positions.pop(stream, None)
        if failed:
            self.recovery_failures += 1
            log.info("resume could not recover every stream", extra={"streams": failed})
            if self.on_recovery_failed is not None:
                try:
                    self.on_recovery_failed(failed)
                except Exception:
                    log.exception("on_recovery_failed raised")

    def _set_exp(self, exp: object) -> None:
        self.exp = float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None
        self._exp_changed.set()
        self._exp_changed = trio.Event()

    async def refresher(self, send: Callable[[str], Awaitable[None]], token: Callable[[], str]) -> None:
        """Refresh in-band before the credential expires, for as long as the socket lives.

        Starts ``refresh_margin`` seconds before ``exp`` (half the remaining time for short
        credentials), asks ``token()`` for the new credential, and tries again every few seconds
        while the gateway refuses it: a refused refresh leaves the old expiry in force.
        """
        while True:
            exp = self.exp
            if exp is None:
                await self._exp_changed.wait()
                continue
            remaining = exp - time.time()
            wait = remaining - min(self.refresh_margin, max(remaining, 0) / 2)
            changed = self._exp_changed
            with trio.move_on_after(max(wait, 0)):
                await changed.wait()
                continue  # a new expiry: plan again
            await send(json.dumps({"type": "refresh", "token": token()}, separators=(",", ":")))
            with trio.move_on_after(REFRESH_REPLY_TIMEOUT):
                await self._exp_changed.wait()
            if self.exp is not None and self.exp <= exp:
                # Refused, or the same expiry again: try later, not in a loop.
                await trio.sleep(max(min(REFRESH_REPLY_TIMEOUT, (exp - time.time()) / 2), 0.5))
