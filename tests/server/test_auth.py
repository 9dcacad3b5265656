"""The token on every route (401 missing, 403 wrong), the cookie flow, and Host/Origin checks."""

from __future__ import annotations

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from server.auth import new_token
from tests.server.conftest import Served

PAGES = [("GET", "/"), ("GET", "/static/favicon.svg"), ("GET", "/openapi.json")]


def every_route(served: Served) -> list[tuple[str, str]]:
    with served.http() as client:
        schema = client.get("/openapi.json").json()
    routes = [(method.upper(), path.replace("{name}", "status")) for path, item in schema["paths"].items()
              for method in item]
    assert len(routes) >= 7
    return routes + PAGES


@pytest.mark.parametrize(("header", "status"), [(None, 401), ("Bearer wrong-token", 403), ("Basic abc", 403)])
def test_every_route_needs_the_token(served: Served, header: str | None, status: int) -> None:
    headers = {"Authorization": header} if header else {}
    with httpx.Client(base_url=served.base, timeout=30) as client:
        for method, path in every_route(served):
            response = client.request(method, path, headers={**headers, "Accept": "application/json"})
            assert response.status_code == status, (method, path, response.text)


def test_a_wrong_cookie_or_query_token_is_403(served: Served) -> None:
    with httpx.Client(base_url=served.base, timeout=30) as client:
        assert client.get("/api/status", params={"token": "nope"}).status_code == 403
        client.cookies.set(f"traindeck_token_{served.port}", "nope")
        assert client.get("/api/status").status_code == 403


def test_the_query_token_sets_a_strict_httponly_cookie_and_redirects_to_a_clean_url(served: Served) -> None:
    with httpx.Client(base_url=served.base, timeout=30) as client:
        response = client.get("/", params={"token": served.token, "x": "1"})
        assert response.status_code == 303
        assert response.headers["location"] == "/?x=1"
        cookie = response.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert client.get("/api/status").status_code == 200  # the cookie alone now works
        assert served.token not in client.get("/").text


def test_a_browser_without_the_token_gets_the_login_page(served: Served) -> None:
    with httpx.Client(base_url=served.base, timeout=30) as client:
        page = client.get("/", headers={"Accept": "text/html"})
        assert page.status_code == 401 and "<form" in page.text
        assert client.get("/login").status_code == 200
        wrong = client.post("/login", data={"token": "nope"})
        assert wrong.status_code == 403
        right = client.post("/login", data={"token": served.token})
        assert right.status_code == 303 and "HttpOnly" in right.headers["set-cookie"]
        assert client.get("/api/status").status_code == 200


@pytest.mark.parametrize("host", ["evil.example", f"evil.example:{8000}", "127.0.0.1:1", "localhost"])
def test_a_foreign_host_is_rejected_even_with_the_token(served: Served, host: str) -> None:
    with served.http() as client:
        assert client.get("/api/status", headers={"Host": host}).status_code == 403
        assert client.post("/command/status", headers={"Host": host}).status_code == 403


def test_loopback_names_with_the_right_port_are_accepted(served: Served) -> None:
    with served.http() as client:
        for host in (f"localhost:{served.port}", f"127.0.0.1:{served.port}"):
            assert client.get("/api/status", headers={"Host": host}).status_code == 200


def test_a_foreign_origin_cannot_send_commands(served: Served) -> None:
    with served.http() as client:
        response = client.post("/command/status", headers={"Origin": "http://evil.example"})
        assert response.status_code == 403
        assert client.post("/command/status", headers={"Origin": "null"}).status_code == 403
        assert client.post("/command/status", headers={"Origin": served.base}).status_code == 200


def test_websocket_needs_the_token_and_a_local_origin(served: Served) -> None:
    with pytest.raises(InvalidStatus) as missing:
        connect(served.ws_url, open_timeout=30).close()
    assert missing.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as wrong:
        connect(served.ws_url, additional_headers={"Authorization": "Bearer nope"}, open_timeout=30).close()
    assert wrong.value.response.status_code == 403
    with pytest.raises(InvalidStatus) as foreign:
        served.ws(origin="http://evil.example").close()
    assert foreign.value.response.status_code == 403
    with served.ws(origin=served.base) as ws:
        assert ws.recv(timeout=30)


def test_a_generated_token_can_follow_the_token_option_on_a_command_line() -> None:
    # One token in 64 would start with "-", which argparse takes for an option.
    tokens = [new_token() for _ in range(2000)]
    assert not [t for t in tokens if t.startswith("-")]
    assert len(set(tokens)) == len(tokens) and all(len(t) == 32 for t in tokens)
