"""Redis command helpers shared by the gateway, the CLI and the test plugin."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from coredis.tokens import PureToken

#: Cap of the critical stream, as the backend writes it (``XADD ... MAXLEN ~ 50000``).
STREAM_MAXLEN = 50000
DLQ_MAXLEN = 1000


def xadd_capped(target: Any, key: str, fields: Mapping[str, Any], maxlen: int, *, approximate: bool = True) -> Any:
    """``XADD key MAXLEN [~|=] maxlen * field value ...`` on a client or a pipeline."""
    return target.xadd(
        key,
        fields,
        trim_strategy=PureToken.MAXLEN,
        threshold=maxlen,
        trim_operator=PureToken.APPROXIMATELY if approximate else PureToken.EQUAL,
    )
