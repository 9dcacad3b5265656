"""Writer process for the kill test of ``trainer_core.io``.

Run as ``python -m tests.trainer_core.io_kill_writer``; it answers one line per command on stdin:

``calibrate TARGET``  saves a few times next to TARGET and prints ``period SECONDS`` (one save).
``kill TARGET SAVES DELAY``
                      forks a child that saves version 1, 0, 1, 0, ... of ``make_version`` to
                      TARGET forever; once the child reports SAVES finished saves, waits DELAY
                      seconds, SIGKILLs it, reaps it and prints ``killed STATUS``. Counting the
                      child's saves (rather than timing them) lets the test land kills before,
                      inside and after a given save whatever the machine's speed.

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


def _write_forever(target: Path, versions: list[dict[str, Any]], done: int) -> None:
    i = 1
    while True:
        io.save(versions[i % 2], target)
        os.write(done, b".")
        i += 1


def _calibrate(target: Path, versions: list[dict[str, Any]]) -> str:
    scratch = target.with_name(f"calibration{target.suffix}")
    start = time.perf_counter()
    for i in range(4):
        io.save(versions[i % 2], scratch)
    scratch.unlink()
    return f"period {(time.perf_counter() - start) / 4}"


def _kill_after(target: Path, versions: list[dict[str, Any]], saves: int, delay: float) -> str:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            _write_forever(target, versions, write_end)
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(1)
    os.close(write_end)
    finished = 0
    while finished < saves and os.read(read_end, 1):  # b"" when the child died: the status tells
        finished += 1
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.close(read_end)
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
            print(_kill_after(Path(target), versions, int(rest[0]), float(rest[1])), flush=True)


if __name__ == "__main__":
    main()
