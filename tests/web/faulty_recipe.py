"""The demo recipe with faults a test can switch on while it trains.

The folder named by $TRAINDECK_TEST_FAULTS holds flag files: while ``nan`` exists every loss is
NaN (the trainer skips the updates and raises alerts); while ``crash-eval`` exists, evaluation
raises (the trainer process dies with a traceback). Without the flags it is the demo.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from trainer_core.recipe import Recipe, StepOutput
from trainer_core.recipes import demo

config_defaults = demo.config_defaults
FAULTS_ENV = "TRAINDECK_TEST_FAULTS"
NAN_FLAG = "nan"
CRASH_EVAL_FLAG = "crash-eval"


def _flag(name: str) -> bool:
    folder = os.environ.get(FAULTS_ENV)
    return bool(folder) and (Path(folder) / name).exists()


def build(config: Any) -> Recipe:
    recipe = demo.build(config)
    demo_step, demo_eval = recipe.step, recipe.eval

    def step(engines: Any, batch: Any) -> StepOutput:
        out = demo_step(engines, batch)
        if _flag(NAN_FLAG):
            out.losses = {name: loss * float("nan") for name, loss in out.losses.items()}
        return out

    def evaluate(ctx: Any) -> dict[str, float]:
        if _flag(CRASH_EVAL_FLAG):
            raise RuntimeError("evaluation failed on purpose (crash-eval flag)")
        assert demo_eval is not None
        return dict(demo_eval(ctx))

    recipe.step = step
    recipe.eval = evaluate
    return recipe
