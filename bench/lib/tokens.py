"""Tokens the gateway accepts, minted with its default settings' secrets."""

from __future__ import annotations

from collections.abc import Sequence

from bench.lib.constants import TENANT
from gateway.core.tokens import mint_staff_token, mint_table_token
from gateway.settings import Settings


def default_settings() -> Settings:
    """The settings of a gateway started with no setting in its environment (the benchmarks')."""
    return Settings.from_env({"ENVIRONMENT": "development"})


def staff_token(
    settings: Settings,
    *,
    user_id: int,
    branch_ids: Sequence[int],
    roles: Sequence[str],
    ttl: float,
    sector_ids: Sequence[int] | None = None,
) -> str:
    """A staff JWT of tenant ``TENANT``."""
    return mint_staff_token(
        secret=settings.jwt_secret,
        issuer=settings.jwt_issuer,
        audience=settings.jwt_audience,
        user_id=user_id,
        tenant_id=TENANT,
        branch_ids=branch_ids,
        roles=roles,
        ttl=ttl,
        sector_ids=sector_ids,
    )


def table_token(settings: Settings, *, branch_id: int, session_id: int, ttl: float) -> str:
    """A diner's table token of tenant ``TENANT``; the table has the session's id."""
    return mint_table_token(
        secret=settings.table_token_secret,
        tenant_id=TENANT,
        branch_id=branch_id,
        table_id=session_id,
        session_id=session_id,
        ttl=ttl,
    )
