"""Resumable samplers: shuffled, ordered, length-batched, and a "marble bag" pool.

Every sampler counts ``epoch`` and ``position`` (items, or batches for the batched one,
yielded in the current epoch by this rank) and derives everything else from them, so its
state is a few integers whatever the dataset size:

* iterating yields the rest of the current epoch; once an epoch is exhausted, the next
  ``iter()`` starts the next one (so a sampler restored at the exact end of an epoch goes on
  with the next epoch);
* ``set_epoch(e)`` with a different epoch starts that epoch from its beginning; setting the
  current epoch keeps the position, so a loop that calls it every epoch still resumes;
* ``state_dict_at(epoch, position)`` gives the state after exactly ``position`` yields of
  ``epoch``: a ``DataLoader`` with workers prefetches ahead of what the loop has consumed,
  so the loop saves the state of what it consumed, not the sampler's own.

Sharding follows ``torch.utils.data.DistributedSampler``: rank ``r`` of ``w`` takes epoch
positions ``r, r + w, r + 2w, ...``, and the epoch is padded by wrapping around to a multiple
of ``w``, so every rank yields ``ceil(n / w)`` items (batches) and nothing is dropped; only the
``w - 1`` or fewer padding entries repeat an item of the same epoch.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch

from trainer_core.batching import group_by_length
from trainer_core.permutation import KeyedPermutation, mix64

KEY_KIND = "kind"
KEY_VERSION = "version"
KEY_LENGTH = "length"
KEY_SEED = "seed"
KEY_WORLD_SIZE = "world_size"
KEY_EPOCH = "epoch"
KEY_POSITION = "position"
KEY_NUM_BATCHES = "num_batches"
KEY_MAX_TOKENS = "max_tokens"
KEY_MAX_BATCH_SIZE = "max_batch_size"
KEY_SHUFFLE = "shuffle"
KEY_DROP_LAST = "drop_last"
STATE_VERSION = 1

# Items generated per vectorised step: enough to amortise the torch calls, and below torch's
# parallel grain size (32768 elements) so each step stays on one thread, which is faster for
# work this small and does not stall when other processes keep the cores busy.
CHUNK = 30_000
BATCH_CHUNK = 1 << 10


class SamplerStateError(ValueError):
    """A state dict that does not fit the sampler it is loaded into."""


class OversizedItemWarning(UserWarning):
    """Items longer than ``max_tokens`` were given batches of their own."""


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_shard(rank: int, world_size: int) -> tuple[int, int]:
    _check_int("world_size", world_size, 1)
    _check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank must be < world_size ({world_size}), got {rank}")
    return rank, world_size


def _same(a: object, b: object) -> bool:
    """Equality that does not let ``True`` pass for ``1``."""
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def _shard_positions(start: int, stop: int, rank: int, world_size: int, total: int) -> torch.Tensor:
    """Epoch positions of this rank's entries ``start..stop-1``, wrapped into ``[0, total)``."""
    positions = torch.arange(start, stop, dtype=torch.int64).mul_(world_size).add_(rank)
    return positions.remainder_(total) if world_size > 1 else positions


class _EpochSampler:
    """Epoch/position bookkeeping and the state-dict protocol shared by every sampler."""

    _kind: ClassVar[str]

    def __init__(self) -> None:
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        raise NotImplementedError

    def _identity(self) -> dict[str, Any]:
        """Values a loaded state must match (sizes, seed, settings)."""
        raise NotImplementedError

    def _chunks(self, epoch: int, start: int) -> Iterator[Iterable[Any]]:
        """This rank's entries of ``epoch`` from ``start`` on, a chunk at a time."""
        raise NotImplementedError

    def _restored(self) -> None:
        """Hook for samplers that cache derived data when epoch/position change."""

    def _start_next_epoch_if_done(self) -> None:
        # An empty epoch is never "done": with nothing to yield, epochs change by set_epoch only.
        if self.position >= len(self) > 0:
            self.epoch += 1
            self.position = 0
            self._restored()

    def __iter__(self) -> Iterator[Any]:
        self._start_next_epoch_if_done()
        return self._follow(self._chunks(self.epoch, self.position))

    def _follow(self, chunks: Iterator[Iterable[Any]]) -> Iterator[Any]:
        for chunk in chunks:
            for item in chunk:
                self.position += 1
                yield item

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning, unless it is already the current one."""
        _check_int("epoch", epoch, 0)
        if epoch != self.epoch:
            self.epoch = epoch
            self.position = 0
            self._restored()

    def state_dict(self) -> dict[str, Any]:
        """The current state: small, JSON-serialisable, independent of the dataset size."""
        return self.state_dict_at(self.epoch, self.position)

    def state_dict_at(self, epoch: int, position: int) -> dict[str, Any]:
        """The state after exactly ``position`` yields of ``epoch`` (for prefetching loaders)."""
        _check_int("epoch", epoch, 0)
        _check_int("position", position, 0)
        if position > len(self):
            raise ValueError(f"position {position} is past the end of an epoch ({len(self)} per epoch)")
        return {KEY_KIND: self._kind, KEY_VERSION: STATE_VERSION, **self._identity(),
                KEY_EPOCH: epoch, KEY_POSITION: position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a state; everything is checked before anything changes."""
        epoch, position = self._validated(state)
        self.epoch = epoch
        self.position = position
        self._restored()

    def _validated(self, state: object) -> tuple[int, int]:
        name = type(self).__name__
        if not isinstance(state, Mapping):
            raise SamplerStateError(f"{name} state must be a dict, got {type(state).__name__}")
        expected = {KEY_KIND: self._kind, KEY_VERSION: STATE_VERSION, **self._identity()}
        wanted = {*expected, KEY_EPOCH, KEY_POSITION}
        missing = sorted(wanted - set(state))
        if missing:
            raise SamplerStateError(f"{name} state is missing keys {missing}")
        unknown = sorted(str(key) for key in set(state) - wanted)
        if unknown:
            raise SamplerStateError(f"{name} state has unknown keys {unknown}")
        for key, value in expected.items():
            if not _same(state[key], value):
                raise SamplerStateError(f"{name} state has {key}={state[key]!r} but this sampler has {value!r}")
        try:
            epoch = _check_int(KEY_EPOCH, state[KEY_EPOCH], 0)
            position = _check_int(KEY_POSITION, state[KEY_POSITION], 0)
        except ValueError as err:
            raise SamplerStateError(f"{name} state: {err}") from None
        if position > len(self):
            raise SamplerStateError(f"{name} state has position {position} past the epoch end ({len(self)})")
        return epoch, position


class RandomSampler(_EpochSampler):
    """A fresh seeded permutation every epoch, computed in chunks, never stored."""

    _kind = "RandomSampler"

    def __init__(self, length: int, *, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.length = _check_int("length", length, 0)
        self.seed = _check_int("seed", seed, -(1 << 63))
        self.rank, self.world_size = _check_shard(rank, world_size)
        KeyedPermutation(self.length, 0)  # rejects sizes the permutation cannot handle, now
        self._per_rank = math.ceil(self.length / world_size)

    def __len__(self) -> int:
        return self._per_rank

    def _identity(self) -> dict[str, Any]:
        return {KEY_LENGTH: self.length, KEY_SEED: self.seed, KEY_WORLD_SIZE: self.world_size}

    def _chunks(self, epoch: int, start: int) -> Iterator[list[int]]:
        permutation = KeyedPermutation(self.length, mix64(self.seed, epoch))
        for low in range(start, self._per_rank, CHUNK):
            high = min(low + CHUNK, self._per_rank)
            positions = _shard_positions(low, high, self.rank, self.world_size, self.length)
            yield permutation(positions).tolist()


class OrderedSampler(_EpochSampler):
    """``0 .. length-1`` in order (this rank's share), resumable like the others."""

    _kind = "OrderedSampler"

    def __init__(self, length: int, *, rank: int = 0, world_size: int = 1) -> None:
        super().__init__()
        self.length = _check_int("length", length, 0)
        self.rank, self.world_size = _check_shard(rank, world_size)
        self._per_rank = math.ceil(self.length / world_size)

    def __len__(self) -> int:
        return self._per_rank

    def _identity(self) -> dict[str, Any]:
        return {KEY_LENGTH: self.length, KEY_WORLD_SIZE: self.world_size}

    def _chunks(self, epoch: int, start: int) -> Iterator[Iterable[int]]:
        if self.world_size == 1:
            yield range(start, self.length)
            return
        rank, world, length = self.rank, self.world_size, self.length
        for low in range(start, self._per_rank, CHUNK):
            yield [(rank + j * world) % length for j in range(low, min(low + CHUNK, self._per_rank))]


class BatchedOrderedSampler(_EpochSampler):
    """Batches of similar-length items under a token and/or batch-size budget.

    Batches are fixed at construction (see ``trainer_core.batching``); ``shuffle`` permutes
    their order each epoch with the seed, and ranks are dealt whole batches.
    """

    _kind = "BatchedOrderedSampler"

    def __init__(
        self,
        lengths: Sequence[float] | torch.Tensor,
        *,
        max_tokens: float = 0,
        max_batch_size: int = 0,
        shuffle: bool = False,
        drop_last: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int | float) or not max_tokens >= 0:
            raise ValueError(f"max_tokens must be a number >= 0, got {max_tokens!r}")
        if not math.isfinite(max_tokens):
            raise ValueError(f"max_tokens must be finite, got {max_tokens!r}")
        self.max_batch_size = _check_int("max_batch_size", max_batch_size, 0)
        if max_tokens == 0 and max_batch_size == 0:
            raise ValueError("BatchedOrderedSampler needs a limit: set max_tokens > 0 or max_batch_size > 0")
        self.max_tokens = max_tokens
        self.shuffle = bool(shuffle)
        self.drop_last = bool(drop_last)
        self.seed = _check_int("seed", seed, -(1 << 63))
        self.rank, self.world_size = _check_shard(rank, world_size)
        self._batches = group_by_length(lengths, max_tokens=max_tokens, max_batch_size=max_batch_size,
                                        drop_last=self.drop_last)
        self.num_items = self._batches.order.numel()
        self.num_batches = len(self._batches)
        self._per_rank = math.ceil(self.num_batches / world_size)
        if self._batches.oversized:
            warnings.warn(
                f"{self._batches.oversized} item(s) are longer than max_tokens={max_tokens}; "
                "each forms a batch of its own",
                OversizedItemWarning,
                stacklevel=2,
            )

    def __len__(self) -> int:
        return self._per_rank

    def _identity(self) -> dict[str, Any]:
        return {
            KEY_LENGTH: self.num_items, KEY_NUM_BATCHES: self.num_batches, KEY_SEED: self.seed,
            KEY_WORLD_SIZE: self.world_size, KEY_MAX_TOKENS: self.max_tokens,
            KEY_MAX_BATCH_SIZE: self.max_batch_size, KEY_SHUFFLE: self.shuffle, KEY_DROP_LAST: self.drop_last,
        }

    def _chunks(self, epoch: int, start: int) -> Iterator[list[list[int]]]:
        permutation = KeyedPermutation(self.num_batches, mix64(self.seed, epoch)) if self.shuffle else None
        order, bounds = self._batches.order, self._batches.bounds
        for low in range(start, self._per_rank, BATCH_CHUNK):
            high = min(low + BATCH_CHUNK, self._per_rank)
            ids = _shard_positions(low, high, self.rank, self.world_size, self.num_batches)
            if permutation is not None:
                ids = permutation(ids)
            starts, stops = bounds[ids].tolist(), bounds[ids + 1].tolist()
            yield [order[a:b].tolist() for a, b in zip(starts, stops, strict=True)]


class PoolSampler(_EpochSampler):
    """A marble bag: draws without replacement, refilled with a new shuffle when empty.

    The bag's order for refill ``epoch`` is a keyed permutation of (seed, epoch), so the state
    is (seed, epoch, position) at any size; draws come from a small buffer of precomputed
    positions, O(1) each.
    """

    _kind = "PoolSampler"

    def __init__(self, pool_or_length: int | Sequence[Any] | torch.Tensor, *, seed: int = 0) -> None:
        super().__init__()
        if isinstance(pool_or_length, bool):
            raise ValueError("pool_or_length must be an int or a sequence, got bool")
        if isinstance(pool_or_length, int):
            self.pool: Sequence[Any] | torch.Tensor | None = None
            self.length = _check_int("length", pool_or_length, 1)
        elif hasattr(pool_or_length, "__len__") and hasattr(pool_or_length, "__getitem__"):
            self.pool = pool_or_length
            self.length = len(pool_or_length)
            if self.length == 0:
                raise ValueError("PoolSampler needs a non-empty pool")
        else:
            raise ValueError(f"pool_or_length must be an int or a sequence, got {type(pool_or_length).__name__}")
        self.seed = _check_int("seed", seed, -(1 << 63))
        KeyedPermutation(self.length, 0)
        self._pending: list[int] = []  # upcoming indices of the current bag, last one drawn first

    def __len__(self) -> int:
        return self.length

    def _identity(self) -> dict[str, Any]:
        return {KEY_LENGTH: self.length, KEY_SEED: self.seed}

    def _restored(self) -> None:
        self._pending = []

    def _chunks(self, epoch: int, start: int) -> Iterator[list[int]]:
        permutation = KeyedPermutation(self.length, mix64(self.seed, epoch))
        for low in range(start, self.length, CHUNK):
            yield permutation(torch.arange(low, min(low + CHUNK, self.length), dtype=torch.int64)).tolist()

    def _refill_pending(self) -> None:
        self._start_next_epoch_if_done()
        chunk = next(self._chunks(self.epoch, self.position))
        chunk.reverse()
        self._pending = chunk

    def sample(self) -> Any:
        """One item not drawn since the last refill (refilling first if the bag is empty)."""
        if not self._pending:
            self._refill_pending()
        self.position += 1
        index = self._pending.pop()
        return index if self.pool is None else self.pool[index]

    __call__ = sample

    def __iter__(self) -> Iterator[Any]:
        self._start_next_epoch_if_done()
        return self._drain()

    def _drain(self) -> Iterator[Any]:
        while self.position < self.length:
            yield self.sample()
