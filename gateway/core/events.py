"""Event envelopes: validation of what publishers send (§4.1–§4.2, D8, D10, D13) and building them.

``parse_event`` is the single gate every event passes, whatever path it came by, so the checks are
the same for pub/sub, the stream and the publish API. It raises only ``InvalidEvent``, whose
``reason`` is a fixed metric label.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from hashlib import blake2b
from typing import Any, NoReturn

from gateway.core.model import Event

KNOWN_FIELDS: frozenset[str] = frozenset(
    {
        "type", "tenant_id", "branch_id", "table_id", "session_id", "sector_id",
        "entity", "actor", "timestamp", "ts", "v",
    }
)
#: Stamped by the existing gateway and leaked to clients; never forwarded (D13).
INTERNAL_FIELDS: frozenset[str] = frozenset({"_enqueued_at", "_retry_count"})
MAX_UNKNOWN_FIELDS = 10
MAX_TYPE_LENGTH = 64

#: Every ``InvalidEvent.reason``, so metrics can be registered up front.
REASONS: tuple[str, ...] = (
    "too_large", "not_utf8", "not_json", "not_object", "missing_type", "bad_type",
    "missing_tenant", "bad_tenant", "bad_id", "too_many_unknown_fields", "bad_field",
)

_ALLOWED_FIELDS = KNOWN_FIELDS | INTERNAL_FIELDS
_OPTIONAL_IDS = ("table_id", "session_id", "sector_id")
_OBJECT_FIELDS = ("entity", "actor")
_SEPARATORS = (",", ":")

# Built once: json.dumps with non-default options would construct an encoder per call.
# allow_nan=False also catches overflowing numbers such as 1e400, which parse to inf and would
# otherwise go out as the non-JSON token ``Infinity``. Parsed JSON is a tree, so the circular
# check is pure cost; depth is still bounded by the recursion limit.
_compact = json.JSONEncoder(
    separators=_SEPARATORS, ensure_ascii=False, allow_nan=False, check_circular=False
).encode
_canonical = json.JSONEncoder(
    separators=_SEPARATORS, ensure_ascii=False, allow_nan=False, check_circular=False, sort_keys=True
).encode


class InvalidEvent(Exception):
    """A rejected event; ``reason`` is one of ``REASONS`` and never carries input."""

    reason: str

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _reject(reason: str) -> NoReturn:
    raise InvalidEvent(reason)


def _reject_constant(_: str) -> NoReturn:
    raise ValueError("NaN and Infinity are not JSON")


_decode = json.JSONDecoder(parse_constant=_reject_constant).decode


def parse_event(raw: bytes | str, *, max_size: int) -> Event:
    """Validate one raw envelope and return it as an ``Event``; raise ``InvalidEvent`` otherwise."""
    if isinstance(raw, str):
        # A character is 1 to 4 bytes, so only the middle band needs the real byte count.
        if len(raw) > max_size or (
            len(raw) * 4 > max_size and len(raw.encode("utf-8", "surrogatepass")) > max_size
        ):
            _reject("too_large")
        text = raw
    else:
        if len(raw) > max_size:
            _reject("too_large")
        try:
            # Explicit: json.loads(bytes) would also accept UTF-16/32 by sniffing.
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            _reject("not_utf8")
    try:
        data: Any = _decode(text)
    except (ValueError, RecursionError):
        _reject("not_json")
    if type(data) is not dict:
        _reject("not_object")

    event_type = data.get("type")
    if event_type is None and "type" not in data:
        _reject("missing_type")
    if type(event_type) is not str or not event_type or len(event_type) > MAX_TYPE_LENGTH:
        _reject("bad_type")

    tenant_id = data.get("tenant_id")
    if type(tenant_id) is not int or tenant_id <= 0:
        _reject("missing_tenant" if "tenant_id" not in data else "bad_tenant")

    branch_id = data.get("branch_id")
    if branch_id is None:
        branch_id = 0
    elif type(branch_id) is not int or branch_id < 0:
        _reject("bad_id")
    for name in _OPTIONAL_IDS:
        value = data.get(name)
        if value is not None and (type(value) is not int or value <= 0):
            _reject("bad_id")
    for name in _OBJECT_FIELDS:
        value = data.get(name)
        if value is not None and type(value) is not dict:
            _reject("bad_field")
    if "v" in data and type(data["v"]) is not int:
        _reject("bad_field")

    # A dict of at most MAX_UNKNOWN_FIELDS keys cannot exceed it, so the backend's ten-key
    # envelope never pays for the count.
    if len(data) > MAX_UNKNOWN_FIELDS and (
        sum(1 for key in data if key not in _ALLOWED_FIELDS) > MAX_UNKNOWN_FIELDS
    ):
        _reject("too_many_unknown_fields")

    for name in INTERNAL_FIELDS:
        data.pop(name, None)

    try:
        frame_payload = _compact(data).encode("utf-8")
        ts = data.pop("ts", None)
        # The dict is ours: dropping ts after the frame is built avoids copying it.
        dedup_key = blake2b(_canonical(data).encode("utf-8"), digest_size=16).digest()
    except UnicodeEncodeError:
        # Lone surrogates ("\ud800" escapes) decode fine but cannot be sent as UTF-8.
        _reject("not_utf8")
    except (ValueError, RecursionError):
        _reject("not_json")

    return Event(
        type=event_type,
        tenant_id=tenant_id,
        branch_id=branch_id,
        table_id=data.get("table_id"),
        session_id=data.get("session_id"),
        sector_id=data.get("sector_id"),
        frame_payload=frame_payload,
        dedup_key=dedup_key,
        ts_epoch=parse_ts(ts) if type(ts) is str else None,
    )


def parse_ts(ts: str) -> float | None:
    """ISO-8601 to Unix seconds (naive means UTC, ``Z`` accepted); ``None`` when it does not parse.

    A bad ``ts`` only weakens de-duplication, so it is not a reason to drop the event.
    """
    try:
        moment = datetime.fromisoformat(ts)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    except (ValueError, OverflowError, OSError):
        return None


def envelope(
    event_type: str,
    tenant_id: int,
    branch_id: int = 0,
    *,
    table_id: int | None = None,
    session_id: int | None = None,
    sector_id: int | None = None,
    entity: Mapping[str, object] | None = None,
    actor: Mapping[str, object] | None = None,
    ts: str | None = None,
) -> dict[str, object]:
    """An envelope shaped like the backend's: all ten keys, in its order (§4.1)."""
    return {
        "type": event_type,
        "tenant_id": tenant_id,
        "branch_id": branch_id,
        "table_id": table_id,
        "session_id": session_id,
        "sector_id": sector_id,
        "entity": dict(entity) if entity is not None else {},
        "actor": dict(actor) if actor is not None else {},
        "ts": ts if ts is not None else datetime.now(UTC).isoformat(),
        "v": 1,
    }


def encode_envelope(env: Mapping[str, object]) -> bytes:
    """Serialise as the backend does: default separators, non-ASCII unescaped."""
    return json.dumps(env, ensure_ascii=False).encode("utf-8")
