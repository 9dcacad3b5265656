"""Loop overhead: the headless traindeck loop against a bare PyTorch loop, same model and data.

Each step does a real forward/backward/update of a small model plus a busy-wait of 1 ms or
0.1 ms of the thread's own CPU time, standing in for the model's compute. Both loops record
when each step starts, in wall-clock time and in the main thread's CPU time; steps/s is measured
between the first and last recorded step, so start-up is excluded. On a quiet machine the two
agree; on a busy one the CPU-time figure is the stable one (it does not count time the process
spent descheduled). Runs alternate between the two loops and the medians are compared.

    python bench/loop_overhead.py [--repeats 5] [--steps-1ms 2000] [--steps-01ms 10000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

from trainer_core.headless import StdinChannel
from trainer_core.recipe import Recipe, resolve_config
from trainer_core.sampler import RandomSampler
from trainer_core.train import run

STAMPS: list[tuple[float, float]] = []
SPEC = "__main__:build"  # this very module, so STAMPS is shared with the recipe


def spin(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def stamp() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


def make_parts(seed: int = 0) -> tuple[nn.Module, torch.utils.data.Dataset]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    data = torch.utils.data.TensorDataset(torch.randn(4096, 16), torch.randn(4096, 1))
    return model, data


def build(config) -> Recipe:
    model, data = make_parts(config.trainer.seed)
    spin_s = float(config.recipe["spin_ms"]) / 1000

    def step(engines, batch) -> torch.Tensor:
        STAMPS.append(stamp())
        x, y = batch
        loss = nn.functional.mse_loss(engines.model(x), y)
        spin(spin_s)
        return loss

    return Recipe(models=model, dataset=data, step=step)


def rate(stamps: list[tuple[float, float]]) -> tuple[float, float]:
    """Steps/s by wall clock and by the main thread's CPU time."""
    steps = len(stamps) - 1
    return steps / (stamps[-1][0] - stamps[0][0]), steps / (stamps[-1][1] - stamps[0][1])


def bare_loop(steps: int, spin_ms: float) -> tuple[float, float]:
    model, data = make_parts()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(data, sampler=RandomSampler(len(data)), batch_size=8, drop_last=True)
    stamps: list[tuple[float, float]] = []
    done = 0
    while done < steps:
        for x, y in loader:
            stamps.append(stamp())
            loss = nn.functional.mse_loss(model(x), y)
            spin(spin_ms / 1000)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done += 1
            if done == steps:
                break
    return rate(stamps)


def traindeck_loop(steps: int, spin_ms: float) -> tuple[float, float]:
    STAMPS.clear()
    config = resolve_config(SPEC, None, [f"trainer.iterations={steps}", "data.batch_size=8", "data.sampler=random",
                                         f"recipe.spin_ms={spin_ms}", "trainer.save_on_quit=false"])
    with tempfile.TemporaryDirectory() as tmp, open(os.devnull, "w") as devnull:
        channel = StdinChannel(None, devnull, log_every=config.trainer.log_every)
        run(SPEC, config, Path(tmp) / "run", resume=False, channel=channel, install_signal_handlers=False)
    return rate(STAMPS[:-1] if len(STAMPS) > steps else STAMPS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--steps-1ms", type=int, default=2000)
    parser.add_argument("--steps-01ms", type=int, default=10000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"{'step':>8} {'clock':>6} {'bare steps/s':>13} {'traindeck steps/s':>18} {'ratio':>6} {'target':>7}")
    for spin_ms, steps, target in ((1.0, args.steps_1ms, 0.98), (0.1, args.steps_01ms, 0.95)):
        bare, ours = [], []
        for repeat in range(args.repeats):  # pairs of runs; which loop goes first alternates
            if repeat % 2 == 0:
                b = bare_loop(steps, spin_ms)
                o = traindeck_loop(steps, spin_ms)
            else:
                o = traindeck_loop(steps, spin_ms)
                b = bare_loop(steps, spin_ms)
            bare.append(b)
            ours.append(o)
        for index, clock in enumerate(("wall", "cpu")):
            b = statistics.median(r[index] for r in bare)
            o = statistics.median(r[index] for r in ours)
            ratio = statistics.median(ro[index] / rb[index] for rb, ro in zip(bare, ours, strict=True))
            print(f"{spin_ms:>6}ms {clock:>6} {b:>13.1f} {o:>18.1f} {ratio:>6.3f} {target:>7}")
    print("ratio: median over the paired runs of traindeck/bare steps/s")


if __name__ == "__main__":
    main()
