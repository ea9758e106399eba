"""Command line: ``gateway serve | token | publish | config-doc``.

Every ``serve`` flag is generated from the settings class, so ``gateway serve --help``,
the environment variables and ``docs/configuration.md`` always agree.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from gateway.settings import Settings, SettingsError, settings_fields

if TYPE_CHECKING:
    from gateway.redisio.topology import Topology

EXIT_CONFIG = 2
#: Seconds ``gateway publish`` waits for Redis before giving up with a message.
PUBLISH_TIMEOUT = 15.0
REDIS_SCHEMES = ("redis", "rediss", "unix")

_MAIN_EPILOG = """examples:
  gateway serve --port 8001                  run the gateway (gateway serve --help: every setting)
  gateway token staff --user 7 --tenant 1 --branch 2 --role WAITER
  gateway publish --type ROUND_READY --tenant 1 --branch 2 --session 9
  gateway config-doc > docs/configuration.md
"""
_CONFIG_DOC_EPILOG = """examples:
  gateway config-doc > docs/configuration.md
"""
_SERVE_EPILOG = """examples:
  gateway serve                              embedded Redis, port 8001 (WS_GATEWAY_PORT)
  gateway serve --port 9001 --host 127.0.0.1
  REDIS_URL=redis://127.0.0.1:6379/0 JWT_SECRET=... ENVIRONMENT=production gateway serve
"""
_TOKEN_EPILOG = """examples:
  gateway token staff --user 7 --tenant 1 --branch 2 --role WAITER
  gateway token staff --user 1 --tenant 1 --branch 2 --branch 3 --role ADMIN --ttl 3600
  gateway token table --tenant 1 --branch 2 --table 5 --session 9
  gateway token table --tenant 1 --branch 2 --table 5 --session 9 --legacy
"""
_PUBLISH_EPILOG = """examples:
  gateway publish --type ROUND_READY --tenant 1 --branch 2 --table 5 --session 9 --entity '{"round_id": 3}'
  echo '{"type":"ENTITY_UPDATED","tenant_id":1,"branch_id":0}' | gateway publish -
  gateway publish --channel branch:2:waiters --type TABLE_SESSION_STARTED --tenant 1 --branch 2
Without --channel the event is appended to the critical stream (XADD ... data <json>), as the
backend's stream publishers do; with --channel it is PUBLISHed to that pub/sub channel.
Without REDIS_URL or --redis-url the event goes through a running gateway's publish API (--gateway,
default http://127.0.0.1:8001): a development gateway takes it from this machine with no token,
so `./scripts/serve` and then `gateway publish ...` deliver with no set-up.
"""


_DLQ_EPILOG = """examples:
  gateway dlq list                            one JSON line per dead letter (id, original_id, error, data, ...)
  gateway dlq replay 1764268800000-0          append that entry's data to the critical stream again
  gateway dlq replay --all                    replay everything (after fixing what made them fail)
A replayed entry is removed from the dead-letter stream; if it fails again it returns there.
"""


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("settings (each overrides its environment variable)")
    for field in settings_fields():
        meta = field.metadata
        if meta["secret"]:
            continue  # secrets only through the environment: never in argv / ps output
        default = "host name" if field.name == "instance_id" else field.default
        help_text = f"{meta['help']} [env {meta['env']}; default {default!r}]"
        kwargs: dict[str, Any] = {"dest": field.name, "default": None, "help": help_text, "metavar": "VALUE"}
        if meta["choices"]:
            kwargs["metavar"] = "{" + ",".join(meta["choices"]) + "}"
        group.add_argument(_flag(field.name), **kwargs)


def _settings_from(args: argparse.Namespace, *, serving: bool = False) -> Settings:
    overrides = {f.name: getattr(args, f.name, None) for f in settings_fields() if not f.metadata["secret"]}
    return Settings.from_env(serving=serving, **overrides)


def _cmd_serve(args: argparse.Namespace) -> int:
    import trio

    from gateway.app import run_until_signalled
    from gateway.logs import setup_logging

    settings = _settings_from(args, serving=True)
    setup_logging(settings.log_level, settings.log_format, settings.environment)
    trio.run(run_until_signalled, settings)
    return 0


def _cmd_token(args: argparse.Namespace) -> int:
    from gateway.core import tokens

    settings = _settings_from(argparse.Namespace())
    if args.kind == "staff":
        token = tokens.mint_staff_token(
            secret=settings.jwt_secret, issuer=settings.jwt_issuer, audience=settings.jwt_audience,
            user_id=args.user, tenant_id=args.tenant, branch_ids=args.branch or [], roles=args.role or ["WAITER"],
            ttl=args.ttl, sector_ids=args.sector or None, token_type=args.type,
        )
    else:
        mint = tokens.mint_legacy_table_token if args.legacy else tokens.mint_table_token
        token = mint(secret=settings.table_token_secret, tenant_id=args.tenant, branch_id=args.branch,
                     table_id=args.table, session_id=args.session, ttl=args.ttl)
    print(token)
    return 0


def _cmd_publish(args: argparse.Namespace) -> int:
    import trio

    from gateway.core.events import InvalidEvent, encode_envelope, envelope, parse_event

    if args.source == "-":
        payload = sys.stdin.buffer.read().strip()
    else:
        if args.type is None or args.tenant is None:
            print("gateway publish: --type and --tenant are required (or pass - to read JSON from stdin)",
                  file=sys.stderr)
            return EXIT_CONFIG
        try:
            entity = _json_object("--entity", args.entity)
            actor = _json_object("--actor", args.actor)
        except ValueError as exc:
            print(f"gateway publish: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        payload = encode_envelope(envelope(
            args.type, args.tenant, args.branch or 0, table_id=args.table, session_id=args.session,
            sector_id=args.sector, entity=entity, actor=actor,
        ))
    settings = _settings_from(argparse.Namespace())
    try:
        parse_event(payload, max_size=settings.max_message_size)
    except InvalidEvent as exc:
        print(f"gateway publish: invalid event: {exc.reason}", file=sys.stderr)
        return 1
    topology = _redis_topology(args, settings)
    if topology is None:
        if args.redis_url:
            print("gateway publish: the Redis URL must start with redis://, rediss:// or unix://", file=sys.stderr)
            return EXIT_CONFIG
        if args.channel:
            print("gateway publish: --channel needs REDIS_URL or --redis-url (the Redis the gateway reads); "
                  "without one, events go through a running gateway's publish API (--gateway)", file=sys.stderr)
            return EXIT_CONFIG
        return _publish_via_gateway(args.gateway, payload, settings.publish_token)

    async def send() -> str:
        from gateway.redisio.client import STREAM_MAXLEN, xadd_capped

        with trio.fail_after(PUBLISH_TIMEOUT):
            async with topology.client() as client:
                if args.channel:
                    receivers = await client.publish(args.channel, payload)
                    return f"published to {args.channel} ({receivers} subscribers)"
                entry = await xadd_capped(client, settings.stream, {"data": payload}, STREAM_MAXLEN)
                return f"appended to {settings.stream} as {entry.decode() if isinstance(entry, bytes) else entry}"

    from gateway.redisio.client import is_redis_failure

    try:
        print(trio.run(send))
    except Exception as exc:
        # A traceback would bury the one fact that matters: the Redis named here did not answer.
        if not (is_redis_failure(exc) or isinstance(exc, trio.TooSlowError | ValueError)):
            raise
        print(f"gateway publish: cannot publish to {topology.describe()}: {_first_error(exc)}", file=sys.stderr)
        return 1
    return 0


def _redis_topology(args: argparse.Namespace, settings: Settings) -> Topology | None:
    """The Redis the operator tools talk to: ``--redis-url``, else the gateway's own deployment
    settings (``REDIS_SENTINELS``/``REDIS_CLUSTER_NODES``, else ``REDIS_URL``). None when there is
    none, or the URL is not a Redis one."""
    from gateway.redisio.topology import Standalone, topology_of

    if args.redis_url:
        return Standalone(args.redis_url) if args.redis_url.partition("://")[0] in REDIS_SCHEMES else None
    if settings.redis_sentinels or settings.redis_cluster_nodes:
        return topology_of(settings, None)
    return Standalone(settings.redis_url) if settings.redis_url else None


def _publish_via_gateway(base: str, payload: bytes, token: str | None) -> int:
    """POST the envelope to a running gateway's ``/ws/publish`` (D19): the way to reach a gateway
    whose Redis is its own embedded one. A development gateway takes it from this machine with no
    token; any other needs GATEWAY_PUBLISH_TOKEN."""
    import urllib.error
    import urllib.request

    url = base.rstrip("/") + "/ws/publish"
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=payload, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=PUBLISH_TIMEOUT) as response:
            answer = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode(errors="replace")[:200]
        hint = " (set GATEWAY_PUBLISH_TOKEN, or REDIS_URL to publish to Redis directly)" if exc.code in (401, 404) else ""
        print(f"gateway publish: {url} answered {exc.code} {detail}{hint}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"gateway publish: no gateway answered at {url} ({_first_error(exc)}); start one with "
              "./scripts/serve, pass --gateway, or set REDIS_URL", file=sys.stderr)
        return 1
    print(f"appended to {answer.get('stream', 'the stream')} as {answer.get('id')} through {url}")
    return 0


def _json_object(flag: str, raw: str | None) -> dict[str, Any] | None:
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{flag} must be a JSON object: {exc}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag} must be a JSON object, not {type(value).__name__}")
    return value


def _first_error(exc: BaseException) -> str:
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return str(exc) or type(exc).__name__


def _cmd_dlq(args: argparse.Namespace) -> int:
    import trio

    from gateway.ingest.dlq import list_dead_letters, replay_dead_letters
    from gateway.redisio.client import is_redis_failure

    settings = _settings_from(argparse.Namespace())
    topology = _redis_topology(args, settings)
    if topology is None:
        print("gateway dlq: set REDIS_URL or --redis-url to the Redis the gateways read "
              "(redis://, rediss:// or unix://), or REDIS_SENTINELS / REDIS_CLUSTER_NODES", file=sys.stderr)
        return EXIT_CONFIG

    async def run() -> list[str]:
        with trio.fail_after(PUBLISH_TIMEOUT):
            async with topology.client() as client:
                if args.action == "list":
                    letters = await list_dead_letters(client, settings.dead_letter_stream, count=args.count)
                    return [json.dumps(d.as_dict(), ensure_ascii=False) for d in letters]
                ids = None if args.all else args.ids
                replayed = await replay_dead_letters(client, settings.dead_letter_stream, settings.stream, ids)
                return [f"replayed {entry_id} to {settings.stream}" for entry_id in replayed]

    if args.action == "replay" and not args.all and not args.ids:
        print("gateway dlq replay: name the entry ids to replay, or --all", file=sys.stderr)
        return EXIT_CONFIG
    try:
        lines = trio.run(run)
    except Exception as exc:
        if not (is_redis_failure(exc) or isinstance(exc, trio.TooSlowError)):
            raise
        print(f"gateway dlq: cannot reach {topology.describe()}: {_first_error(exc)}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    if args.action == "replay" and not lines:
        print("gateway dlq replay: nothing to replay", file=sys.stderr)
    return 0


def _cmd_config_doc(args: argparse.Namespace) -> int:
    sys.stdout.write(configuration_markdown())
    return 0


def configuration_markdown() -> str:
    """``docs/configuration.md``, generated from the settings class."""
    lines = [
        "# Configuration",
        "",
        "Generated by `gateway config-doc` from the settings class; a test fails when this page is stale.",
        "Every setting is read from its environment variable; `gateway serve` also takes the flag",
        "(flags win). Secrets are read from the environment only. An invalid value stops start-up",
        "with exit code 2 and a message naming the variable.",
        "",
        "| Environment variable | Flag | Default | Valid values | Meaning |",
        "|---|---|---|---|---|",
    ]
    for field in settings_fields():
        meta = field.metadata
        default = field.default
        if field.name == "instance_id":
            default = "the host name"
        elif meta["secret"] and default:
            default = f"`{default}` (development only)"
        elif default is None or default == ():
            default = "unset"
        elif isinstance(default, bool):
            default = f"`{str(default).lower()}`"
        else:
            default = f"`{default}`"
        if meta["choices"]:
            valid = ", ".join(f"`{c}`" for c in meta["choices"])
        elif meta["minimum"] is not None:
            valid = f"{meta['minimum']} – {meta['maximum']}"
        elif str(field.type) == "bool":
            valid = "1/0, true/false, yes/no, on/off"
        else:
            valid = "text"
        flag = "(environment only)" if meta["secret"] else f"`{_flag(field.name)}`"
        help_text = meta["help"].replace("|", "\\|")
        lines.append(f"| `{meta['env']}` | {flag} | {default} | {valid} | {help_text} |")
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gateway", description="Integrador real-time WebSocket gateway.",
                                     epilog=_MAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway", epilog=_SERVE_EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           description="Run the gateway. Without REDIS_URL it starts a private redis-server child.")
    _add_setting_flags(serve)
    serve.set_defaults(func=_cmd_serve)

    token = sub.add_parser("token", help="mint a development token with the configured secrets",
                           epilog=_TOKEN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = token.add_subparsers(dest="kind", required=True)
    staff = kinds.add_parser("staff", help="staff JWT (Dashboard, pwaWaiter)", epilog=_TOKEN_EPILOG,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    staff.add_argument("--user", type=int, required=True)
    staff.add_argument("--tenant", type=int, required=True)
    staff.add_argument("--branch", type=int, action="append", help="repeat for several branches")
    staff.add_argument("--role", action="append", choices=["WAITER", "KITCHEN", "MANAGER", "ADMIN"],
                       help="repeat for several roles (default WAITER)")
    staff.add_argument("--sector", type=int, action="append", help="sector_ids claim; repeat for several")
    staff.add_argument("--ttl", type=float, default=900, help="seconds (default 900)")
    staff.add_argument("--type", default="access", choices=["access", "refresh"])
    staff.set_defaults(func=_cmd_token)
    table = kinds.add_parser("table", help="table token (pwaMenu)", epilog=_TOKEN_EPILOG,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("tenant", "branch", "table", "session"):
        table.add_argument(f"--{name}", type=int, required=True)
    table.add_argument("--ttl", type=float, default=10800, help="seconds (default 10800)")
    table.add_argument("--legacy", action="store_true", help="the six-field HMAC format instead of a JWT")
    table.set_defaults(func=_cmd_token)

    publish = sub.add_parser("publish", help="publish one event envelope", epilog=_PUBLISH_EPILOG,
                             formatter_class=argparse.RawDescriptionHelpFormatter)
    publish.add_argument("source", nargs="?", choices=["-"], metavar="-", help="- to read the envelope JSON from stdin")
    publish.add_argument("--type")
    publish.add_argument("--tenant", type=int)
    publish.add_argument("--branch", type=int)
    publish.add_argument("--table", type=int)
    publish.add_argument("--session", type=int)
    publish.add_argument("--sector", type=int)
    publish.add_argument("--entity", help="JSON object")
    publish.add_argument("--actor", help="JSON object")
    publish.add_argument("--channel", help="PUBLISH to this channel instead of appending to the stream")
    publish.add_argument("--redis-url", help="default: REDIS_URL")
    publish.add_argument("--gateway", default="http://127.0.0.1:8001",
                         help="without a Redis URL: the running gateway whose publish API takes the event "
                              "(default http://127.0.0.1:8001)")
    publish.set_defaults(func=_cmd_publish)

    dlq = sub.add_parser("dlq", help="inspect or replay the dead-letter stream", epilog=_DLQ_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    dlq.add_argument("action", choices=["list", "replay"])
    dlq.add_argument("ids", nargs="*", help="entry ids to replay (from `gateway dlq list`)")
    dlq.add_argument("--all", action="store_true", help="replay every entry")
    dlq.add_argument("--count", type=int, default=100, help="entries to list (default 100)")
    dlq.add_argument("--redis-url", help="default: REDIS_URL")
    dlq.set_defaults(func=_cmd_dlq)

    doc = sub.add_parser("config-doc", help="print docs/configuration.md", epilog=_CONFIG_DOC_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter,
                         description="Print the settings reference (Markdown), generated from the settings class.")
    doc.set_defaults(func=_cmd_config_doc)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except SettingsError as exc:
        print(f"gateway: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130



