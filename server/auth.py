"""Token authentication and Host/Origin checks, as one ASGI middleware for HTTP and WebSocket.

The token travels as ``Authorization: Bearer T``, as ``?token=T`` (a browser following the
printed link: it gets an HttpOnly SameSite=Strict cookie and a redirect to the clean URL, so
the token leaves the address bar and history), or as that cookie. Missing means 401, wrong
means 403; only the login page is public.

Host is checked on every request (DNS rebinding: a page on evil.example that resolves to
127.0.0.1 still sends ``Host: evil.example``). Origin, when present, is checked on WebSockets
and on state-changing requests (cross-site WebSocket hijacking and CSRF from another site).
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, RedirectResponse, Response

from server.settings import ServerSettings, normalise_hostport

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PUBLIC_PATHS = frozenset({"/login"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
TOKEN_PARAM = "token"


def new_token() -> str:
    """A random URL-safe token that never starts with "-", so ``--token TOKEN`` reads it as a value."""
    while (token := secrets.token_urlsafe(24)).startswith("-"):
        pass
    return token


def token_matches(candidate: str, token: str) -> bool:
    return secrets.compare_digest(candidate.encode("utf-8", "replace"), token.encode("utf-8"))


def cookie_header(settings: ServerSettings, token: str) -> str:
    return f"{settings.cookie_name}={token}; Path=/; HttpOnly; SameSite=Strict"


class AuthMiddleware:
    def __init__(self, app: ASGIApp, settings: ServerSettings,
                 login_page: Callable[[int, str], Response] | None = None) -> None:
        self.app = app
        self.settings = settings
        self.allowed = settings.allowed_hosts()
        self.login_page = login_page

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        response = self.check(scope)
        if response is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await self._deny_websocket(scope, receive, send, response)
        else:
            await response(scope, receive, send)

    def check(self, scope: Scope) -> Response | None:
        """None to let the request through, else the response that refuses (or redirects) it."""
        headers = Headers(scope=scope)
        problem = self._foreign(scope, headers)
        if problem:
            return JSONResponse({"detail": problem}, status_code=403)
        if scope["path"] in PUBLIC_PATHS:
            return None
        candidate, source = self._presented_token(scope, headers)
        if candidate is None:
            return self._refuse(scope, headers, 401, "missing token")
        if not token_matches(candidate, self.settings.token):
            return self._refuse(scope, headers, 403, "wrong token")
        if source == "query" and scope["type"] == "http" and scope["method"] in ("GET", "HEAD"):
            return self._redirect_to_clean_url(scope, candidate)
        return None

    def _foreign(self, scope: Scope, headers: Headers) -> str | None:
        host = headers.get("host")
        if host is None or normalise_hostport(host, 80) not in self.allowed:
            return "host not allowed"
        checks_origin = scope["type"] == "websocket" or scope.get("method") not in SAFE_METHODS
        origin = headers.get("origin")
        if checks_origin and origin is not None:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                return "origin not allowed"
            default_port = 443 if parts.scheme == "https" else 80
            if normalise_hostport(parts.netloc, default_port) not in self.allowed:
                return "origin not allowed"
        return None

    def _presented_token(self, scope: Scope, headers: Headers) -> tuple[str | None, str]:
        auth = headers.get("authorization")
        if auth is not None:
            scheme, _, value = auth.partition(" ")
            return (value.strip() if scheme.lower() == "bearer" else ""), "header"
        for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True):
            if key == TOKEN_PARAM:
                return value, "query"
        cookie = headers.get("cookie")
        if cookie:
            jar: SimpleCookie = SimpleCookie()
            try:
                jar.load(cookie)
            except Exception:  # a malformed Cookie header is the same as none
                return None, "cookie"
            morsel = jar.get(self.settings.cookie_name)
            if morsel is not None:
                return morsel.value, "cookie"
        return None, "none"

    def _refuse(self, scope: Scope, headers: Headers, status: int, detail: str) -> Response:
        wants_html = scope["type"] == "http" and "text/html" in headers.get("accept", "")
        if wants_html and self.login_page is not None:
            response = self.login_page(status, "That token is not valid for this server." if status == 403 else "")
        else:
            response = JSONResponse({"detail": detail}, status_code=status)
        if status == 401:
            response.headers["WWW-Authenticate"] = "Bearer"
        return response

    def _redirect_to_clean_url(self, scope: Scope, token: str) -> Response:
        query = [(k, v) for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
                 if k != TOKEN_PARAM]
        target = scope["path"] + (f"?{urlencode(query)}" if query else "")
        response = RedirectResponse(target, status_code=303)
        response.headers["Set-Cookie"] = cookie_header(self.settings, token)
        response.headers["Cache-Control"] = "no-store"
        return response

    async def _deny_websocket(self, scope: Scope, receive: Receive, send: Send, response: Response) -> None:
        await receive()  # websocket.connect
        if "websocket.http.response" in scope.get("extensions", {}):
            await response(scope, receive, send)
        else:
            await send({"type": "websocket.close", "code": 1008})
