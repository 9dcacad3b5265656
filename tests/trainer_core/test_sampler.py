"""The four samplers: coverage, order, sharding, limits, and their small state dicts."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DistributedSampler

from trainer_core.sampler import (
    KEY_EPOCH,
    KEY_POSITION,
    BatchedOrderedSampler,
    OrderedSampler,
    OversizedItemWarning,
    PoolSampler,
    RandomSampler,
)


def one_epoch(sampler: object) -> list:
    return list(iter(sampler))  # type: ignore[call-overload]


def json_size(state: dict) -> int:
    return len(json.dumps(state).encode())


# --- RandomSampler -------------------------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(length=st.integers(0, 3000), seed=st.integers(-(2**40), 2**40))
def test_random_epochs_are_permutations_that_change_every_epoch(length: int, seed: int) -> None:
    sampler = RandomSampler(length, seed=seed)
    first, second = one_epoch(sampler), one_epoch(sampler)
    assert sorted(first) == sorted(second) == list(range(length))
    assert sampler.epoch == (1 if length else 0)  # an empty sampler has no epochs to run through
    if length >= 10:
        assert first != second


def test_random_order_depends_only_on_seed_and_epoch() -> None:
    a, b, c = RandomSampler(500, seed=1), RandomSampler(500, seed=1), RandomSampler(500, seed=2)
    assert one_epoch(a) == one_epoch(b) != one_epoch(c)
    b.set_epoch(5)
    a.set_epoch(5)
    assert one_epoch(a) == one_epoch(b)


def test_a_billion_items_start_at_once_with_a_tiny_state() -> None:
    sampler = RandomSampler(10**9, seed=11)
    iterator = iter(sampler)
    head = [next(iterator) for _ in range(100_000)]
    assert len(set(head)) == len(head)
    assert all(0 <= i < 10**9 for i in head)
    assert len(sampler) == 10**9 and sampler.position == 100_000
    assert json_size(sampler.state_dict()) < 1024


def test_set_epoch_to_another_epoch_restarts_and_to_the_same_one_keeps_the_position() -> None:
    sampler = RandomSampler(100, seed=3)
    iterator = iter(sampler)
    [next(iterator) for _ in range(30)]
    sampler.set_epoch(0)
    assert (sampler.epoch, sampler.position) == (0, 30)
    sampler.set_epoch(4)
    assert (sampler.epoch, sampler.position) == (4, 0)
    fresh = RandomSampler(100, seed=3)
    fresh.set_epoch(4)
    assert one_epoch(sampler) == one_epoch(fresh)


# --- OrderedSampler and PoolSampler --------------------------------------------------------


def test_ordered_yields_every_index_in_order_each_epoch() -> None:
    sampler = OrderedSampler(7)
    assert one_epoch(sampler) == one_epoch(sampler) == list(range(7))
    assert (sampler.epoch, sampler.position, len(sampler)) == (1, 7, 7)


def test_pool_draws_every_item_once_per_bag_then_refills_with_a_new_shuffle() -> None:
    bag = PoolSampler(1000, seed=5)
    first = [bag.sample() for _ in range(1000)]
    second = [bag() for _ in range(1000)]
    assert sorted(first) == sorted(second) == list(range(1000))
    assert first != second
    assert bag.epoch == 1


def test_pool_maps_draws_to_the_pool_values() -> None:
    names = ["a", "b", "c", "d", "e"]
    by_index, by_value = PoolSampler(5, seed=2), PoolSampler(names, seed=2)
    assert [by_value.sample() for _ in range(12)] == [names[by_index.sample()] for _ in range(12)]


def test_pool_iteration_drains_what_is_left_in_the_bag() -> None:
    bag = PoolSampler(list(range(100, 110)), seed=0)
    drawn = [bag.sample() for _ in range(4)]
    rest = list(bag)
    assert len(rest) == 6 and sorted(drawn + rest) == list(range(100, 110))
    assert sorted(bag) == list(range(100, 110))  # an empty bag refills before iterating


def test_pool_state_is_tiny_at_any_size() -> None:
    bag = PoolSampler(10**9, seed=1)
    drawn = [bag.sample() for _ in range(1000)]
    assert len(set(drawn)) == 1000
    assert json_size(bag.state_dict()) < 1024


@pytest.mark.parametrize("pool", [0, [], -3, 2.5, True, None])
def test_pool_refuses_an_empty_or_unusable_pool(pool: object) -> None:
    with pytest.raises(ValueError, match=r"pool|length"):
        PoolSampler(pool)  # type: ignore[arg-type]


# --- BatchedOrderedSampler -----------------------------------------------------------------


def test_batched_needs_at_least_one_limit() -> None:
    with pytest.raises(ValueError, match="max_tokens > 0 or max_batch_size > 0"):
        BatchedOrderedSampler([1, 2, 3])


def test_batched_warns_once_counting_items_longer_than_max_tokens() -> None:
    with pytest.warns(OversizedItemWarning, match="^2 item") as caught:
        sampler = BatchedOrderedSampler([1, 30, 2, 40, 3], max_tokens=10, drop_last=False)
    assert len(caught) == 1
    batches = one_epoch(sampler)
    assert [1] in batches and [3] in batches
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 50), min_size=1, max_size=80),
    max_tokens=st.integers(50, 200),
    max_batch_size=st.integers(0, 8),
    seed=st.integers(0, 100),
)
def test_batched_shuffle_reorders_the_same_batches_each_epoch(
    lengths: list[int], max_tokens: int, max_batch_size: int, seed: int
) -> None:
    plain = BatchedOrderedSampler(lengths, max_tokens=max_tokens, max_batch_size=max_batch_size, drop_last=False)
    shuffled = BatchedOrderedSampler(
        lengths, max_tokens=max_tokens, max_batch_size=max_batch_size, drop_last=False, shuffle=True, seed=seed
    )
    batches = one_epoch(plain)
    epochs = [one_epoch(shuffled) for _ in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(batches)
        for batch in epoch:
            assert max(lengths[i] for i in batch) * len(batch) <= max_tokens
            assert max_batch_size == 0 or len(batch) <= max_batch_size
    if len(batches) >= 6:
        assert len({tuple(map(tuple, e)) for e in epochs}) > 1


def test_batched_drop_last_drops_the_final_short_batch_only() -> None:
    lengths = [5] * 10
    kept = BatchedOrderedSampler(lengths, max_batch_size=4, drop_last=False)
    dropped = BatchedOrderedSampler(lengths, max_batch_size=4)
    assert [len(b) for b in one_epoch(kept)] == [4, 4, 2]
    assert [len(b) for b in one_epoch(dropped)] == [4, 4]
    assert len(dropped) == 2


def test_batched_builds_from_a_tensor_of_durations() -> None:
    durations = torch.rand(1000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 20
    sampler = BatchedOrderedSampler(durations, max_tokens=60.0, drop_last=False)
    batches = one_epoch(sampler)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert all(float(durations[b].max()) * len(b) <= 60.0 for b in batches)


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"max_tokens": -1}, "max_tokens"),
        ({"max_tokens": float("nan")}, "max_tokens"),
        ({"max_tokens": float("inf")}, "max_tokens"),
        ({"max_batch_size": -2}, "max_batch_size"),
        ({"max_batch_size": 2, "rank": 2, "world_size": 2}, "rank"),
        ({"max_batch_size": 2, "world_size": 0}, "world_size"),
    ],
)
def test_batched_bad_options_get_an_error_naming_them(options: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        BatchedOrderedSampler([1, 2, 3], **options)


# --- Sharding ------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(length=st.integers(1, 300), world_size=st.integers(1, 8))
def test_ordered_shares_match_distributed_sampler(length: int, world_size: int) -> None:
    dataset = range(length)
    for rank in range(world_size):
        reference = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=False)  # type: ignore[arg-type]
        assert one_epoch(OrderedSampler(length, rank=rank, world_size=world_size)) == list(reference)


@settings(max_examples=40, deadline=None)
@given(length=st.integers(1, 500), world_size=st.integers(1, 8), seed=st.integers(0, 1000))
def test_random_shares_are_disjoint_equal_and_padded_by_wrapping(length: int, world_size: int, seed: int) -> None:
    shares = [one_epoch(RandomSampler(length, seed=seed, rank=r, world_size=world_size)) for r in range(world_size)]
    per_rank = math.ceil(length / world_size)
    assert all(len(share) == per_rank for share in shares)
    whole = one_epoch(RandomSampler(length, seed=seed))
    padded = (whole * world_size)[: per_rank * world_size]
    assert all(share == padded[r::world_size] for r, share in enumerate(shares))
    first_rounds = [i for share in shares for i in share[: length // world_size]]
    assert len(set(first_rounds)) == len(first_rounds)  # disjoint apart from the padding


def test_batched_deals_whole_batches_to_ranks() -> None:
    lengths = [(i * 37) % 23 + 1 for i in range(200)]
    whole = one_epoch(BatchedOrderedSampler(lengths, max_tokens=40, shuffle=True, seed=3))
    shares = [
        one_epoch(BatchedOrderedSampler(lengths, max_tokens=40, shuffle=True, seed=3, rank=r, world_size=3))
        for r in range(3)
    ]
    per_rank = math.ceil(len(whole) / 3)
    assert [len(share) for share in shares] == [per_rank] * 3
    padded = (whole * 3)[: per_rank * 3]
    assert all(share == padded[r::3] for r, share in enumerate(shares))


# --- State dicts ---------------------------------------------------------------------------


def makers() -> dict[str, object]:
    return {
        "random": lambda: RandomSampler(50, seed=4, world_size=2),
        "ordered": lambda: OrderedSampler(50, world_size=2),
        "pool": lambda: PoolSampler(50, seed=4),
        "batched": lambda: BatchedOrderedSampler(list(range(1, 51)), max_tokens=100, seed=4, shuffle=True),
    }


@pytest.mark.parametrize("kind", sorted(makers()))
def test_state_dict_is_small_json_that_round_trips(kind: str) -> None:
    sampler = makers()[kind]()
    iterator = iter(sampler)
    next(iterator)
    state = sampler.state_dict()
    assert json.loads(json.dumps(state)) == state and json_size(state) < 1024
    restored = makers()[kind]()
    restored.load_state_dict(json.loads(json.dumps(state)))
    assert (restored.epoch, restored.position) == (sampler.epoch, 1)


@pytest.mark.parametrize("kind", sorted(makers()))
def test_state_dict_at_is_the_state_after_that_many_yields(kind: str) -> None:
    sampler = makers()[kind]()
    sampler.set_epoch(3)
    iterator = iter(sampler)
    for _ in range(7):
        next(iterator)
    assert makers()[kind]().state_dict_at(3, 7) == sampler.state_dict()


def bad_states(good: dict) -> list[tuple[object, str]]:
    cases: list[tuple[object, str]] = [
        ([1, 2], "must be a dict"),
        ("state", "must be a dict"),
        ({k: v for k, v in good.items() if k != KEY_POSITION}, "missing keys"),
        ({**good, "extra": 1}, "unknown keys"),
        ({**good, "kind": "SomethingElse"}, "kind"),
        ({**good, KEY_EPOCH: -1}, "epoch"),
        ({**good, KEY_EPOCH: True}, "epoch"),
        ({**good, KEY_POSITION: "3"}, "position"),
        ({**good, KEY_POSITION: 10**6}, "position"),
        ({**good, "length": good["length"] + 1}, "length"),
    ]
    if "seed" in good:
        cases.append(({**good, "seed": good["seed"] + 1}, "seed"))
    if "world_size" in good:
        cases.append(({**good, "world_size": good["world_size"] + 1}, "world_size"))
    return cases


@pytest.mark.parametrize("kind", sorted(makers()))
def test_bad_state_dicts_are_refused_before_anything_changes(kind: str) -> None:
    sampler = makers()[kind]()
    good = makers()[kind]().state_dict_at(2, 5)
    sampler.load_state_dict(good)
    for bad, problem in bad_states(good):
        with pytest.raises(ValueError, match=problem):
            sampler.load_state_dict(bad)  # type: ignore[arg-type]
        assert (sampler.epoch, sampler.position) == (2, 5)


def test_a_state_from_other_batch_limits_is_refused() -> None:
    lengths = list(range(1, 51))
    state = BatchedOrderedSampler(lengths, max_tokens=100).state_dict()
    with pytest.raises(ValueError, match=r"max_tokens|num_batches"):
        BatchedOrderedSampler(lengths, max_tokens=120).load_state_dict(state)


@pytest.mark.parametrize(("epoch", "position"), [(-1, 0), (0, -1), (0, 10**9), (1.0, 0)])
def test_state_dict_at_refuses_impossible_points(epoch: object, position: object) -> None:
    with pytest.raises(ValueError, match=r"epoch|position"):
        RandomSampler(10).state_dict_at(epoch, position)  # type: ignore[arg-type]
