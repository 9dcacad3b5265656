"""The dashboard page and the login page (the only route that needs no token)."""

from __future__ import annotations

import json
from urllib.parse import parse_qs

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from server.auth import cookie_header, token_matches
from server.context import ServerContext
from server.routes.deps import AUTH_RESPONSES, Ctx
from trainer_core.store import StoreError, metric_names

router = APIRouter(include_in_schema=False)

MAX_FORM_BYTES = 4096


def render_login(ctx: ServerContext, status_code: int, error: str = "") -> Response:
    html = ctx.templates.get_template("login.html").render(error=error, run_name=ctx.settings.run_name)
    return HTMLResponse(html, status_code=status_code, headers={"Cache-Control": "no-store"})


def known_metric_names(ctx: ServerContext) -> str:
    """The store's metric names as JSON for the page, so it can ask for the first chart's history at once.

    ``<`` is escaped so no name can close the script element it sits in.
    """
    try:
        names = metric_names(ctx.store_path)
    except StoreError:
        names = []  # the page then asks the API, which reports the problem
    return json.dumps(names).replace("<", "\\u003c")


@router.get("/", response_class=HTMLResponse, responses=AUTH_RESPONSES)
def index(request: Request, ctx: Ctx) -> Response:
    context = {"run_name": ctx.settings.run_name, "read_only": ctx.read_only, "version": ctx.settings.version,
               "metric_names": known_metric_names(ctx)}
    return ctx.templates.TemplateResponse(request, "index.html", context, headers={"Cache-Control": "no-store"})


@router.get("/login", response_class=HTMLResponse)
def login_form(ctx: Ctx) -> Response:
    return render_login(ctx, 200)


@router.post("/login", response_class=HTMLResponse)
async def login(request: Request, ctx: Ctx) -> Response:
    """The pasted token, from a plain form: on success the same cookie as ``?token=`` sets."""
    body = await request.body()
    token = ""
    if len(body) <= MAX_FORM_BYTES:
        token = (parse_qs(body.decode("utf-8", "replace")).get("token") or [""])[0].strip()
    if not token:
        return render_login(ctx, 401, "Paste the token from the Dashboard line the server printed.")
    if not token_matches(token, ctx.settings.token):
        return render_login(ctx, 403, "That token is not valid for this server.")
    response = RedirectResponse("/", status_code=303)
    response.headers["Set-Cookie"] = cookie_header(ctx.settings, token)
    return response
