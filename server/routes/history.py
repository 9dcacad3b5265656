"""GET /api/metrics and /api/events: history from the run's store (the pipe carries only live data)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, HTTPException, Query
from fastapi.concurrency import run_in_threadpool

from server.routes.deps import INPUT_RESPONSES, Ctx
from trainer_core.store import StoreError, metric_names, query_events, query_metrics

router = APIRouter(tags=["history"])

DEFAULT_POINTS = 2000
MAX_POINTS = 10_000
MAX_EVENTS = 10_000
STEP_LIMIT = 2**62


def _split_names(names: str | None) -> list[str] | None:
    if names is None or not names.strip():
        return None
    return list(dict.fromkeys(n.strip() for n in names.split(",") if n.strip()))


@router.get("/api/metrics", responses=INPUT_RESPONSES)
async def get_metrics(
    ctx: Ctx,
    names: str | None = Query(None, max_length=10_000, description="comma-separated names; none = every metric"),
    max_points: int = Query(DEFAULT_POINTS, ge=1, le=MAX_POINTS, description="points per metric at most"),
    from_step: int | None = Query(None, ge=0, le=STEP_LIMIT),
    to_step: int | None = Query(None, ge=0, le=STEP_LIMIT),
) -> dict[str, dict[str, list[Any]]]:
    """``{name: {"step", "value", "min", "max"}}``, downsampled per bucket to at most ``max_points``.

    Unknown names and an empty step range (``from_step > to_step``) give empty lists.
    """
    wanted = _split_names(names)
    empty_range = from_step is not None and to_step is not None and from_step > to_step

    def read() -> dict[str, dict[str, list[Any]]]:
        chosen = metric_names(ctx.store_path) if wanted is None else wanted
        if not chosen or empty_range:
            return {name: {"step": [], "value": [], "min": [], "max": []} for name in chosen}
        return query_metrics(ctx.store_path, chosen, max_points=max_points, from_step=from_step, to_step=to_step)

    try:
        return await run_in_threadpool(read)
    except StoreError as exc:
        raise HTTPException(503, str(exc)) from None


@router.get("/api/events", responses=INPUT_RESPONSES)
async def get_events(
    ctx: Ctx,
    since_id: int = Query(0, ge=0, le=STEP_LIMIT, description="only events with a larger id"),
    limit: int = Query(1000, ge=1, le=MAX_EVENTS),
) -> list[dict[str, Any]]:
    """Command log, results, alerts, checkpoints…: ``[{"id", "time", "step", "kind", "data"}]``, oldest first."""
    try:
        return await run_in_threadpool(query_events, ctx.store_path, since_id, limit)
    except StoreError as exc:
        raise HTTPException(503, str(exc)) from None
