"""Logging: JSON lines in production, readable lines in development, secrets redacted.

Tokens travel in query strings (``?token=...``, ``?table_token=...``): every URL is passed through
:func:`redact_target` before it is logged, and the formatters redact any ``token=`` that slips
into a message anyway.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any
from urllib.parse import parse_qsl, quote

_TOKEN_RE = re.compile(r"((?:table_)?token=)[^&\s\"']+", re.IGNORECASE)
_BEARER_RE = re.compile(r"(Bearer\s+)[^\s\"']+", re.IGNORECASE)
# LogRecord attributes that are not "extra" fields.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def redact(text: str) -> str:
    return _BEARER_RE.sub(r"\1***", _TOKEN_RE.sub(r"\1***", text))


#: Query parameters whose values are shown in logs; every other value, and any name not listed
#: here, is replaced by ``***``. Names are compared after decoding (``tok%65n`` is ``token``),
#: and an unknown name may itself be a credential (``?eyJhbGci...``).
_SHOWN_VALUES = frozenset({"branch_id", "session_id", "since"})
_SHOWN_NAMES = _SHOWN_VALUES | {"token", "table_token"}


def redact_target(target: str) -> str:
    """A request target as it may be logged: the path, and the decoded query with credentials masked."""
    path, _, query = target.partition("?")
    if not query:
        return path
    shown = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        shown_name = name if name in _SHOWN_NAMES else "***"
        shown_value = quote(value, safe="") if name in _SHOWN_VALUES else "***"
        shown.append(f"{shown_name}={shown_value}")
    return f"{path}?{'&'.join(shown)}" if shown else path


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": redact(record.getMessage()),
        }
        for key, value in _extras(record).items():
            out[key] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{stamp} {record.levelname:<7} {record.name}: {redact(record.getMessage())}"
        if extras:
            line += f" [{redact(extras)}]"
        if record.exc_info:
            line += "\n" + redact(self.formatException(record.exc_info))
        return line


def setup_logging(level: str, fmt: str, environment: str) -> None:
    use_json = fmt == "json" or (fmt == "auto" and environment != "development")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    root = logging.getLogger("gateway")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


class RateLimitedLog:
    """Repeated bad input is reported as counts: the first occurrence of a reason is logged at
    once, later ones are summed and logged at most once per ``interval`` (audit SCALE-HIGH-02)."""

    def __init__(self, logger: logging.Logger, interval: float = 60.0) -> None:
        self._logger = logger
        self._interval = interval
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, message: str, *, reason: str, **extra: Any) -> None:
        key = f"{message}|{reason}"
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        suppressed = self._suppressed.pop(key, 0)
        self._last[key] = now
        if len(self._last) > 1000:
            self._last.clear()
        self._logger.warning(message, extra={"reason": reason, "repeats_suppressed": suppressed, **extra})
