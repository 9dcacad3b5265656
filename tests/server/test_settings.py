"""Which Host/Origin values a server accepts, derived from where it listens."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.settings import ServerSettings, is_loopback, normalise_hostport


def settings(host: str = "127.0.0.1", port: int = 8123, extra: tuple[str, ...] = ()) -> ServerSettings:
    return ServerSettings(token="t", run_dir=Path("run"), host=host, port=port, extra_hosts=extra)


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("0.0.0.0", False), ("::", False), ("192.168.1.4", False), ("example.org", False),
])
def test_loopback_addresses_are_recognised(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


def test_a_loopback_server_accepts_loopback_names_on_its_own_port_only() -> None:
    allowed = settings().allowed_hosts()
    assert {"127.0.0.1:8123", "localhost:8123", "[::1]:8123"} <= allowed
    assert "localhost:8000" not in allowed and "evil.example:8123" not in allowed


def test_extra_hosts_get_the_server_port_unless_they_name_one() -> None:
    allowed = settings(extra=("Tunnel.Example", "proxy.example:443")).allowed_hosts()
    assert "tunnel.example:8123" in allowed and "proxy.example:443" in allowed


def test_a_specific_bind_address_is_accepted_as_host() -> None:
    assert "10.0.0.5:8123" in settings(host="10.0.0.5").allowed_hosts()


@pytest.mark.parametrize(("value", "port", "expected"), [
    ("LOCALHOST:8123", 80, "localhost:8123"), ("localhost", 80, "localhost:80"), ("[::1]:9", 80, "[::1]:9"),
    ("[::1]", 443, "[::1]:443"), ("example.org", 443, "example.org:443"),
])
def test_host_values_are_normalised_with_the_default_port(value: str, port: int, expected: str) -> None:
    assert normalise_hostport(value, port) == expected


def test_the_cookie_is_named_after_the_port_and_the_url_never_shows_a_wildcard() -> None:
    assert settings(port=9001).cookie_name == "traindeck_token_9001"
    assert settings(host="0.0.0.0").url == "http://127.0.0.1:8123/"
