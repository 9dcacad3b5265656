"""One optimizer step: micro-batches, AMP, backward, non-finite guard, clipping, update.

Kept apart from the loop so the loop reads as control flow and this reads as numerics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from trainer_core.recipe import StepOutput
from trainer_core.session import Session


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch; CPU-to-CPU is free."""
    if isinstance(batch, torch.Tensor):
        return batch if batch.device == device else batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device) for k, v in batch.items()})  # type: ignore[call-arg]
    if isinstance(batch, list | tuple) and not hasattr(batch, "_fields"):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def as_step_output(out: Any, engine_names: list[str]) -> StepOutput:
    if isinstance(out, StepOutput):
        losses = out.losses
    elif isinstance(out, torch.Tensor):
        if len(engine_names) != 1:
            raise ValueError(f"the step returned one loss for {len(engine_names)} engines; return {{engine: loss}}")
        return StepOutput({engine_names[0]: out})
    elif isinstance(out, Mapping):
        return as_step_output(StepOutput(dict(out)), engine_names)
    else:
        raise TypeError(f"the recipe's step returned {type(out).__name__}; expected a loss tensor, "
                        "a dict {engine: loss} or a StepOutput")
    unknown = set(losses) - set(engine_names)
    if unknown:
        raise ValueError(f"the step returned losses for unknown engines {sorted(unknown)} (engines: {engine_names})")
    return out


class StepRunner:
    def __init__(self, session: Session, trainer_cfg: Any) -> None:
        self.s = session
        self.accumulation = trainer_cfg.grad_accumulation
        self.grad_clip = trainer_cfg.grad_clip
        self.grad_norm_every = trainer_cfg.grad_norm_every
        self.names = list(session.engines)
        self.single = len(self.names) == 1
        self.engines = list(session.engines.values())
        self.autocast = self.engines[0].autocast
        self.move_batches = session.device.type != "cpu"
        self.meter = session.activation_meter
        self.nonfinite_streak = 0
        self.nonfinite_total = 0
        self.last_samples = 0
        self.last_tokens = 0
        self.samples_seen = 0  # over the whole run: the loop saves and restores them with its state
        self.tokens_seen = 0
        # The common case (one engine, no accumulation, no activation meter) has its own path:
        # at 0.1 ms steps every call and lookup the loop adds is a measurable share of the step.
        self.fast = self.single and self.accumulation == 1 and self.meter is None
        self._engine = self.engines[0]
        self._next_batch = session.feed.next
        self._recipe_step = session.recipe.step
        self._engine_map = session.engines
        self._amp = self._engine.amp_dtype is not None
        self._scaled = self._engine.scaler is not None

    def run(self, step: int) -> tuple[dict[str, float], bool]:
        """Train one optimizer step; returns its metric values and whether it was skipped as non-finite."""
        return self.step_function()(step)

    def step_function(self) -> Callable[[int], tuple[dict[str, float], bool]]:
        """``run`` without its dispatch: the path this runner takes every step, for the loop to call."""
        return self._run_single if self.fast else self._run_general

    def _run_single(self, step: int) -> tuple[dict[str, float], bool]:
        start = time.perf_counter()
        engine = self._engine
        lr = engine.optimizer.param_groups[0]["lr"]  # looked up each step: loading a checkpoint replaces the groups
        batch = self._next_batch()
        if self.move_batches:
            batch = to_device(batch, self.s.device)
        if self._amp:
            with engine.autocast():
                out = self._recipe_step(self._engine_map, batch)
        else:
            out = self._recipe_step(self._engine_map, batch)
        if type(out) is torch.Tensor:
            loss, output = out, None
        else:
            output = as_step_output(out, self.names)
            if engine.name not in output.losses:
                raise ValueError(f"the step returned no loss for engine {engine.name!r}")
            loss = output.losses[engine.name]
        value = loss.item()
        finite = value - value == 0.0  # False for nan and for +-inf
        if finite:
            (engine.backward_scale(loss) if self._scaled else loss).backward()
        norm = engine.finish_update(self.grad_clip, apply=finite, measure=(step + 1) % self.grad_norm_every == 0)
        if finite:
            self.nonfinite_streak = 0
        else:
            self._count_nonfinite(False)
            value = math.nan
        elapsed = time.perf_counter() - start
        metrics = {"train/loss": value, "train/lr": float(lr)}
        if norm is not None:
            metrics["train/grad_norm"] = float(norm)
        if output is None or not finite:  # a skipped step logs no stats and trained no samples
            self.last_samples = self.last_tokens = 0
            metrics["train/step_time"] = elapsed
        else:
            self._add_output(metrics, output, elapsed)
        return metrics, not finite

    def _add_output(self, metrics: dict[str, float], output: StepOutput, elapsed: float) -> None:
        """A StepOutput's stats, then step time, samples/s and tokens/s (the order the general path logs)."""
        for key, value in output.stats.items():
            metrics[f"train/{key}"] = float(value)
        metrics["train/step_time"] = elapsed
        self.last_samples, self.last_tokens = output.samples or 0, output.tokens or 0
        self.samples_seen += self.last_samples
        self.tokens_seen += self.last_tokens
        if self.last_samples:
            metrics["train/samples_per_s"] = self.last_samples / elapsed
        if self.last_tokens:
            metrics["train/tokens_per_s"] = self.last_tokens / elapsed

    def _run_general(self, step: int) -> tuple[dict[str, float], bool]:
        start = time.perf_counter()
        lrs = [engine.lr for engine in self.engines]
        totals: dict[str, float] = dict.fromkeys(self.names, 0.0)
        stats: dict[str, float] = {}
        samples = tokens = 0
        finite = True
        activation_bytes = 0
        for _ in range(self.accumulation):
            batch = self.s.feed.next()
            if self.move_batches:
                batch = to_device(batch, self.s.device)
            if self.meter is not None:
                with self.meter:
                    out = self._forward(batch)
                activation_bytes = max(activation_bytes, self.meter.bytes)
            else:
                out = self._forward(batch)
            losses = out.losses
            values = {}
            for name, loss in losses.items():
                values[name] = value = float(loss.detach())
                finite = finite and math.isfinite(value)
            if not finite:
                break
            self._backward(losses)
            for name, value in values.items():
                totals[name] += value / self.accumulation
            for key, value in out.stats.items():
                stats[key] = stats.get(key, 0.0) + float(value) / self.accumulation
            samples += out.samples or 0
            tokens += out.tokens or 0
        measure = (step + 1) % self.grad_norm_every == 0
        norms = [engine.finish_update(self.grad_clip, apply=finite, measure=measure) for engine in self.engines]
        self._count_nonfinite(finite)
        if not finite:  # the update was dropped: nothing of this step was trained
            stats, samples, tokens = {}, 0, 0
        elapsed = time.perf_counter() - start
        self.last_samples, self.last_tokens = samples, tokens
        self.samples_seen += samples
        self.tokens_seen += tokens
        metrics = self._metrics(totals if finite else dict.fromkeys(self.names, math.nan), stats, norms, lrs, elapsed)
        if samples:
            metrics["train/samples_per_s"] = samples / elapsed
        if tokens:
            metrics["train/tokens_per_s"] = tokens / elapsed
        if self.meter is not None:
            metrics["train/activation_bytes"] = float(activation_bytes)
        return metrics, not finite

    def _forward(self, batch: Any) -> StepOutput:
        with self.autocast():
            return as_step_output(self.s.recipe.step(self.s.engines, batch), self.names)

    def _backward(self, losses: dict[str, torch.Tensor]) -> None:
        scaled = [engine.backward_scale(losses[engine.name]) for engine in self.engines if engine.name in losses]
        if self.accumulation > 1:
            scaled = [loss / self.accumulation for loss in scaled]
        torch.autograd.backward(scaled)

    def _count_nonfinite(self, finite: bool) -> None:
        if finite:
            self.nonfinite_streak = 0
        else:
            self.nonfinite_streak += 1
            self.nonfinite_total += 1

    def _metrics(self, losses: dict[str, float], stats: dict[str, float], norms: list[Any], lrs: list[float],
                 elapsed: float) -> dict[str, float]:
        """The step's values; lr is the one the update used."""
        metrics: dict[str, float] = {}
        if self.single:
            metrics["train/loss"] = losses[self.names[0]]
            metrics["train/lr"] = lrs[0]
            if norms[0] is not None:
                metrics["train/grad_norm"] = float(norms[0])
        else:
            metrics["train/loss"] = sum(losses.values())
            for engine, norm, lr in zip(self.engines, norms, lrs, strict=True):
                metrics[f"train/loss/{engine.name}"] = losses[engine.name]
                metrics[f"train/lr/{engine.name}"] = lr
                if norm is not None:
                    metrics[f"train/grad_norm/{engine.name}"] = float(norm)
        for key, value in stats.items():
            metrics[f"train/{key}"] = value
        metrics["train/step_time"] = elapsed
        return metrics
