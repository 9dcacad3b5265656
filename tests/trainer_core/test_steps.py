"""The step runner, alone and in the real loop: both paths, non-finite steps, accumulation, two engines."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from tests.trainer_core.loop_helpers import ScriptedChannel
from trainer_core.config import Config
from trainer_core.recipe import Recipe, StepOutput, resolve_config
from trainer_core.session import Session, build_session
from trainer_core.signals import StopFlag
from trainer_core.steps import StepRunner
from trainer_core.train import Trainer

MODULE = "tests.trainer_core.test_steps"
LINEAR = f"{MODULE}:build_linear"
PAIR = f"{MODULE}:build_pair"
FEATURES = 4
BATCH = 4
BASE = (
    "data.sampler=ordered",
    f"data.batch_size={BATCH}",
    "trainer.device=cpu",
    "trainer.log_every=0",
    "trainer.save_frequency=0",
    "trainer.eval_frequency=0",
    "trainer.grad_norm_every=1",
    "optimizer.lr=0.01",
)
TIMINGS = frozenset({"train/step_time", "train/samples_per_s", "train/tokens_per_s", "train/steps_per_s"})


# ---------------------------------------------------------------------------------- recipes


def dataset(count: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(count, FEATURES, generator=g)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(count, 1, generator=g)
    return TensorDataset(x, y)


def build_linear(config: Config) -> Recipe:
    """One linear model. recipe.output: tensor | dict | full (a StepOutput with stats, samples and tokens);
    recipe.bad_calls: the step calls (counted from 0, one per micro-batch) whose loss is multiplied by recipe.bad;
    recipe.extra: an engine name the step also returns a loss for (a dict output);
    recipe.raise_at: the step call that raises a RuntimeError."""
    opts = config.recipe
    raise_at = opts.get("raise_at")
    bad_calls = set(opts.get("bad_calls", []))
    bad = float(opts.get("bad", "nan"))
    output = opts.get("output", "tensor")
    extra = opts.get("extra")
    calls: list[int] = []

    def step(engines: Any, batch: Any) -> Any:
        if len(calls) == raise_at:
            raise RuntimeError("the step failed on purpose")
        x, y = batch
        pred = engines.model(x)
        loss = F.mse_loss(pred, y)
        if len(calls) in bad_calls:
            loss = loss * bad
        calls.append(len(x))
        if extra:
            return {"main": loss, extra: loss.detach()}
        if output == "tensor":
            return loss
        if output == "dict":
            return {"main": loss}
        stats = {"mae": (pred - y).abs().mean().detach(), "call": float(len(calls))}
        return StepOutput({"main": loss}, stats=stats, samples=len(x), tokens=FEATURES * len(x))

    return Recipe(models=nn.Linear(FEATURES, 1), dataset=dataset(), step=step)


def build_pair(config: Config) -> Recipe:
    """Two engines, "ar" and "nar"; recipe.extra names a third, unknown engine the step also returns a loss for."""
    extra = config.recipe.get("extra")

    def step(engines: Any, batch: Any) -> Any:
        x, y = batch
        losses = {"ar": F.mse_loss(engines["ar"].model(x), y), "nar": F.mse_loss(engines.nar.model(x), 2 * y)}
        if extra:
            losses[extra] = losses["ar"] * 2
        return losses

    return Recipe(models={"ar": nn.Linear(FEATURES, 1), "nar": nn.Linear(FEATURES, 1)}, dataset=dataset(),
                  step=step)


# ---------------------------------------------------------------------------------- helpers


def make_config(spec: str, *overrides: str) -> Config:
    return resolve_config(spec, None, [*BASE, *overrides])


@contextmanager
def opened(run_dir: Path, spec: str, *overrides: str) -> Iterator[tuple[Session, StepRunner]]:
    config = make_config(spec, *overrides)
    session = build_session(spec, config, run_dir)
    try:
        yield session, StepRunner(session, config.trainer)
    finally:
        session.close()


def run_loop(run_dir: Path, spec: str, *overrides: str, fast: bool = True, resume: bool = False,
             script: list[tuple[int, str]] | None = None) -> tuple[Trainer, ScriptedChannel]:
    """The real loop through a Trainer, on the fast path or (``fast=False``) forced onto the general one."""
    session = build_session(spec, make_config(spec, *overrides), run_dir)
    channel = ScriptedChannel(script)
    trainer = Trainer(session, channel, StopFlag())
    try:
        if not fast:
            trainer.steps.fast = False
        trainer.start(resume)
        assert trainer.loop() == 0
    finally:
        trainer.close()
    return trainer, channel


def metric_rows(channel: ScriptedChannel) -> list[tuple[int, dict[str, float]]]:
    return [(m["step"], m["values"]) for m in channel.of_type("metrics")]


def series(channel: ScriptedChannel, name: str) -> dict[int, float]:
    return {step: values[name] for step, values in metric_rows(channel) if name in values}


def comparable(values: dict[str, float]) -> dict[str, Any]:
    """The values without timings, nan made comparable."""
    return {k: ("nan" if math.isnan(v) else v) for k, v in values.items() if k not in TIMINGS}


def params_of(*models: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for model in models for p in model.parameters()]


def same(before: list[torch.Tensor], *models: nn.Module) -> bool:
    return all(torch.equal(old, new) for old, new in zip(before, params_of(*models), strict=True))


def changed_everywhere(before: list[torch.Tensor], *models: nn.Module) -> bool:
    return all(not torch.equal(old, new) for old, new in zip(before, params_of(*models), strict=True))


def batch_of(session: Session, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The index-th batch of the ordered sampler."""
    x, y = session.recipe.dataset.tensors
    return x[index * BATCH:(index + 1) * BATCH], y[index * BATCH:(index + 1) * BATCH]


# ---------------------------------------------------------------------------------- fast path parity


@pytest.mark.parametrize("output", ["tensor", "dict", "full"])
@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_the_fast_path_and_the_general_path_log_identical_values_in_the_same_order(
        tmp_path: Path, output: str, clip: float) -> None:
    overrides = (f"recipe.output={output}", f"trainer.grad_clip={clip}", "trainer.grad_norm_every=2",
                 "trainer.iterations=7", "optimizer.warmup_steps=3", "optimizer.schedule=cosine",
                 "recipe.bad_calls=[4]")
    fast, fast_channel = run_loop(tmp_path / "fast", LINEAR, *overrides)
    general, general_channel = run_loop(tmp_path / "general", LINEAR, *overrides, fast=False)
    assert fast.steps.fast and not general.steps.fast

    fast_rows, general_rows = metric_rows(fast_channel), metric_rows(general_channel)
    assert [step for step, _ in fast_rows] == list(range(1, 8))
    assert [(step, list(values)) for step, values in fast_rows] == [
        (step, list(values)) for step, values in general_rows]
    assert [(step, comparable(values)) for step, values in fast_rows] == [
        (step, comparable(values)) for step, values in general_rows]
    assert math.isnan(fast_rows[4][1]["train/loss"])
    assert len({values["train/lr"] for _, values in fast_rows}) > 3  # the schedule moved the lr
    assert same(params_of(fast.s.engines.model), general.s.engines.model)
    seen = (fast.steps.samples_seen, fast.steps.tokens_seen)
    assert seen == (general.steps.samples_seen, general.steps.tokens_seen)
    assert fast.steps.nonfinite_total == general.steps.nonfinite_total == 1


# ---------------------------------------------------------------------------------- non-finite losses


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize(("accumulation", "bad_call"), [(1, 1), (2, 3)])
def test_a_non_finite_loss_skips_the_update_and_is_counted(
        tmp_path: Path, bad: str, accumulation: int, bad_call: int) -> None:
    overrides = (f"trainer.grad_accumulation={accumulation}", f"recipe.bad_calls=[{bad_call}]", f"recipe.bad={bad}")
    with opened(tmp_path, LINEAR, *overrides) as (session, runner):
        assert runner.fast is (accumulation == 1)
        model = session.engines.model
        before = params_of(model)
        first, skipped = runner.run(0)
        assert not skipped and math.isfinite(first["train/loss"]) and "train/grad_norm" in first
        assert changed_everywhere(before, model)

        before = params_of(model)
        values, skipped = runner.run(1)  # with accumulation, the second micro-batch is the bad one
        assert skipped
        assert same(before, model)
        assert all(p.grad is None for p in model.parameters())
        assert math.isnan(values["train/loss"])
        assert "train/grad_norm" not in values
        assert (runner.nonfinite_streak, runner.nonfinite_total) == (1, 1)

        values, skipped = runner.run(2)
        assert not skipped and math.isfinite(values["train/loss"])
        assert changed_everywhere(before, model)
        assert (runner.nonfinite_streak, runner.nonfinite_total) == (0, 1)


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("accumulation", "bad_calls"), [(1, "[0, 2, 3, 4]"), (2, "[0, 3, 4, 5]")])
def test_non_finite_steps_raise_alerts_and_enough_in_a_row_pause_the_run(
        tmp_path: Path, accumulation: int, bad_calls: str) -> None:
    # Steps 1, 3, 4 and 5 are non-finite (a non-finite micro-batch ends its step, so with accumulation the
    # calls shift); step 2 is finite and breaks the streak, so only step 5 makes three in a row.
    trainer, channel = run_loop(
        tmp_path, LINEAR, "trainer.iterations=7", "trainer.nonfinite_patience=3", f"recipe.bad_calls={bad_calls}",
        f"trainer.grad_accumulation={accumulation}", "recipe.bad=inf", script=[(5, "resume")])
    assert trainer.steps.fast is (accumulation == 1)
    loss = series(channel, "train/loss")
    assert sorted(loss) == list(range(1, 8))
    assert [step for step, value in loss.items() if math.isnan(value)] == [1, 3, 4, 5]

    events = channel.of_type("event")
    warnings = [e for e in events if e["kind"] == "alert" and e["data"]["level"] == "warning"]
    assert [e["step"] for e in warnings] == [1, 3, 4, 5]
    assert all("non-finite loss" in e["data"]["message"] for e in warnings)
    assert "(3 in a row, 4 in all)" in warnings[-1]["data"]["message"]
    errors = [e for e in events if e["kind"] == "alert" and e["data"]["level"] == "error"]
    assert [(e["step"], e["data"]["message"]) for e in errors] == [(5, "paused: 3 non-finite losses in a row")]
    assert [e["step"] for e in events if e["kind"] == "pause"] == [5]
    paused = [s for s in channel.of_type("status") if s["state"] == "paused"]
    assert paused and all(s["step"] == 5 and s["nonfinite_total"] == 4 for s in paused)
    assert channel.result_for("resume")["message"] == "resumed at step 5"
    assert channel.of_type("status")[-1]["state"] == "finished"
    assert trainer.steps.nonfinite_total == 4


def test_a_skipped_accumulated_step_logs_no_stats_and_counts_no_samples_like_a_skipped_single_step(
        tmp_path: Path) -> None:
    with opened(tmp_path / "single", LINEAR, "recipe.output=full", "recipe.bad_calls=[0]") as (_, runner):
        single, skipped = runner.run(0)
        assert skipped and runner.last_samples == 0
    assert not any(key in single for key in ("train/mae", "train/call", "train/samples_per_s"))

    overrides = ("recipe.output=full", "recipe.bad_calls=[1]", "trainer.grad_accumulation=2")
    with opened(tmp_path / "accumulated", LINEAR, *overrides) as (_, runner):
        accumulated, skipped = runner.run(0)  # the second micro-batch is non-finite: the whole step is dropped
        assert skipped and math.isnan(accumulated["train/loss"])
        dropped_samples = runner.last_samples
    # The general path keeps what the first micro-batch added before the break: it logs train/mae and
    # train/call as half of that micro-batch's values (divided by 2 micro-batches, of which one counted),
    # logs train/samples_per_s, and reports 4 samples trained, which would go into samples_seen although
    # the update was thrown away. The fast path logs none of these for a skipped step.
    assert sorted(accumulated) == sorted(single), "a skipped accumulated step logs stats of a discarded micro-batch"
    assert dropped_samples == 0, "a skipped accumulated step counts the discarded micro-batch's samples"


# ---------------------------------------------------------------------------------- step outputs


@pytest.mark.parametrize(("accumulation", "fast"), [(1, True), (1, False), (2, False)])
def test_a_step_output_with_stats_samples_and_tokens_logs_stats_and_rates(
        tmp_path: Path, accumulation: int, fast: bool) -> None:
    with opened(tmp_path, LINEAR, "recipe.output=full", f"trainer.grad_accumulation={accumulation}") as (_, runner):
        runner.fast = fast
        values, _ = runner.run(0)
        assert runner.last_samples == BATCH * accumulation
        assert runner.last_tokens == FEATURES * BATCH * accumulation
    assert list(values) == ["train/loss", "train/lr", "train/grad_norm", "train/mae", "train/call",
                            "train/step_time", "train/samples_per_s", "train/tokens_per_s"]
    assert values["train/call"] == pytest.approx(sum(range(1, accumulation + 1)) / accumulation)
    assert values["train/mae"] > 0
    elapsed = values["train/step_time"]
    assert values["train/samples_per_s"] == pytest.approx(BATCH * accumulation / elapsed)
    assert values["train/tokens_per_s"] == pytest.approx(FEATURES * BATCH * accumulation / elapsed)


@pytest.mark.parametrize("fast", [True, False])
def test_a_plain_loss_tensor_logs_no_samples_or_tokens_rates(tmp_path: Path, fast: bool) -> None:
    with opened(tmp_path, LINEAR, "recipe.output=tensor") as (_, runner):
        runner.fast = fast
        values, skipped = runner.run(0)
        assert not skipped
        assert (runner.last_samples, runner.last_tokens) == (0, 0)
    assert list(values) == ["train/loss", "train/lr", "train/grad_norm", "train/step_time"]


def test_the_loop_counts_samples_and_tokens_from_step_outputs(tmp_path: Path) -> None:
    trainer, channel = run_loop(tmp_path, LINEAR, "recipe.output=full", "trainer.iterations=3")
    assert (trainer.steps.samples_seen, trainer.steps.tokens_seen) == (3 * BATCH, 3 * BATCH * FEATURES)
    assert sorted(series(channel, "train/tokens_per_s")) == [1, 2, 3]


# ---------------------------------------------------------------------------------- accumulation


def test_accumulating_two_micro_batches_equals_one_step_on_their_mean_loss(tmp_path: Path) -> None:
    overrides = ("trainer.grad_accumulation=2", "optimizer.name=sgd", "optimizer.momentum=0", "optimizer.lr=0.1")
    with opened(tmp_path, LINEAR, *overrides) as (session, runner):
        model = session.engines.model
        reference = copy.deepcopy(model)
        reference_opt = torch.optim.SGD(reference.parameters(), lr=0.1)
        micro = [F.mse_loss(reference(x), y) for x, y in (batch_of(session, 0), batch_of(session, 1))]
        ((micro[0] + micro[1]) / 2).backward()
        reference_opt.step()

        values, skipped = runner.run(0)
        assert not skipped
        assert values["train/loss"] == pytest.approx((micro[0].item() + micro[1].item()) / 2, rel=1e-6)
        for mine, theirs in zip(model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-6, atol=1e-7)
        assert session.feed.consumed == 2


# ---------------------------------------------------------------------------------- two engines


def test_two_engines_log_a_summed_loss_and_per_engine_values_and_both_train(tmp_path: Path) -> None:
    with opened(tmp_path, PAIR, "optimizer.warmup_steps=2", "trainer.grad_clip=1.0") as (session, runner):
        assert not runner.fast
        ar, nar = session.engines["ar"].model, session.engines["nar"].model
        x, y = batch_of(session, 0)
        with torch.no_grad():
            loss_ar, loss_nar = F.mse_loss(ar(x), y).item(), F.mse_loss(nar(x), 2 * y).item()
        before = params_of(ar, nar)
        values, skipped = runner.run(0)
        assert not skipped
        assert changed_everywhere(before, ar, nar)
    assert list(values) == ["train/loss", "train/loss/ar", "train/lr/ar", "train/grad_norm/ar", "train/loss/nar",
                            "train/lr/nar", "train/grad_norm/nar", "train/step_time"]
    assert values["train/loss/ar"] == pytest.approx(loss_ar, rel=1e-6)
    assert values["train/loss/nar"] == pytest.approx(loss_nar, rel=1e-6)
    assert values["train/loss"] == pytest.approx(loss_ar + loss_nar, rel=1e-6)
    assert values["train/lr/ar"] == values["train/lr/nar"] == pytest.approx(0.005)
    assert values["train/grad_norm/ar"] > 0 and values["train/grad_norm/nar"] > 0


def test_two_engines_through_the_loop_store_per_engine_metrics(tmp_path: Path) -> None:
    _, channel = run_loop(tmp_path, PAIR, "trainer.iterations=3", "trainer.grad_norm_every=2")
    assert sorted(series(channel, "train/loss/nar")) == [1, 2, 3]
    assert sorted(series(channel, "train/grad_norm/ar")) == [2]
    assert set(series(channel, "train/lr/ar").values()) == {0.01}
    assert channel.of_type("status")[-1]["state"] == "finished"


def test_a_loss_for_an_unknown_engine_raises_an_error_naming_it(tmp_path: Path) -> None:
    with opened(tmp_path, PAIR, "recipe.extra=vocoder") as (_, runner), \
            pytest.raises(ValueError, match=r"unknown engines \['vocoder'\]"):
        runner.run(0)


@pytest.mark.parametrize("fast", [True, False])
def test_a_single_engine_step_returning_a_loss_for_another_engine_raises_an_error_naming_it(
        tmp_path: Path, fast: bool) -> None:
    with opened(tmp_path, LINEAR, "recipe.extra=critic") as (_, runner):
        runner.fast = fast
        with pytest.raises(ValueError, match=r"unknown engines \['critic'\]"):
            runner.run(0)


# ---------------------------------------------------------------------------------- grad norm cadence


@pytest.mark.parametrize("accumulation", [1, 2])
def test_grad_norm_is_logged_every_grad_norm_every_steps_and_on_every_step_when_clipping(
        tmp_path: Path, accumulation: int) -> None:
    common = ("trainer.iterations=7", f"trainer.grad_accumulation={accumulation}")
    _, channel = run_loop(tmp_path / "measured", LINEAR, *common, "trainer.grad_norm_every=3")
    assert sorted(series(channel, "train/grad_norm")) == [3, 6]
    _, channel = run_loop(tmp_path / "clipped", LINEAR, *common, "trainer.grad_norm_every=3",
                          "trainer.grad_clip=0.5")
    norms = series(channel, "train/grad_norm")
    assert sorted(norms) == list(range(1, 8))
    assert all(value > 0 for value in norms.values())


# ---------------------------------------------------------------------------------- lr after resume


@pytest.mark.parametrize("fast", [True, False])
def test_a_resumed_run_logs_the_lr_its_optimizer_uses(tmp_path: Path, fast: bool) -> None:
    overrides = ("trainer.iterations=6", "optimizer.warmup_steps=4")
    _, whole = run_loop(tmp_path / "whole", LINEAR, *overrides, fast=fast)
    run_loop(tmp_path / "halves", LINEAR, *overrides, fast=fast, script=[(0, "quit@2")])
    resumed, second = run_loop(tmp_path / "halves", LINEAR, *overrides, fast=fast, resume=True)
    expected = series(whole, "train/lr")
    assert expected == pytest.approx({1: 0.0025, 2: 0.005, 3: 0.0075, 4: 0.01, 5: 0.01, 6: 0.01})
    whole_loss = series(whole, "train/loss")
    assert series(second, "train/loss") == {step: whole_loss[step] for step in (3, 4, 5, 6)}
    # StepRunner caches optimizer.param_groups[0] for the fast path when it is built, but Trainer.start then
    # resumes with optimizer.load_state_dict, which replaces the param group dicts: the fast path keeps reading
    # the stale group's lr (the warm-up's first value), while the optimizer trains with the restored one.
    logged = series(second, "train/lr")
    assert logged == pytest.approx({step: expected[step] for step in (3, 4, 5, 6)}), (
        f"logged lr after resume {logged} differs from the lr the optimizer used {expected}")
    assert resumed.s.engines.main.lr == pytest.approx(0.01)
