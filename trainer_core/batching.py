"""Greedy length-bucketed batching, vectorised so that 10^7 items take seconds, not minutes.

Items are sorted by length (stable) and cut into batches of consecutive items, each batch as
long as the limits allow: ``max_length_in_batch * batch_size <= max_tokens`` (when
``max_tokens > 0``) and ``batch_size <= max_batch_size`` (when ``max_batch_size > 0``).
An item longer than ``max_tokens`` gets a batch of its own.

The greedy loop "add the next item while it fits" is rewritten as array work:

* Because lengths are sorted, a batch ``[s, e)`` is limited only by its last item: it fits
  iff ``e - s <= capacity[e - 1]``, where ``capacity[i]`` is the largest count ``k`` with
  ``k * length[i] <= max_tokens`` (and ``k <= max_batch_size``). Capacities never increase
  along the sorted order.
* So ``e - capacity[e - 1]`` is strictly increasing in ``e``, and the end of the batch that
  starts at ``s`` is one binary search away.
* Inside a run of items with equal capacity ``c`` the batches are every ``c`` items, so the
  sequential walk jumps over whole runs; it takes about two Python steps per run (a few
  hundred for typical token counts or durations), not one per batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Batches:
    """Batch ``b`` is ``order[bounds[b]:bounds[b + 1]]``; ``oversized`` counts lone long items."""

    order: torch.Tensor
    bounds: torch.Tensor
    oversized: int

    def __len__(self) -> int:
        return self.bounds.numel() - 1

    def batch(self, index: int) -> list[int]:
        start, stop = self.bounds[index : index + 2].tolist()
        return self.order[start:stop].tolist()


def lengths_tensor(lengths: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """The lengths as a 1-D float64 tensor, or a clear ``ValueError`` naming what is wrong."""
    if isinstance(lengths, torch.Tensor):
        values = lengths.detach().to("cpu")
    elif isinstance(lengths, list | tuple):
        try:
            values = torch.tensor(lengths, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"lengths must be numbers: {err}") from None
    else:
        raise ValueError(f"lengths must be a list, tuple or tensor, got {type(lengths).__name__}")
    if values.dim() != 1:
        raise ValueError(f"lengths must be one-dimensional, got shape {tuple(values.shape)}")
    if values.dtype == torch.bool or values.is_complex():
        raise ValueError(f"lengths must be real numbers, got dtype {values.dtype}")
    values = values.to(torch.float64)
    if not bool(torch.isfinite(values).all()):
        raise ValueError("lengths must be finite (found inf or nan)")
    if bool((values < 0).any()):
        raise ValueError(f"lengths must be non-negative (found {float(values.min())})")
    return values + 0.0  # turns -0.0 into 0.0, so the bit pattern orders like the value


def sort_by_length(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable ascending sort; non-negative doubles order like their bit patterns as int64,
    and the integer sort is several times faster than the floating-point one."""
    keys, order = torch.sort(lengths.view(torch.int64), stable=True)
    return keys.view(torch.float64), order


def capacities(sorted_lengths: torch.Tensor, max_tokens: float, max_batch_size: int) -> torch.Tensor:
    """For each sorted item, the most items a batch ending with it may hold (0: alone).

    The token capacity is ``floor(max_tokens / length)`` (``inf`` for length 0, then capped at
    the item count), settled by one correction step on the limit's own test,
    ``k * length <= max_tokens``, because a rounded division can be off by one.
    """
    n = sorted_lengths.numel()
    if max_tokens > 0:
        cap = torch.div(max_tokens, sorted_lengths).floor_().clamp_(0, n)
        grow = (cap + 1).mul_(sorted_lengths) <= max_tokens
        shrink = (cap * sorted_lengths) > max_tokens
        cap.add_(grow).add_(shrink, alpha=-1).clamp_(0, n)
    else:
        cap = torch.full((n,), float(n), dtype=torch.float64)
    if max_batch_size > 0:
        cap.clamp_(max=max_batch_size)
    return cap.to(torch.int64)


def batch_starts(cap: torch.Tensor) -> torch.Tensor:
    """Sorted positions where the greedy batches start, given the capacities.

    A batch ``[s, e)`` fits iff ``e - cap[e - 1] <= s``, and ``e - cap[e - 1]`` is strictly
    increasing, so the end of the batch from ``s`` is found by one binary search. Inside a run
    of equal capacity ``c`` the batches are simply every ``c`` items, so the walk jumps whole
    runs at once and the Python loop only takes about two steps per run of equal capacity.
    """
    n = cap.numel()
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    earliest_start = torch.arange(1, n + 1, dtype=torch.int64) - cap
    run_starts = torch.cat([torch.zeros(1, dtype=torch.int64), (cap[1:] != cap[:-1]).nonzero().squeeze(1) + 1])
    run_ends = torch.cat([run_starts[1:], torch.tensor([n], dtype=torch.int64)])
    segments = []
    start = 0
    while start < n:
        run = int(torch.searchsorted(run_starts, start, right=True)) - 1
        run_end, step = int(run_ends[run]), max(int(cap[start]), 1)
        whole = (run_end - start) // step
        if whole:
            segments.append(torch.arange(start, start + whole * step, step, dtype=torch.int64))
            start += whole * step
            if start >= run_end:
                continue
        segments.append(torch.tensor([start], dtype=torch.int64))
        start = max(int(torch.searchsorted(earliest_start, start, right=True)), start + 1)
    return torch.cat(segments)


def is_full(size: int, longest: float, max_tokens: float, max_batch_size: int) -> bool:
    """Whether one more item as long as the batch's longest would break a limit.

    A batch no limit can bind (only ``max_tokens`` is set and its items have length 0)
    counts as full: it cannot be short of anything.
    """
    token_bound = max_tokens > 0 and longest > 0
    if token_bound and (size + 1) * longest > max_tokens:
        return True
    if max_batch_size > 0:
        return size + 1 > max_batch_size
    return not token_bound


def group_by_length(
    lengths: Sequence[float] | torch.Tensor, *, max_tokens: float, max_batch_size: int, drop_last: bool
) -> Batches:
    """Sort, cut into greedy batches, and drop the final batch if asked and it is not full."""
    values = lengths_tensor(lengths)
    n = values.numel()
    sorted_lengths, order = sort_by_length(values)
    cap = capacities(sorted_lengths, max_tokens, max_batch_size)
    starts = batch_starts(cap)
    bounds = torch.cat([starts, torch.tensor([n], dtype=torch.int64)])
    oversized = int((cap == 0).sum()) if max_tokens > 0 else 0
    if drop_last and starts.numel():
        last_size, longest = n - int(starts[-1]), float(sorted_lengths[-1])
        if not is_full(last_size, longest, max_tokens, max_batch_size):
            bounds = bounds[:-1]
    return Batches(order=order, bounds=bounds, oversized=oversized)
