"""Engines: the lr schedule, lr and loss-scale changes, the update with clipping, the engines mapping."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from torch import nn

from trainer_core.config import config_from_dict
from trainer_core.engine import Engine, Engines, LRSchedule, build_engines, build_optimizer, lr_multiplier

CPU = torch.device("cpu")


def optimizer_cfg(**values: object) -> object:
    return config_from_dict({"optimizer": values}).optimizer


def sgd(model: nn.Module, lr: float = 0.1) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr)


def two_group_sgd(lrs: tuple[float, float] = (1.0, 0.1)) -> torch.optim.Optimizer:
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))
    return torch.optim.SGD([{"params": model[0].parameters(), "lr": lrs[0]},
                            {"params": model[1].parameters(), "lr": lrs[1]}], lr=lrs[0])


def lrs_of(optimizer: torch.optim.Optimizer) -> list[float]:
    return [group["lr"] for group in optimizer.param_groups]


def make_engine(model: nn.Module | None = None, *, lr: float = 0.1, warmup: int = 0, schedule: str = "constant",
                total: int = 100, amp_dtype: torch.dtype | None = None) -> Engine:
    torch.manual_seed(0)
    model = model if model is not None else nn.Linear(3, 2)
    optimizer = sgd(model, lr)
    constant_from = warmup if schedule == "constant" else None
    scheduler = LRSchedule(optimizer, lr_multiplier(schedule, warmup, total, 0.0), constant_from)
    return Engine("main", model, optimizer, scheduler, device=CPU, amp_dtype=amp_dtype)


def backward_once(engine: Engine, scale: float = 1.0) -> None:
    torch.manual_seed(1)
    x = torch.randn(5, 3)
    (engine.model(x).pow(2).sum() * scale).backward()


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ---------------------------------------------------------------------------------- lr_multiplier


def test_warmup_rises_linearly_then_a_constant_schedule_holds_one() -> None:
    mult = lr_multiplier("constant", 4, 100, 0.0)
    assert [mult(step) for step in range(7)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0]
    assert mult(10_000) == 1.0


def test_cosine_decays_from_one_after_warmup_to_the_min_lr_ratio() -> None:
    mult = lr_multiplier("cosine", 2, 12, 0.1)
    assert mult(0) == 0.5
    assert mult(1) == 1.0
    assert mult(2) == 1.0  # the first step after warm-up is the peak
    assert mult(4) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    assert mult(7) == pytest.approx(0.55)  # half way: shape 0.5
    assert mult(12) == pytest.approx(0.1)
    assert mult(50) == pytest.approx(0.1)  # past the end it stays at the floor


def test_linear_decays_to_the_min_lr_ratio_and_stays_there() -> None:
    mult = lr_multiplier("linear", 0, 10, 0.2)
    assert mult(0) == 1.0
    assert mult(5) == pytest.approx(0.6)
    assert mult(10) == pytest.approx(0.2)
    assert mult(25) == pytest.approx(0.2)


def test_linear_with_warmup_starts_its_decay_where_the_warmup_ends() -> None:
    mult = lr_multiplier("linear", 5, 15, 0.0)
    assert [mult(step) for step in range(5)] == [0.2, 0.4, 0.6, 0.8, 1.0]
    assert mult(5) == 1.0
    assert mult(10) == pytest.approx(0.5)
    assert mult(15) == 0.0


def test_an_unknown_schedule_raises_a_value_error_naming_it() -> None:
    with pytest.raises(ValueError, match="unknown schedule 'step'"):
        lr_multiplier("step", 0, 10, 0.0)(0)
    with pytest.raises(ValueError, match="unknown schedule 'exp'"):
        lr_multiplier("exp", 3, 10, 0.0)(3)


# ---------------------------------------------------------------------------------- LRSchedule


def test_a_constant_schedule_keeps_the_lr_after_warmup_and_keeps_an_lr_set_later() -> None:
    engine = make_engine(lr=0.3, warmup=3)
    seen = [engine.lr]
    for _ in range(6):
        engine.scheduler.step()
        seen.append(engine.lr)
    assert seen == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3])
    assert engine.set_lr(0.05) == pytest.approx(0.05)
    for _ in range(5):
        engine.scheduler.step()
        assert engine.lr == pytest.approx(0.05)
    assert engine.scheduler.last_step == 11


def test_set_lr_during_warmup_rescales_the_base_and_the_warmup_goes_on_from_it() -> None:
    engine = make_engine(lr=0.4, warmup=4)
    engine.scheduler.step()  # multiplier 0.5: lr 0.2
    assert engine.set_lr(0.1) == pytest.approx(0.1)
    engine.scheduler.step()
    assert engine.lr == pytest.approx(0.15)
    engine.scheduler.step()
    assert engine.lr == pytest.approx(0.2)
    engine.scheduler.step()
    assert engine.lr == pytest.approx(0.2)


def test_a_cosine_schedule_sets_every_group_to_its_base_times_the_multiplier() -> None:
    optimizer = two_group_sgd((1.0, 0.1))
    mult = lr_multiplier("cosine", 2, 10, 0.1)
    schedule = LRSchedule(optimizer, mult)
    for step in range(13):
        assert schedule.last_step == step
        assert lrs_of(optimizer) == [1.0 * mult(step), 0.1 * mult(step)]
        schedule.step()


def test_set_lr_on_a_cosine_schedule_rescales_every_group_and_the_decay_continues() -> None:
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD([{"params": [model.weight], "lr": 1.0}, {"params": [model.bias], "lr": 0.5}])
    mult = lr_multiplier("cosine", 0, 10, 0.0)
    engine = Engine("main", model, optimizer, LRSchedule(optimizer, mult), device=CPU)
    for _ in range(3):
        engine.scheduler.step()
    engine.set_lr(0.2)
    assert lrs_of(optimizer) == pytest.approx([0.2, 0.1])
    engine.scheduler.step()
    assert lrs_of(optimizer) == pytest.approx([0.2 * mult(4) / mult(3), 0.1 * mult(4) / mult(3)])


def test_schedule_state_round_trips_into_a_fresh_schedule() -> None:
    mult = lr_multiplier("cosine", 2, 20, 0.0)
    first = two_group_sgd()
    schedule = LRSchedule(first, mult)
    for _ in range(5):
        schedule.step()
    schedule.base_lrs = [0.5, 0.05]  # as after an lr command
    state = schedule.state_dict()
    schedule.base_lrs.append(9.0)
    assert state == {"step": 5, "base_lrs": [0.5, 0.05]}

    second = two_group_sgd((3.0, 3.0))
    restored = LRSchedule(second, mult)
    restored.load_state_dict(state)
    assert restored.last_step == 5
    assert restored.base_lrs == [0.5, 0.05]
    assert lrs_of(second) == [0.5 * mult(5), 0.05 * mult(5)]
    restored.step()
    assert lrs_of(second) == [0.5 * mult(6), 0.05 * mult(6)]


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"step": 3}, "needs 'step' and 'base_lrs'"),
        ({"base_lrs": [1.0, 1.0]}, "needs 'step' and 'base_lrs'"),
        ([3, [1.0, 1.0]], "needs 'step' and 'base_lrs'"),
        ({"step": 3, "base_lrs": [1.0]}, "has 1 groups, the optimizer 2"),
        ({"step": 3, "base_lrs": [1.0, 1.0, 1.0]}, "has 3 groups, the optimizer 2"),
    ],
)
def test_loading_a_bad_schedule_state_raises_and_leaves_the_schedule_unchanged(state: object, message: str) -> None:
    optimizer = two_group_sgd((1.0, 0.1))
    schedule = LRSchedule(optimizer, lr_multiplier("linear", 2, 10, 0.0))
    schedule.step()
    schedule.step()
    before = (schedule.last_step, list(schedule.base_lrs), lrs_of(optimizer))
    with pytest.raises(ValueError, match=message):
        schedule.load_state_dict(state)  # type: ignore[arg-type]
    assert (schedule.last_step, schedule.base_lrs, lrs_of(optimizer)) == before


# ---------------------------------------------------------------------------------- Engine


@pytest.mark.parametrize("value", [0.0, -0.001, math.nan, math.inf, -math.inf])
def test_set_lr_rejects_zero_negative_and_non_finite_values(value: float) -> None:
    engine = make_engine(lr=0.1)
    with pytest.raises(ValueError, match="finite positive"):
        engine.set_lr(value)
    assert engine.lr == 0.1
    assert engine.scheduler.base_lrs == [0.1]


@pytest.mark.parametrize("amp_dtype", [None, torch.float16, torch.bfloat16])
def test_set_loss_scale_without_fp16_on_cuda_raises_a_clear_error(amp_dtype: torch.dtype | None) -> None:
    engine = make_engine(amp_dtype=amp_dtype)
    assert engine.scaler is None
    with pytest.raises(ValueError, match="loss_scale needs fp16 training on CUDA"):
        engine.set_loss_scale(1024.0)


def test_an_update_that_is_not_applied_keeps_the_parameters_and_clears_the_gradients() -> None:
    engine = make_engine(lr=0.1, warmup=2)
    before = params_of(engine.model)
    backward_once(engine)
    assert all(p.grad is not None for p in engine.model.parameters())
    assert engine.finish_update(grad_clip=1.0, apply=False) is None
    for old, new in zip(before, engine.model.parameters(), strict=True):
        assert torch.equal(old, new)
    assert all(p.grad is None for p in engine.model.parameters())
    assert engine.scheduler.last_step == 1  # the schedule follows the step count, skipped or not
    assert engine.lr == pytest.approx(0.1)


def test_clipping_returns_the_norm_before_clipping_and_updates_with_the_clipped_gradients() -> None:
    engine = make_engine(lr=0.1)
    reference = copy.deepcopy(engine.model)
    backward_once(engine, scale=10.0)
    for mine, theirs in zip(engine.model.parameters(), reference.parameters(), strict=True):
        theirs.grad = mine.grad.clone()
    expected_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    assert expected_norm > 5.0  # far above the limit, so the clipping matters
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.1 * p.grad

    norm = engine.finish_update(grad_clip=0.5, apply=True, measure=False)

    assert norm is not None
    assert float(norm) == pytest.approx(float(expected_norm), rel=1e-6)
    for mine, theirs in zip(engine.model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs)
    assert all(p.grad is None for p in engine.model.parameters())


class MixedPrecisionModel(nn.Module):
    """Parameters of two dtypes: the gradients cannot be stacked into one tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.narrow = nn.Parameter(torch.randn(3, 2))
        self.wide = nn.Parameter(torch.randn(2, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x @ self.narrow).double() + self.wide


@pytest.mark.parametrize("make_model", [lambda: nn.Linear(3, 2), lambda: nn.Linear(3, 1, bias=False),
                                        MixedPrecisionModel], ids=["one-dtype", "one-tensor", "two-dtypes"])
@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_the_grad_norm_and_clipping_match_torch_for_any_mix_of_gradients(make_model: Any, clip: float) -> None:
    engine = make_engine(make_model(), lr=0.1)
    reference = copy.deepcopy(engine.model)
    backward_once(engine, scale=10.0)
    for mine, theirs in zip(engine.model.parameters(), reference.parameters(), strict=True):
        theirs.grad = mine.grad.clone()
    if clip:
        expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), clip)
    else:
        expected = torch.nn.utils.get_total_norm([p.grad for p in reference.parameters()])
    with torch.no_grad():
        for p in reference.parameters():
            p -= 0.1 * p.grad

    norm = engine.finish_update(grad_clip=clip, apply=True, measure=True)

    assert norm is not None and float(norm) == pytest.approx(float(expected), rel=1e-6)
    for mine, theirs in zip(engine.model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs)


def test_the_clipped_step_moves_the_parameters_by_exactly_lr_times_the_clip() -> None:
    engine = make_engine(lr=0.1)
    before = params_of(engine.model)
    backward_once(engine, scale=10.0)
    engine.finish_update(grad_clip=0.5, apply=True)
    moved = torch.cat([(new.detach() - old).flatten() for old, new in zip(before, engine.model.parameters(),
                                                                          strict=True)])
    assert float(moved.norm()) == pytest.approx(0.1 * 0.5, rel=1e-5)


def test_without_clipping_a_measured_update_returns_the_total_gradient_norm() -> None:
    engine = make_engine(lr=0.1)
    before = params_of(engine.model)
    backward_once(engine)
    grads = [p.grad.clone() for p in engine.model.parameters()]
    expected = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    norm = engine.finish_update(grad_clip=0.0, apply=True, measure=True)
    assert norm is not None
    assert float(norm) == pytest.approx(float(expected), rel=1e-6)
    for old, grad, new in zip(before, grads, engine.model.parameters(), strict=True):
        torch.testing.assert_close(new.detach(), old - 0.1 * grad)


def test_an_unmeasured_update_without_clipping_returns_none_but_still_updates() -> None:
    engine = make_engine(lr=0.1)
    before = params_of(engine.model)
    backward_once(engine)
    assert engine.finish_update(grad_clip=0.0, apply=True, measure=False) is None
    assert not any(torch.equal(old, new) for old, new in zip(before, engine.model.parameters(), strict=True))
    assert all(p.grad is None for p in engine.model.parameters())


def test_a_measured_update_with_no_gradients_returns_none() -> None:
    engine = make_engine(lr=0.1)
    before = params_of(engine.model)
    assert engine.finish_update(grad_clip=0.0, apply=True, measure=True) is None
    for old, new in zip(before, engine.model.parameters(), strict=True):
        assert torch.equal(old, new)


def test_engine_state_round_trips_and_a_state_without_its_parts_is_refused() -> None:
    engine = make_engine(lr=0.2, warmup=4)
    backward_once(engine)
    engine.finish_update(grad_clip=0.0, apply=True)
    state = engine.state_dict()
    assert state["scaler"] is None

    other = make_engine(nn.Linear(3, 2), lr=0.2, warmup=4)
    other.load_state_dict(copy.deepcopy(state))
    assert other.scheduler.last_step == 1
    assert other.lr == pytest.approx(0.1)
    for mine, theirs in zip(engine.model.parameters(), other.model.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    with pytest.raises(ValueError, match="engine 'main': checkpoint lacks optimizer, scheduler"):
        other.load_state_dict({"model": state["model"]})


# ---------------------------------------------------------------------------------- Engines


def test_engines_are_reached_by_attribute_and_by_key() -> None:
    engine = make_engine()
    engines = Engines({"main": engine})
    assert engines.main is engine
    assert engines["main"] is engine
    assert list(engines) == ["main"] and len(engines) == 1
    assert engines.model is engine.model
    with pytest.raises(KeyError):
        engines["other"]
    with pytest.raises(AttributeError, match="other"):
        engines.other  # noqa: B018


def test_engines_model_with_two_engines_raises_an_attribute_error_that_says_it_is_ambiguous() -> None:
    engines = Engines({"ar": make_engine(), "nar": make_engine()})
    assert engines.ar is not engines.nar
    with pytest.raises(AttributeError) as raised:
        engines.model  # noqa: B018
    # Engines.model raises "engines.model is ambiguous with 2 engines; use engines[name].model", but an
    # AttributeError from a property makes Python fall back to Engines.__getattr__("model"), which raises a
    # bare AttributeError("model"): the helpful message never reaches the user.
    assert "ambiguous" in str(raised.value), f"the message was lost: AttributeError({str(raised.value)!r})"


def test_engines_train_switches_every_model() -> None:
    engines = Engines({"ar": make_engine(), "nar": make_engine()})
    engines.train(False)
    assert not engines["ar"].model.training and not engines["nar"].model.training
    engines.train()
    assert engines["ar"].model.training and engines["nar"].model.training


# ---------------------------------------------------------------------------------- build_engines


def test_build_engines_gives_each_model_its_own_optimizer_and_warming_schedule() -> None:
    torch.manual_seed(0)
    models = {"ar": nn.Linear(2, 2), "nar": nn.Linear(2, 1)}
    models["nar"].bias.requires_grad_(False)
    cfg = optimizer_cfg(name="sgd", lr=0.2, warmup_steps=2, momentum=0.0)
    engines = build_engines(models, cfg, iterations=10, device=CPU, amp_dtype=None)
    assert list(engines) == ["ar", "nar"]
    assert engines.ar.optimizer is not engines.nar.optimizer
    assert engines.nar.parameters() == [models["nar"].weight]
    assert engines.ar.lr == pytest.approx(0.1)
    for engine in engines.values():
        engine.scheduler.step()
        engine.scheduler.step()
    assert engines.ar.lr == pytest.approx(0.2) and engines.nar.lr == pytest.approx(0.2)
    assert engines.ar.scheduler.constant_from == 2


def test_build_engines_uses_the_recipes_param_groups() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1))

    def groups(name: str, module: nn.Module) -> list[dict[str, object]]:
        assert name == "main"
        return [{"params": module[0].parameters(), "lr": 0.5}, {"params": module[1].parameters()}]

    cfg = optimizer_cfg(name="adamw", lr=0.01, schedule="cosine")
    engine = build_engines({"main": model}, cfg, iterations=10, device=CPU, amp_dtype=None,
                           param_groups=groups)["main"]
    assert lrs_of(engine.optimizer) == [0.5, 0.01]
    assert engine.scheduler.constant_from is None
    for _ in range(5):
        engine.scheduler.step()
    assert lrs_of(engine.optimizer) == pytest.approx([0.25, 0.005])


@pytest.mark.parametrize(("name", "kind"), [("adamw", torch.optim.AdamW), ("adam", torch.optim.Adam),
                                            ("sgd", torch.optim.SGD)])
def test_build_optimizer_builds_the_named_optimizer(name: str, kind: type) -> None:
    optimizer = build_optimizer(nn.Linear(2, 1).parameters(), optimizer_cfg(name=name, lr=0.02))
    assert type(optimizer) is kind
    assert optimizer.param_groups[0]["lr"] == 0.02


def test_build_optimizer_refuses_an_unknown_name() -> None:
    cfg = optimizer_cfg()
    object.__setattr__(cfg, "name", "lion")  # the config itself refuses it, so bypass its check
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        build_optimizer(nn.Linear(2, 1).parameters(), cfg)
