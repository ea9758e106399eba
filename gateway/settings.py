"""The one settings class.

Every setting is an attrs field whose metadata names its environment variable, its command-line
flag, its valid range and a help line. ``Settings.from_env`` reads the environment (the existing
gateway's names where it had one), the CLI overlays flags, and ``docs/configuration.md`` is
generated from the same metadata (``gateway config-doc``), so the three never disagree.
"""

from __future__ import annotations

import os
import socket
import zoneinfo
from collections.abc import Mapping
from typing import Any

import attrs

from gateway import settings_values as _values
from gateway.core.clientip import parse_networks
from gateway.core.cluster import key_slot, tagged
from gateway.core.credentials import Credentials
from gateway.settings_values import (
    SettingsError as SettingsError,  # re-exported: callers know it here
)
from gateway.settings_values import redact_url_password as redact_url_password
from gateway.settings_values import setting

# The parsers keep the names they had when they were defined here.
_check_range, _convert = _values.check_range, _values.convert
_parse_bool, _parse_level, _parse_list = _values.parse_bool, _values.parse_level, _values.parse_list
_parse_nodes, _parse_optional_port = _values.parse_nodes, _values.parse_optional_port
_parse_optional_str, _parse_redis_url = _values.parse_optional_str, _values.parse_redis_url

DEFAULT_JWT_SECRET = "dev-secret-change-me-in-production"
DEFAULT_TABLE_TOKEN_SECRET = "table-token-secret-change-me"
#: Shortest HS256 secret or publish token accepted outside development (RFC 7518 §3.2: a key of
#: at least the hash size).
MIN_SECRET_BYTES = 32
ENVIRONMENTS = ("development", "test", "staging", "production")
LOG_FORMATS = ("auto", "json", "text")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _hostname() -> str:
    return socket.gethostname() or "gateway"


@attrs.frozen(kw_only=True)
class Settings:
    # --- serving -------------------------------------------------------------------------------
    host: str = setting("0.0.0.0", "WS_GATEWAY_HOST", "Address to listen on.")
    port: int = setting(8001, "WS_GATEWAY_PORT", "TCP port for WebSocket and HTTP.", minimum=0, maximum=65535)
    environment: str = setting(
        "production", "ENVIRONMENT",
        "Deployment environment. Outside development the gateway refuses to start on default or weak "
        "secrets and without ALLOWED_ORIGINS; development is only ever chosen explicitly.",
        choices=ENVIRONMENTS,
    )
    production_check: bool = setting(
        False, "PRODUCTION_CHECK",
        "Set on production hosts: disables the development bypass for a missing Origin header (D2).",
        parse=_parse_bool,
    )
    allowed_origins: tuple[str, ...] = setting(
        (), "ALLOWED_ORIGINS",
        "Comma-separated exact Origin allow-list (WebSocket and CORS). Required outside development; "
        "empty in development: the 18 development origins and their https:// forms.",
        parse=_parse_list,
    )
    trusted_proxies: tuple[str, ...] = setting(
        (), "GATEWAY_TRUSTED_PROXIES",
        "Comma-separated addresses/networks of reverse proxies whose X-Forwarded-For is believed. Empty: none.",
        parse=_parse_list,
    )
    admin_host: str = setting(
        "127.0.0.1", "GATEWAY_ADMIN_HOST", "Address of the internal operations listener (see GATEWAY_ADMIN_PORT).",
    )
    admin_port: int | None = setting(
        None, "GATEWAY_ADMIN_PORT",
        "Serve /ws/metrics, /ws/health/detailed and /ws/publish only on this internal port (404 on the public "
        "one). Unset: every route on the public port.",
        parse=_parse_optional_port, minimum=0, maximum=65535,
    )
    max_pending_connections: int = setting(
        4096, "WS_MAX_PENDING_CONNECTIONS",
        "TCP connections not yet admitted as sockets (HTTP requests, handshakes, closes in progress) per "
        "process; beyond it new ones get a bare 503 before any parsing.", minimum=1, maximum=1000000,
    )
    max_pending_per_ip: int = setting(
        256, "WS_MAX_PENDING_PER_IP",
        "Connections not yet admitted from one peer address (proxies in GATEWAY_TRUSTED_PROXIES are exempt: "
        "limit them in the proxy); beyond it a bare 503.", minimum=1, maximum=1000000,
    )
    handshake_timeout: float = setting(
        5.0, "WS_HANDSHAKE_TIMEOUT", "Seconds a client has to send its request head (and upgrade).",
        minimum=0.1, maximum=120,
    )
    max_header_bytes: int = setting(
        16384, "WS_MAX_HEADER_BYTES", "Largest request head accepted (431 beyond).",
        minimum=1024, maximum=1048576,
    )
    max_body_bytes: int = setting(
        1048576, "WS_MAX_BODY_BYTES", "Largest HTTP request body accepted (413 beyond).",
        minimum=1024, maximum=16777216,
    )
    # --- credentials ---------------------------------------------------------------------------
    jwt_secret: str = setting(DEFAULT_JWT_SECRET, "JWT_SECRET", "HS256 secret of staff JWTs.", secret=True)
    jwt_issuer: str = setting("menu-ops", "JWT_ISSUER", "Required `iss` of staff JWTs.")
    jwt_audience: str = setting("menu-ops-users", "JWT_AUDIENCE", "Required `aud` of staff JWTs.")
    table_token_secret: str = setting(
        DEFAULT_TABLE_TOKEN_SECRET, "TABLE_TOKEN_SECRET", "Secret of table tokens (JWT and legacy HMAC).",
        secret=True,
    )
    max_token_lifetime: float = setting(
        86400.0, "GATEWAY_MAX_TOKEN_LIFETIME",
        "Longest credential lifetime accepted (exp minus iat, or exp minus now without iat), in seconds; "
        "longer-lived tokens are refused 4001.", minimum=60, maximum=31536000,
    )
    jwt_revalidation_interval: float = setting(
        300.0, "JWT_REVALIDATION_INTERVAL", "Seconds between revocation checks of an open staff socket.",
        minimum=1, maximum=86400,
    )
    table_token_revalidation_interval: float = setting(
        1800.0, "TABLE_TOKEN_REVALIDATION_INTERVAL", "Seconds between re-verifications of an open diner socket.",
        minimum=1, maximum=86400,
    )
    # --- limits --------------------------------------------------------------------------------
    max_connections_per_user: int = setting(
        3, "WS_MAX_CONNECTIONS_PER_USER", "Open sockets per staff user, across every instance on one Redis (D23; "
        "per process while Redis does not answer); beyond it HTTP 429 before the upgrade.", minimum=1, maximum=10000,
    )
    max_connections_per_session: int = setting(
        10, "WS_MAX_CONNECTIONS_PER_SESSION", "Open diner sockets per table session, across every instance on one "
        "Redis as WS_MAX_CONNECTIONS_PER_USER; beyond it HTTP 429 before the upgrade.",
        minimum=1, maximum=10000,
    )
    max_total_connections: int = setting(
        10000, "WS_MAX_TOTAL_CONNECTIONS", "Open sockets per process (1013 beyond).", minimum=1, maximum=1000000,
    )
    lease_ttl: float = setting(
        30.0, "GATEWAY_LEASE_TTL",
        "Seconds a socket's lease in the cluster-wide limits lasts unless renewed (every third of it): a killed "
        "instance's sockets stop counting against the per-user and per-session limits within this time (D23).",
        minimum=2, maximum=3600,
    )
    connect_rate_per_user: int = setting(
        60, "WS_CONNECT_RATE_PER_USER",
        "Connection attempts per staff user (per table session for diners) per window, cluster-wide; "
        "beyond it HTTP 429 with Retry-After. 0: off.", minimum=0, maximum=1000000,
    )
    connect_rate_per_ip: int = setting(
        1200, "WS_CONNECT_RATE_PER_IP",
        "Connection attempts per client address per window, cluster-wide (proxies in GATEWAY_TRUSTED_PROXIES "
        "are exempt; their clients count by X-Forwarded-For); beyond it HTTP 429 with Retry-After. 0: off.",
        minimum=0, maximum=10000000,
    )
    connect_rate_window: float = setting(
        60.0, "WS_CONNECT_RATE_WINDOW", "Window of the connection attempt rates, in seconds.", minimum=1, maximum=86400,
    )
    heartbeat_timeout: float = setting(
        60.0, "WS_HEARTBEAT_TIMEOUT", "A socket silent this long is closed 1001 by the sweeper.",
        minimum=1, maximum=86400,
    )
    heartbeat_sweep_interval: float = setting(
        30.0, "WS_HEARTBEAT_SWEEP_INTERVAL", "Seconds between heartbeat sweeps.", minimum=0.1, maximum=3600,
    )
    max_message_size: int = setting(
        65536, "WS_MAX_MESSAGE_SIZE", "Largest inbound text message in characters (1009 beyond); also the "
        "largest event accepted from Redis, in bytes.", minimum=16, maximum=16777216,
    )
    max_frames_per_message: int = setting(
        32, "WS_MAX_FRAMES_PER_MESSAGE", "Frames one inbound message may be split into (1009 beyond).",
        minimum=1, maximum=100000,
    )
    message_rate_limit: int = setting(
        30, "WS_MESSAGE_RATE_LIMIT",
        "Inbound frames (data, continuation, ping and pong alike) allowed per window (4029 beyond).",
        minimum=1, maximum=100000,
    )
    message_rate_window: float = setting(
        1.0, "WS_MESSAGE_RATE_WINDOW", "Sliding window of the message rate limit, in seconds.",
        minimum=0.01, maximum=3600,
    )
    send_queue_max_bytes: int = setting(
        1048576, "WS_SEND_QUEUE_MAX_BYTES",
        "Bytes queued for one socket beyond what the kernel took; past it the socket is closed 1013 "
        "\"Slow consumer\".", minimum=1024, maximum=1073741824,
    )
    # --- fan-out -------------------------------------------------------------------------------
    broadcast_queue_size: int = setting(
        10000, "GATEWAY_BROADCAST_QUEUE", "Events buffered between Redis readers and broadcast workers.",
        minimum=1, maximum=1000000,
    )
    direct_write: bool = setting(
        True, "GATEWAY_DIRECT_WRITE",
        "Write a frame straight to an idle socket instead of waking its writer task.", parse=_parse_bool,
    )
    ingest_linger_ms: int = setting(
        5, "GATEWAY_INGEST_LINGER_MS",
        "While events flow, milliseconds each Redis reader waits between reads so one read carries them "
        "all (less CPU per event, at most this much more latency per reader); 0: read at once.",
        minimum=0, maximum=1000,
    )
    dedup_window: float = setting(
        10.0, "GATEWAY_DEDUP_WINDOW", "Seconds within which copies of one logical event are delivered once (D10).",
        minimum=0, maximum=3600,
    )
    dedup_ts_tolerance: float = setting(
        1.0, "GATEWAY_DEDUP_TS_TOLERANCE",
        "Copies whose publisher `ts` differ by more than this many seconds are distinct events.",
        minimum=0, maximum=3600,
    )
    # --- Redis ---------------------------------------------------------------------------------
    redis_url: str | None = setting(
        None, "REDIS_URL", "Redis to use (redis://, rediss://, unix://). Unset: start a private redis-server child (D18).",
        parse=_parse_redis_url,
    )
    redis_sentinels: tuple[tuple[str, int], ...] = setting(
        (), "REDIS_SENTINELS",
        "Comma-separated host:port of Redis Sentinels (instead of REDIS_URL); the gateway follows the "
        "master they name, with REDIS_SENTINEL_MASTER.", parse=_parse_nodes,
    )
    redis_sentinel_master: str | None = setting(
        None, "REDIS_SENTINEL_MASTER", "Name of the master the sentinels monitor (`sentinel monitor <name> ...`).",
        parse=_parse_optional_str,
    )
    redis_sentinel_password: str | None = setting(
        None, "REDIS_SENTINEL_PASSWORD", "Password of the sentinels themselves (their requirepass), if any.",
        parse=_parse_optional_str, secret=True,
    )
    redis_cluster_nodes: tuple[tuple[str, int], ...] = setting(
        (), "REDIS_CLUSTER_NODES",
        "Comma-separated host:port of some Redis Cluster nodes (instead of REDIS_URL); the rest is discovered.",
        parse=_parse_nodes,
    )
    redis_username: str | None = setting(
        None, "REDIS_USERNAME", "ACL user of the data nodes with REDIS_SENTINELS or REDIS_CLUSTER_NODES.",
        parse=_parse_optional_str,
    )
    redis_password: str | None = setting(
        None, "REDIS_PASSWORD", "Password of the data nodes with REDIS_SENTINELS or REDIS_CLUSTER_NODES "
        "(REDIS_URL carries its own).", parse=_parse_optional_str, secret=True,
    )
    redis_data_dir: str | None = setting(
        None, "GATEWAY_REDIS_DATA_DIR", "Embedded Redis only: keep its data here (AOF on). Unset: nothing on disk.",
        parse=_parse_optional_str,
    )
    instance_id: str = setting(
        None, "GATEWAY_INSTANCE_ID",
        "Stable name of this instance; names its consumer group on the stream (D14). Default: the host name.",
        factory=_hostname,
    )
    stream: str = setting("events:critical", "GATEWAY_STREAM", "Stream of critical events.")
    dlq_stream: str | None = setting(
        None, "GATEWAY_DLQ_STREAM",
        "Dead-letter stream. Default: `events:dlq`; on a cluster `{<stream>}:dlq`, since it must share the stream's slot.",
        parse=_parse_optional_str,
    )
    group_prefix: str = setting(
        "ws_gateway_group", "GATEWAY_GROUP_PREFIX", "Consumer groups are named `<prefix>:<instance id>`.",
    )
    stream_batch: int = setting(
        100, "GATEWAY_STREAM_BATCH", "Entries read per XREADGROUP.", minimum=1, maximum=10000,
    )
    stream_block_ms: int = setting(
        1000, "GATEWAY_STREAM_BLOCK_MS", "XREADGROUP BLOCK in milliseconds.", minimum=1, maximum=60000,
    )
    reclaim_idle: float = setting(
        30.0, "GATEWAY_RECLAIM_IDLE", "Seconds a read but unacknowledged stream entry waits before it is reclaimed.",
        minimum=0.01, maximum=86400,
    )
    reclaim_interval: float = setting(
        30.0, "GATEWAY_RECLAIM_INTERVAL", "Seconds between passes that reclaim idle pending entries.",
        minimum=0.01, maximum=86400,
    )
    group_stale_after: float = setting(
        86400.0, "GATEWAY_GROUP_STALE_AFTER",
        "Consumer groups of other instances idle this long are deleted so they never pin stream memory.",
        minimum=1, maximum=31536000,
    )
    breaker_failures: int = setting(
        5, "GATEWAY_BREAKER_FAILURES", "Consecutive failures of one Redis path that open its circuit breaker.",
        minimum=1, maximum=1000,
    )
    breaker_recovery: float = setting(
        30.0, "GATEWAY_BREAKER_RECOVERY", "Seconds an open breaker waits before it lets trial calls through.",
        minimum=0.01, maximum=3600,
    )
    breaker_trial_calls: int = setting(
        3, "GATEWAY_BREAKER_TRIAL_CALLS", "Successful trial calls that close a half-open breaker.",
        minimum=1, maximum=1000,
    )
    redis_backoff_base: float = setting(
        1.0, "GATEWAY_REDIS_BACKOFF_BASE", "First retry delay of a Redis reader, in seconds (doubles per failure).",
        minimum=0.01, maximum=60,
    )
    redis_backoff_cap: float = setting(
        30.0, "GATEWAY_REDIS_BACKOFF_CAP", "Longest retry delay of a Redis reader, before jitter.",
        minimum=0.01, maximum=3600,
    )
    catchup_window: float = setting(
        300.0, "GATEWAY_CATCHUP_WINDOW", "Seconds of events kept per branch for catch-up.", minimum=1, maximum=86400,
    )
    catchup_max_events: int = setting(
        100, "GATEWAY_CATCHUP_MAX_EVENTS", "Events kept per branch for catch-up.", minimum=1, maximum=100000,
    )
    resume_window: float = setting(
        300.0, "GATEWAY_RESUME_WINDOW", "Seconds of events a v2 client can resume per stream (D20).",
        minimum=1, maximum=86400,
    )
    resume_max_events: int = setting(
        1000, "GATEWAY_RESUME_MAX_EVENTS", "Newest events a v2 client can resume per stream, however old (D20).",
        minimum=1, maximum=100000,
    )
    resume_ttl: float = setting(
        86400.0, "GATEWAY_RESUME_TTL", "Seconds a stream with no new event is kept at all.", minimum=60, maximum=2592000,
    )
    # --- waiter sectors (§4.7) ----------------------------------------------------------------
    database_url: str | None = setting(
        None, "DATABASE_URL",
        "PostgreSQL with the table waiter_sector_assignment; unset: the database sector source is off.",
        parse=_parse_optional_str, secret=True,
    )
    sector_timezone: str = setting(
        "UTC", "GATEWAY_SECTOR_TIMEZONE", "Time zone whose local date selects today's sector assignments.",
    )
    sector_cache_ttl: float = setting(
        60.0, "GATEWAY_SECTOR_CACHE_TTL", "Seconds a successful database sector lookup is reused.",
        minimum=0, maximum=86400,
    )
    sector_lookup_timeout: float = setting(
        2.0, "GATEWAY_SECTOR_LOOKUP_TIMEOUT", "Seconds a sector lookup may take before it counts as failed.",
        minimum=0.1, maximum=60,
    )
    # --- operations ----------------------------------------------------------------------------
    publish_token: str | None = setting(
        None, "GATEWAY_PUBLISH_TOKEN", "Bearer token of POST /ws/publish. Unset: the endpoint is off.",
        parse=_parse_optional_str, secret=True,
    )
    console_enabled: bool = setting(
        False, "GATEWAY_CONSOLE",
        "Serve the live console at /ws/console outside development (always on in development); with "
        "GATEWAY_ADMIN_PORT set, on the internal listener only.",
        parse=_parse_bool,
    )
    drain_period: float = setting(
        3.0, "GATEWAY_DRAIN_PERIOD",
        "On SIGTERM, 1012 closes are spread over this many seconds so clients do not all reconnect at once.",
        minimum=0, maximum=3600,
    )
    shutdown_timeout: float = setting(
        10.0, "GATEWAY_SHUTDOWN_TIMEOUT", "Seconds a shutdown may take (drain included) before remaining sockets are dropped.",
        minimum=0.1, maximum=3600,
    )
    log_level: str = setting("INFO", "LOG_LEVEL", "Log level.", parse=_parse_level, choices=LOG_LEVELS)
    log_format: str = setting(
        "auto", "LOG_FORMAT", "json, text, or auto (text in development, JSON elsewhere).", choices=LOG_FORMATS,
    )

    # ------------------------------------------------------------------------------------------
    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *, serving: bool = True, **overrides: Any) -> Settings:
        """Read every setting from ``environ`` (default ``os.environ``), then apply ``overrides``.

        Raises ``SettingsError`` naming the variable for any value that does not parse or is out of
        range, and, when ``serving``, for default or weak secrets and a missing origin list outside
        development (commands that only mint tokens or publish skip those).
        """
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in attrs.fields(cls):
            env = field.metadata["env"]
            if env in environ:
                values[field.name] = _convert(field, environ[env], env)
        for name, raw in overrides.items():
            if raw is None:
                continue
            field = getattr(attrs.fields(cls), name)
            values[name] = _convert(field, raw, "--" + name.replace("_", "-")) if isinstance(raw, str) else raw
        settings = cls(**values)
        settings.check(serving=serving)
        return settings

    def check(self, *, serving: bool = True) -> None:
        for field in attrs.fields(type(self)):
            _check_range(field, getattr(self, field.name), field.metadata["env"])
        if serving and self.environment != "development":
            self._check_production()
        try:
            parse_networks(self.trusted_proxies)
        except ValueError as exc:
            raise SettingsError(f"GATEWAY_TRUSTED_PROXIES: {exc}") from None
        try:
            zoneinfo.ZoneInfo(self.sector_timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise SettingsError(f"GATEWAY_SECTOR_TIMEZONE: unknown time zone {self.sector_timezone!r}") from None
        if not self.instance_id or any(c.isspace() for c in self.instance_id):
            raise SettingsError("GATEWAY_INSTANCE_ID: must be a non-empty name without spaces")
        self._check_redis()

    def _check_redis(self) -> None:
        """One way to reach Redis, complete, with credentials only where they are used."""
        chosen = [name for name, value in (("REDIS_URL", self.redis_url), ("REDIS_SENTINELS", self.redis_sentinels),
                                           ("REDIS_CLUSTER_NODES", self.redis_cluster_nodes)) if value]
        if len(chosen) > 1:
            raise SettingsError(f"{chosen[1]}: set only one of REDIS_URL, REDIS_SENTINELS and REDIS_CLUSTER_NODES")
        if bool(self.redis_sentinels) != bool(self.redis_sentinel_master):
            missing = "REDIS_SENTINEL_MASTER" if self.redis_sentinels else "REDIS_SENTINELS"
            raise SettingsError(f"{missing}: REDIS_SENTINELS and REDIS_SENTINEL_MASTER go together")
        if self.redis_sentinel_password and not self.redis_sentinels:
            raise SettingsError("REDIS_SENTINEL_PASSWORD: only used with REDIS_SENTINELS")
        for name, value in (("REDIS_USERNAME", self.redis_username), ("REDIS_PASSWORD", self.redis_password)):
            if value and not (self.redis_sentinels or self.redis_cluster_nodes):
                raise SettingsError(f"{name}: only used with REDIS_SENTINELS or REDIS_CLUSTER_NODES "
                                    "(REDIS_URL carries its own credentials)")
        if self.redis_username and not self.redis_password:
            raise SettingsError("REDIS_USERNAME: needs REDIS_PASSWORD")
        if self.redis_cluster_nodes and key_slot(self.dead_letter_stream) != key_slot(self.stream):
            raise SettingsError(f"GATEWAY_DLQ_STREAM: on a cluster it must share the slot of {self.stream!r} "
                                f"(dead letters and acknowledgements go in one write), e.g. {tagged(self.stream)}:dlq")

    def _check_production(self) -> None:
        """Outside development a gateway never starts on a secret anyone could know or guess."""
        env = f"ENVIRONMENT={self.environment}"
        for name, value, default in (("JWT_SECRET", self.jwt_secret, DEFAULT_JWT_SECRET),
                                     ("TABLE_TOKEN_SECRET", self.table_token_secret, DEFAULT_TABLE_TOKEN_SECRET)):
            if value == default:
                raise SettingsError(f"{name}: the default secret is refused when {env}")
            if len(value.encode()) < MIN_SECRET_BYTES:
                raise SettingsError(f"{name}: shorter than {MIN_SECRET_BYTES} bytes, refused when {env}")
        if self.jwt_secret == self.table_token_secret:
            raise SettingsError(f"TABLE_TOKEN_SECRET: must differ from JWT_SECRET when {env}")
        if self.publish_token is not None and len(self.publish_token.encode()) < MIN_SECRET_BYTES:
            raise SettingsError(f"GATEWAY_PUBLISH_TOKEN: shorter than {MIN_SECRET_BYTES} bytes, refused when {env}")
        if not self.allowed_origins:
            raise SettingsError(f"ALLOWED_ORIGINS: must be set when {env} (the built-in list is for development)")

    @property
    def default_secrets_in_use(self) -> list[str]:
        """Names of the secrets still at their public defaults (development warns about them)."""
        return [name for name, value, default in (("JWT_SECRET", self.jwt_secret, DEFAULT_JWT_SECRET),
                                                  ("TABLE_TOKEN_SECRET", self.table_token_secret,
                                                   DEFAULT_TABLE_TOKEN_SECRET))
                if value == default]

    # --- derived values ------------------------------------------------------------------------
    def credentials(self) -> Credentials:
        return Credentials(jwt_secret=self.jwt_secret, jwt_issuer=self.jwt_issuer, jwt_audience=self.jwt_audience,
                           table_token_secret=self.table_token_secret, max_lifetime=self.max_token_lifetime)

    @property
    def origin_bypass_active(self) -> bool:
        """A missing Origin is accepted only in development without PRODUCTION_CHECK (D2)."""
        return self.environment == "development" and not self.production_check

    @property
    def dead_letter_stream(self) -> str:
        if self.dlq_stream is not None:
            return self.dlq_stream
        return f"{tagged(self.stream)}:dlq" if self.redis_cluster_nodes else "events:dlq"

    @property
    def consumer_group(self) -> str:
        return f"{self.group_prefix}:{self.instance_id}"

    def redacted(self) -> dict[str, Any]:
        """The settings as a dict with secrets masked, for logs and the detailed health page."""
        out: dict[str, Any] = {}
        for field in attrs.fields(type(self)):
            value = getattr(self, field.name)
            if field.metadata["secret"] and value:
                value = "***"
            elif field.name == "redis_url" and value:
                value = redact_url_password(value)
            out[field.name] = value
        return out


def settings_fields() -> tuple[attrs.Attribute[Any], ...]:
    return attrs.fields(Settings)
