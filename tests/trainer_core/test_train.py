"""The loop, driven in-process through a scripted channel with the real demo recipe."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from tests.trainer_core.loop_helpers import ScriptedChannel, small_config, train
from trainer_core.checkpoint import list_checkpoints
from trainer_core.recipe import resolve_config
from trainer_core.train import run

LINEAR = "tests.trainer_core.test_steps:build_linear"


def losses(run_dir: Path, name: str = "train/loss") -> list[tuple[int, float]]:
    with sqlite3.connect(run_dir / "metrics.sqlite") as conn:
        return conn.execute("SELECT step, value FROM metrics WHERE name=? ORDER BY step", (name,)).fetchall()


def events(run_dir: Path, kind: str) -> list[tuple[int, str]]:
    with sqlite3.connect(run_dir / "metrics.sqlite") as conn:
        return conn.execute("SELECT step, data FROM events WHERE kind=? ORDER BY id", (kind,)).fetchall()


def test_reaching_iterations_saves_a_final_checkpoint_and_exits_0(tmp_path: Path) -> None:
    code, channel = train(tmp_path, small_config("trainer.iterations=6"))
    assert code == 0
    assert [c["step"] for c in list_checkpoints(tmp_path)] == [6]
    assert (tmp_path / "config.yaml").is_file()
    assert channel.of_type("status")[-1]["state"] == "finished"
    assert channel.closed


def test_every_step_writes_one_row_per_metric_to_the_store(tmp_path: Path) -> None:
    train(tmp_path, small_config("trainer.iterations=5", "trainer.grad_norm_every=2"))
    assert [step for step, _ in losses(tmp_path)] == [1, 2, 3, 4, 5]
    assert [step for step, _ in losses(tmp_path, "train/grad_norm")] == [2, 4]
    for name in ("train/lr", "train/step_time", "train/steps_per_s", "train/accuracy",
                 "train/tokens_per_s", "train/samples_per_s", "train/epoch"):
        assert len(losses(tmp_path, name)) == 5, name


def test_metrics_reach_the_channel_in_step_order_and_before_every_later_message(tmp_path: Path) -> None:
    started = time.time()
    _, channel = train(tmp_path, small_config("trainer.iterations=7", "trainer.save_frequency=3",
                                              "trainer.eval_frequency=2"))
    trained: list[int] = []
    for message in channel.sent:
        if message["type"] == "metrics" and "train/loss" in message["values"]:
            trained.append(message["step"])
            assert started <= message["time"] <= time.time()
        elif message.get("step"):  # events, results and status: the metrics of their step came first
            assert trained[-1] == message["step"], message
    assert trained == list(range(1, 8))
    times = [m["time"] for m in channel.of_type("metrics") if "train/loss" in m["values"]]
    assert times == sorted(times)
    assert len(events(tmp_path, "checkpoint")) == 3 and len(events(tmp_path, "eval")) == 3


def test_a_crash_keeps_the_metrics_of_the_steps_trained_before_it(tmp_path: Path) -> None:
    config = resolve_config(LINEAR, None, ["trainer.iterations=50", "recipe.raise_at=5", "trainer.log_every=0"])
    channel = ScriptedChannel()
    with pytest.raises(RuntimeError, match="on purpose"):
        run(LINEAR, config, tmp_path, resume=False, channel=channel, install_signal_handlers=False)
    assert [step for step, _ in losses(tmp_path)] == [1, 2, 3, 4, 5]
    kinds = [m["type"] for m in channel.sent]
    assert kinds[-1] == "crash" and kinds.count("crash") == 1
    assert [m["step"] for m in channel.of_type("metrics")] == [1, 2, 3, 4, 5]


def test_loss_falls_on_the_demo(tmp_path: Path) -> None:
    train(tmp_path, small_config("trainer.iterations=60"))
    values = [v for _, v in losses(tmp_path)]
    assert sum(values[-10:]) / 10 < 0.85 * sum(values[:5]) / 5


def test_periodic_save_and_eval_follow_their_frequencies(tmp_path: Path) -> None:
    train(tmp_path, small_config("trainer.iterations=6", "trainer.save_frequency=2", "trainer.eval_frequency=3",
                                 "trainer.keep_last=0"))
    assert [c["step"] for c in list_checkpoints(tmp_path)] == [2, 4, 6]
    assert [step for step, _ in losses(tmp_path, "eval/loss")] == [3, 6]


def test_commands_are_applied_and_each_gets_one_result(tmp_path: Path) -> None:
    script = [(1, "save"), (1, "export best"), (2, "eval"), (2, "lr 0.0005"), (3, "status"), (3, "help"),
              (3, "time"), (3, "time to 5"), (3, "sav"), (3, "lr -1"), (3, "export ../evil")]
    code, channel = train(tmp_path, small_config("trainer.iterations=6"), script)
    assert code == 0
    save = channel.result_for("save")
    assert save["ok"] and Path(save["data"]["path"]).is_dir()
    export = channel.result_for("export best")
    assert export["ok"] and Path(export["data"]["path"]) == tmp_path / "exports" / "best.safetensors"
    assert (tmp_path / "exports" / "best.safetensors").is_file()
    assert channel.result_for("eval")["data"]["metrics"]["loss"] > 0
    assert channel.result_for("lr")["data"]["lr"] == pytest.approx(0.0005)
    assert channel.result_for("status")["data"]["iterations"] == 6
    assert "save" in channel.result_for("help")["message"]
    assert channel.result_for("time to 5")["data"]["target"] == 5
    bad = [r for r in channel.results() if not r["ok"]]
    assert [r["command"] for r in bad] == ["sav", "lr -1", "export ../evil"]
    assert "did you mean 'save'" in bad[0]["message"]
    remote = [data for _, data in events(tmp_path, "command") if '"source": "remote"' in data]
    assert len(remote) == len(script)
    assert len(events(tmp_path, "result")) >= len(script)


def test_lr_command_sets_the_lr_of_the_next_step_and_the_schedule_continues(tmp_path: Path) -> None:
    train(tmp_path, small_config("trainer.iterations=40", "optimizer.warmup_steps=0"), [(3, "lr 0.0001")])
    lrs = dict(losses(tmp_path, "train/lr"))
    [applied] = [step for step, _ in events(tmp_path, "lr")]  # the first poll at or after step 3
    assert 3 <= applied <= 38
    assert lrs[applied] > 1e-3
    assert lrs[applied + 1] == pytest.approx(1e-4)
    assert lrs[applied + 2] < lrs[applied + 1]


def test_scheduled_quit_stops_at_that_step_and_saves(tmp_path: Path) -> None:
    code, channel = train(tmp_path, small_config("trainer.iterations=20"), [(0, "quit@4")])
    assert code == 0
    assert [step for step, _ in losses(tmp_path)][-1] == 4
    assert [c["step"] for c in list_checkpoints(tmp_path)] == [4]
    assert channel.result_for("quit@4")["ok"]
    assert channel.of_type("status")[-1]["state"] == "stopped"


def test_scheduled_commands_survive_a_resume(tmp_path: Path) -> None:
    train(tmp_path, small_config("trainer.iterations=20"), [(0, "export at7@7"), (0, "quit@3")])
    code, _ = train(tmp_path, small_config("trainer.iterations=8"), resume=True)
    assert code == 0
    assert (tmp_path / "exports" / "at7.safetensors").is_file()


def test_pause_holds_the_step_until_resume(tmp_path: Path) -> None:
    script = [(2, "pause"), (2, "resume")]
    code, channel = train(tmp_path, small_config("trainer.iterations=4"), script)
    assert code == 0
    assert channel.result_for("pause")["message"].startswith("paused")
    assert channel.result_for("resume")["message"].startswith("resumed")
    kinds = [e["kind"] for e in channel.of_type("event")]
    assert "pause" in kinds and "resume" in kinds


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_is_bit_exact_with_workers(tmp_path: Path, workers: int) -> None:
    overrides = (f"data.num_workers={workers}", "trainer.eval_frequency=3")
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    train(whole, small_config("trainer.iterations=10", *overrides))
    train(halves, small_config("trainer.iterations=10", *overrides), [(0, "quit@5")])
    train(halves, small_config("trainer.iterations=10", *overrides), resume=True)
    assert losses(halves) == losses(whole)
    assert len(losses(whole)) == 10


def test_eval_quit_before_the_first_step_evaluates_the_latest_checkpoint(tmp_path: Path) -> None:
    train(tmp_path, small_config("trainer.iterations=4"))
    code, channel = train(tmp_path, small_config("trainer.iterations=8"), [(0, "eval_quit")], resume=True)
    assert code == 0
    result = channel.result_for("eval_quit")
    assert result["ok"] and result["step"] == 4
    assert [step for step, _ in losses(tmp_path)][-1] == 4
    assert [c["step"] for c in list_checkpoints(tmp_path)] == [4]


def test_resume_skips_a_truncated_checkpoint_and_says_why(tmp_path: Path) -> None:
    train(tmp_path, small_config("trainer.iterations=4", "trainer.save_frequency=2", "trainer.keep_last=0"))
    newest = Path(list_checkpoints(tmp_path)[-1]["path"])
    weights = max(newest.glob("model.*"), key=lambda p: p.stat().st_size)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, channel = train(tmp_path, small_config("trainer.iterations=5"), resume=True)
    assert code == 0
    start = next(e for e in channel.of_type("event") if e["kind"] == "start")
    assert start["data"]["resume_from"].endswith("step_00000002")
    alerts = [e["data"]["message"] for e in channel.of_type("event") if e["kind"] == "alert"]
    assert any("step_00000004" in message for message in alerts)


def test_tensorboard_event_files_are_written_when_asked(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tmp_path, small_config("trainer.iterations=3", "trainer.tensorboard=true"))
    accumulator = EventAccumulator(str(tmp_path / "tensorboard"))
    accumulator.Reload()
    assert [event.step for event in accumulator.Scalars("train/loss")] == [1, 2, 3]


def test_a_fresh_run_refuses_a_run_directory_with_checkpoints(tmp_path: Path) -> None:
    from trainer_core.rundir import RunDirError

    train(tmp_path, small_config("trainer.iterations=2"))
    with pytest.raises(RunDirError, match="--resume"):
        train(tmp_path, small_config("trainer.iterations=2"))
    assert [c["step"] for c in list_checkpoints(tmp_path)] == [2]


def test_activation_offload_trains_the_demo_to_the_same_losses(tmp_path: Path) -> None:
    train(tmp_path / "plain", small_config("trainer.iterations=4", "recipe.layers=2"))
    code, channel = train(tmp_path / "offload", small_config("trainer.iterations=4", "recipe.layers=2",
                                                             "optimizations.unsloth=true",
                                                             "optimizations.measure_activations=true"))
    assert code == 0
    assert losses(tmp_path / "offload") == losses(tmp_path / "plain")
    notes = [e["data"]["message"] for e in channel.of_type("event") if e["kind"] == "info"]
    assert any("offload" in note for note in notes)
    assert len(losses(tmp_path / "offload", "train/activation_bytes")) == 4
