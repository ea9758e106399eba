"""Turning one raw setting into a checked value: parse, range, choices. The error names the
environment variable (or flag) and never shows a secret."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

_Parser = Callable[[str], Any]


class SettingsError(ValueError):
    """An invalid setting. The message names the environment variable (or flag)."""


def _convert(field: attrs.Attribute[Any], raw: str, name: str) -> Any:
    parse: _Parser | None = field.metadata["parse"]
    if parse is None:
        parse = {"int": int, "float": float}.get(str(field.type), str)
    try:
        value = parse(raw.strip() if parse in (int, float) else raw)
    except ValueError as exc:
        raise SettingsError(f"{name}: invalid value {_shown(field, raw)}: {exc}") from None
    _check_range(field, value, name)
    return value


def _shown(field: attrs.Attribute[Any], raw: str) -> str:
    # A URL may carry a password even when it is malformed.
    return "(hidden)" if field.metadata["secret"] or field.name == "redis_url" else repr(raw)


def _check_range(field: attrs.Attribute[Any], value: Any, name: str) -> None:
    meta = field.metadata
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        if value != value or value in (float("inf"), float("-inf")):
            raise SettingsError(f"{name}: must be a finite number")
        if meta["minimum"] is not None and value < meta["minimum"]:
            raise SettingsError(f"{name}: {value} is below the minimum {meta['minimum']}")
        if meta["maximum"] is not None and value > meta["maximum"]:
            raise SettingsError(f"{name}: {value} is above the maximum {meta['maximum']}")
    if meta["choices"] is not None and value not in meta["choices"]:
        raise SettingsError(f"{name}: {value!r} is not one of {', '.join(meta['choices'])}")
