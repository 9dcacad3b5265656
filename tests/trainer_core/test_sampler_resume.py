"""Exact resume: items before a snapshot plus items after restoring it equal the uninterrupted run.

This is the iterate-k / snapshot / restore test of torchdata's stateful dataloader, at random
points and across epoch boundaries, and with a prefetching ``DataLoader`` whose workers make
the sampler run ahead of what the loop consumed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader, Dataset

from trainer_core.sampler import BatchedOrderedSampler, OrderedSampler, PoolSampler, RandomSampler

Maker = Callable[[], Any]


def maker(kind: str, length: int, world_size: int, seed: int) -> Maker:
    rank = world_size - 1
    lengths = [(i * 7919) % 13 + 1 for i in range(length)]
    return {
        "random": lambda: RandomSampler(length, seed=seed, rank=rank, world_size=world_size),
        "ordered": lambda: OrderedSampler(length, rank=rank, world_size=world_size),
        "pool": lambda: PoolSampler(length, seed=seed),
        "batched": lambda: BatchedOrderedSampler(
            lengths, max_tokens=20, shuffle=True, drop_last=False, seed=seed, rank=rank, world_size=world_size
        ),
    }[kind]


def take(sampler: Any, count: int) -> list:
    """``count`` items, iterating the sampler again (next epoch) whenever one runs out."""
    out: list = []
    while len(out) < count:
        for item in sampler:
            out.append(item)
            if len(out) == count:
                break
    return out


def draw(pool: PoolSampler, count: int) -> list:
    return [pool.sample() for _ in range(count)]


def through_json(state: dict) -> dict:
    return json.loads(json.dumps(state))


@settings(max_examples=80, deadline=None)
@given(
    kind=st.sampled_from(["random", "ordered", "pool", "batched"]),
    length=st.integers(1, 40),
    world_size=st.integers(1, 3),
    seed=st.integers(0, 10**6),
    data=st.data(),
)
def test_restoring_a_snapshot_continues_the_uninterrupted_sequence(
    kind: str, length: int, world_size: int, seed: int, data: st.DataObject
) -> None:
    make = maker(kind, length, world_size, seed)
    total = 3 * len(make()) + 2
    split = data.draw(st.integers(0, total), label="split")
    expected = take(make(), total)
    first = make()
    before = take(first, split)
    restored = make()
    restored.load_state_dict(through_json(first.state_dict()))
    assert before + take(restored, total - split) == expected


@settings(max_examples=40, deadline=None)
@given(length=st.integers(1, 50), seed=st.integers(0, 10**6), data=st.data())
def test_pool_draws_resume_across_refills(length: int, seed: int, data: st.DataObject) -> None:
    total = 3 * length + 1
    split = data.draw(st.integers(0, total), label="split")
    expected = draw(PoolSampler(length, seed=seed), total)
    first = PoolSampler(length, seed=seed)
    before = draw(first, split)
    restored = PoolSampler(length, seed=seed)
    restored.load_state_dict(through_json(first.state_dict()))
    assert before + draw(restored, total - split) == expected


def test_a_snapshot_at_the_exact_end_of_an_epoch_continues_with_the_next_epoch() -> None:
    sampler = RandomSampler(20, seed=8)
    epoch0 = list(sampler)
    state = sampler.state_dict()
    assert (state["epoch"], state["position"]) == (0, 20)
    restored = RandomSampler(20, seed=8)
    restored.load_state_dict(state)
    assert list(restored) == list(sampler) != epoch0
    assert restored.epoch == sampler.epoch == 1


# --- With a prefetching DataLoader ---------------------------------------------------------


class Indices(Dataset):
    """Item ``i`` is ``i``: what comes out is exactly what the sampler chose."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> int:
        return index


def consume(sampler: Any, batches: int, *, workers: int, batch_size: int | None) -> tuple[list, dict | None]:
    """A training loop's view: count what it consumed per epoch and save that state."""
    bounded = {"num_workers": workers, "timeout": 60} if workers else {}
    if batch_size is None:
        loader = DataLoader(Indices(10_000), batch_sampler=sampler, **bounded)
    else:
        loader = DataLoader(Indices(10_000), sampler=sampler, batch_size=batch_size, **bounded)
    got: list = []
    state = None
    while len(got) < batches:
        epoch, consumed = None, 0
        for batch in loader:
            if epoch is None:
                epoch = sampler.epoch  # the pass's epoch, known once its first batch arrived
            got.append(batch.tolist())
            consumed += 1 if batch_size is None else len(batch)
            state = sampler.state_dict_at(epoch, consumed)
            if len(got) == batches:
                break
    return got, state


LOADER_CASES = {
    "random, mid-epoch": (lambda: RandomSampler(23, seed=5), 3, 5),
    "random, end of epoch": (lambda: RandomSampler(24, seed=5), 3, 8),
    "batched, mid-epoch": (
        lambda: BatchedOrderedSampler([(i * 31) % 17 + 1 for i in range(90)], max_tokens=24, shuffle=True, seed=2),
        None,
        9,
    ),
}


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")  # machines with one CPU
@pytest.mark.parametrize("case", sorted(LOADER_CASES))
def test_resume_from_consumed_batches_with_dataloader_workers(case: str) -> None:
    make, batch_size, split = LOADER_CASES[case]
    total = split + 3 * len(make()) // (batch_size or 1)
    expected, _ = consume(make(), total, workers=0, batch_size=batch_size)
    first = make()
    before, state = consume(first, split, workers=2, batch_size=batch_size)
    assert state is not None
    if case.endswith("mid-epoch"):
        assert first.state_dict() != state  # the workers' prefetch ran the sampler ahead
    restored = make()
    restored.load_state_dict(through_json(state))
    after, _ = consume(restored, total - split, workers=2, batch_size=batch_size)
    assert before + after == expected
