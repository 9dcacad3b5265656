"""GET /api/status: the trainer's state, step and speed, merged with the server's own counters."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict

from server.routes.deps import AUTH_RESPONSES, Ctx

router = APIRouter(tags=["run"])


class Status(BaseModel):
    model_config = ConfigDict(extra="allow")
    state: str
    step: int | None = None
    iterations: int | None = None
    pid: int | None = None
    exit_code: int | None = None
    read_only: bool


@router.get("/api/status", response_model=Status, responses=AUTH_RESPONSES)
def get_status(ctx: Ctx) -> dict[str, Any]:
    return ctx.status()
