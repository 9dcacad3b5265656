"""Loop overhead: the headless traindeck loop against a bare PyTorch loop, same model and data.

Each step does a real forward/backward/AdamW update of a small model plus a busy-wait of 1 ms or
0.1 ms of the thread's own CPU time, standing in for the model's compute. The two loops take
turns every 101 steps in one process (see ``paired.py``), so both see the same machine; steps/s
counts only the intervals between consecutive steps of one loop, by wall clock and by the
thread's CPU time. Each repeat is one paired run in a fresh process; the ratio printed is the
median over the repeats, with their range. ``--calibrate`` also pairs the bare loop with itself,
which shows the method's own spread.

    python bench/loop_overhead.py [--repeats 15] [--steps-1ms 2000] [--steps-01ms 5000] [--calibrate]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from paired import Handover, bare_against_bare, make_parts, read_result, settings, spin, summary
from torch import nn

SPEC = "__main__:build"  # this very module


def build(config: Any) -> Any:
    from trainer_core.recipe import Recipe

    model, data = make_parts(config.trainer.seed)
    spin_s = float(config.recipe["spin_ms"]) / 1000
    handover = Handover(config.recipe, config.trainer.iterations)

    def step(engines: Any, batch: Any) -> torch.Tensor:
        handover()
        x, y = batch
        loss = nn.functional.mse_loss(engines.model(x), y)
        spin(spin_s)
        return loss

    return Recipe(models=model, dataset=data, step=step)


def paired_run(steps: int, spin_ms: float) -> dict[str, dict[str, float]]:
    from trainer_core.headless import StdinChannel
    from trainer_core.recipe import resolve_config
    from trainer_core.train import run

    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as devnull:
        result = Path(tmp) / "result.json"
        config = resolve_config(SPEC, None, [
            f"trainer.iterations={steps}", "data.batch_size=8", "data.sampler=random", f"recipe.spin_ms={spin_ms}",
            "trainer.save_on_quit=false", *settings(spin_ms, result)])
        channel = StdinChannel(None, devnull, log_every=config.trainer.log_every)
        run(SPEC, config, Path(tmp) / "run", resume=False, channel=channel, install_signal_handlers=False)
        return read_result(result)


def calibration_run(steps: int, spin_ms: float) -> dict[str, dict[str, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        bare_against_bare(steps, spin_ms, Path(tmp) / "result.json")
        return read_result(Path(tmp) / "result.json")


def one_run(steps: int, spin_ms: float, calibrate: bool) -> dict[str, dict[str, float]]:
    """One paired run in a fresh process (``--one``), so no run inherits another's process."""
    args = [sys.executable, __file__, "--one", str(steps), str(spin_ms)] + (["--calibrate"] if calibrate else [])
    done = subprocess.run(args, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def report(spin_ms: float, runs: list[dict[str, dict[str, float]]], target: float | str) -> None:
    for clock, bare, ours, ratio, low, high in summary(runs):
        print(f"{spin_ms:>6}ms {clock:>6} {bare:>13.1f} {ours:>18.1f} {ratio:>6.3f} {low:>6.3f}-{high:<6.3f} "
              f"{target:>7}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--steps-1ms", type=int, default=2000)
    parser.add_argument("--steps-01ms", type=int, default=5000)
    parser.add_argument("--calibrate", action="store_true", help="also pair the bare loop with itself")
    parser.add_argument("--one", nargs=2, metavar=("STEPS", "SPIN_MS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.one:
        steps, spin_ms = int(args.one[0]), float(args.one[1])
        runs = calibration_run(steps, spin_ms) if args.calibrate else paired_run(steps, spin_ms)
        print(json.dumps(runs))
        return
    print(f"{'step':>8} {'clock':>6} {'bare steps/s':>13} {'traindeck steps/s':>18} {'ratio':>6} {'range':>13} "
          f"{'target':>7}")
    for spin_ms, steps, target in ((1.0, args.steps_1ms, 0.98), (0.1, args.steps_01ms, 0.95)):
        report(spin_ms, [one_run(steps, spin_ms, False) for _ in range(args.repeats)], target)
        if args.calibrate:
            report(spin_ms, [one_run(steps, spin_ms, True) for _ in range(args.repeats)], "(bare/bare)")
    print("ratio: median over the paired runs of traindeck/bare steps/s (range: lowest-highest run)")
    if args.calibrate:
        print("(bare/bare): the bare loop paired with itself, the spread a process's luck alone gives")


if __name__ == "__main__":
    main()
