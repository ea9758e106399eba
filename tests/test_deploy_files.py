"""The deployment files agree with the code.

No container engine runs here, so the Containerfile, compose.yaml, nginx.conf, the Prometheus
rules and the Grafana dashboard are checked for consistency instead: ports, routes, the user, the
entry point, setting names, and every metric name and label against a live gateway's /ws/metrics.
"""

from __future__ import annotations

import json
import re
import shlex
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import yaml  # type: ignore[import-untyped]
from prometheus_client import Counter, Gauge, Histogram

from gateway.cli import build_parser
from gateway.metrics import Metrics
from gateway.serving.http import ROUTES
from gateway.settings import Settings, settings_fields
from gateway_testing import GatewayHandle

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "docs" / "deploy"
CONTAINERFILE = ROOT / "Containerfile"
COMPOSE = ROOT / "compose.yaml"
NGINX = DEPLOY / "nginx.conf"
ALERTS = DEPLOY / "prometheus-alerts.yml"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
OPERATIONS = ROOT / "docs" / "operations.md"

DEFAULTS = Settings.from_env({}, serving=False)
SETTING_ENVS = {f.metadata["env"] for f in settings_fields()}
#: Variables the Python base image and pip read; the only non-setting names the images may use.
RUNTIME_ENVS = {"PYTHONDONTWRITEBYTECODE", "PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR"}


# --- YAML ----------------------------------------------------------------------------------------
# PyYAML's safe loader, except that a key given twice in one mapping is an error: YAML forbids it,
# and a duplicated key in a deployment file silently drops the first value.


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)


def load_yaml(path: Path) -> Any:
    return parse_yaml(path.read_text())


def test_yaml_loader_handles_the_constructs_used() -> None:
    text = """
base: &b
  a: 1
  l: [x, "y z", 'q''s']
other:
  <<: *b
  a: 2
seq:
  - name: one
    expr: up == 0   # comment
  - plain
  -
    nested: true
text: |
  line 1
  line 2
after: "x: y"
"""
    value = parse_yaml(text)
    assert value == {
        "base": {"a": 1, "l": ["x", "y z", "q's"]},
        "other": {"a": 2, "l": ["x", "y z", "q's"]},
        "seq": [{"name": "one", "expr": "up == 0"}, "plain", {"nested": True}],
        "text": "line 1\nline 2\n",
        "after": "x: y",
    }
    for bad in ("a: b: c\n", "a:\n  - x\n   y: 1\n", "a: 1\na: 2\n", "a: *missing\n"):
        with pytest.raises(yaml.YAMLError):
            parse_yaml(bad)


# --- Containerfile ---------------------------------------------------------------------------------


def containerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in CONTAINERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = pending + line
        pending = ""
        instruction, _, args = full.strip().partition(" ")
        out.append((instruction.upper(), args.strip()))
    assert not pending, "Containerfile ends inside a continued line"
    return out


def instructions(name: str) -> list[str]:
    return [args for instr, args in containerfile() if instr == name]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in instructions("ENV"):
        for part in shlex.split(args):
            key, sep, value = part.partition("=")
            assert sep, f"ENV uses the key=value form: {args}"
            env[key] = value
    return env


def test_containerfile_port_matches_the_settings() -> None:
    assert DEFAULTS.port == 8001
    exposed = [int(p.split("/")[0]) for args in instructions("EXPOSE") for p in args.split()]
    assert exposed == [DEFAULTS.port]
    env = image_env()
    assert int(env["WS_GATEWAY_PORT"]) == DEFAULTS.port


def test_containerfile_env_names_are_settings() -> None:
    env = image_env()
    for name in env:
        assert name in SETTING_ENVS or name in RUNTIME_ENVS, f"Containerfile sets unknown variable {name}"
    # The image's own values are valid settings (secrets come from the runtime environment).
    settings = Settings.from_env({**env, "JWT_SECRET": "s" * 32, "TABLE_TOKEN_SECRET": "t" * 32,
                                  "ALLOWED_ORIGINS": "https://app.example.com"})
    assert settings.environment == "production"
    assert not settings.origin_bypass_active


def test_containerfile_healthcheck_hits_the_health_route() -> None:
    (health,) = instructions("HEALTHCHECK")
    _, _, command = health.partition("CMD")
    argv = exec_form(command.strip())
    paths = re.findall(r"/ws/[a-z/]+", " ".join(argv))
    assert paths == ["/ws/health"]
    assert "GET" in ROUTES["/ws/health"]
    assert "WS_GATEWAY_PORT" in argv[-1] and f"'{DEFAULTS.port}'" in argv[-1]


async def test_containerfile_healthcheck_command_passes_against_a_gateway(gateway: GatewayHandle) -> None:
    (health,) = instructions("HEALTHCHECK")
    argv = exec_form(health.partition("CMD")[2].strip())
    assert argv[0] == "python"
    result = await trio.run_process(
        [sys.executable, *argv[1:]], env={"WS_GATEWAY_PORT": str(gateway.port)}, check=False, capture_stderr=True
    )
    assert result.returncode == 0, result.stderr


def test_containerfile_runs_as_a_created_non_root_user() -> None:
    (user,) = instructions("USER")
    name = user.split(":")[0]
    assert name not in ("root", "0")
    runs = " && ".join(instructions("RUN"))
    created = re.search(r"useradd\b([^&;]*)\b" + re.escape(name) + r"\s*(?:$|&&|;)", runs)
    assert created, f"USER {name} is not created by a RUN useradd"
    uid = re.search(r"--uid\s+(\d+)", created.group(1))
    assert uid is None or int(uid.group(1)) != 0
    order = [instr for instr, _ in containerfile()]
    assert order.index("USER") > max(i for i, instr in enumerate(order) if instr == "RUN")


def test_containerfile_entrypoint_is_the_console_script_serve() -> None:
    (entrypoint,) = instructions("ENTRYPOINT")
    (cmd,) = instructions("CMD")
    assert exec_form(entrypoint) == ["gateway"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["gateway"].partition(":")
    imported = __import__(module, fromlist=[attr])
    assert callable(getattr(imported, attr))
    try:
        args = build_parser().parse_args(exec_form(cmd))
    except SystemExit:
        pytest.fail(f"CMD {cmd} is not a valid `gateway` command line")
    assert args.command == "serve"
    assert instructions("STOPSIGNAL") == ["SIGTERM"]


def test_containerfile_copies_what_exists() -> None:
    for args in instructions("COPY"):
        *sources, _dest = args.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY source {source} does not exist"


# --- compose.yaml ----------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    value = load_yaml(COMPOSE)
    assert isinstance(value, dict) and isinstance(value.get("services"), dict)
    return value


def gateway_services() -> dict[str, dict[str, Any]]:
    services = compose()["services"]
    found = {
        name: svc for name, svc in services.items()
        if isinstance(svc.get("build"), dict) and svc["build"].get("dockerfile") == "Containerfile"
    }
    assert len(found) >= 2, "compose.yaml runs several gateway instances"
    return found


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    assert isinstance(env, dict)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _interpolated(value: str) -> Iterator[str]:
    yield from re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", value)


def _resolve(value: str) -> str:
    """Compose interpolation with every variable unset except the required secrets."""
    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        if op.endswith("?"):
            return f"{name.lower()}-for-the-test-0123456789abcdef"
        return arg if op.endswith("-") else ""

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:?[-?])?([^}]*)\}", sub, value)


def test_compose_gateways_have_distinct_instance_ids_and_a_redis() -> None:
    services = compose()["services"]
    ids = []
    for name, svc in gateway_services().items():
        env = environment(svc)
        assert env.get("GATEWAY_INSTANCE_ID"), f"{name} sets no GATEWAY_INSTANCE_ID"
        ids.append(env["GATEWAY_INSTANCE_ID"])
        url = env.get("REDIS_URL", "")
        m = re.match(r"redis://([^:/]+)(?::(\d+))?/", url)
        assert m, f"{name}: REDIS_URL {url!r}"
        assert m.group(1) in services, f"{name}: REDIS_URL host {m.group(1)} is not a compose service"
        assert m.group(1) in svc.get("depends_on", []), f"{name} does not depend on {m.group(1)}"
    assert len(set(ids)) == len(ids), f"GATEWAY_INSTANCE_ID values repeat: {ids}"


def test_compose_env_names_are_settings() -> None:
    image = set(image_env())
    for name, svc in gateway_services().items():
        for key, value in environment(svc).items():
            assert key in SETTING_ENVS or key in image, f"{name}: {key} is not a setting"
            for var in _interpolated(value):
                assert var in SETTING_ENVS, f"{name}: ${{{var}}} is not a setting"


def test_compose_env_values_are_valid_settings() -> None:
    for name, svc in gateway_services().items():
        env = {**image_env(), **{k: _resolve(v) for k, v in environment(svc).items()}}
        settings = Settings.from_env(env)
        assert settings.instance_id == env["GATEWAY_INSTANCE_ID"], name
        assert settings.redis_url == env["REDIS_URL"], name


def _seconds(duration: str) -> float:
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration):
        total += float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    return total


def test_compose_gives_the_drain_time_to_finish() -> None:
    for name, svc in gateway_services().items():
        env = environment(svc)
        timeout = float(env.get("GATEWAY_SHUTDOWN_TIMEOUT", DEFAULTS.shutdown_timeout))
        grace = _seconds(str(svc.get("stop_grace_period", "10s")))
        assert grace > timeout, f"{name}: stop_grace_period {grace}s <= shutdown timeout {timeout}s"


def test_compose_redis_persists_with_aof() -> None:
    services = compose()["services"]
    command = services["redis"]["command"]
    words = command if isinstance(command, list) else command.split()
    assert words[words.index("--appendonly") + 1] == "yes"


def test_compose_mounts_the_nginx_config() -> None:
    nginx = compose()["services"]["nginx"]
    mounts = [v.split(":") for v in nginx["volumes"]]
    assert any((ROOT / src).resolve() == NGINX.resolve() and dst.endswith("nginx.conf") for src, dst, *_ in mounts)
    assert set(nginx["depends_on"]) >= set(gateway_services())


# --- nginx.conf ------------------------------------------------------------------------------------


def nginx_text() -> str:
    return "\n".join(line.split("#", 1)[0] for line in NGINX.read_text().splitlines())


def test_nginx_proxies_ws_with_the_upgrade_headers() -> None:
    text = nginx_text()
    assert text.count("{") == text.count("}")
    m = re.search(r"location\s+/ws/\s*\{(.*?)\n\s*\}", text, re.S)
    assert m, "no location /ws/"
    block = m.group(1)
    assert re.search(r"proxy_pass\s+http://ws_gateway\s*;", block)
    assert re.search(r"proxy_http_version\s+1\.1\s*;", block)
    assert re.search(r"proxy_set_header\s+Upgrade\s+\$http_upgrade\s*;", block)
    assert re.search(r"proxy_set_header\s+Connection\s+\$connection_upgrade\s*;", block)
    assert re.search(r"map\s+\$http_upgrade\s+\$connection_upgrade\s*\{[^}]*default\s+upgrade\s*;", text)
    # nginx must not cut a live socket before the gateway's own heartbeat timeout does.
    read_timeout = re.search(r"proxy_read_timeout\s+(\d+)s\s*;", block)
    assert read_timeout and int(read_timeout.group(1)) > DEFAULTS.heartbeat_timeout


def test_nginx_upstreams_are_the_compose_gateways() -> None:
    upstream = re.search(r"upstream\s+ws_gateway\s*\{(.*?)\}", nginx_text(), re.S)
    assert upstream
    servers = set(re.findall(r"server\s+([\w.-]+:\d+)", upstream.group(1)))
    assert servers == {f"{name}:{DEFAULTS.port}" for name in gateway_services()}


def test_nginx_never_logs_query_strings() -> None:
    formats = re.findall(r"log_format\s+\w+(.*?);", nginx_text(), re.S)
    assert formats
    for fmt in formats:
        assert "$uri" in fmt
        assert not re.search(r"\$(request(?![_a-z])|request_uri|args|query_string|arg_)", fmt), fmt


# --- metric names from a live gateway --------------------------------------------------------------


@attrs.frozen
class Exposition:
    #: Every name a PromQL selector can use, with the label names it can carry.
    labels: dict[str, frozenset[str]]


def _registered_labels() -> dict[str, frozenset[str]]:
    """Label names of the registry's families (labelled families may have no samples yet)."""
    out: dict[str, frozenset[str]] = {}
    for collector in vars(Metrics()).values():
        if not isinstance(collector, Counter | Gauge | Histogram):
            continue
        name, labels = vars(collector)["_name"], frozenset(vars(collector)["_labelnames"])
        if isinstance(collector, Counter):
            out[name + "_total"] = labels
        elif isinstance(collector, Histogram):
            out[name + "_bucket"] = labels | {"le"}
            out[name + "_sum"] = labels
            out[name + "_count"] = labels
        else:
            out[name] = labels
    assert out, "no instruments found on Metrics"
    return out


async def live_exposition(gateway: GatewayHandle) -> Exposition:
    response = await trio.to_thread.run_sync(lambda: httpx.get(f"{gateway.url}/ws/metrics", timeout=10))
    assert response.status_code == 200
    names: dict[str, set[str]] = {}
    for line in response.text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            if kind == "histogram":
                for suffix in ("_bucket", "_sum", "_count"):
                    names.setdefault(name + suffix, set())
            else:
                names.setdefault(name, set())
        elif line and not line.startswith("#"):
            m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s", line)
            assert m, line
            names.setdefault(m.group(1), set()).update(re.findall(r"(\w+)=\"", m.group(2) or ""))
    registered = _registered_labels()
    assert set(registered) <= set(names), "a registered family is missing from /ws/metrics"
    return Exposition({n: frozenset(v | registered.get(n, frozenset())) for n, v in names.items()})


#: Labels Prometheus itself attaches to every scraped series.
TARGET_LABELS = frozenset({"instance", "job"})


def check_expression(expr: str, exposition: Exposition) -> set[str]:
    """Assert that every metric and label in ``expr`` exists; returns the metrics used."""
    for pair in ("()", "{}", "[]"):
        assert expr.count(pair[0]) == expr.count(pair[1]), f"unbalanced {pair}: {expr}"
    without_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    without_ranges = re.sub(r"\[[^\]]*\]", "", without_strings)
    used: set[str] = set()
    for m in re.finditer(r"\b(wsgateway_[a-zA-Z0-9_:]*)\s*(\{[^}]*\})?", without_ranges):
        name, selector = m.group(1), m.group(2) or ""
        assert name in exposition.labels, f"{name} is not in /ws/metrics (expression: {expr})"
        used.add(name)
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector):
            assert label in exposition.labels[name] | TARGET_LABELS, f"{name} has no label {label!r}: {expr}"
    assert used, f"no gateway metric in {expr}"
    available = TARGET_LABELS.union(*(exposition.labels[n] for n in used))
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", without_strings):
        for label in filter(None, (part.strip() for part in group.split(","))):
            assert label in available, f"label {label!r} is on none of {sorted(used)}: {expr}"
    return used


def labels_of(used: set[str], exposition: Exposition) -> frozenset[str]:
    return TARGET_LABELS.union(*(exposition.labels[n] for n in used))


def test_expression_checker_catches_typos() -> None:
    exposition = Exposition({"wsgateway_closes_total": frozenset({"code"})})
    assert check_expression('sum by (code) (rate(wsgateway_closes_total{code="1001"}[5m]))', exposition) == {
        "wsgateway_closes_total"
    }
    for bad in (
        "rate(wsgateway_closes[5m])",
        'rate(wsgateway_closes_total{reason="x"}[5m])',
        "sum by (reason) (rate(wsgateway_closes_total[5m]))",
        "sum(rate(wsgateway_closes_total[5m])",
    ):
        with pytest.raises(AssertionError):
            check_expression(bad, exposition)


# --- prometheus-alerts.yml -------------------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    doc = load_yaml(ALERTS)
    assert isinstance(doc, dict) and set(doc) == {"groups"}
    rules: list[dict[str, Any]] = []
    group_names = []
    for group in doc["groups"]:
        assert set(group) <= {"name", "interval", "rules", "limit"}, group.keys()
        group_names.append(group["name"])
        assert group["rules"], group["name"]
        rules.extend(group["rules"])
    assert len(set(group_names)) == len(group_names)
    return rules


def test_alert_rules_are_well_formed() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(set(names)) == len(names), names
    headings = set(re.findall(r"^###\s+(\S+)\s*$", OPERATIONS.read_text(), re.M))
    for rule in rules:
        assert set(rule) <= {"alert", "expr", "for", "keep_firing_for", "labels", "annotations"}, rule
        assert re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", rule["alert"])
        assert isinstance(rule["expr"], str) and rule["expr"].strip()
        if "for" in rule:
            assert re.fullmatch(r"(\d+(ms|s|m|h|d|w|y))+", str(rule["for"])), rule["for"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"]
        anchor = annotations["runbook_url"].split("#", 1)[1]
        assert anchor == rule["alert"].lower(), annotations["runbook_url"]
        assert rule["alert"] in headings, f"docs/operations.md has no runbook heading for {rule['alert']}"


async def test_alert_rules_use_existing_metrics(gateway: GatewayHandle) -> None:
    exposition = await live_exposition(gateway)
    used: set[str] = set()
    for rule in alert_rules():
        rule_used = check_expression(rule["expr"], exposition)
        used |= rule_used
        for text in rule["annotations"].values():
            for label in re.findall(r"\$labels\.(\w+)", text):
                assert label in labels_of(rule_used, exposition), f"{rule['alert']}: $labels.{label}"
    required = {
        "wsgateway_breaker_state", "wsgateway_dlq_total", "wsgateway_redis_up", "wsgateway_draining",
        "wsgateway_slow_consumer_closes_total", "wsgateway_rejections_total", "wsgateway_events_invalid_total",
        "wsgateway_redis_errors_total", "wsgateway_events_received_total", "wsgateway_stream_acked_total",
    }
    assert required <= used, required - used


def test_alert_rules_named_in_the_brief() -> None:
    by_expr = {r["expr"].replace(" ", ""): r for r in alert_rules()}
    assert by_expr["wsgateway_breaker_state==2"]["for"] == "1m"
    assert by_expr["wsgateway_draining==1"]["for"] == "2m"
    assert "wsgateway_redis_up==0" in by_expr
    assert any("increase(wsgateway_dlq_total[10m])" in e and e.endswith(">0") for e in by_expr)


# --- grafana-dashboard.json ------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    value = json.loads(DASHBOARD.read_text())
    assert isinstance(value, dict)
    return value


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def test_dashboard_is_well_formed() -> None:
    dash = dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    assert dash["title"] and dash["uid"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in _panels(dash["panels"])]
    assert len(set(ids)) == len(ids)
    for panel in _panels(dash["panels"]):
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24 and grid["h"] > 0
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"], panel["title"]
        ref_ids = [t["refId"] for t in panel["targets"]]
        assert len(set(ref_ids)) == len(ref_ids)


async def test_dashboard_uses_existing_metrics(gateway: GatewayHandle) -> None:
    exposition = await live_exposition(gateway)
    dash = dashboard()
    used: set[str] = set()
    for panel in _panels(dash["panels"]):
        for target in panel.get("targets", []):
            expr = target["expr"].replace("$__rate_interval", "5m")
            metrics_used = check_expression(expr, exposition)
            used |= metrics_used
            for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", target.get("legendFormat", "")):
                assert label in labels_of(metrics_used, exposition), f"{panel['title']}: legend {label}"
    for variable in dash["templating"]["list"]:
        if variable["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+)\s*,\s*(\w+)\)", variable["definition"])
            assert m, variable["definition"]
            assert m.group(2) in labels_of(check_expression(m.group(1), exposition), exposition)
    required = {
        "wsgateway_open_connections", "wsgateway_frames_delivered_total", "wsgateway_events_received_total",
        "wsgateway_events_routed_total", "wsgateway_events_invalid_total", "wsgateway_events_duplicate_total",
        "wsgateway_delivery_latency_seconds_bucket", "wsgateway_closes_total", "wsgateway_rejections_total",
        "wsgateway_slow_consumer_closes_total", "wsgateway_breaker_state", "wsgateway_redis_up",
        "wsgateway_draining",
    }
    assert required <= used, required - used
    quantiles = {
        float(q) for panel in _panels(dash["panels"]) for t in panel.get("targets", [])
        for q in re.findall(r"histogram_quantile\(\s*([0-9.]+)\s*,", t["expr"])
    }
    assert {0.5, 0.99} <= quantiles


def test_nginx_limits_and_exposes_only_the_public_routes() -> None:
    text = nginx_text()
    public = re.search(r"map\s+\$uri\s+\$ws_public\s*\{(.*?)\}", text, re.S)
    assert public, "no map of public routes"
    for path in ("/ws/waiter", "/ws/kitchen", "/ws/admin", "/ws/diner", "/ws/catchup", "/ws/catchup/session",
                 "/ws/health"):
        assert any(re.fullmatch(pattern.lstrip("~"), path) if pattern.startswith("~") else pattern == path
                   for pattern, value in re.findall(r"(\S+)\s+(\d)\s*;", public.group(1)) if value == "1"), path
    for path in ("/ws/metrics", "/ws/health/detailed", "/ws/publish"):
        assert not any(re.fullmatch(pattern.lstrip("~"), path) if pattern.startswith("~") else pattern == path
                       for pattern, value in re.findall(r"(\S+)\s+(\d)\s*;", public.group(1))
                       if value == "1"), path
    block = re.search(r"location\s+/ws/\s*\{(.*?)\n\s*\}", text, re.S)
    assert block
    assert re.search(r"if\s+\(\$ws_public\s*=\s*0\)\s*\{\s*return\s+404;\s*\}", block.group(1))
    assert re.search(r"limit_conn\s+ws_conn_per_ip\s+\d+\s*;", block.group(1))
    assert re.search(r"limit_req\s+zone=ws_req_per_ip", block.group(1))
