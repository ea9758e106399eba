"""Logs: tokens never appear, JSON lines carry the socket's context, repeats are counted."""

import json
import logging

import pytest

from gateway.logs import JsonFormatter, RateLimitedLog, TextFormatter, redact, redact_target
from gateway_testing import GatewayHandle

TOKEN = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiI3In0.c2lnbmF0dXJl"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f"/ws/waiter?token={TOKEN}", "/ws/waiter?token=***"),
        (f"/ws/diner?table_token={TOKEN}&x=1", "/ws/diner?table_token=***&x=1"),
        (f"/ws/catchup?branch_id=2&since=0&token={TOKEN}", "/ws/catchup?branch_id=2&since=0&token=***"),
        (f"Authorization: Bearer {TOKEN}", "Authorization: Bearer ***"),
        ("/ws/health", "/ws/health"),
    ],
)
def test_redact(text: str, expected: str) -> None:
    assert redact(text) == expected


def _record(msg: str, **extra: object) -> logging.LogRecord:
    record = logging.makeLogRecord({"name": "gateway.server", "levelname": "INFO", "levelno": 20, "msg": msg})
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_json_lines_carry_context_and_never_a_token() -> None:
    line = JsonFormatter().format(_record(f"rejected {TOKEN}?token={TOKEN}", conn=3, endpoint="waiter",
                                          tenant=1, target=f"/ws/waiter?token={TOKEN}"))
    data = json.loads(line)
    assert data["conn"] == 3 and data["endpoint"] == "waiter" and data["tenant"] == 1
    assert data["target"] == "/ws/waiter?token=***"
    assert TOKEN not in data["target"]
    text = TextFormatter().format(_record("x", target=f"/ws/waiter?token={TOKEN}"))
    assert TOKEN not in text


def test_repeated_bad_input_is_reported_as_counts(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("gateway.test-ratelimit")
    limited = RateLimitedLog(logger, interval=3600)
    with caplog.at_level(logging.WARNING, logger="gateway.test-ratelimit"):
        for _ in range(1000):
            limited.warning("invalid event dropped", reason="not_json")
        limited.warning("invalid event dropped", reason="bad_tenant")
    assert len(caplog.records) == 2  # the first of each reason; the rest are counted
    assert {r.reason for r in caplog.records} == {"not_json", "bad_tenant"}  # type: ignore[attr-defined]


async def test_a_rejected_socket_logs_its_context_but_not_its_token(
    gateway: GatewayHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway")
    token = gateway.staff_token(roles=("KITCHEN",))  # valid token, wrong role for /ws/admin
    admin = await gateway.connect("admin", token)
    assert (await admin.closed())[0] == 4003
    rejected = [r for r in caplog.records if r.getMessage() == "socket rejected"]
    assert rejected, [r.getMessage() for r in caplog.records]
    record = rejected[0]
    assert record.endpoint == "admin" and record.reason == "role"  # type: ignore[attr-defined]
    assert record.tenant == 1 and record.user == 7  # type: ignore[attr-defined]
    for r in caplog.records:
        assert token not in JsonFormatter().format(r)


@pytest.mark.parametrize("target", [
    "/ws/waiter?token=SECRETVALUE",
    "/ws/waiter?tok%65n=SECRETVALUE",
    "/ws/waiter?%74oken=SECRETVALUE",
    "/ws/waiter?t%6Fken=SECRETVALUE",
    "/ws/diner?table_tok%65n=SECRETVALUE",
    "/ws/diner?TABLE_TOKEN=SECRETVALUE",
    "/ws/waiter?SECRETVALUE",
    "/ws/waiter?x=1&token=SECRETVALUE&token=SECRETVALUE",
    "/ws/catchup?branch_id=2&since=1.5&token=SECRET%56ALUE",
    "/ws/waiter?token%3DSECRETVALUE",
    "/ws/waiter?;token=SECRETVALUE",
])
def test_redact_target_hides_every_spelling_of_a_credential(target: str) -> None:
    shown = redact_target(target)
    assert "SECRET" not in shown
    assert shown.startswith(target.partition("?")[0])


def test_redact_target_keeps_what_helps_and_nothing_else() -> None:
    assert redact_target("/ws/catchup?branch_id=2&since=1.5&token=abc") == "/ws/catchup?branch_id=2&since=1.5&token=***"
    assert redact_target("/ws/diner?table_token=abc") == "/ws/diner?table_token=***"
    assert redact_target("/ws/waiter") == "/ws/waiter"
    assert redact_target("/ws/waiter?") == "/ws/waiter"
