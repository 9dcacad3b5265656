"""Where a run lives on disk.

A fresh run gets its own time-stamped folder so two runs never mix their stores; ``--resume``
without ``--run-dir`` picks the newest folder of the same recipe, which is what a user who
just got preempted means.
"""

from __future__ import annotations

import time
from pathlib import Path

RUNS_ROOT = Path("runs")


class RunDirError(ValueError):
    """A run directory that cannot be used as asked."""


def check_fresh_or_resume(run_dir: Path, resume: bool) -> None:
    """A fresh run must not mix its checkpoints and curves with another run's."""
    if not resume and (run_dir / "checkpoints" / "latest").exists():
        raise RunDirError(
            f"{run_dir} already holds checkpoints of another run; pass --resume to continue it, "
            "or choose a new --run-dir"
        )


def recipe_short_name(recipe_spec: str) -> str:
    """``pkg.mod:build`` -> ``mod``; ``path/to/file.py:build`` -> ``file``; ``demo`` -> ``demo``."""
    target = recipe_spec.split(":", 1)[0]
    name = Path(target).stem if target.endswith(".py") or "/" in target else target.rsplit(".", 1)[-1]
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name) or "run"


def resolve_run_dir(run_dir: str | Path | None, recipe_spec: str, resume: bool, root: Path = RUNS_ROOT) -> Path:
    if run_dir is not None:
        path = Path(run_dir)
        if path.exists() and not path.is_dir():
            raise RunDirError(f"run directory {path} exists and is not a directory")
        check_fresh_or_resume(path, resume)
        return path
    name = recipe_short_name(recipe_spec)
    if resume:
        candidates = sorted(p for p in root.glob(f"{name}-*") if p.is_dir())
        if candidates:
            return candidates[-1]
    return root / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
