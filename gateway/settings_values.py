"""How setting values are read from their environment text (``gateway.settings`` uses these)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from gateway.core.cluster import parse_nodes

__all__ = ["Parser",
    "SettingsError",
    "check_range",
    "convert",
    "parse_bool",
    "parse_level",
    "parse_list",
    "parse_nodes",
    "parse_optional_port",
    "parse_optional_str",
    "parse_redis_url",
    "redact_url_password",
    "setting",
]


class SettingsError(ValueError):
    """An invalid setting. The message names the environment variable (or flag)."""


Parser = Callable[[str], Any]
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError("expected one of 1/0, true/false, yes/no, on/off")


def parse_list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def parse_optional_str(raw: str) -> str | None:
    return raw.strip() or None


def parse_redis_url(raw: str) -> str | None:
    url = raw.strip()
    if not url:
        return None
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must start with redis://, rediss:// or unix://")
    return url


def parse_optional_port(raw: str) -> int | None:
    return int(raw.strip()) if raw.strip() else None


def parse_level(raw: str) -> str:
    return raw.strip().upper()


def redact_url_password(url: str) -> str:
    """``redis://user:secret@host`` -> ``redis://user:***@host``."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def convert(field: attrs.Attribute[Any], raw: str, name: str) -> Any:
    parse: Parser | None = field.metadata["parse"]
    if parse is None:
        parse = {"int": int, "float": float}.get(str(field.type), str)
    try:
        value = parse(raw.strip() if parse in (int, float) else raw)
    except ValueError as exc:
        raise SettingsError(f"{name}: invalid value {_shown(field, raw)}: {exc}") from None
    check_range(field, value, name)
    return value


def _shown(field: attrs.Attribute[Any], raw: str) -> str:
    # A URL may carry a password even when it is malformed.
    return "(hidden)" if field.metadata["secret"] or field.name == "redis_url" else repr(raw)


def check_range(field: attrs.Attribute[Any], value: Any, name: str) -> None:
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


def setting(
    default: Any,
    env: str,
    help: str,
    *,
    parse: Parser | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] | None = None,
    secret: bool = False,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """An attrs field of ``Settings``: its metadata names the variable, the parser, the range and the
    help line that ``docs/configuration.md`` is generated from."""
    meta = {
        "env": env,
        "help": help,
        "parse": parse,
        "minimum": minimum,
        "maximum": maximum,
        "choices": choices,
        "secret": secret,
    }
    if factory is not None:
        return attrs.field(factory=factory, metadata=meta)
    return attrs.field(default=default, metadata=meta)
