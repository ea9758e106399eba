"""pytest plugin: run the real gateway inside a test suite. Opt-in: enable it with
``pytest -p gateway_testing`` or ``pytest_plugins = ["gateway_testing"]`` in a top-level conftest.

Install with ``pip install 'gateway[testing]'``; once enabled, the fixtures are:

- ``redis_server``: a private ``redis-server`` for the session (or ``GATEWAY_TEST_REDIS_URL``);
- ``redis_url``: its URL, with the database flushed before each test;
- ``gateway``: a running gateway on a free port (function scope), a :class:`GatewayHandle`;
- ``gateway_factory``: start gateways with custom settings, ``await gateway_factory(heartbeat_timeout=2)``;
- ``redis_sentinel`` / ``redis_cluster``: a master with a replica and three sentinels, or a
  three-master cluster, of the test's own (``gateway_testing.topologies``);
- ``publisher``: writes events the way the backend does (stream and channels);
- token factories and a WebSocket client factory on the handle: ``await gw.connect("waiter", token)``.

Async tests run under Trio (``trio_mode = true`` in the pytest configuration).
"""

from gateway_testing.fixtures import (
    gateway,
    gateway_factory,
    publisher,
    redis_cluster,
    redis_sentinel,
    redis_server,
    redis_url,
)
from gateway_testing.handle import (
    GatewayHandle,
    running_gateway,
    staff_token,
    table_token,
    test_settings,
)
from gateway_testing.publisher import Publisher, now_iso
from gateway_testing.sockets import DEFAULT_ORIGIN, NoMessage, WSClient

__all__ = [
    "DEFAULT_ORIGIN",
    "GatewayHandle",
    "NoMessage",
    "Publisher",
    "WSClient",
    "gateway",
    "gateway_factory",
    "now_iso",
    "publisher",
    "redis_cluster",
    "redis_sentinel",
    "redis_server",
    "redis_url",
    "running_gateway",
    "staff_token",
    "table_token",
    "test_settings",
]
