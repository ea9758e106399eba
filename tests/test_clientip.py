import pytest

from gateway.core.clientip import client_ip, parse_networks
from gateway.settings import Settings, SettingsError

TRUSTED = parse_networks(["127.0.0.1", "10.0.0.0/8"])


@pytest.mark.parametrize(
    ("peer", "header", "expected"),
    [
        ("127.0.0.1", b"203.0.113.7", "203.0.113.7"),  # trusted proxy: believe it
        ("198.51.100.1", b"203.0.113.7", "198.51.100.1"),  # untrusted peer: ignore the header
        ("127.0.0.1", None, "127.0.0.1"),
        ("127.0.0.1", b"1.2.3.4, 203.0.113.7, 10.1.2.3", "203.0.113.7"),  # right-most untrusted hop
        # Every hop trusted: the left-most one is client-supplied, so it proves nothing.
        ("127.0.0.1", b"10.1.1.1, 10.2.2.2", "127.0.0.1"),
        ("127.0.0.1", b"10.1.1.1", "127.0.0.1"),
        ("127.0.0.1", b"not-an-ip", "127.0.0.1"),  # malformed: fall back to the peer
        ("::ffff:127.0.0.1", b"203.0.113.9", "203.0.113.9"),  # IPv4-mapped peer
        ("127.0.0.1", b"", "127.0.0.1"),
    ],
)
def test_client_ip(peer: str, header: bytes | None, expected: str) -> None:
    assert client_ip(peer, header, TRUSTED) == expected


def test_no_trusted_proxies_never_believes_the_header() -> None:
    assert client_ip("127.0.0.1", b"203.0.113.7", ()) == "127.0.0.1"


def test_bad_trusted_proxy_setting_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="GATEWAY_TRUSTED_PROXIES"):
        Settings.from_env({"GATEWAY_TRUSTED_PROXIES": "10.0.0.0/8, nonsense"}, serving=False)
