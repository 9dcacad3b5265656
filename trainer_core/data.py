"""Endless batches over epochs, with the position of what was *consumed*.

A DataLoader with workers prefetches ahead of the loop, so the sampler's own position runs
ahead of training. Resuming exactly needs the sampler state at the number of batches the
loop actually consumed in the current epoch; this module keeps that count.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from trainer_core import sampler as samplers

EPOCH = "epoch"
CONSUMED = "consumed"
SAMPLER = "sampler"


def build_sampler(data_cfg: Any, dataset: Any, lengths: Any, *, seed: int, rank: int, world_size: int) -> Any:
    kind = data_cfg.sampler
    if kind == "auto":
        kind = "batched" if data_cfg.max_tokens > 0 and lengths is not None else (
            "random" if data_cfg.shuffle else "ordered"
        )
    if kind == "batched":
        if lengths is None:
            raise ValueError("data.sampler: 'batched' needs the recipe to give per-item lengths (Recipe.lengths)")
        return samplers.BatchedOrderedSampler(
            lengths, max_tokens=data_cfg.max_tokens, max_batch_size=data_cfg.batch_size if data_cfg.max_tokens <= 0
            else 0, shuffle=data_cfg.shuffle, drop_last=data_cfg.drop_last, seed=seed, rank=rank,
            world_size=world_size,
        )
    if kind == "random":
        return samplers.RandomSampler(len(dataset), seed=seed, rank=rank, world_size=world_size)
    if kind == "ordered":
        return samplers.OrderedSampler(len(dataset), rank=rank, world_size=world_size)
    raise ValueError(f"data.sampler: unknown sampler {kind!r} (auto, random, ordered, batched)")


def yields_batches(sampler: Any) -> bool:
    return isinstance(sampler, samplers.BatchedOrderedSampler) or bool(getattr(sampler, "yields_batches", False))


class DataFeed:
    """Batches forever; ``state_dict`` describes exactly the consumed batches."""

    def __init__(self, dataset: Any, sampler: Any, data_cfg: Any, *, collate_fn: Any, seed: int) -> None:
        self.sampler = sampler
        self.batched = yields_batches(sampler)
        self.batch_size = 1 if self.batched else data_cfg.batch_size
        self.seed = seed
        self._generator = torch.Generator()
        workers = data_cfg.num_workers
        loader_kwargs: dict[str, Any] = {
            "num_workers": workers,
            "collate_fn": collate_fn,
            "generator": self._generator,
            "persistent_workers": workers > 0,
        }
        if workers > 0:
            loader_kwargs["prefetch_factor"] = data_cfg.prefetch_factor
        if self.batched:
            self.loader = DataLoader(dataset, batch_sampler=sampler, **loader_kwargs)
        else:
            self.loader = DataLoader(
                dataset, sampler=sampler, batch_size=data_cfg.batch_size, drop_last=data_cfg.drop_last,
                **loader_kwargs,
            )
        self.batches_per_epoch = len(self.loader)
        if self.batches_per_epoch == 0:
            raise ValueError("the data yields no batch per epoch: too few items for the batch size on this rank")
        self.epoch = int(getattr(sampler, "epoch", 0))
        self.consumed = 0
        self._iter: Iterator[Any] | None = None

    def next(self) -> Any:
        while True:
            if self._iter is None:
                # The loader's own generator seeds its workers: reseed it per epoch so a resumed
                # run gives its workers the same seeds, and the global RNG is never touched.
                self._generator.manual_seed(self.seed * 1_000_003 + self.epoch)
                self._iter = iter(self.loader)
            try:
                batch = next(self._iter)
            except StopIteration:
                self._iter = None
                self.epoch += 1
                self.consumed = 0
                continue
            self.consumed += 1
            return batch

    @property
    def epoch_progress(self) -> float:
        return self.epoch + self.consumed / self.batches_per_epoch

    def state_dict(self) -> dict[str, Any]:
        if self.consumed >= self.batches_per_epoch:
            position = len(self.sampler)  # a short or dropped last batch: the epoch is simply done
        else:
            position = self.consumed if self.batched else self.consumed * self.batch_size
        return {
            EPOCH: self.epoch,
            CONSUMED: self.consumed,
            SAMPLER: self.sampler.state_dict_at(self.epoch, position),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [key for key in (EPOCH, CONSUMED, SAMPLER) if key not in state]
        if missing:
            raise ValueError(f"data state lacks {', '.join(missing)}")
        self.sampler.load_state_dict(state[SAMPLER])
        self.epoch, self.consumed = int(state[EPOCH]), int(state[CONSUMED])
        if self.consumed >= self.batches_per_epoch:
            self.epoch, self.consumed = self.epoch + 1, 0
        self._iter = None

    def close(self) -> None:
        self._iter = None
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
