"""The secrets and rules that verify credentials, as one value handed to whoever verifies them."""

from __future__ import annotations

import attrs

from gateway.core.auth import StaffClaims, TableClaims, verify_staff_token, verify_table_token


@attrs.frozen
class Credentials:
    jwt_secret: str = attrs.field(repr=False)
    jwt_issuer: str
    jwt_audience: str
    table_token_secret: str = attrs.field(repr=False)
    max_lifetime: float

    def staff(self, token: str, now: float) -> StaffClaims:
        return verify_staff_token(token, secret=self.jwt_secret, issuer=self.jwt_issuer, audience=self.jwt_audience,
                                  now=now, max_lifetime=self.max_lifetime)

    def table(self, token: str, now: float) -> TableClaims:
        return verify_table_token(token, secret=self.table_token_secret, now=now, max_lifetime=self.max_lifetime)
