"""Recipes: how a user plugs a model into traindeck.

A recipe is a function ``build(config) -> Recipe``. It names the models (one engine each),
the data, the per-batch step and, optionally, evaluation and export. The loop owns everything
else: optimizers, schedules, AMP, checkpoints, commands. A recipe may carry its own config defaults
as ``config_defaults = {...}`` in its module or on the function (a nested dict, below the config
file and ``--set`` in precedence).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trainer_core.checkpoint import step_dir_name

if TYPE_CHECKING:
    from trainer_core.config import Config
    from trainer_core.engine import Engines

BUILTIN_RECIPES = {"demo": "trainer_core.recipes.demo:build"}


@dataclass
class StepOutput:
    """What the per-batch step returns: a loss per engine, plus stats to log.

    ``samples`` and ``tokens`` feed the samples/s and tokens/s metrics when given.
    """

    losses: dict[str, torch.Tensor]
    stats: dict[str, float | torch.Tensor] = field(default_factory=dict)
    samples: int | None = None
    tokens: int | None = None


@dataclass
class EvalContext:
    """Handed to a recipe's eval function: the engines, the step and where to write samples."""

    engines: Engines
    step: int
    run_dir: Path
    config: Config
    device: torch.device

    @property
    def samples_dir(self) -> Path:
        path = self.run_dir / "samples" / step_dir_name(self.step)
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass
class Recipe:
    """A training recipe.

    models:      one ``nn.Module`` (engine "main") or a mapping name -> module.
    dataset:     a map-style dataset.
    step:        ``step(engines, batch) -> loss | {engine: loss} | StepOutput``; the loop does
                 backward, clipping and the optimizer step.
    collate_fn:  DataLoader collate function.
    sampler:     a sampler from ``trainer_core.sampler``; ``None`` builds one from ``data.sampler``.
    lengths:     per-item lengths, for the batched sampler built from config.
    eval:        ``eval(ctx: EvalContext) -> {name: float}``, logged as ``eval/<name>``.
    export:      ``export(engines, path: Path, metadata: dict) -> None``; default: every model's
                 weights in one ``.safetensors`` with the config in its metadata.
    param_groups: ``param_groups(engine_name, module) -> list[dict]`` to customise optimizer groups.
    """

    models: nn.Module | Mapping[str, nn.Module]
    dataset: Any
    step: Callable[..., Any]
    collate_fn: Callable[[list[Any]], Any] | None = None
    sampler: Any = None
    lengths: Any = None
    eval: Callable[[EvalContext], Mapping[str, float]] | None = None
    export: Callable[..., None] | None = None
    param_groups: Callable[[str, nn.Module], list[dict[str, Any]]] | None = None

    def model_map(self) -> dict[str, nn.Module]:
        if isinstance(self.models, nn.Module):
            return {"main": self.models}
        models = dict(self.models)
        if not models:
            raise ValueError("recipe names no models")
        for name, model in models.items():
            if not isinstance(model, nn.Module):
                raise TypeError(f"recipe model {name!r} is a {type(model).__name__}, not an nn.Module")
        return models


class RecipeError(ValueError):
    """A recipe spec that cannot be loaded."""


def load_recipe(spec: str) -> Callable[..., Recipe]:
    """Resolve ``package.module:function``, ``path/to/file.py:function`` or a built-in name."""
    spec = BUILTIN_RECIPES.get(spec, spec)
    target, _, func_name = spec.partition(":")
    func_name = func_name or "build"
    if not target:
        raise RecipeError(
            f"recipe {spec!r}: expected module:function, file.py:function or one of {list(BUILTIN_RECIPES)}"
        )
    if target.endswith(".py") or "/" in target:
        module = _load_file(Path(target), spec)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise RecipeError(
                f"recipe {spec!r}: cannot import {target!r} ({exc}); built-in recipes: {', '.join(BUILTIN_RECIPES)}"
            ) from exc
    func = getattr(module, func_name, None)
    if not callable(func):
        raise RecipeError(f"recipe {spec!r}: {target} has no function {func_name!r}")
    return func


def _load_file(path: Path, spec: str) -> Any:
    if not path.is_file():
        raise RecipeError(f"recipe {spec!r}: file {path} not found")
    name = f"traindeck_recipe_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise RecipeError(f"recipe {spec!r}: cannot load {path}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    module_spec.loader.exec_module(module)
    return module


def recipe_defaults(spec: str) -> dict[str, Any]:
    """The recipe's own config defaults: ``build.config_defaults`` or its module's ``config_defaults``."""
    func = load_recipe(spec)
    defaults = getattr(func, "config_defaults", None)
    if defaults is None:
        defaults = getattr(sys.modules.get(func.__module__), "config_defaults", None)
    if defaults is not None and not isinstance(defaults, Mapping):
        raise RecipeError(f"recipe {spec!r}: config_defaults must be a mapping, got {type(defaults).__name__}")
    return dict(defaults or {})


def resolve_config(recipe_spec: str, config_file: str | None, overrides: list[str] | tuple[str, ...]) -> Config:
    """The run's config: dataclass defaults < the recipe's defaults < the file < ``--set``."""
    from trainer_core.config import load_config

    return load_config(config_file, overrides, defaults=recipe_defaults(recipe_spec))


def build_recipe(spec: str, config: Config) -> Recipe:
    recipe = load_recipe(spec)(config)
    if not isinstance(recipe, Recipe):
        raise RecipeError(f"recipe {spec!r} returned {type(recipe).__name__}, expected trainer_core.recipe.Recipe")
    return recipe
