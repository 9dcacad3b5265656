"""Activation offload against no checkpointing and plain torch.utils.checkpoint, in one run.

Model: a 12-layer pre-norm transformer LM (causal SDPA attention, GELU MLP, AdamW). On GPU:
d=1024, 16 heads, seq 2048, batch 4, bf16 autocast; on CPU a scaled-down shape in float32.
Variants: ``plain`` (no checkpointing), ``checkpoint`` (torch.utils.checkpoint per block,
non-reentrant) and ``offload`` (trainer_core.offload.apply_activation_offload). All start
from the same weights and data; their first losses are asserted equal.

Memory: on GPU, peak ``torch.cuda.max_memory_allocated`` during a step minus the baseline of
parameters, gradients and optimizer state (measured just before the step); on CPU, the bytes
autograd keeps for backward, from ActivationMeter (``bytes`` on the compute device,
``cpu_bytes`` offloaded). Step time: the median over rounds, the variants interleaved in each
round so that drift in machine load hits them alike; on CPU it is this process's CPU time with
one thread (``--threads``), which other work on a shared machine does not inflate.

Target (GPU): >= 50% less activation memory than plain at <= 10% more step time.

Run: ``.venv/bin/python bench/offload.py [--device auto|cpu|cuda] [--rounds 5]``
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer_core.offload import ActivationMeter, apply_activation_offload

GPU_SHAPE = {"layers": 12, "dim": 1024, "heads": 16, "seq": 2048, "batch": 4, "vocab": 8192}
CPU_SHAPE = {"layers": 12, "dim": 192, "heads": 4, "seq": 128, "batch": 4, "vocab": 1024}
VARIANTS = ("plain", "checkpoint", "offload")


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class LM(nn.Module):
    def __init__(self, layers: int, dim: int, heads: int, seq: int, vocab: int, **_: int) -> None:
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, dim), nn.Parameter(torch.zeros(seq, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens[:, :-1]) + self.pos[: tokens.size(1) - 1]
        for block in self.blocks:
            x = block(x)
        return F.cross_entropy(self.head(self.norm(x)).flatten(0, 1).float(), tokens[:, 1:].flatten())


class CheckpointForward:
    """torch.utils.checkpoint around a block's forward: the usual recompute, inputs kept on device."""

    def __init__(self, inner: Callable[..., torch.Tensor]) -> None:
        self.inner = inner

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.inner, x, use_reentrant=False)


@dataclass
class Runner:
    name: str
    model: LM
    optimizer: torch.optim.Optimizer
    device: torch.device
    autocast: torch.dtype | None
    times: list[float] = field(default_factory=list)
    activation_bytes: int = 0
    offloaded_bytes: int = 0
    peak_bytes: int = 0
    first_loss: float = 0.0

    def step(self, tokens: torch.Tensor, meter: ActivationMeter | None = None) -> tuple[float, float]:
        """One optimizer step; returns (seconds, loss)."""
        autocast = (torch.autocast(self.device.type, self.autocast) if self.autocast is not None
                    else contextlib.nullcontext())
        clock = time.perf_counter if self.device.type == "cuda" else time.process_time
        sync(self.device)
        start = clock()
        with meter if meter is not None else contextlib.nullcontext(), autocast:
            loss = self.model(tokens)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: part of the baseline
        sync(self.device)
        elapsed = clock() - start
        if meter is not None:
            self.activation_bytes, self.offloaded_bytes = meter.bytes, meter.cpu_bytes
        return elapsed, loss.item()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(name: str, base: LM, device: torch.device, autocast: torch.dtype | None) -> Runner:
    model = copy.deepcopy(base).to(device)
    if name == "checkpoint":
        for block in model.blocks:
            block.forward = CheckpointForward(block.forward)
    elif name == "offload":
        apply_activation_offload(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return Runner(name, model, optimizer, device, autocast)


def measure_peak(runner: Runner, tokens: torch.Tensor) -> None:
    """GPU only: the step's peak allocation above parameters, gradients and optimizer state."""
    sync(runner.device)
    baseline = torch.cuda.memory_allocated(runner.device)
    torch.cuda.reset_peak_memory_stats(runner.device)
    runner.step(tokens)
    runner.peak_bytes = torch.cuda.max_memory_allocated(runner.device) - baseline


def run(device: torch.device, shape: dict[str, int], rounds: int) -> list[Runner]:
    torch.manual_seed(0)
    base = LM(**shape)
    tokens = torch.randint(0, shape["vocab"], (shape["batch"], shape["seq"] + 1)).to(device)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    runners = [build(name, base, device, autocast) for name in VARIANTS]
    for runner in runners:  # first step: losses must agree; also allocates optimizer state
        runner.first_loss = runner.step(tokens)[1]
    losses = {r.name: r.first_loss for r in runners}
    if not all(math.isclose(loss, losses["plain"], rel_tol=1e-4) for loss in losses.values()):
        raise SystemExit(f"variants disagree on the first loss: {losses}")
    for runner in runners:
        runner.step(tokens)  # warm-up
        if device.type == "cuda":
            measure_peak(runner, tokens)
    for _ in range(rounds):
        for runner in runners:
            runner.times.append(runner.step(tokens)[0])
    for runner in runners:
        runner.step(tokens, ActivationMeter())
    return runners


def report(runners: list[Runner], device: torch.device, shape: dict[str, int], rounds: int) -> None:
    plain = runners[0]
    print(f"device {device}, shape {shape}, median of {rounds} steps, first loss {plain.first_loss:.4f} (all equal)")
    use_peak = device.type == "cuda"
    header = "peak activ. (MiB)" if use_peak else "kept on device (MiB)"
    clock = "step (ms)" if use_peak else "step (ms CPU)"
    print(f"{'variant':<11} {header:>21} {'offloaded (MiB)':>16} {clock:>13} {'memory':>8} {'time':>7}")
    for r in runners:
        memory = r.peak_bytes if use_peak else r.activation_bytes
        base_memory = plain.peak_bytes if use_peak else plain.activation_bytes
        step, base_step = statistics.median(r.times), statistics.median(plain.times)
        print(f"{r.name:<11} {memory / 2**20:>21.1f} {r.offloaded_bytes / 2**20:>16.1f} {step * 1e3:>13.1f} "
              f"{memory / base_memory:>7.2f}x {step / base_step:>6.2f}x")
    offload, ckpt = runners[2], runners[1]
    memory_saving = 1 - (offload.peak_bytes / plain.peak_bytes if use_peak else
                         offload.activation_bytes / plain.activation_bytes)
    slower = statistics.median(offload.times) / statistics.median(plain.times) - 1
    vs_checkpoint = statistics.median(offload.times) / statistics.median(ckpt.times) - 1
    print(f"offload vs plain: {memory_saving:.0%} less activation memory on the compute device, "
          f"{slower:+.0%} step time ({vs_checkpoint:+.0%} against checkpoint)")
    if use_peak:
        met = memory_saving >= 0.5 and slower <= 0.10
        print(f"target (>= 50% less memory, <= +10% time): {'met' if met else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for the CPU run")
    for key in CPU_SHAPE:
        parser.add_argument(f"--{key}", type=int, default=None, help="override the shape")
    args = parser.parse_args()
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    if not use_cuda:
        torch.set_num_threads(args.threads)
    shape = dict(GPU_SHAPE if use_cuda else CPU_SHAPE)
    shape.update({key: getattr(args, key) for key in shape if getattr(args, key) is not None})
    report(run(device, shape, args.rounds), device, shape, args.rounds)


if __name__ == "__main__":
    main()
