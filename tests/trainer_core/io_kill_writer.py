"""Writer process for the kill test of ``trainer_core.io``.

Run as ``python -m tests.trainer_core.io_kill_writer``; it answers one line per command on stdin:

``calibrate TARGET``  saves a few times next to TARGET and prints ``period SECONDS`` (one save).
``kill TARGET DELAY`` forks a child that saves version 1, 0, 1, 0, ... of ``make_version`` to
                      TARGET forever, SIGKILLs it after DELAY seconds, reaps it and prints
                      ``killed STATUS``.

Forking from one warm process makes each kill cost milliseconds instead of a fresh interpreter
importing torch.
"""

from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from trainer_core import io


def make_version(k: int) -> dict[str, Any]:
    """About 0.4 MB of tensors (shared, strided, bf16) and plain values, different for each ``k``."""
    g = torch.Generator().manual_seed(k)
    weights = torch.randn(256, 256, generator=g)
    return {
        "version": k,
        "weights": weights,
        "tied": weights,
        "view": weights[::2, 1:],
        "bias": torch.randn(4096, generator=g).to(torch.bfloat16),
        "state": {0: {"step": torch.tensor(float(k)), "exp_avg": torch.randn(8192, generator=g)}},
        "notes": [f"version {k}", k * 0.5, None, (k, True)],
    }


def _write_forever(target: Path, versions: list[dict[str, Any]]) -> None:
    i = 1
    while True:
        io.save(versions[i % 2], target)
        i += 1


def _calibrate(target: Path, versions: list[dict[str, Any]]) -> str:
    scratch = target.with_name(f"calibration{target.suffix}")
    start = time.perf_counter()
    for i in range(4):
        io.save(versions[i % 2], scratch)
    scratch.unlink()
    return f"period {(time.perf_counter() - start) / 4}"


def _kill_after(target: Path, versions: list[dict[str, Any]], delay: float) -> str:
    pid = os.fork()
    if pid == 0:
        try:
            _write_forever(target, versions)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(1)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return f"killed {status}"


def main() -> None:
    torch.set_num_threads(1)  # no worker threads exist when forking
    versions = [make_version(0), make_version(1)]
    for line in sys.stdin:
        command, target, *rest = line.split()
        if command == "calibrate":
            print(_calibrate(Path(target), versions), flush=True)
        else:
            print(_kill_after(Path(target), versions, float(rest[0])), flush=True)


if __name__ == "__main__":
    main()
