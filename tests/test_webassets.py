"""The browser files the gateway serves (client library, types, console) and the development token
endpoint the console uses; also that ``browser/`` ships in the wheel (package data)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import trio

from gateway.core.auth import legacy_table_signature
from gateway.serving import webassets
from gateway_testing import GatewayHandle

Factory = Callable[..., Awaitable[GatewayHandle]]
ROOT = Path(__file__).resolve().parent.parent


async def request(method: str, url: str, **kwargs: Any) -> httpx.Response:
    return await trio.to_thread.run_sync(lambda: httpx.request(method, url, timeout=10, **kwargs))


def test_files_found_from_the_checkout() -> None:
    assert webassets.browser_root() == ROOT / "browser"
    assert {"/ws/client.js", "/ws/client/index.js", "/ws/client/client.js", "/ws/client.d.ts",
            "/ws/console", "/ws/console/console.js"} <= set(webassets.PATHS)
    for path in webassets.PATHS:
        assert webassets.lookup(path, console=True) is not None, path
    assert webassets.lookup("/ws/console", console=False) is None
    assert webassets.lookup("/ws/client/../../pyproject.toml", console=True) is None


async def test_library_modules_and_types_are_served(gateway: GatewayHandle) -> None:
    entry = await request("GET", gateway.url + "/ws/client.js")
    assert entry.status_code == 200
    assert entry.headers["content-type"] == "text/javascript; charset=utf-8"
    assert 'from "./client/index.js"' in entry.text
    index = await request("GET", gateway.url + "/ws/client/index.js")
    assert index.status_code == 200
    # Every relative import of every served module resolves to another served module.
    for path in [p for p in webassets.PATHS if p.startswith("/ws/client/")]:
        body = (await request("GET", gateway.url + path)).text
        for line in body.splitlines():
            if " from './" in line:
                target = "/ws/client/" + line.split(" from './")[1].split("'")[0]
                assert target in webassets.PATHS, (path, target)
    types = await request("GET", gateway.url + "/ws/client.d.ts")
    assert types.status_code == 200 and "class BaseWebSocketClient" in types.text
    assert (await request("HEAD", gateway.url + "/ws/client.js")).status_code == 200
    assert (await request("POST", gateway.url + "/ws/client.js")).status_code == 405
    assert (await request("GET", gateway.url + "/ws/client/nope.js")).status_code == 404


async def test_console_in_development_only_unless_enabled(gateway_factory: Factory) -> None:
    dev = await gateway_factory()
    page = await request("GET", dev.url + "/ws/console")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert (await request("GET", dev.url + "/ws/console/console.js")).status_code == 200
    prod = await gateway_factory(environment="production", jwt_secret="s" * 40, table_token_secret="t" * 40,
                                 allowed_origins="https://app.example.com")
    assert (await request("GET", prod.url + "/ws/console")).status_code == 404
    assert (await request("GET", prod.url + "/ws/console/console.js")).status_code == 404
    assert (await request("GET", prod.url + "/ws/client.js")).status_code == 200
    assert (await request("POST", prod.url + "/ws/dev/token", json={})).status_code == 404
    enabled = await gateway_factory(environment="production", jwt_secret="s" * 40, table_token_secret="t" * 40,
                                    allowed_origins="https://app.example.com", console_enabled=True)
    assert (await request("GET", enabled.url + "/ws/console")).status_code == 200
    assert (await request("POST", enabled.url + "/ws/dev/token", json={})).status_code == 404


async def test_dev_token_mints_with_the_gateway_secrets(gateway_factory: Factory) -> None:
    gw = await gateway_factory(publish_token="pub-secret")
    s = gw.settings
    answer = await request("POST", gw.url + "/ws/dev/token",
                           json={"kind": "staff", "user": 8, "roles": ["KITCHEN"], "branches": [2, 3], "ttl": 60})
    assert answer.status_code == 200
    body = answer.json()
    assert body["publish_token"] == "pub-secret"
    claims = jwt.decode(body["token"], s.jwt_secret, algorithms=["HS256"], audience=s.jwt_audience, issuer=s.jwt_issuer)
    assert (claims["sub"], claims["roles"], claims["branch_ids"], claims["exp"]) == ("8", ["KITCHEN"], [2, 3], body["exp"])
    table = (await request("POST", gw.url + "/ws/dev/token", json={"kind": "table", "session": 4})).json()
    assert jwt.decode(table["token"], s.table_token_secret, algorithms=["HS256"], audience="integrador:diner")["session_id"] == 4
    legacy = (await request("POST", gw.url + "/ws/dev/token", json={"kind": "legacy", "session": 4})).json()["token"]
    fields = legacy.split(":")
    assert fields[3] == "4" and fields[5] == legacy_table_signature(s.table_token_secret, ":".join(fields[:5]))
    for bad in ({"kind": "root"}, {"ttl": 0}, {"roles": "ADMIN"}, {"user": -1}, [1]):
        assert (await request("POST", gw.url + "/ws/dev/token", json=bad)).status_code == 422, bad
    assert (await request("POST", gw.url + "/ws/dev/token", content=b"{")).status_code == 422


@pytest.mark.slow
def test_wheel_ships_the_browser_files(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("gateway-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"gateway/serving/webassets.py", "gateway/_browser/src/index.js", "gateway/_browser/src/index.d.ts",
            "gateway/_browser/console/index.html", "gateway/_browser/console/console.js"} <= names
    assert not any("node_modules" in n or "/test/" in n for n in names)
    # The package list in pyproject.toml is explicit: every package of the tree must be in it.
    for init in [*ROOT.glob("gateway/**/__init__.py"), *ROOT.glob("gateway_*/__init__.py")]:
        assert init.relative_to(ROOT).as_posix() in names, init
    assert json.loads(zipfile.ZipFile(wheel).read("gateway/_browser/package.json"))["name"] == "@integrador/ws-client"


async def test_in_production_the_console_is_served_on_the_admin_listener_only(gateway_factory: Any) -> None:
    gw = await gateway_factory(environment="production", jwt_secret="s" * 32, table_token_secret="t" * 32,
                               allowed_origins="https://app.example.com", console_enabled=True, admin_port=0)
    admin = f"http://127.0.0.1:{gw.gw.admin_port}"
    assert (await request("GET", gw.url + "/ws/console")).status_code == 404
    assert (await request("GET", admin + "/ws/console")).status_code == 200
    # The library itself stays public: the apps import it from the gateway they talk to.
    assert (await request("GET", gw.url + "/ws/client.js")).status_code == 200
    assert (await request("POST", admin + "/ws/dev/token", json={})).status_code == 404
