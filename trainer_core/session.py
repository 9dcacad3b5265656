"""Everything a run is built from: the recipe's parts, engines, data, store, device.

``build_session`` is the only place that turns a config into live objects, so the loop itself
never reads config sections to construct things.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer_core import distributed, io, rng
from trainer_core.config import Config, config_to_dict
from trainer_core.data import DataFeed, build_sampler
from trainer_core.engine import Engines, build_engines, resolve_amp, resolve_device
from trainer_core.recipe import EvalContext, Recipe, build_recipe
from trainer_core.store import MetricsStore
from trainer_core.tensorboard import TensorBoardSink, open_sink


@dataclass
class Session:
    config: Config
    run_dir: Path
    recipe: Recipe
    engines: Engines
    feed: DataFeed
    store: MetricsStore | None
    device: torch.device
    activation_meter: Any = None
    optimization_notes: tuple[str, ...] = ()
    tensorboard: TensorBoardSink | None = None
    warnings: tuple[str, ...] = ()

    def log_metrics(self, step: int, values: dict[str, float]) -> None:
        if self.store is not None:
            self.store.log_metrics(step, values)
        if self.tensorboard is not None:
            self.tensorboard.log(step, values)

    def log_steps(self, rows: list[tuple[int, dict[str, float], float]]) -> None:
        """The loop's float metrics of several steps, each ``(step, values, time)``."""
        if self.store is not None:
            self.store.log_float_steps(rows)
        if self.tensorboard is not None:
            for step, values, _ in rows:
                self.tensorboard.log(step, values)

    def evaluate(self, step: int) -> dict[str, float]:
        """Run the recipe's eval without disturbing the training RNG streams (exact resume holds)."""
        if self.recipe.eval is None:
            raise ValueError("this recipe has no eval function")
        saved = rng.capture()
        self.engines.train(False)
        try:
            with torch.no_grad():
                metrics = self.recipe.eval(EvalContext(self.engines, step, self.run_dir, self.config, self.device))
        finally:
            self.engines.train(True)
            rng.restore(saved)
        return {str(k): float(v) for k, v in dict(metrics).items()}

    def export(self, name: str, step: int) -> Path:
        from trainer_core.commands import check_export_name

        export_dir = self.run_dir / "exports"
        export_dir.mkdir(parents=True, exist_ok=True)
        path = export_dir / f"{check_export_name(name)}.safetensors"
        metadata = {"traindeck_config": json.dumps(config_to_dict(self.config)), "step": str(step)}
        if self.recipe.export is not None:
            self.recipe.export(self.engines, path, metadata)
            return path
        if len(self.engines) == 1:
            tensors = dict(self.engines.model.state_dict())
        else:
            tensors = {f"{n}.{k}": v for n, e in self.engines.items() for k, v in e.model.state_dict().items()}
        io.save_weights(tensors, path, metadata=metadata)
        return path

    def close(self) -> None:
        self.feed.close()
        if self.store is not None:
            self.store.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_session(recipe_spec: str, config: Config, run_dir: Path) -> Session:
    """The run's live objects, for this rank (under torchrun ``train.run`` has joined the process group)."""
    t = config.trainer
    run_dir.mkdir(parents=True, exist_ok=True)
    device = resolve_device(t.device)
    if t.deterministic and device.type == "cuda":
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    torch.autograd.set_detect_anomaly(t.detect_anomaly)
    seed_everything(t.seed + distributed.rank())
    recipe = build_recipe(recipe_spec, config)
    models = recipe.model_map()
    notes, meter = _apply_optimizations(models, config)
    engines = build_engines(
        models, config.optimizer, iterations=t.iterations, device=device,
        amp_dtype=resolve_amp(t.dtype, device), param_groups=recipe.param_groups,
    )
    sampler = recipe.sampler or build_sampler(
        config.data, recipe.dataset, recipe.lengths, seed=t.seed, rank=distributed.rank(),
        world_size=distributed.world_size(),
    )
    feed = DataFeed(recipe.dataset, sampler, config.data, collate_fn=recipe.collate_fn, seed=t.seed)
    leader = distributed.is_leader()
    store = MetricsStore(run_dir / "metrics.sqlite") if leader else None
    sink, problem = open_sink(run_dir) if t.tensorboard and leader else (None, None)
    return Session(config, run_dir, recipe, engines, feed, store, device, meter, tuple(notes), sink,
                   (problem,) if problem else ())


def _apply_optimizations(models: dict[str, torch.nn.Module], config: Config) -> tuple[list[str], Any]:
    options = asdict(config.optimizations)
    if not any(options.values()) or all(not v or v == "auto" for v in options.values()):
        return [], None
    from trainer_core.optimize import apply_optimizations

    notes: list[str] = []
    for name, model in models.items():
        notes += [f"{name}: {line}" for line in apply_optimizations(model, options)]
    meter = None
    if options.get("measure_activations"):
        from trainer_core.offload import ActivationMeter

        meter = ActivationMeter()
    return notes, meter
