"""``create_app``: the FastAPI application around one run (driven or read-only).

With a :class:`~server.supervisor.Supervisor` the app starts the trainer in its lifespan,
forwards every trainer message to the WebSocket hub, and on shutdown asks the trainer to quit
(so save-on-quit applies) before it lets the process go. Without one it is a read-only view
over the run directory's store, which it tails for live updates.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

import web
from server.auth import AuthMiddleware, Receive, Scope, Send
from server.context import ServerContext
from server.hub import Hub
from server.routes import checkpoints, commands, history, pages, status, ws
from server.settings import ServerSettings
from server.supervisor import Supervisor
from server.tail import StoreTail

SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]


class SecurityHeaders:
    """No framing (the page has buttons that act), no MIME sniffing, no Referer with a token."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Any) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(settings: ServerSettings, supervisor: Supervisor | None = None) -> FastAPI:
    """The app for one run; ``supervisor=None`` makes it a read-only view."""
    templates = Jinja2Templates(directory=str(web.TEMPLATES_DIR))
    ctx = ServerContext(settings=settings, hub=Hub(settings.hub), templates=templates, supervisor=supervisor)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with _driving(ctx) if supervisor is not None else _tailing(ctx):
            yield

    app = FastAPI(title="traindeck", version=settings.version, lifespan=lifespan,
                  docs_url=None, redoc_url=None, swagger_ui_oauth2_redirect_url=None)
    app.state.ctx = ctx
    for module in (status, history, checkpoints, commands, pages, ws):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=str(web.STATIC_DIR)), name="static")
    app.add_middleware(AuthMiddleware, settings=settings,
                       login_page=lambda code, error: pages.render_login(ctx, code, error))
    app.add_middleware(SecurityHeaders)
    return app


@contextlib.asynccontextmanager
async def _driving(ctx: ServerContext) -> AsyncIterator[None]:
    supervisor = ctx.supervisor
    assert supervisor is not None
    supervisor.listeners.append(ctx.hub.broadcast)
    supervisor.start()
    try:
        yield
    finally:
        await supervisor.stop()


@contextlib.asynccontextmanager
async def _tailing(ctx: ServerContext) -> AsyncIterator[None]:
    tail = StoreTail(ctx.store_path, ctx.hub.broadcast, ctx.status)
    task = asyncio.create_task(tail.run())
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
