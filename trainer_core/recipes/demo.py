"""The built-in demo: a tiny audio-token language model, written against the public API only.

Synthetic "audio" is K codebooks of tokens per timestep. Codebook 0 follows a noisy linear
recurrence and each further codebook is a noisy function of the one above it, so there is real
structure to learn. Items have varying lengths, are batched by ``BatchedOrderedSampler`` under a
token budget, interleaved with the ``delayed`` pattern (MusicGen-style) and modelled by a small
causal transformer with one output head per codebook.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer_core.pattern import get_pattern
from trainer_core.recipe import EvalContext, Recipe, StepOutput

config_defaults: dict[str, Any] = {
    "trainer": {"iterations": 3000, "save_frequency": 250, "eval_frequency": 100, "keep_last": 3},
    "data": {"max_tokens": 1536, "sampler": "batched", "shuffle": True},
    "optimizer": {"lr": 3e-3, "warmup_steps": 50, "schedule": "cosine", "min_lr_ratio": 0.1, "weight_decay": 0.01},
    "recipe": {
        "codebooks": 4, "card": 32, "items": 4000, "eval_items": 256, "min_len": 12, "max_len": 48,
        "dim": 64, "layers": 2, "heads": 4, "dropout": 0.1, "noise": 0.1,
    },
}


@dataclass(frozen=True)
class DemoSpec:
    codebooks: int
    card: int
    items: int
    eval_items: int
    min_len: int
    max_len: int
    dim: int
    layers: int
    heads: int
    dropout: float
    noise: float

    @classmethod
    def from_config(cls, recipe_cfg: dict[str, Any]) -> DemoSpec:
        merged = {**config_defaults["recipe"], **recipe_cfg}
        unknown = set(merged) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"recipe: unknown demo options {sorted(unknown)}")
        return cls(**merged)


class SyntheticCodes(torch.utils.data.Dataset):
    """Item i is generated from its own seeded generator: deterministic, worker-safe, resumable."""

    def __init__(self, spec: DemoSpec, count: int, seed: int) -> None:
        self.spec, self.count, self.seed = spec, count, seed
        g = torch.Generator().manual_seed(seed)
        self.lengths = torch.randint(spec.min_len, spec.max_len + 1, (count,), generator=g).tolist()

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> torch.Tensor:
        spec, length = self.spec, self.lengths[index]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        codes = torch.empty(spec.codebooks, length, dtype=torch.long)
        step = int(torch.randint(1, spec.card, (1,), generator=g))
        x = int(torch.randint(0, spec.card, (1,), generator=g))
        for t in range(length):
            codes[0, t] = x
            x = (x + step) % spec.card
        for q in range(1, spec.codebooks):
            codes[q] = (codes[q - 1] * 3 + q) % spec.card
        noise = torch.rand(codes.shape, generator=g) < spec.noise
        codes[noise] = torch.randint(0, spec.card, (int(noise.sum()),), generator=g)
        return codes


def collate(items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pad to the longest item; ``valid`` marks real timesteps."""
    k, longest = items[0].shape[0], max(item.shape[1] for item in items)
    codes = torch.zeros(len(items), k, longest, dtype=torch.long)
    valid = torch.zeros(len(items), k, longest, dtype=torch.long)
    for i, item in enumerate(items):
        codes[i, :, : item.shape[1]] = item
        valid[i, :, : item.shape[1]] = 1
    return {"codes": codes, "valid": valid}


class TinyCodecLM(nn.Module):
    """Sum of per-codebook embeddings -> causal transformer -> one head per codebook."""

    def __init__(self, spec: DemoSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed = nn.ModuleList(nn.Embedding(spec.card + 1, spec.dim) for _ in range(spec.codebooks))
        self.pos = nn.Embedding(2 * spec.max_len + spec.codebooks + 8, spec.dim)
        layer = nn.TransformerEncoderLayer(
            spec.dim, spec.heads, 4 * spec.dim, spec.dropout, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, spec.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(spec.dim)
        self.heads = nn.ModuleList(nn.Linear(spec.dim, spec.card) for _ in range(spec.codebooks))

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """[B, K, S] tokens -> [B, card, K, S] logits for the next step."""
        steps = seq.shape[-1]
        x = sum(embed(seq[:, q]) for q, embed in enumerate(self.embed))
        x = x + self.pos(torch.arange(steps, device=seq.device))
        mask = nn.Transformer.generate_square_subsequent_mask(steps, device=seq.device)
        x = self.norm(self.blocks(x, mask=mask, is_causal=True))
        return torch.stack([head(x) for head in self.heads], dim=1).permute(0, 3, 1, 2)


class Objective:
    """Next-step prediction over the interleaved sequence, on valid positions only."""

    def __init__(self, spec: DemoSpec) -> None:
        self.spec = spec
        self.pattern = get_pattern("delayed", spec.codebooks)

    def __call__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
        special = self.spec.card
        seq, _ = self.pattern.build(batch["codes"], special)
        valid, _ = self.pattern.build(batch["valid"], 0)
        logits = model(seq[..., :-1])
        target, keep = seq[..., 1:], valid[..., 1:].bool()
        loss = F.cross_entropy(logits.float(), target.masked_fill(~keep, -100), ignore_index=-100)
        correct = ((logits.argmax(1) == target) & keep).sum()
        return loss, correct, int(keep.sum())


def build(config: Any) -> Recipe:
    spec = DemoSpec.from_config(config.recipe)
    seed = config.trainer.seed
    train_set = SyntheticCodes(spec, spec.items, seed=seed + 1)
    eval_set = SyntheticCodes(spec, spec.eval_items, seed=seed + 2)
    objective = Objective(spec)

    def step(engines: Any, batch: dict[str, torch.Tensor]) -> StepOutput:
        loss, correct, tokens = objective(engines.model, batch)
        return StepOutput({"main": loss}, {"accuracy": correct / max(tokens, 1)},
                          samples=batch["codes"].shape[0], tokens=tokens)

    def evaluate(ctx: EvalContext) -> dict[str, float]:
        total_loss = total_correct = total_tokens = 0.0
        for start in range(0, len(eval_set), 64):
            batch = collate([eval_set[i] for i in range(start, min(start + 64, len(eval_set)))])
            batch = {k: v.to(ctx.device) for k, v in batch.items()}
            loss, correct, tokens = objective(ctx.engines.model, batch)
            total_loss += float(loss) * tokens
            total_correct += float(correct)
            total_tokens += tokens
        return {"loss": total_loss / total_tokens, "accuracy": total_correct / total_tokens}

    return Recipe(
        models=TinyCodecLM(spec), dataset=train_set, step=step, collate_fn=collate,
        lengths=train_set.lengths, eval=evaluate,
    )
