"""The `gateway` command, run as a real subprocess: configuration errors, token minting, publishing,
help texts and the generated configuration reference.

Every run gets a clean environment (no inherited setting variables), so the defaults apply unless
a test sets a variable on purpose.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import trio

from gateway.core.auth import verify_staff_token, verify_table_token
from gateway.redisio.client import make_client
from gateway.settings import (
    DEFAULT_JWT_SECRET,
    DEFAULT_TABLE_TOKEN_SECRET,
    Settings,
    settings_fields,
)

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = str(Path(sys.executable).with_name("gateway"))
# Generous: only there so that a command that wrongly starts serving cannot hang the suite.
TIMEOUT = 60


def clean_env(**variables: str) -> dict[str, str]:
    keep = ("PATH", "HOME", "TMPDIR", "LANG", "LC_ALL")
    env = {name: os.environ[name] for name in keep if name in os.environ}
    env.update(variables)
    return env


def run(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GATEWAY, *args], env=clean_env() if env is None else env, input=stdin,
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)


async def run_async(*args: str, env: dict[str, str], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    # In a Trio test: the test's event loop stays free while the command runs.
    with trio.fail_after(TIMEOUT):
        return await trio.run_process([GATEWAY, *args], env=env, stdin=stdin, capture_stdout=True,
                                      capture_stderr=True, check=False)


# --- configuration errors ----------------------------------------------------------------------


@pytest.mark.parametrize(("variable", "value"), [
    ("WS_GATEWAY_PORT", "abc"),
    ("WS_GATEWAY_PORT", "70000"),
    ("WS_MAX_CONNECTIONS_PER_USER", "0"),
    ("ENVIRONMENT", "moon"),
    ("LOG_LEVEL", "LOUD"),
    ("PRODUCTION_CHECK", "maybe"),
    ("WS_HANDSHAKE_TIMEOUT", "nan"),
    ("GATEWAY_INGEST_LINGER_MS", "-1"),
    ("GATEWAY_INGEST_LINGER_MS", "5ms"),
    ("GATEWAY_INGEST_LINGER_MS", "1001"),
])
def test_invalid_setting_exits_2_naming_the_variable(variable: str, value: str) -> None:
    result = run("serve", "--host", "127.0.0.1", env=clean_env(**{variable: value}))
    assert result.returncode == 2, result.stderr
    assert variable in result.stderr
    assert "Traceback" not in result.stderr


def test_redis_url_without_a_redis_scheme_exits_2_naming_it() -> None:
    result = run("serve", "--host", "127.0.0.1", "--port", "0", env=clean_env(REDIS_URL="localhost:6379"))
    assert result.returncode == 2
    assert "REDIS_URL" in result.stderr


@pytest.mark.parametrize("environment", ["production", "staging"])
def test_default_jwt_secret_is_refused_outside_development(environment: str) -> None:
    result = run("serve", "--host", "127.0.0.1", env=clean_env(ENVIRONMENT=environment))
    assert result.returncode == 2
    assert "JWT_SECRET" in result.stderr


def test_default_table_token_secret_is_refused_in_production() -> None:
    env = clean_env(ENVIRONMENT="production", JWT_SECRET="a-real-secret-of-enough-length-0123456789")
    result = run("serve", "--host", "127.0.0.1", env=env)
    assert result.returncode == 2
    assert "TABLE_TOKEN_SECRET" in result.stderr


STRONG = "s" * 40
STRONG_TABLE = "t" * 40
PRODUCTION_OK = {"ENVIRONMENT": "production", "JWT_SECRET": STRONG, "TABLE_TOKEN_SECRET": STRONG_TABLE,
                 "ALLOWED_ORIGINS": "https://app.example.com"}


def test_production_is_the_default_environment() -> None:
    assert Settings.from_env({}, serving=False).environment == "production"
    # With nothing configured the gateway refuses to start: it would otherwise take anyone's
    # tokens signed with the public default secret.
    result = run("serve", "--host", "127.0.0.1", "--port", "0")
    assert result.returncode == 2
    assert "JWT_SECRET" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("changes", "named"), [
    ({"JWT_SECRET": "short-secret-of-31-bytes-xxxxxx"}, "JWT_SECRET"),
    ({"TABLE_TOKEN_SECRET": "x" * 31}, "TABLE_TOKEN_SECRET"),
    ({"TABLE_TOKEN_SECRET": STRONG}, "TABLE_TOKEN_SECRET"),
    ({"GATEWAY_PUBLISH_TOKEN": "p" * 31}, "GATEWAY_PUBLISH_TOKEN"),
    ({"ALLOWED_ORIGINS": ""}, "ALLOWED_ORIGINS"),
    ({"ENVIRONMENT": "staging", "ALLOWED_ORIGINS": ""}, "ALLOWED_ORIGINS"),
])
def test_weak_settings_are_refused_outside_development(changes: dict[str, str], named: str) -> None:
    result = run("serve", "--host", "127.0.0.1", "--port", "0", env=clean_env(**{**PRODUCTION_OK, **changes}))
    assert result.returncode == 2, result.stderr
    assert named in result.stderr
    # The message names the variable, never its value.
    for name, value in changes.items():
        if value and name != "ENVIRONMENT":
            assert value not in result.stderr


def test_strong_settings_pass_the_production_checks() -> None:
    settings = Settings.from_env({**PRODUCTION_OK, "GATEWAY_PUBLISH_TOKEN": "p" * 32})
    assert settings.environment == "production"
    assert not settings.origin_bypass_active
    assert settings.default_secrets_in_use == []


def test_development_is_chosen_explicitly_and_says_what_is_unsafe() -> None:
    settings = Settings.from_env({"ENVIRONMENT": "development"})
    assert settings.origin_bypass_active
    assert settings.default_secrets_in_use == ["JWT_SECRET", "TABLE_TOKEN_SECRET"]


def test_invalid_flag_value_names_the_flag() -> None:
    result = run("serve", "--port", "abc")
    assert result.returncode == 2
    assert "--port" in result.stderr
    assert "Traceback" not in result.stderr


def test_flag_wins_over_the_environment() -> None:
    # The variable is valid and the flag is not: the error proves the flag was the value used.
    result = run("serve", "--max-connections-per-user", "0", env=clean_env(WS_MAX_CONNECTIONS_PER_USER="5"))
    assert result.returncode == 2
    assert "--max-connections-per-user" in result.stderr


def test_secrets_are_not_flags() -> None:
    result = run("serve", "--jwt-secret", "x")
    assert result.returncode == 2
    assert "unrecognized arguments" in result.stderr


# --- tokens ------------------------------------------------------------------------------------


def test_staff_token_is_accepted_with_the_default_settings() -> None:
    result = run("token", "staff", "--user", "7", "--tenant", "1", "--branch", "2", "--branch", "3",
                 "--role", "WAITER", "--role", "KITCHEN", "--sector", "4", "--ttl", "600")
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    settings = Settings.from_env({}, serving=False)
    claims = verify_staff_token(token, secret=DEFAULT_JWT_SECRET, issuer=settings.jwt_issuer,
                                audience=settings.jwt_audience, now=time.time())
    assert claims.user_id == 7
    assert claims.tenant_id == 1
    assert claims.branch_ids == {2, 3}
    assert claims.roles == {"WAITER", "KITCHEN"}
    assert claims.sector_ids == frozenset({4})
    assert 0 < claims.expires_at - time.time() <= 600


def test_staff_token_uses_the_configured_secret() -> None:
    result = run("token", "staff", "--user", "7", "--tenant", "1", "--branch", "2",
                 env=clean_env(JWT_SECRET="another-secret-for-this-test-0123456789"))
    assert result.returncode == 0, result.stderr
    settings = Settings.from_env({}, serving=False)
    claims = verify_staff_token(result.stdout.strip(), secret="another-secret-for-this-test-0123456789",
                                issuer=settings.jwt_issuer, audience=settings.jwt_audience, now=time.time())
    assert claims.roles == {"WAITER"}


@pytest.mark.parametrize("legacy", [False, True])
def test_table_token_is_accepted_with_the_default_settings(legacy: bool) -> None:
    args = ["token", "table", "--tenant", "1", "--branch", "2", "--table", "5", "--session", "9"]
    result = run(*args, *(["--legacy"] if legacy else []))
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert (len(token.split(":")) == 6) is legacy
    claims = verify_table_token(token, secret=DEFAULT_TABLE_TOKEN_SECRET, now=time.time())
    assert (claims.tenant_id, claims.branch_id, claims.table_id, claims.session_id) == (1, 2, 5, 9)


def test_token_with_missing_arguments_fails() -> None:
    result = run("token", "table", "--tenant", "1")
    assert result.returncode == 2
    assert "--branch" in result.stderr


# --- publish -----------------------------------------------------------------------------------


async def stream_entries(redis_url: str) -> list[dict[str, object]]:
    client = make_client(redis_url)
    async with client:
        entries = await client.xrange("events:critical")
    return [json.loads(e.field_values[b"data"]) for e in entries]


async def test_publish_appends_to_the_critical_stream(redis_url: str) -> None:
    result = await run_async("publish", "--type", "ROUND_READY", "--tenant", "1", "--branch", "2", "--table", "5",
                             "--session", "9", "--entity", '{"round_id": 3}', env=clean_env(REDIS_URL=redis_url))
    assert result.returncode == 0, result.stderr
    assert b"events:critical" in result.stdout
    [event] = await stream_entries(redis_url)
    assert event["type"] == "ROUND_READY"
    assert (event["tenant_id"], event["branch_id"], event["table_id"], event["session_id"]) == (1, 2, 5, 9)
    assert event["entity"] == {"round_id": 3}


async def test_publish_reads_an_envelope_from_stdin(redis_url: str) -> None:
    envelope = {"type": "ENTITY_UPDATED", "tenant_id": 1, "branch_id": 0, "entity": {"id": 4}}
    result = await run_async("publish", "-", env=clean_env(REDIS_URL=redis_url), stdin=json.dumps(envelope).encode())
    assert result.returncode == 0, result.stderr
    assert await stream_entries(redis_url) == [envelope]


async def test_publish_to_a_channel(redis_url: str) -> None:
    client = make_client(redis_url)
    async with client, client.pubsub(channels=["branch:2:waiters"]) as pubsub:
        result = await run_async("publish", "--channel", "branch:2:waiters", "--type", "TABLE_SESSION_STARTED",
                                 "--tenant", "1", "--branch", "2", "--redis-url", redis_url, env=clean_env())
        assert result.returncode == 0, result.stderr
        with trio.fail_after(10):
            async for message in pubsub:
                if message["type"] == "message":
                    break
    data = message["data"]
    assert isinstance(data, bytes)
    assert json.loads(data)["type"] == "TABLE_SESSION_STARTED"
    assert await stream_entries(redis_url) == []


@pytest.mark.parametrize(("args", "stdin", "expected"), [
    (["--type", "ROUND_READY"], b"", "--tenant"),
    (["--type", "ROUND_READY", "--tenant", "0"], b"", "bad_tenant"),
    (["--type", "ROUND_READY", "--tenant", "1", "--entity", "{not json"], b"", "--entity"),
    (["--type", "ROUND_READY", "--tenant", "1", "--entity", "[1, 2]"], b"", "--entity"),
    (["--type", "ROUND_READY", "--tenant", "1", "--actor", '"me"'], b"", "--actor"),
    (["-"], b"not json", "not_json"),
    (["-"], b'{"type": "ROUND_READY", "tenant_id": "1"}', "bad_tenant"),
    (["nonsense"], b"", "invalid choice"),
])
async def test_invalid_publish_input_fails_with_a_message(redis_url: str, args: list[str], stdin: bytes,
                                                          expected: str) -> None:
    result = await run_async("publish", *args, env=clean_env(REDIS_URL=redis_url), stdin=stdin)
    assert result.returncode != 0
    stderr = result.stderr.decode()
    assert expected in stderr
    assert "Traceback" not in stderr
    assert await stream_entries(redis_url) == []


def test_publish_without_redis_url_and_no_gateway_says_so() -> None:
    # Without a Redis URL the event goes through a running gateway's publish API.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run("publish", "--type", "ROUND_READY", "--tenant", "1", "--gateway", f"http://127.0.0.1:{port}")
    assert result.returncode == 1
    assert "no gateway answered" in result.stderr
    assert "REDIS_URL" in result.stderr
    assert "Traceback" not in result.stderr


def test_publish_to_a_channel_without_redis_url_says_so() -> None:
    result = run("publish", "--channel", "branch:2:waiters", "--type", "ROUND_READY", "--tenant", "1")
    assert result.returncode == 2
    assert "REDIS_URL" in result.stderr


@pytest.mark.parametrize("url", ["localhost:6379", "http://127.0.0.1:6379"])
def test_publish_to_a_url_that_is_not_redis_says_so(url: str) -> None:
    result = run("publish", "--type", "ROUND_READY", "--tenant", "1", "--redis-url", url)
    assert result.returncode == 2
    assert "redis://" in result.stderr
    assert "Traceback" not in result.stderr


def test_publish_to_an_unreachable_redis_fails_with_a_message() -> None:
    # A port that was just free: nothing listens there.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"redis://user:hunter2@127.0.0.1:{port}/0"
    result = run("publish", "--type", "ROUND_READY", "--tenant", "1", env=clean_env(REDIS_URL=url))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"127.0.0.1:{port}" in result.stderr
    assert "hunter2" not in result.stderr


# --- help and generated documentation ----------------------------------------------------------


@pytest.mark.parametrize("command", [
    [], ["serve"], ["token"], ["token", "staff"], ["token", "table"], ["publish"], ["config-doc"],
])
def test_help_works_and_shows_an_example(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "examples:" in result.stdout
    examples = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("gateway ")]
    assert any(line.split()[1:1 + len(command)] == command for line in examples), result.stdout


def test_token_examples_in_the_help_run() -> None:
    help_text = run("token", "--help").stdout
    examples = [line.strip() for line in help_text.splitlines() if line.strip().startswith("gateway token ")]
    assert examples
    for example in examples:
        result = run(*shlex.split(example)[1:])
        assert result.returncode == 0, (example, result.stderr)
        assert result.stdout.strip()


def test_configuration_doc_is_current() -> None:
    result = run("config-doc")
    assert result.returncode == 0, result.stderr
    committed = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == result.stdout, "docs/configuration.md is stale: run `gateway config-doc > docs/configuration.md`"


def test_configuration_doc_lists_every_variable() -> None:
    doc = run("config-doc").stdout
    for field in settings_fields():
        assert f"`{field.metadata['env']}`" in doc


def test_every_non_secret_setting_has_a_serve_flag() -> None:
    help_text = run("serve", "--help").stdout
    for field in settings_fields():
        flag = "--" + field.name.replace("_", "-")
        if field.metadata["secret"]:
            assert flag not in help_text, flag
        else:
            assert flag in help_text, flag
            assert field.metadata["env"] in help_text, field.metadata["env"]
