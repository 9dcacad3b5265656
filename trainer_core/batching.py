"""Greedy length-bucketed batching, fast enough for 10^7 items in a couple of seconds.

Items are sorted by length (stable) and cut into batches of consecutive items, each batch as
long as the limits allow: ``max_length_in_batch * batch_size <= max_tokens`` (when
``max_tokens > 0``) and ``batch_size <= max_batch_size`` (when ``max_batch_size > 0``).
An item longer than ``max_tokens`` gets a batch of its own.

The greedy loop "add the next item while it fits" needs no per-item Python work:

* Because lengths are sorted, a batch ``[s, e)`` is limited only by its last item: it fits
  iff ``e - s <= capacity(length[e - 1])``, the largest count ``k`` with
  ``k * length <= max_tokens`` (and ``k <= max_batch_size``). Capacity never increases along
  the sorted order.
* Items of equal capacity ``c`` form a contiguous run, found by one binary search for the
  longest length that still allows ``c``; inside a run the batches are every ``c`` items.
* Only a batch that straddles two runs needs a search of its own (over at most ``c`` items).

So the walk costs a few scalar steps per run of equal capacity (a few hundred for typical
token counts or durations), and the only full passes over the data are one validation pass
and one stable sort.
"""

from __future__ import annotations

import array
import math
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
            doubles = array.array("d", lengths)  # three times faster than torch.tensor(list)
        except (TypeError, ValueError, OverflowError) as err:
            raise ValueError(f"lengths must be numbers: {err}") from None
        values = torch.frombuffer(doubles, dtype=torch.float64) if doubles else torch.zeros(0, dtype=torch.float64)
    else:
        raise ValueError(f"lengths must be a list, tuple or tensor, got {type(lengths).__name__}")
    if values.dim() != 1:
        raise ValueError(f"lengths must be one-dimensional, got shape {tuple(values.shape)}")
    if values.dtype == torch.bool or values.is_complex():
        raise ValueError(f"lengths must be real numbers, got dtype {values.dtype}")
    values = values.to(torch.float64).contiguous()
    if values.numel() == 0:
        return values
    low, high = (float(v) for v in torch.aminmax(values))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("lengths must be finite (found inf or nan)")
    if low < 0:
        raise ValueError(f"lengths must be non-negative (found {low})")
    # -0.0 has a negative bit pattern; adding 0.0 turns it into 0.0 so bits order like values.
    return values + 0.0 if low == 0 else values


def sort_by_length(lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable ascending sort; non-negative doubles order like their bit patterns as int64,
    and the integer sort is several times faster than the floating-point one."""
    keys, order = torch.sort(lengths.view(torch.int64), stable=True)
    return keys.view(torch.float64), order


class _Limits:
    """Capacities of batches over a sorted length array, evaluated one position at a time."""

    def __init__(self, sorted_lengths: torch.Tensor, max_tokens: float, max_batch_size: int) -> None:
        self.lengths = sorted_lengths
        self.n = sorted_lengths.numel()
        self.max_tokens = float(max_tokens)
        self.max_size = min(max_batch_size, self.n) if max_batch_size > 0 else self.n

    def token_capacity(self, length: float) -> int:
        """Largest ``k <= n`` with ``k * length <= max_tokens`` (the limit's own float test)."""
        if self.max_tokens <= 0 or length <= 0:
            return self.n
        quotient = self.max_tokens / length
        k = self.n if quotient >= self.n else math.floor(quotient)
        while k < self.n and (k + 1) * length <= self.max_tokens:
            k += 1
        while k > 0 and k * length > self.max_tokens:
            k -= 1
        return k

    def capacity_at(self, position: int) -> int:
        return min(self.token_capacity(float(self.lengths[position])), self.max_size)

    def run_end(self, start: int, capacity: int) -> int:
        """First position after ``start`` whose capacity is below ``capacity``.

        Ending the run late would put too many items in a batch, so the length bound is settled
        on the exact float test; ending it early would only cost an extra search.
        """
        if self.max_tokens <= 0 or capacity == 0:
            return self.n
        longest = self.max_tokens / capacity  # then settle on the largest float that still fits
        while capacity * longest > self.max_tokens:
            longest = math.nextafter(longest, -math.inf)
        while capacity * math.nextafter(longest, math.inf) <= self.max_tokens:
            longest = math.nextafter(longest, math.inf)
        query = torch.tensor([longest], dtype=torch.float64)
        return max(int(torch.searchsorted(self.lengths, query, right=True)), start + 1)

    def straddle_end(self, start: int, capacity: int, run_end: int) -> int:
        """End of the batch from ``start`` that runs past ``run_end`` (binary search)."""
        low, high = run_end, min(start + capacity, self.n)  # ``low`` always fits
        while low < high:
            middle = (low + high + 1) // 2
            if middle - start <= self.capacity_at(middle - 1):
                low = middle
            else:
                high = middle - 1
        return low


def batch_starts(sorted_lengths: torch.Tensor, max_tokens: float, max_batch_size: int) -> torch.Tensor:
    """Sorted positions where the greedy batches start."""
    limits = _Limits(sorted_lengths, max_tokens, max_batch_size)
    segments = [torch.zeros(0, dtype=torch.int64)]
    start = 0
    while start < limits.n:
        capacity = limits.capacity_at(start)
        run_end, step = limits.run_end(start, capacity), max(capacity, 1)  # 0: oversized, alone
        whole = (run_end - start) // step
        if whole:
            segments.append(torch.arange(start, start + whole * step, step, dtype=torch.int64))
            start += whole * step
        if start < run_end:
            segments.append(torch.tensor([start], dtype=torch.int64))
            start = limits.straddle_end(start, step, run_end)
    return torch.cat(segments)


def count_oversized(sorted_lengths: torch.Tensor, max_tokens: float) -> int:
    if max_tokens <= 0:
        return 0
    limit = torch.tensor([float(max_tokens)], dtype=torch.float64)
    return sorted_lengths.numel() - int(torch.searchsorted(sorted_lengths, limit, right=True))


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
    starts = batch_starts(sorted_lengths, max_tokens, max_batch_size)
    bounds = torch.cat([starts, torch.tensor([n], dtype=torch.int64)])
    oversized = count_oversized(sorted_lengths, max_tokens)
    if drop_last and starts.numel():
        last_size, longest = n - int(starts[-1]), float(sorted_lengths[-1])
        if not is_full(last_size, longest, max_tokens, max_batch_size):
            bounds = bounds[:-1]
    return Batches(order=order, bounds=bounds, oversized=oversized)
