"""Ranks without ceremony.

Single-process runs never touch ``torch.distributed``; under torchrun (``WORLD_SIZE`` > 1) the
process group is created from the environment. Only the leader (rank 0) talks to the outside;
commands it receives are broadcast so every rank applies them at the same step.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_leader() -> bool:
    return rank() == 0


def init_from_env() -> bool:
    """Join the process group torchrun describes; returns whether this call joined it.

    The caller that joined is the one that leaves (``teardown``): a group someone else created
    stays theirs.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend=backend)
    return True


def teardown() -> None:
    """Leave the process group while the interpreter is whole.

    Left to interpreter shutdown, Gloo's worker threads can still hold work that refers to Python
    objects, and the process now and then aborts on its way out (SIGABRT) after a clean run.
    """
    if is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """The leader's ``obj`` on every rank (a no-op when not distributed)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on the leader (others get an empty list)."""
    if not is_initialized():
        return [obj]
    out: list[Any] | None = [None] * world_size() if is_leader() else None
    dist.gather_object(obj, out, dst=0)
    return out or []


def barrier() -> None:
    if is_initialized():
        dist.barrier()
