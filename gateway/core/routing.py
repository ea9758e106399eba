"""Who receives an event: §4.4 of the existing gateway as amended by D8–D12.

The channel an event arrived on plays no part; the audience follows from the event's fields and
each socket's credentials alone. It is computed as one set, so a socket that qualifies through
several groups still gets one frame (D10), and only sockets of the event's tenant are ever
candidates (D8).

Groups, all within the event's tenant:

- **A(b)**: admin sockets whose ``branch_ids`` contain *b*. **A(tenant)**: every admin socket.
- **W(b)**: plain waiters (on /ws/waiter, neither admin nor kitchen) whose ``branch_ids`` contain *b*.
- **S(b, s)**: the plain waiters of W(b) whose ``sector_ids`` contain *s*, plus those of W(b) with no
  sector assignment at all (D11). A sector never reaches a waiter outside the event's branch.
- **K(b)**: kitchen sockets of *b* that are not admin (a manager on /ws/kitchen is in A(b)).
- **D(session)**: diner sockets of that table session (D9). **D(b)**: every diner socket of *b*.
- **S/W**: S(b, sector_id) when ``sector_id`` is set, else W(b).

Matrix, for an event of branch *b* (``branch_id`` > 0) unless stated. D(session) applies only when
the event has a ``session_id``.

| Event type | Admins | Waiters | Kitchen | Diners |
|---|---|---|---|---|
| ENTITY_CREATED, ENTITY_UPDATED, ENTITY_DELETED, CASCADE_DELETE | A(b) | – | – | – |
| ROUND_PENDING, TABLE_SESSION_STARTED | A(b) | W(b) | – | D(session) |
| ROUND_SUBMITTED, ROUND_IN_KITCHEN, ROUND_READY, ROUND_SERVED, TICKET_IN_PROGRESS, TICKET_READY, TICKET_DELIVERED | A(b) | S/W | K(b) | D(session) |
| PRODUCT_AVAILABILITY_CHANGED | A(b) | S/W | – | D(session) ∪ D(b) |
| every other type, unknown types included | A(b) | S/W | – | D(session) |
| ENTITY_* / CASCADE_DELETE with ``branch_id`` 0 | A(tenant) | – | – | – |
| any other type with ``branch_id`` 0 | A(tenant) | – | – | D(session) |

Differences from the existing gateway: diners are no longer part of W(b) and get only their own
session's events plus product availability (D9); a diner gets every non-admin event of its session,
not a fixed list of types; unassigned waiters get sector-targeted events (D11); ``branch_id`` 0
reaches the tenant's admins (D12); and tenant isolation is unconditional (D8).

``receives`` is the same rule for one principal, written as a plain predicate. It is what catch-up
filtering uses, and ``audience`` must always equal the set of sockets whose principal it accepts.
A ``branch_id`` ≤ 0 means "no branch" and a ``sector_id`` ≤ 0 means "no sector", as in §4.4.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TypeVar

from gateway.core.index import ConnectionIndex
from gateway.core.model import Event, Principal

C = TypeVar("C", bound=Hashable)

# --- event types (§4.3) ---------------------------------------------------------------------------
ROUND_PENDING = "ROUND_PENDING"
ROUND_CONFIRMED = "ROUND_CONFIRMED"
ROUND_SUBMITTED = "ROUND_SUBMITTED"
ROUND_IN_KITCHEN = "ROUND_IN_KITCHEN"
ROUND_READY = "ROUND_READY"
ROUND_SERVED = "ROUND_SERVED"
ROUND_CANCELED = "ROUND_CANCELED"
ROUND_ITEM_DELETED = "ROUND_ITEM_DELETED"
ROUND_ITEM_VOIDED = "ROUND_ITEM_VOIDED"
SERVICE_CALL_CREATED = "SERVICE_CALL_CREATED"
SERVICE_CALL_ACKED = "SERVICE_CALL_ACKED"
SERVICE_CALL_CLOSED = "SERVICE_CALL_CLOSED"
CHECK_REQUESTED = "CHECK_REQUESTED"
CHECK_PAID = "CHECK_PAID"
PAYMENT_APPROVED = "PAYMENT_APPROVED"
PAYMENT_REJECTED = "PAYMENT_REJECTED"
PAYMENT_FAILED = "PAYMENT_FAILED"
TABLE_SESSION_STARTED = "TABLE_SESSION_STARTED"
TABLE_TRANSFERRED = "TABLE_TRANSFERRED"
TABLE_CLEARED = "TABLE_CLEARED"
TABLE_STATUS_CHANGED = "TABLE_STATUS_CHANGED"
TICKET_IN_PROGRESS = "TICKET_IN_PROGRESS"
TICKET_READY = "TICKET_READY"
TICKET_DELIVERED = "TICKET_DELIVERED"
PRODUCT_AVAILABILITY_CHANGED = "PRODUCT_AVAILABILITY_CHANGED"
CART_ITEM_ADDED = "CART_ITEM_ADDED"
CART_ITEM_UPDATED = "CART_ITEM_UPDATED"
CART_ITEM_REMOVED = "CART_ITEM_REMOVED"
CART_CLEARED = "CART_CLEARED"
CART_SYNC = "CART_SYNC"
ENTITY_CREATED = "ENTITY_CREATED"
ENTITY_UPDATED = "ENTITY_UPDATED"
ENTITY_DELETED = "ENTITY_DELETED"
CASCADE_DELETE = "CASCADE_DELETE"

# --- routing sets -------------------------------------------------------------------------------
ADMIN_ONLY: frozenset[str] = frozenset({ENTITY_CREATED, ENTITY_UPDATED, ENTITY_DELETED, CASCADE_DELETE})
#: Types every waiter of the branch needs whatever the sector (a new order, a new table session).
BRANCH_WIDE_WAITER: frozenset[str] = frozenset({ROUND_PENDING, TABLE_SESSION_STARTED})
KITCHEN_TYPES: frozenset[str] = frozenset(
    {
        ROUND_SUBMITTED,
        ROUND_IN_KITCHEN,
        ROUND_READY,
        ROUND_SERVED,
        TICKET_IN_PROGRESS,
        TICKET_READY,
        TICKET_DELIVERED,
    }
)
#: Types every diner of the branch gets, whatever the session (the menu shows availability).
DINER_BRANCH_TYPES: frozenset[str] = frozenset({PRODUCT_AVAILABILITY_CHANGED})
#: The types ``/ws/catchup/session`` returns, in addition to the session match (D16): the
#: existing gateway's list (§1.3) plus the types pwaMenu subscribes to that it lacked
#: (TABLE_CLEARED, SERVICE_CALL_ACKED/CLOSED, ROUND_ITEM_DELETED, CART_SYNC, PAYMENT_FAILED), so a
#: reconnecting diner catches up on everything its socket would have shown.
DINER_CATCHUP_TYPES: frozenset[str] = frozenset(
    {
        ROUND_PENDING,
        ROUND_CONFIRMED,
        ROUND_SUBMITTED,
        ROUND_IN_KITCHEN,
        ROUND_READY,
        ROUND_SERVED,
        ROUND_CANCELED,
        CART_ITEM_ADDED,
        CART_ITEM_UPDATED,
        CART_ITEM_REMOVED,
        CART_CLEARED,
        CHECK_REQUESTED,
        CHECK_PAID,
        PAYMENT_APPROVED,
        PAYMENT_REJECTED,
        TABLE_STATUS_CHANGED,
        PRODUCT_AVAILABILITY_CHANGED,
        TABLE_CLEARED,
        SERVICE_CALL_ACKED,
        SERVICE_CALL_CLOSED,
        ROUND_ITEM_DELETED,
        CART_SYNC,
        PAYMENT_FAILED,
    }
)


def _sector(event: Event) -> int | None:
    sector = event.sector_id
    return sector if sector is not None and sector > 0 else None


def audience(event: Event, index: ConnectionIndex[C]) -> set[C]:
    """Every socket that gets ``event``, each once (D10)."""
    tenant = event.tenant_id
    branch = event.branch_id
    kind = event.type
    admin_only = kind in ADMIN_ONLY
    out: set[C] = set()
    if branch > 0:
        out |= index.branch_admins(tenant, branch)
        if not admin_only:
            sector = _sector(event)
            if sector is None or kind in BRANCH_WIDE_WAITER:
                out |= index.branch_waiters(tenant, branch)
            else:
                out |= index.sector_waiters(tenant, branch, sector)
                out |= index.unassigned_waiters(tenant, branch)
            if kind in KITCHEN_TYPES:
                out |= index.branch_kitchen(tenant, branch)
            if kind in DINER_BRANCH_TYPES:
                out |= index.branch_diners(tenant, branch)
    else:
        out |= index.tenant_admins(tenant)
    if not admin_only and event.session_id is not None:
        out |= index.session_diners(tenant, event.session_id)
    return out


def receives(event: Event, principal: Principal) -> bool:
    """Whether a socket with ``principal`` gets ``event``: ``audience`` for one socket."""
    if principal.tenant_id != event.tenant_id:
        return False
    kind = event.type
    branch = event.branch_id if event.branch_id > 0 else None
    if principal.is_admin and (branch is None or branch in principal.branch_ids):
        return True
    if kind in ADMIN_ONLY:
        return False
    if principal.is_diner:
        if event.session_id is not None and principal.session_id == event.session_id:
            return True
        if kind in DINER_BRANCH_TYPES and branch is not None and branch in principal.branch_ids:
            return True
    if branch is None or branch not in principal.branch_ids:
        return False
    if principal.is_plain_waiter:
        sector = _sector(event)
        if sector is None or kind in BRANCH_WIDE_WAITER:
            return True
        if not principal.sector_ids or sector in principal.sector_ids:
            return True
    return principal.is_kitchen and not principal.is_admin and kind in KITCHEN_TYPES
