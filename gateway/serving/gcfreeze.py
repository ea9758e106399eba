"""Admitted sockets leave the cyclic garbage collector's full passes.

A socket's objects (its connection, protocol state, task, cancel scope: about a hundred tracked
objects) live as long as the socket. CPython runs a full collection whenever the objects that
survived younger ones exceed a quarter of the long-lived ones, and each full pass walks every
tracked object: in a reconnect storm of 10,000 sockets that was 8 to 9 full passes of up to
0.7 s each, about a third of the CPU of admitting them (docs/performance.md). Closing a socket
leaves no reference cycle (its objects are freed by reference counting), so the collector has
nothing to find among them.

After every ``every`` admitted sockets the daemon collects once (only what is not frozen yet:
at most the objects allocated since the previous time, so that no garbage is frozen) and then
freezes every tracked object (``gc.freeze``): later full passes skip them. Frozen objects are
still freed by reference counting when their socket closes. Off unless the daemon turns it on
(``gateway.app.run_until_signalled``, which also freezes the start-up objects).
"""

from __future__ import annotations

import gc

import attrs

#: Admitted sockets between two freezes: the collection before a freeze walks about a hundred
#: objects per socket admitted since the previous one (a few tens of milliseconds).
FREEZE_EVERY = 200


@attrs.define
class AdmissionFreezer:
    enabled: bool = False
    every: int = FREEZE_EVERY
    _since: int = 0

    def admitted(self) -> None:
        if not self.enabled:
            return
        self._since += 1
        if self._since >= self.every:
            self._since = 0
            gc.collect()
            gc.freeze()
