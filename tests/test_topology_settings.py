"""Sentinel and Cluster settings: every bad value gets a startup error naming its variable, and
the hash-slot arithmetic the cluster keys rely on agrees with Redis'."""

from __future__ import annotations

import pytest
from test_cli import clean_env, run

from gateway.core.cluster import hash_tag, key_slot, parse_nodes, tagged
from gateway.redisio.topology import Cluster, SentinelMaster, Standalone, topology_of
from gateway.settings import Settings, SettingsError


def settings(**env: str) -> Settings:
    return Settings.from_env({"ENVIRONMENT": "development", **env})


# Slots Redis itself reports (CLUSTER KEYSLOT on 7.0).
@pytest.mark.parametrize(("key", "slot"), [
    ("events:critical", 11560), ("foo", 12182), ("{user1000}.following", 3443), ("{user1000}.followers", 3443),
    ("foo{}{bar}", 8363), ("foo{{bar}}zap", 4015), ("foo{bar}{zap}", 5061), ("", 0),
])
def test_key_slot_matches_redis(key: str, slot: int) -> None:
    assert key_slot(key) == slot


def test_a_tagged_companion_shares_the_slot_of_the_untagged_name() -> None:
    assert key_slot(tagged("events:critical") + ":dlq") == key_slot("events:critical")
    assert hash_tag(b"a{}b") == b"a{}b"


def test_node_lists_parse() -> None:
    assert parse_nodes(" 10.0.0.1:26379, redis-b:26380 ,[::1]:7000") == (
        ("10.0.0.1", 26379), ("redis-b", 26380), ("::1", 7000))
    assert parse_nodes("") == ()


@pytest.mark.parametrize(("env", "message"), [
    ({"REDIS_SENTINELS": "10.0.0.1"}, "REDIS_SENTINELS: invalid value '10.0.0.1': '10.0.0.1' is not host:port"),
    ({"REDIS_SENTINELS": "a:0", "REDIS_SENTINEL_MASTER": "m"}, "the port must be a number from 1 to 65535"),
    ({"REDIS_SENTINELS": "a:x", "REDIS_SENTINEL_MASTER": "m"}, "the port must be a number from 1 to 65535"),
    ({"REDIS_SENTINELS": "a:1,a:1", "REDIS_SENTINEL_MASTER": "m"}, "REDIS_SENTINELS: invalid value 'a:1,a:1': a node is listed twice"),
    ({"REDIS_CLUSTER_NODES": "::1:7000"}, "REDIS_CLUSTER_NODES: invalid value '::1:7000': '::1:7000': write an IPv6 address in brackets"),
    ({"REDIS_CLUSTER_NODES": "[::1:7000"}, "is not [address]:port"),
    ({"REDIS_CLUSTER_NODES": "a b:7000"}, "a host name has no spaces"),
    ({"REDIS_CLUSTER_NODES": ":7000"}, "is not host:port"),
    ({"REDIS_SENTINELS": "a:26379"}, "REDIS_SENTINEL_MASTER: REDIS_SENTINELS and REDIS_SENTINEL_MASTER go together"),
    ({"REDIS_SENTINEL_MASTER": "m"}, "REDIS_SENTINELS: REDIS_SENTINELS and REDIS_SENTINEL_MASTER go together"),
    ({"REDIS_URL": "redis://a", "REDIS_SENTINELS": "a:26379", "REDIS_SENTINEL_MASTER": "m"},
     "REDIS_SENTINELS: set only one of REDIS_URL, REDIS_SENTINELS and REDIS_CLUSTER_NODES"),
    ({"REDIS_URL": "redis://a", "REDIS_CLUSTER_NODES": "a:7000"},
     "REDIS_CLUSTER_NODES: set only one of REDIS_URL, REDIS_SENTINELS and REDIS_CLUSTER_NODES"),
    ({"REDIS_SENTINELS": "a:26379", "REDIS_SENTINEL_MASTER": "m", "REDIS_CLUSTER_NODES": "a:7000"},
     "REDIS_CLUSTER_NODES: set only one of"),
    ({"REDIS_SENTINEL_PASSWORD": "pw"}, "REDIS_SENTINEL_PASSWORD: only used with REDIS_SENTINELS"),
    ({"REDIS_PASSWORD": "pw"}, "REDIS_PASSWORD: only used with REDIS_SENTINELS or REDIS_CLUSTER_NODES"),
    ({"REDIS_URL": "redis://a", "REDIS_USERNAME": "u"}, "REDIS_USERNAME: only used with"),
    ({"REDIS_CLUSTER_NODES": "a:7000", "REDIS_USERNAME": "u"}, "REDIS_USERNAME: needs REDIS_PASSWORD"),
    ({"REDIS_CLUSTER_NODES": "a:7000", "GATEWAY_DLQ_STREAM": "events:dlq"},
     "GATEWAY_DLQ_STREAM: on a cluster it must share the slot of 'events:critical'"),
])
def test_bad_redis_deployment_settings_are_refused_naming_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=None) as info:
        settings(**env)
    assert message in str(info.value)


def test_secrets_never_appear_in_errors_or_redacted_settings() -> None:
    with pytest.raises(SettingsError) as info:
        settings(REDIS_PASSWORD="s3cret-data", REDIS_SENTINEL_PASSWORD="s3cret-sentinel")
    assert "s3cret" not in str(info.value)
    s = settings(REDIS_SENTINELS="a:26379", REDIS_SENTINEL_MASTER="m", REDIS_PASSWORD="s3cret-data",
                 REDIS_SENTINEL_PASSWORD="s3cret-sentinel")
    assert "s3cret" not in repr(s.redacted())
    topology = topology_of(s, None)
    assert "s3cret" not in repr(topology) and "s3cret" not in topology.describe()


def test_each_setting_picks_its_topology_and_dead_letter_stream() -> None:
    s = settings(REDIS_SENTINELS="a:26379,b:26379", REDIS_SENTINEL_MASTER="main", REDIS_PASSWORD="pw")
    sentinel = topology_of(s, None)
    assert isinstance(sentinel, SentinelMaster) and sentinel.sentinels == (("a", 26379), ("b", 26379))
    assert sentinel.master == "main" and not sentinel.clustered and s.dead_letter_stream == "events:dlq"
    c = settings(REDIS_CLUSTER_NODES="a:7000", REDIS_USERNAME="gw", REDIS_PASSWORD="pw")
    cluster = topology_of(c, None)
    assert isinstance(cluster, Cluster) and cluster.clustered and cluster.username == "gw"
    assert c.dead_letter_stream == "{events:critical}:dlq"
    assert settings(REDIS_CLUSTER_NODES="a:7000", GATEWAY_DLQ_STREAM="{events:critical}:dead").dead_letter_stream \
        == "{events:critical}:dead"
    assert isinstance(topology_of(settings(), "redis://x"), Standalone)
    assert settings().dead_letter_stream == "events:dlq"


@pytest.mark.parametrize(("env", "named"), [
    ({"REDIS_SENTINELS": "10.0.0.1"}, "REDIS_SENTINELS"),
    ({"REDIS_SENTINELS": "10.0.0.1:26379"}, "REDIS_SENTINEL_MASTER"),
    ({"REDIS_CLUSTER_NODES": "n1:7000", "REDIS_SENTINEL_PASSWORD": "not-for-a-cluster"}, "REDIS_SENTINEL_PASSWORD"),
])
def test_gateway_serve_exits_2_naming_the_variable(env: dict[str, str], named: str) -> None:
    result = run("serve", "--host", "127.0.0.1", env=clean_env(ENVIRONMENT="development", **env))
    assert result.returncode == 2, result.stderr
    assert named in result.stderr and "Traceback" not in result.stderr
    assert "not-for-a-cluster" not in result.stderr
