"""Shared route plumbing: the server context and the response schemas used in the OpenAPI document."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends
from pydantic import BaseModel, ConfigDict
from starlette.requests import HTTPConnection

from server.context import ServerContext


def get_ctx(conn: HTTPConnection) -> ServerContext:
    return conn.app.state.ctx


class Problem(BaseModel):
    """Every error body: ``detail`` says what is wrong (a list for request-validation errors)."""

    model_config = ConfigDict(extra="allow")
    detail: str | list[Any]


AUTH_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "missing token"},
    403: {"model": Problem, "description": "wrong token, foreign Host or Origin"},
}
INPUT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **AUTH_RESPONSES,
    422: {"model": Problem, "description": "malformed request"},
}


Ctx = Annotated[ServerContext, Depends(get_ctx)]
