"""The status of a run that this server does not drive, read from its store (``traindeck view``)."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from trainer_core.checkpoint import latest_checkpoint
from trainer_core.pid import pid_alive
from trainer_core.store import StoreError, last_step, query_events

LIFECYCLE_KINDS = ("start", "finish")


def stored_status(run_dir: Path) -> dict[str, Any]:
    """State from the newest start/finish event: finished, stopped, running (its pid lives) or crashed."""
    store = run_dir / "metrics.sqlite"
    status: dict[str, Any] = {"state": "stopped", "step": 0, "iterations": None, "pid": None,
                              "exit_code": None, "run_dir": str(run_dir)}
    try:
        status["step"] = last_step(store) or 0
        lifecycle = query_events(store, kinds=LIFECYCLE_KINDS, limit=100_000)
    except (StoreError, ValueError) as exc:
        status["error"] = str(exc)
        return status
    with contextlib.suppress(OSError):
        checkpoint = latest_checkpoint(run_dir)
        status["last_checkpoint"] = str(checkpoint) if checkpoint is not None else None
    starts = [e for e in lifecycle if e["kind"] == "start"]
    if starts:
        status["iterations"] = starts[-1]["data"].get("iterations")
    if not lifecycle:
        return status
    last = lifecycle[-1]
    if last["kind"] == "finish":
        reason = last["data"].get("reason", "finished")
        status["state"] = "finished" if reason == "finished" else "stopped"
        status["exit_code"] = last["data"].get("exit_code", 0)
    else:
        pid = last["data"].get("pid")
        status["state"] = "running" if pid_alive(pid) else "crashed"
        status["pid"] = pid
    return status
