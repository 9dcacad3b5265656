"""What one server instance is configured with, and the host-name rules derived from it."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path

from server.hub import HubLimits
from trainer_core import __version__

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
DEFAULT_WAIT_S = 60.0
MAX_WAIT_S = 3600.0
DEFAULT_QUIT_TIMEOUT_S = 60.0


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def url_host(host: str) -> str:
    """The host as it appears in a URL (IPv6 in brackets)."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _machine_names() -> set[str]:
    names = {socket.gethostname(), socket.getfqdn()}
    with contextlib.suppress(OSError):
        names.update(socket.gethostbyname_ex(socket.gethostname())[2])
    return {n.lower() for n in names if n}


@dataclass(frozen=True)
class ServerSettings:
    token: str
    run_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    read_only: bool = False
    run_name: str = ""
    version: str = __version__
    extra_hosts: tuple[str, ...] = ()
    command_wait_s: float = DEFAULT_WAIT_S
    quit_timeout_s: float = DEFAULT_QUIT_TIMEOUT_S
    hub: HubLimits = field(default_factory=HubLimits)

    @property
    def cookie_name(self) -> str:
        # Cookies ignore ports: two servers on one machine must not overwrite each other's.
        return f"traindeck_token_{self.port}"

    @property
    def url(self) -> str:
        shown = "127.0.0.1" if self.host in WILDCARD_HOSTS else self.host
        return f"http://{url_host(shown)}:{self.port}/"

    def allowed_hosts(self) -> frozenset[str]:
        """``host:port`` values accepted in the Host and Origin headers (lower case).

        Loopback names are always allowed; a specific bind address adds itself; a wildcard
        bind adds this machine's names and addresses. ``extra_hosts`` entries without a port
        get the server's port (e.g. a name used through a reverse proxy or tunnel).
        """
        names = set(LOOPBACK_NAMES)
        if self.host in WILDCARD_HOSTS:
            names |= _machine_names()
        else:
            names.add(self.host.lower())
        allowed = {f"{url_host(n)}:{self.port}" for n in names}
        for extra in self.extra_hosts:
            extra = extra.lower()
            allowed.add(extra if _has_port(extra) else f"{url_host(extra)}:{self.port}")
        return frozenset(allowed)


def _has_port(hostport: str) -> bool:
    if hostport.startswith("["):
        return "]:" in hostport
    return hostport.count(":") == 1


def normalise_hostport(value: str, default_port: int) -> str:
    """``Host``/``Origin`` netloc -> ``host:port`` with the scheme's default port filled in."""
    value = value.strip().lower()
    return value if _has_port(value) else f"{url_host(value)}:{default_port}"
