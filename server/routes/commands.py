"""POST /command/{name}, POST /command and POST /run/restart.

A command waits for the trainer's result (``?wait=`` seconds, 60 by default): 200 with it,
202 with the command id when it takes longer (the result arrives later as an event), 422 when
the parser or the trainer refuses it, 409 when no trainer is running.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from server import dispatch
from server.context import ServerContext
from server.routes.deps import INPUT_RESPONSES, Ctx, Problem
from server.settings import MAX_WAIT_S
from server.supervisor import NotRunning
from trainer_core.commands import COMMAND_NAMES

router = APIRouter(tags=["commands"])

STEP_LIMIT = 2**62


class CommandBody(BaseModel):
    """Optional fields of ``POST /command/{name}``; each command accepts only its own."""

    model_config = ConfigDict(extra="forbid")
    value: float | None = Field(None, description="lr, loss_scale")
    name: str | None = Field(None, max_length=100, description="export")
    at_step: int | None = Field(None, ge=0, le=STEP_LIMIT, description="any schedulable command")
    to: int | None = Field(None, ge=0, le=STEP_LIMIT, description="time")
    action: str | None = Field(None, max_length=20, description="event: show | clear | cancel")
    id: int | None = Field(None, ge=0, le=STEP_LIMIT, description="event cancel")


class CommandLine(BaseModel):
    model_config = ConfigDict(extra="forbid")
    line: str = Field(max_length=1000, description="one command in the stdin grammar, e.g. 'lr 1e-4' or 'save@500'")


class CommandResult(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    ok: bool
    command: str
    message: str = ""
    data: dict[str, Any] = {}


class Pending(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    state: str


COMMAND_RESPONSES: dict[int | str, dict[str, Any]] = {
    **INPUT_RESPONSES,
    200: {"model": CommandResult, "description": "the trainer's result"},
    202: {"model": Pending, "description": "still running; the result will arrive as an event"},
    409: {"model": Problem, "description": "no trainer is running"},
    422: {"model": Problem, "description": "malformed, unknown or refused command"},
}


def _wait_query(ctx: ServerContext, wait: float | None) -> float:
    return ctx.settings.command_wait_s if wait is None else wait


async def _respond(ctx: ServerContext, command_of: Any, source: str, wait_s: float) -> JSONResponse:
    try:
        command = command_of()
        status, body = await dispatch.execute(ctx.supervisor, command, source, wait_s)
    except dispatch.CommandRejected as exc:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)
    return JSONResponse(body, status_code=status)


@router.post("/command/{name}", responses=COMMAND_RESPONSES, response_model=CommandResult)
async def post_named_command(
    ctx: Ctx,
    name: Annotated[str, Path(description="the command", json_schema_extra={"enum": list(COMMAND_NAMES)})],
    body: CommandBody | None = None,
    wait: float | None = Query(None, ge=0, le=MAX_WAIT_S, description="seconds to wait for the result"),
) -> JSONResponse:
    fields = body.model_dump(exclude_none=True) if body is not None else None
    return await _respond(ctx, lambda: dispatch.parse_named(name, fields), "rest", _wait_query(ctx, wait))


@router.post("/command", responses=COMMAND_RESPONSES, response_model=CommandResult)
async def post_command_line(
    ctx: Ctx,
    body: CommandLine,
    wait: float | None = Query(None, ge=0, le=MAX_WAIT_S, description="seconds to wait for the result"),
) -> JSONResponse:
    return await _respond(ctx, lambda: dispatch.parse_line(body.line), "rest", _wait_query(ctx, wait))


class Restarted(BaseModel):
    model_config = ConfigDict(extra="allow")
    state: str
    pid: int | None


@router.post("/run/restart", response_model=Restarted,
             responses={**INPUT_RESPONSES, 409: {"model": Problem, "description": "a trainer is running"}})
async def restart(ctx: Ctx) -> Any:
    """Start the trainer again, resuming from the newest valid checkpoint."""
    if ctx.supervisor is None:
        return JSONResponse({"detail": "read-only view: this server does not drive a trainer"}, status_code=409)
    try:
        await ctx.supervisor.restart()
    except NotRunning as exc:
        return JSONResponse({"detail": str(exc)}, status_code=409)
    return {"state": ctx.supervisor.state, "pid": ctx.supervisor.pid}
