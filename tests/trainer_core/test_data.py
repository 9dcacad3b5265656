"""DataFeed: endless batches whose state is that of the consumed batches."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from trainer_core.data import DataFeed
from trainer_core.sampler import RandomSampler


def data_cfg(drop_last: bool, workers: int = 0) -> SimpleNamespace:
    return SimpleNamespace(batch_size=3, num_workers=workers, prefetch_factor=2, drop_last=drop_last)


def feed(drop_last: bool, workers: int = 0) -> DataFeed:
    dataset = torch.utils.data.TensorDataset(torch.arange(10))
    return DataFeed(dataset, RandomSampler(10, seed=3), data_cfg(drop_last, workers), collate_fn=None, seed=3)


def batches(f: DataFeed, count: int) -> list[list[int]]:
    return [f.next()[0].tolist() for _ in range(count)]


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("stop", [1, 3, 4, 5, 8, 9])
def test_restoring_at_any_batch_continues_the_same_sequence(drop_last: bool, stop: int) -> None:
    whole = batches(feed(drop_last), 12)
    first = feed(drop_last)
    head = batches(first, stop)
    second = feed(drop_last)
    second.load_state_dict(first.state_dict())
    at_end = first.consumed >= first.batches_per_epoch
    assert (second.epoch, second.consumed) == ((first.epoch + 1, 0) if at_end else (first.epoch, first.consumed))
    assert head + batches(second, 12 - stop) == whole


def test_workers_prefetching_ahead_do_not_move_the_saved_position() -> None:
    whole = batches(feed(True), 8)
    first = feed(True, workers=2)
    head = batches(first, 2)
    second = feed(True)
    second.load_state_dict(first.state_dict())
    first.close()
    assert head + batches(second, 6) == whole
