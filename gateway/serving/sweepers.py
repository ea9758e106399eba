"""Tasks that go over every socket: the heartbeat sweep, credential revalidation and the drain."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import trio

from gateway.access.revocation import Revocation
from gateway.core import closecodes
from gateway.core.auth import AuthError, recheck_table_principal
from gateway.core.model import Principal
from gateway.metrics import Metrics
from gateway.serving.registry import SocketRegistry

log = logging.getLogger("gateway")

#: Staff principals per revocation MGET.
REVALIDATION_CHUNK = 1000


async def heartbeat_sweeper(registry: SocketRegistry, *, silence: float, interval: float) -> None:
    """Close sockets that sent nothing for ``silence`` seconds (1001, D6)."""
    while True:
        await trio.sleep(interval)
        cutoff = trio.current_time() - silence
        for conn in [c for c in registry.index if c.last_seen < cutoff]:
            log.info("heartbeat timeout: closing", extra=conn.log_context())
            conn.begin_close(closecodes.HEARTBEAT_TIMEOUT)


async def revalidator(registry: SocketRegistry, revocation: Revocation, *, table_secret: str,
                      staff_interval: float, table_interval: float) -> None:
    """Re-check credentials of open sockets when due (D3): staff revocation keys in one MGET per
    round, diner table tokens re-verified. A Redis failure leaves sockets open (D4)."""
    tick = min(5.0, staff_interval, table_interval)
    while True:
        await trio.sleep(tick)
        now = trio.current_time()
        due = [c for c in registry.index if c.next_check <= now and not c.closing]
        staff = [c for c in due if c.principal is not None and not c.principal.is_diner]
        for conn in due:
            principal = conn.principal
            if principal is None or not principal.is_diner:
                continue
            conn.next_check = now + table_interval
            try:
                recheck_table_principal(principal, conn.token, secret=table_secret, now=time.time())
            except AuthError as exc:
                log.info("table token no longer valid: closing", extra=conn.log_context())
                conn.begin_close(exc.close)
        for start in range(0, len(staff), REVALIDATION_CHUNK):
            chunk = staff[start : start + REVALIDATION_CHUNK]
            principals: Sequence[Principal] = [c.principal for c in chunk if c.principal is not None]
            revoked = await revocation.check(principals)
            if revoked is None:
                continue
            for conn, is_revoked in zip(chunk, revoked, strict=True):
                conn.next_check = trio.current_time() + staff_interval
                if is_revoked and not conn.closing:
                    log.info("token revoked: closing", extra=conn.log_context())
                    conn.begin_close(closecodes.TOKEN_EXPIRED_OR_REVOKED)


async def drain(registry: SocketRegistry, metrics: Metrics, *, period: float, bound: float) -> None:
    """Stop taking sockets and close every one with 1012, spread over ``period`` so the clients'
    reconnects are spread too; wait (at most ``bound`` seconds) until all are gone."""
    registry.draining = True
    metrics.draining.set(1)
    conns = list(registry.sockets)
    log.info("draining", extra={"sockets": len(conns), "drain_period": period})
    with trio.move_on_after(bound):
        period = min(period, bound * 0.8)
        step = period / len(conns) if conns else 0.0
        start = trio.current_time()
        for i, conn in enumerate(conns):
            if step:
                await trio.sleep_until(start + i * step)
            conn.begin_close(closecodes.SERVER_RESTART)
        for conn in list(registry.sockets):  # sockets that arrived while draining
            conn.begin_close(closecodes.SERVER_RESTART)
        # Polling keeps the shared socket set free of wake-up bookkeeping; it runs only here.
        while registry.sockets:  # noqa: ASYNC110
            await trio.sleep(0.02)
