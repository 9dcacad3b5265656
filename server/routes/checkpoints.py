"""GET /api/checkpoints: committed checkpoints and exports of the run, each with its ``kind``."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from server.context import ServerContext
from server.routes.deps import AUTH_RESPONSES, Ctx
from trainer_core.checkpoint import list_checkpoints, list_exports

router = APIRouter(tags=["history"])


def _listing(ctx: ServerContext) -> list[dict[str, Any]]:
    checkpoints = [{"kind": "checkpoint", **c} for c in list_checkpoints(ctx.run_dir)]
    exports = [{"kind": "export", **e} for e in list_exports(ctx.run_dir)]
    return checkpoints + exports


@router.get("/api/checkpoints", responses=AUTH_RESPONSES)
async def get_checkpoints(ctx: Ctx) -> list[dict[str, Any]]:
    """``[{"kind": "checkpoint", "step", "path", "time", "bytes"}, …, {"kind": "export", "name", …}]``."""
    return await run_in_threadpool(_listing, ctx)
