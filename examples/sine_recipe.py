"""A complete user recipe: fit a small MLP to a noisy sine wave.

    traindeck train examples/sine_recipe.py:build --set trainer.iterations=300
"""

import torch
from torch import nn

from trainer_core.recipe import EvalContext, Recipe, StepOutput

config_defaults = {
    "trainer": {"iterations": 500, "eval_frequency": 100, "save_frequency": 250},
    "data": {"batch_size": 64, "sampler": "random"},
    "optimizer": {"lr": 1e-2, "schedule": "cosine", "warmup_steps": 20},
    "recipe": {"hidden": 64, "points": 4096},
}


class NoisySine(torch.utils.data.Dataset):
    def __init__(self, count: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(count, 1, generator=g) * 6.28 - 3.14
        self.y = torch.sin(self.x) + 0.05 * torch.randn(count, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


def build(config) -> Recipe:
    hidden = config.recipe.get("hidden", 64)
    model = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1))
    train_set = NoisySine(config.recipe.get("points", 4096), seed=config.trainer.seed)
    held_out = NoisySine(512, seed=config.trainer.seed + 1)

    def step(engines, batch) -> StepOutput:
        x, y = batch
        loss = nn.functional.mse_loss(engines.model(x), y)
        return StepOutput({"main": loss}, samples=len(x))

    def evaluate(ctx: EvalContext) -> dict[str, float]:
        x, y = held_out.x.to(ctx.device), held_out.y.to(ctx.device)
        return {"mse": nn.functional.mse_loss(ctx.engines.model(x), y).item()}

    return Recipe(models=model, dataset=train_set, step=step, eval=evaluate)
