"""Paired measurement: a traindeck loop and a bare PyTorch loop that take turns, slice by slice.

On a shared 2-core machine the speed a process gets drifts by ±15 % over seconds, and a process's
own luck (where its memory landed, which core it got) moves it by a few percent more, so two loops
measured one after the other, or in two processes, differ by more than a loop overhead is. Here
they run in one process and take turns: the traindeck loop runs ``SLICE`` steps, then, from inside
its recipe's step, hands over to the bare loop, which runs ``SLICE`` steps and hands back. Both
see the same machine and the same process; the bare loop paired with itself measures 0.99-1.01.

Each side records when each of its steps starts (wall clock and the thread's CPU time). A side's
rate counts only the intervals between two consecutive steps of that side: the interval around a
handover is dropped, one in ``SLICE`` (a prime, so that work the loop does every N steps is not
dropped more often than its share), and so are the first ``WARMUP_SLICES`` slices of each side.
traindeck's background threads (the metrics writer, the server pipe) keep running while the bare
loop has its turn; what they do with the GIL then is charged to the bare loop, which favours
traindeck by at most the writer's share of the GIL, well under 0.5 % (it binds a batch of rows
to one statement a few times a second).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

SLICE = 101
WARMUP_SLICES = 2


def spin(seconds: float) -> None:
    """Busy-wait ``seconds`` of this thread's CPU time: the model's compute, whatever else runs."""
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


class Tally:
    """Clean intervals of one side: how many, and their wall and CPU seconds."""

    def __init__(self) -> None:
        self.slices = 0
        self.steps = 0
        self.wall = 0.0
        self.cpu = 0.0

    def add(self, first: tuple[float, float], last: tuple[float, float], intervals: int) -> None:
        self.slices += 1
        if self.slices > WARMUP_SLICES and intervals > 0:
            self.steps += intervals
            self.wall += last[0] - first[0]
            self.cpu += last[1] - first[1]

    def rates(self) -> dict[str, float]:
        return {"steps": self.steps, "wall": self.steps / self.wall, "cpu": self.steps / self.cpu}


# -- the partner: a bare loop in a child process --------------------------------------------------

class BareLoop:
    """The baseline: the same model, data, sampler and optimizer, and nothing else."""

    def __init__(self, spin_ms: float) -> None:
        from trainer_core.sampler import RandomSampler

        self.spin_s = spin_ms / 1000
        self.model, data = make_parts()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3, weight_decay=0.0)  # traindeck's default
        self.loader = torch.utils.data.DataLoader(data, sampler=RandomSampler(len(data)), batch_size=8,
                                                  drop_last=True)
        self.feed = self._batches()

    def _batches(self) -> Any:
        while True:
            yield from self.loader

    def step(self) -> None:
        x, y = next(self.feed)
        loss = nn.functional.mse_loss(self.model(x), y)
        spin(self.spin_s)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


# -- the traindeck side: called at the start of every step of the recipe ----------------------------

class InlinePartner:
    """The bare loop, run a slice at a time when the traindeck side hands over."""

    def __init__(self, spin_ms: float) -> None:
        with torch.random.fork_rng():
            self.loop = BareLoop(spin_ms)
        self.reply: Any = None

    def send(self, count: int | None) -> None:
        if count is None:
            return
        first = last = stamp()
        for index in range(count):
            last = stamp()
            if index == 0:
                first = last
            self.loop.step()
        self.reply = (first, last, count - 1)

    def recv(self) -> Any:
        return self.reply

    def close(self) -> None:
        return None


class Handover:
    """Call at the start of each step; after ``iterations`` calls it writes both sides' rates to ``result``."""

    def __init__(self, recipe_cfg: Any, iterations: int) -> None:
        self.conn = InlinePartner(float(recipe_cfg["bare_spin_ms"]))
        self.result = Path(str(recipe_cfg["result"]))
        self.iterations = iterations
        self.calls = 0
        self.first = self.last = stamp()
        self.mine, self.bare = Tally(), Tally()

    def __call__(self) -> None:
        now = stamp()
        if self.calls % SLICE == 0:
            if self.calls:
                self.mine.add(self.first, self.last, SLICE - 1)
            self.conn.send(SLICE)
            self.bare.add(*self.conn.recv())
            now = stamp()
            self.first = now
        self.last = now
        self.calls += 1
        if self.calls == self.iterations:
            self.mine.add(self.first, self.last, (self.calls - 1) % SLICE)
            self.conn.send(None)
            self.conn.close()
            self.result.write_text(json.dumps({"traindeck": self.mine.rates(), "bare": self.bare.rates()}))


def bare_against_bare(steps: int, spin_ms: float, result: Path) -> None:
    """The calibration: the bare loop on both sides, so any ratio away from 1 is the method's own spread."""
    handover, loop = Handover({"bare_spin_ms": spin_ms, "result": result}, steps), BareLoop(spin_ms)
    for _ in range(steps):
        handover()
        loop.step()


def settings(spin_ms: float, result: Path) -> list[str]:
    """The ``--set`` items a recipe built with :class:`Handover` needs."""
    return [f"recipe.bare_spin_ms={spin_ms}", f"recipe.result={result}"]


def summary(runs: list[dict[str, dict[str, float]]]) -> list[tuple[str, float, float, float, float, float]]:
    """Per clock: the medians of the bare and traindeck steps/s, and the median, lowest and highest ratio."""
    rows = []
    for clock in ("wall", "cpu"):
        ratios = [r["traindeck"][clock] / r["bare"][clock] for r in runs]
        rows.append((clock, statistics.median(r["bare"][clock] for r in runs),
                     statistics.median(r["traindeck"][clock] for r in runs), statistics.median(ratios), min(ratios),
                     max(ratios)))
    return rows


def read_result(path: Path) -> dict[str, dict[str, float]]:
    return json.loads(Path(path).read_text())
