"""Engines: one model with its optimizer, LR schedule and (for fp16) loss scaler.

Several engines train side by side (say an AR and a NAR model); the loop treats them
uniformly. The schedule is a multiplier on a base lr, so ``lr VALUE`` rescales the base and the
schedule's shape (warmup, decay) carries on from the new value.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

MODEL = "model"
OPTIMIZER = "optimizer"
SCHEDULER = "scheduler"
SCALER = "scaler"
SCHEDULE_STEP = "step"
SCHEDULE_BASE_LRS = "base_lrs"

_NO_AUTOCAST = nullcontext()  # reusable: entering it does nothing
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def lr_multiplier(schedule: str, warmup_steps: int, total_steps: int, min_ratio: float) -> Callable[[int], float]:
    """The schedule as a function of the optimizer step: linear warmup, then constant/cosine/linear."""

    def multiplier(step: int) -> float:
        if warmup_steps > 0 and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, max(0.0, (step - warmup_steps) / span))
        if schedule == "cosine":
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        elif schedule == "linear":
            shape = 1.0 - progress
        else:
            raise ValueError(f"unknown schedule {schedule!r}")
        return min_ratio + (1.0 - min_ratio) * shape

    return multiplier


def build_optimizer(params: Any, cfg: Any) -> torch.optim.Optimizer:
    name = cfg.name.lower()
    if name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"optimizer.name: unknown optimizer {cfg.name!r} (adamw, adam, sgd)")


class LRSchedule:
    """The lr of every param group as ``base_lr * multiplier(step)``.

    Cheaper than ``LambdaLR`` per step (it only writes the groups' lr), which matters when a
    step takes a tenth of a millisecond; its state is the step and the base lrs.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, multiplier: Callable[[int], float],
                 constant_from: int | None = None) -> None:
        self.optimizer = optimizer
        self.multiplier = multiplier
        self.base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
        self.last_step = 0
        # From this step on the multiplier no longer changes (a constant schedule after warmup), so
        # a step need not rewrite the groups' lr: ``set_lr`` and loading state write it themselves.
        self.constant_from = constant_from
        self._apply()

    def _apply(self) -> None:
        factor = self.multiplier(self.last_step)
        for group, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base * factor

    def step(self) -> None:
        self.last_step += 1
        if self.constant_from is None or self.last_step <= self.constant_from:
            self._apply()

    def state_dict(self) -> dict[str, Any]:
        return {SCHEDULE_STEP: self.last_step, SCHEDULE_BASE_LRS: list(self.base_lrs)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping) or {SCHEDULE_STEP, SCHEDULE_BASE_LRS} - set(state):
            raise ValueError(f"lr schedule state needs {SCHEDULE_STEP!r} and {SCHEDULE_BASE_LRS!r}")
        base_lrs = [float(lr) for lr in state[SCHEDULE_BASE_LRS]]
        if len(base_lrs) != len(self.optimizer.param_groups):
            raise ValueError(f"lr schedule state has {len(base_lrs)} groups, the optimizer "
                             f"{len(self.optimizer.param_groups)}")
        self.last_step, self.base_lrs = int(state[SCHEDULE_STEP]), base_lrs
        self._apply()


class Engine:
    """A model and everything that updates it."""

    def __init__(
        self,
        name: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: LRSchedule,
        *,
        device: torch.device,
        amp_dtype: torch.dtype | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.device = device
        self.amp_dtype = amp_dtype
        self._params = self.parameters()  # the groups' tensors, fixed once the optimizer is built
        self._uniform_grads: bool | None = None
        use_scaler = amp_dtype is torch.float16 and device.type == "cuda"
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler) if use_scaler else None

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def parameters(self) -> list[nn.Parameter]:
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    def autocast(self) -> Any:
        if self.amp_dtype is None:
            return _NO_AUTOCAST
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def set_lr(self, value: float) -> float:
        """Make ``value`` the lr now; the schedule's shape continues from it."""
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"lr must be a finite positive number, got {value}")
        ratio = value / self.lr
        self.scheduler.base_lrs = [base * ratio for base in self.scheduler.base_lrs]
        for group in self.optimizer.param_groups:
            group["lr"] = group["lr"] * ratio
        return self.lr

    def set_loss_scale(self, value: float) -> float:
        if self.scaler is None:
            raise ValueError("loss_scale needs fp16 training on CUDA (trainer.dtype: float16)")
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"loss_scale must be a finite positive number, got {value}")
        self.scaler.update(new_scale=float(value))
        return float(self.scaler.get_scale())

    def backward_scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def finish_update(self, grad_clip: float, apply: bool, measure: bool = True) -> torch.Tensor | None:
        """Unscale, clip (or just measure) the gradient norm, step; or drop the gradients when not ``apply``.

        Without clipping the norm is only computed when ``measure``: on tiny models it costs as
        much as the optimizer step itself.
        """
        norm = None
        if apply:
            if self.scaler is not None:
                self.scaler.unscale_(self.optimizer)
            if grad_clip > 0 or measure:
                grads = [p.grad for p in self._params if p.grad is not None]
                if grads:
                    norm = self._grad_norm(grads)
                    if grad_clip > 0:
                        self._clip(grads, norm, grad_clip)
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _grad_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """The total 2-norm of ``grads``.

        ``torch.nn.utils.get_total_norm`` groups tensors by device and dtype in Python on every
        call, which costs more than a small model's whole optimizer step; gradients that share one
        device and dtype (the usual case, checked once) take two ops instead.
        """
        if self._uniform_grads is None:
            self._uniform_grads = len({(g.device, g.dtype) for g in grads}) == 1 and not any(g.is_sparse for g in grads)
        if not self._uniform_grads:
            return torch.nn.utils.get_total_norm(grads, foreach=True)
        if len(grads) == 1:
            return torch.linalg.vector_norm(grads[0])
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))

    def _clip(self, grads: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
        """Scale ``grads`` by ``min(1, max_norm / (norm + 1e-6))``, as ``clip_grad_norm_`` does."""
        if not self._uniform_grads:
            with_grads = [p for p in self._params if p.grad is not None]
            torch.nn.utils.clip_grads_with_norm_(with_grads, max_norm, norm, foreach=True)
            return
        torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))

    def state_dict(self) -> dict[str, Any]:
        return {
            MODEL: self.model.state_dict(),
            OPTIMIZER: self.optimizer.state_dict(),
            SCHEDULER: self.scheduler.state_dict(),
            SCALER: self.scaler.state_dict() if self.scaler is not None else None,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = [key for key in (MODEL, OPTIMIZER, SCHEDULER) if key not in state]
        if missing:
            raise ValueError(f"engine {self.name!r}: checkpoint lacks {', '.join(missing)}")
        self.model.load_state_dict(state[MODEL])
        self.optimizer.load_state_dict(state[OPTIMIZER])
        self.scheduler.load_state_dict(state[SCHEDULER])
        if self.scaler is not None and state.get(SCALER):
            self.scaler.load_state_dict(state[SCALER])


class Engines(Mapping[str, Engine]):
    """Engines by name; ``engines.main`` or ``engines["main"]``; ``.model`` when there is one."""

    def __init__(self, engines: Mapping[str, Engine]) -> None:
        self._engines = dict(engines)

    def __getitem__(self, name: str) -> Engine:
        return self._engines[name]

    def __getattr__(self, name: str) -> Engine:
        engines = self.__dict__.get("_engines", {})
        if name in engines:
            return engines[name]
        if name == "model":  # the property raised: say why instead of a bare AttributeError
            raise AttributeError(self._ambiguous_model())
        raise AttributeError(name)

    def _ambiguous_model(self) -> str:
        return f"engines.model is ambiguous with {len(self)} engines; use engines[name].model"

    def __iter__(self) -> Iterator[str]:
        return iter(self._engines)

    def __len__(self) -> int:
        return len(self._engines)

    @property
    def model(self) -> nn.Module:
        if len(self._engines) != 1:
            raise AttributeError(self._ambiguous_model())
        return next(iter(self._engines.values())).model

    def train(self, mode: bool = True) -> None:
        for engine in self._engines.values():
            engine.model.train(mode)


def build_engines(
    models: Mapping[str, nn.Module],
    optimizer_cfg: Any,
    *,
    iterations: int,
    device: torch.device,
    amp_dtype: torch.dtype | None,
    param_groups: Callable[[str, nn.Module], list[dict[str, Any]]] | None = None,
) -> Engines:
    engines = {}
    for name, model in models.items():
        model.to(device)
        params = param_groups(name, model) if param_groups else [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, optimizer_cfg)
        mult = lr_multiplier(optimizer_cfg.schedule, optimizer_cfg.warmup_steps, iterations, optimizer_cfg.min_lr_ratio)
        constant_from = optimizer_cfg.warmup_steps if optimizer_cfg.schedule == "constant" else None
        scheduler = LRSchedule(optimizer, mult, constant_from)
        engines[name] = Engine(name, model, optimizer, scheduler, device=device, amp_dtype=amp_dtype)
    return Engines(engines)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"trainer.device: {name!r} requested but CUDA is not available")
    return device


def resolve_amp(dtype_name: str, device: torch.device) -> torch.dtype | None:
    """AMP autocast only on CUDA; CPU trains in plain fp32."""
    if dtype_name == "float32" or device.type != "cuda":
        return None
    return AMP_DTYPES[dtype_name]
