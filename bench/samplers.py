"""Samplers against the usual approaches, measured in the same run.

* PoolSampler, one epoch of 10^5 draws, against a list-remove pool (``random.choice`` then
  ``pool.remove``: the usual marble bag). Target: >= 200x faster.
* RandomSampler over 10^9 items: memory (peak RSS delta, measured in a fresh process), state
  size (bytes of JSON) and indices/s when iterated in Python, against a materialised
  ``torch.randperm`` sampler at a size that fits. Targets: < 100 MB, < 1 KB, >= 1M indices/s.
* BatchedOrderedSampler construction from 10^7 lengths (a tensor and a list of durations).
  Target: < 5 s. For a ratio, both it and the plain Python greedy loop (sorted() then one item
  at a time) also batch 10^6 lengths; the loop at 10^7 takes minutes.

Figures are medians of ``--repeats`` runs, baseline and candidate interleaved; CPU seconds are
printed next to wall-clock ones because a shared machine's load stretches the latter.
Run: ``.venv/bin/python bench/samplers.py [--repeats 3] [--only random|batched|pool]...``
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from trainer_core.sampler import BatchedOrderedSampler, PoolSampler, RandomSampler

POOL_SIZE = 10**5
HUGE = 10**9
ITERATED = 3_000_000
RANDPERM_SIZE = 10**8
BATCH_ITEMS = 10**7
BASELINE_BATCH_ITEMS = 10**6
MAX_SECONDS = 400.0  # durations uniform in 1..20 s: about 38 per batch


class Timing:
    """Median wall-clock and CPU seconds (CPU time shows the cost when other processes share the cores)."""

    def __init__(self, wall: list[float], cpu: list[float]) -> None:
        self.wall = statistics.median(wall)
        self.cpu = statistics.median(cpu)

    def __str__(self) -> str:
        return f"{self.wall:8.3f} s (CPU {self.cpu:7.3f} s)"


def medians(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, Timing]:
    """Median times per named run, the runs interleaved so drifting load hits all alike."""
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, work in runs.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            work()
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
    return {name: Timing(wall[name], cpu[name]) for name in runs}


def verdict(met: bool) -> str:
    return "met" if met else "NOT met"


# --- PoolSampler -----------------------------------------------------------------------------


def list_remove_epoch(size: int) -> list[int]:
    pool = list(range(size))
    drawn = []
    while pool:
        item = random.choice(pool)
        pool.remove(item)
        drawn.append(item)
    return drawn


def pool_sampler_epoch(size: int) -> list[int]:
    bag = PoolSampler(size, seed=1)
    return [bag.sample() for _ in range(size)]


def bench_pool(repeats: int) -> None:
    assert sorted(pool_sampler_epoch(1000)) == sorted(list_remove_epoch(1000)) == list(range(1000))
    t = medians({"list": lambda: list_remove_epoch(POOL_SIZE), "pool": lambda: pool_sampler_epoch(POOL_SIZE)}, repeats)
    ratio, cpu_ratio = t["list"].wall / t["pool"].wall, t["list"].cpu / t["pool"].cpu
    print(f"PoolSampler, one epoch of {POOL_SIZE:,} draws")
    print(f"  list.remove pool (baseline)  {t['list']}")
    print(f"  PoolSampler                  {t['pool']}   {ratio:.0f}x faster (CPU {cpu_ratio:.0f}x)   "
          f"target >= 200x: {verdict(ratio >= 200)}")


# --- RandomSampler ---------------------------------------------------------------------------


def rss_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def measure_memory(kind: str, size: int) -> None:
    """Child process: peak RSS growth (bytes) for building a sampler and iterating part of it."""
    baseline = rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # restart the peak counter (VmHWM) from here
    if kind == "keyed":
        iterator = iter(RandomSampler(size, seed=1))
        for _ in range(ITERATED):
            next(iterator)
    else:
        order = torch.randperm(size)
        int(order[0])
    print(json.dumps({"bytes": (rss_kb("VmHWM") - baseline) * 1024}))


def memory_in_child(kind: str, size: int) -> int:
    command = [sys.executable, __file__, "--memory", kind, str(size)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=True)
    return int(json.loads(done.stdout.strip().splitlines()[-1])["bytes"])


def iterate(sampler_iter: object, count: int) -> None:
    iterator = iter(sampler_iter)  # type: ignore[call-overload]
    for _ in range(count):
        next(iterator)


def bench_random(repeats: int) -> None:
    start = time.perf_counter()
    sampler = RandomSampler(HUGE, seed=1)
    created = time.perf_counter() - start
    t = medians(
        {
            "randperm": lambda: iterate(torch.randperm(ITERATED).tolist(), ITERATED),
            "keyed": lambda: iterate(RandomSampler(HUGE, seed=1), ITERATED),
        },
        repeats,
    )
    rate, base_rate = ITERATED / t["keyed"].wall, ITERATED / t["randperm"].wall
    cpu_rate = ITERATED / t["keyed"].cpu
    iterate(sampler, 12345)
    state_bytes = len(json.dumps(sampler.state_dict()).encode())
    keyed_memory = memory_in_child("keyed", HUGE)
    randperm_memory = memory_in_child("randperm", RANDPERM_SIZE)
    print(f"RandomSampler over {HUGE:,} items")
    print(f"  created in {created * 1e3:.2f} ms; state {state_bytes} bytes of JSON   target < 1 KB: "
          f"{verdict(state_bytes < 1024)} (a stored order would be {HUGE * 8 / 1e9:.0f} GB as int64)")
    print(f"  memory, peak RSS growth over {ITERATED:,} draws: {keyed_memory / 2**20:7.1f} MB   "
          f"target < 100 MB: {verdict(keyed_memory < 100 * 2**20)}")
    print(f"  randperm({RANDPERM_SIZE:,}) (baseline) peak RSS growth: {randperm_memory / 2**20:7.1f} MB "
          f"(x{HUGE // RANDPERM_SIZE} at {HUGE:,} items: ~{randperm_memory * HUGE / RANDPERM_SIZE / 2**30:.0f} GB)")
    print(f"  iterated in Python: {rate / 1e6:5.2f} M indices/s (per CPU second {cpu_rate / 1e6:5.2f} M)   "
          f"target >= 1M/s: {verdict(rate >= 1e6)}")
    print(f"  randperm({ITERATED:,}).tolist() iterated (baseline, its shuffle included): {base_rate / 1e6:5.2f} M/s "
          f"(sampler/baseline {rate / base_rate:.2f}x)")


# --- BatchedOrderedSampler -------------------------------------------------------------------


def greedy_loop(lengths: list[float], max_tokens: float) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def bench_batched(repeats: int) -> None:
    durations = torch.rand(BATCH_ITEMS, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 19 + 1
    as_list = durations.tolist()
    small = as_list[:BASELINE_BATCH_ITEMS]

    def build(lengths: object) -> BatchedOrderedSampler:
        return BatchedOrderedSampler(lengths, max_tokens=MAX_SECONDS, drop_last=False)  # type: ignore[arg-type]

    assert list(build(small[:5000])) == greedy_loop(small[:5000], MAX_SECONDS)
    t = medians({"tensor": lambda: build(durations), "list": lambda: build(as_list)}, repeats)
    small_t = medians({"loop": lambda: greedy_loop(small, MAX_SECONDS), "sampler": lambda: build(small)}, repeats)
    batches = build(durations).num_batches
    print(f"BatchedOrderedSampler construction, {BATCH_ITEMS:,} durations, max_tokens={MAX_SECONDS} "
          f"({batches:,} batches)")
    print(f"  from a tensor  {t['tensor']}   target < 5 s: {verdict(t['tensor'].wall < 5)}")
    print(f"  from a list    {t['list']}   target < 5 s: {verdict(t['list'].wall < 5)}")
    ratio = small_t["loop"].wall / small_t["sampler"].wall
    print(f"  at {BASELINE_BATCH_ITEMS:,} items: Python greedy loop (baseline) {small_t['loop']}, "
          f"sampler {small_t['sampler']} ({ratio:.1f}x faster)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per figure; the median is reported")
    parser.add_argument("--only", choices=["random", "batched", "pool"], action="append", help="run only these parts")
    parser.add_argument("--memory", nargs=2, metavar=("KIND", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory:
        measure_memory(args.memory[0], int(args.memory[1]))
        return
    random.seed(0)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, "
          f"median of {args.repeats} runs")
    parts = {"random": bench_random, "batched": bench_batched, "pool": bench_pool}
    for name, bench in parts.items():
        if not args.only or name in args.only:
            bench(args.repeats)


if __name__ == "__main__":
    main()
