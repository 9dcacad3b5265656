"""trainer_core.io save/load of a large state dict against the raw libraries, fsync reported apart.

Workload: a transformer-like state dict of about ``--mb`` MB (default 1024, or TRAINDECK_BENCH_IO_MB):
per layer fp32 attention and MLP matrices, biases and norms, a bf16 copy of one projection, int64
position buffers and bool masks, so a few hundred tensors from 4 KB to 16 MB.

Saves (each run interleaves the methods; before every timed save the old file is deleted and
``os.sync()`` drains earlier writeback so runs do not bleed into each other):

* written, no fsync: ``io.save(..., fsync=False)`` vs ``safetensors.torch.save_file`` vs ``torch.save``;
  then the fsync of the file and its folder, timed on its own;
* durable: ``io.save`` (temp file, fsync, rename, folder fsync) vs the raw writers followed by an
  fsync of the file and the folder.

Loads come from the page cache (the files were just written): ``io.load`` vs ``load_file`` (both
map the file; timed alone and with every byte read) and vs ``torch.load(weights_only=True)``.

Every figure is the median (and the min) over ``--runs``; ratios compare figures from the same run.

Run: ``.venv/bin/python bench/io.py [--mb 1024] [--runs 5] [--dir DIR]``
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import safetensors.torch
import torch

from trainer_core import io

D_MODEL = 1024
Stat = tuple[float, float]  # (median, min) seconds


def state_dict(megabytes: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    d, sd = D_MODEL, {}
    sd["embed.weight"] = torch.randn(8192, d, generator=g)
    layer = 0
    while sum(t.nbytes for t in sd.values()) < megabytes << 20:
        p = f"layers.{layer}."
        sd[p + "attn.qkv.weight"] = torch.randn(3 * d, d, generator=g)
        sd[p + "attn.qkv.bias"] = torch.randn(3 * d, generator=g)
        sd[p + "attn.out.weight"] = torch.randn(d, d, generator=g)
        sd[p + "attn.out.weight_bf16"] = torch.randn(d, d, generator=g).to(torch.bfloat16)
        sd[p + "mlp.up.weight"] = torch.randn(4 * d, d, generator=g)
        sd[p + "mlp.up.bias"] = torch.randn(4 * d, generator=g)
        sd[p + "mlp.down.weight"] = torch.randn(d, 4 * d, generator=g)
        sd[p + "mlp.down.bias"] = torch.randn(d, generator=g)
        sd[p + "norm1.weight"] = torch.ones(d)
        sd[p + "norm2.weight"] = torch.ones(d)
        sd[p + "rope.positions"] = torch.arange(2048, dtype=torch.int64)
        sd[p + "attn.causal_mask"] = torch.ones(64, 64, dtype=torch.bool).tril()
        layer += 1
    return sd


def fsync_file_and_folder(path: Path) -> None:
    for target, flags in ((path, os.O_RDONLY), (path.parent, os.O_RDONLY | os.O_DIRECTORY)):
        fd = os.open(target, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def timed(fn: Callable[[], object]) -> float:
    """Seconds ``fn`` takes; what it returns is freed after the clock stops."""
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    del result
    return elapsed


def fresh(path: Path) -> Path:
    """Delete ``path`` and drain all writeback, so the next timed save starts from an idle disk."""
    path.unlink(missing_ok=True)
    os.sync()
    return path


WRITERS: dict[str, tuple[str, Callable[[dict[str, torch.Tensor], Path], None]]] = {
    "io.save .safetensors": (".safetensors", lambda sd, p: io.save(sd, p, fsync=False)),
    "safetensors save_file": (".safetensors", lambda sd, p: safetensors.torch.save_file(sd, p)),
    "torch.save": (".pt", lambda sd, p: torch.save(sd, p)),
    "io.save .pt": (".pt", lambda sd, p: io.save(sd, p, fsync=False)),
}


def durable_writer(name: str) -> Callable[[dict[str, torch.Tensor], Path], None]:
    if name.startswith("io.save"):
        return lambda sd, p: io.save(sd, p)
    write = WRITERS[name][1]
    return lambda sd, p: (write(sd, p), fsync_file_and_folder(p))


def bench_saves(sd: dict[str, torch.Tensor], folder: Path, runs: int) -> dict[str, dict[str, Stat]]:
    times: dict[str, dict[str, list[float]]] = {n: {"write": [], "fsync": [], "durable": []} for n in WRITERS}
    for run in range(runs):
        order = list(WRITERS) if run % 2 == 0 else list(reversed(WRITERS))
        for name in order:
            suffix, write = WRITERS[name]
            path = fresh(folder / f"save{suffix}")
            times[name]["write"].append(timed(lambda: write(sd, path)))  # noqa: B023
            times[name]["fsync"].append(timed(lambda: fsync_file_and_folder(path)))  # noqa: B023
            path = fresh(path)
            times[name]["durable"].append(timed(lambda: durable_writer(name)(sd, path)))  # noqa: B023
    return {n: {k: _stats(v) for k, v in kinds.items()} for n, kinds in times.items()}


def touch_all(loaded: dict[str, torch.Tensor]) -> None:
    for t in loaded.values():
        t.view(torch.uint8).sum() if t.dtype == torch.bool else t.sum()


LOADERS: dict[str, tuple[str, Callable[[Path], dict[str, torch.Tensor]]]] = {
    "io.load .safetensors": (".safetensors", lambda p: io.load(p)),
    "safetensors load_file": (".safetensors", lambda p: safetensors.torch.load_file(p)),
    "io.load .safetensors + read all": (".safetensors", lambda p: touch_all(io.load(p))),
    "load_file + read all": (".safetensors", lambda p: touch_all(safetensors.torch.load_file(p))),
    "io.load .pt": (".pt", lambda p: io.load(p)),
    "torch.load": (".pt", lambda p: torch.load(p, map_location="cpu", weights_only=True)),
}


def bench_loads(folder: Path, runs: int) -> dict[str, Stat]:
    times: dict[str, list[float]] = {n: [] for n in LOADERS}
    for run in range(runs):
        order = list(LOADERS) if run % 2 == 0 else list(reversed(LOADERS))
        for name in order:
            suffix, load = LOADERS[name]
            path = folder / f"save{suffix}"
            repeats = 20 if "read all" not in name and suffix == ".safetensors" else 1
            per_call = [timed(lambda: load(path)) for _ in range(repeats)]  # noqa: B023
            times[name].append(statistics.median(per_call))
            gc.collect()
    return {n: _stats(v) for n, v in times.items()}


def _stats(values: list[float]) -> tuple[float, float]:
    """(median, min): the median is the headline; the min shows the cost with the least interference."""
    return statistics.median(values), min(values)


def report(saves: dict[str, dict[str, Stat]], loads: dict[str, Stat], megabytes: float) -> None:
    print(f"\nsave {megabytes:.0f} MB, seconds: median (min)   written          fsync alone      durable")
    for name, t in saves.items():
        print(f"  {name:<28}" + "".join(f"{t[k][0]:>8.3f} ({t[k][1]:.3f})" for k in ("write", "fsync", "durable")))
    ours, raw_st, raw_pt = saves["io.save .safetensors"], saves["safetensors save_file"], saves["torch.save"]
    print("\nsave ratios of medians (of mins), lower is better")
    for kind in ("write", "durable"):
        for label, a, b in (("io.save .safetensors / torch.save  ", ours, raw_pt),
                            ("io.save .safetensors / save_file   ", ours, raw_st),
                            ("safetensors save_file / torch.save", raw_st, raw_pt),
                            ("io.save .pt / torch.save          ", saves["io.save .pt"], raw_pt)):
            target = "   (target <= 1.20x)" if b is raw_pt and a is ours else ""
            print(f"  {kind:<8} {label} {_ratio(a[kind], b[kind])}{target}")
    print("\nload, seconds: median (min)")
    for name, t in loads.items():
        print(f"  {name:<34} {t[0]:>9.4f} ({t[1]:.4f})")
    print("\nload ratios of medians (of mins), target <= 1.05x")
    for ours_name, raw_name in (("io.load .safetensors", "safetensors load_file"),
                                ("io.load .safetensors + read all", "load_file + read all"),
                                ("io.load .pt", "torch.load")):
        print(f"  {ours_name} / {raw_name}: {_ratio(loads[ours_name], loads[raw_name])}")


def _ratio(a: Stat, b: Stat) -> str:
    return f"{a[0] / b[0]:.2f}x ({a[1] / b[1]:.2f}x)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=int(os.environ.get("TRAINDECK_BENCH_IO_MB", "1024")))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None, help="folder for the files (default: a temp folder)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="traindeck-bench-io-", dir=args.dir))
    try:
        sd = state_dict(args.mb)
        size = sum(t.nbytes for t in sd.values()) / 2**20
        print(f"state dict: {len(sd)} tensors, {size:.0f} MB; files in {folder}; {args.runs} runs")
        saves = bench_saves(sd, folder, args.runs)
        loaded = io.load(folder / "save.safetensors")
        assert all(torch.equal(loaded[k], v) for k, v in sd.items()), "io.load gave different tensors"
        del loaded
        loads = bench_loads(folder, args.runs)
        report(saves, loads, size)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
