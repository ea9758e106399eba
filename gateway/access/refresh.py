"""In-band credential refresh (D21): a new credential checked exactly as at connect.

Signature, type, issuer/audience, lifetime and expiry (``Credentials``), the role for the
endpoint, revocation (one ``MGET``) and the sector lookup of a waiter are the same steps
``Admission.decide`` takes; on top, the credential must name the socket's principal: the same
``sub`` and tenant for staff, the same table session for diners. The answer is the new principal
or a short reason; the socket itself is changed by the caller.
"""

from __future__ import annotations

import time

import attrs

from gateway.access.revocation import Revocation
from gateway.access.sectors import SectorSource
from gateway.core.auth import AuthError, diner_principal, staff_principal
from gateway.core.credentials import Credentials
from gateway.core.model import Principal


@attrs.define(eq=False)
class Refresher:
    credentials: Credentials
    revocation: Revocation
    sectors: SectorSource

    async def verify(self, current: Principal, token: str) -> Principal | str:
        """The principal ``token`` grants on ``current``'s endpoint, or why it is refused."""
        if not token:
            return "missing_token"
        now = time.time()
        endpoint = current.endpoint
        try:
            if endpoint == "diner":
                principal = diner_principal(self.credentials.table(token, now))
            else:
                principal = staff_principal(endpoint, self.credentials.staff(token, now))
        except AuthError as exc:
            return exc.reason
        if principal.tenant_id != current.tenant_id or (
            principal.session_id != current.session_id if current.is_diner else principal.user_id != current.user_id
        ):
            return "other_principal"
        if not principal.is_diner:
            revoked = await self.revocation.check([principal])
            if revoked is None:
                return "unavailable"
            if revoked[0]:
                return "revoked"
            if principal.is_plain_waiter or endpoint == "waiter":
                principal = await self.sectors.assign(principal, refresh=False)
        return principal
