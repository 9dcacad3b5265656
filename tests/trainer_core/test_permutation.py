"""The keyed permutation: a true bijection for any size, chosen by its key, and reproducible."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer_core.permutation import KeyedPermutation, mix64


@settings(max_examples=60, deadline=None)
@given(size=st.integers(0, 5000), key=st.integers(0, 2**64 - 1))
def test_every_size_and_key_gives_each_position_exactly_one_item(size: int, key: int) -> None:
    values = KeyedPermutation(size, key)(torch.arange(size))
    assert sorted(values.tolist()) == list(range(size))


def test_sizes_around_powers_of_two_are_permutations() -> None:
    for size in (1, 2, 3, 4, 5, 63, 64, 65, 1023, 1024, 1025, 65537):
        values = KeyedPermutation(size, 7)(torch.arange(size))
        assert torch.equal(values.sort().values, torch.arange(size))


def test_different_keys_give_different_orders() -> None:
    orders = {tuple(KeyedPermutation(50, key)(torch.arange(50)).tolist()) for key in range(20)}
    assert len(orders) == 20
    assert tuple(range(50)) not in orders


def test_the_same_key_gives_the_same_order_in_any_chunking() -> None:
    permutation = KeyedPermutation(10_000, 99)
    whole = permutation(torch.arange(10_000))
    pieces = torch.cat([permutation(torch.arange(a, min(a + 777, 10_000))) for a in range(0, 10_000, 777)])
    assert torch.equal(whole, pieces)
    assert KeyedPermutation(10_000, 99).at(1234) == int(whole[1234])


def test_a_huge_size_is_reachable_at_any_position_without_materialising() -> None:
    size = 10**12
    permutation = KeyedPermutation(size, 3)
    positions = torch.tensor([0, 1, size // 2, size - 1])
    values = permutation(positions)
    assert bool(((values >= 0) & (values < size)).all())
    assert len(set(values.tolist())) == 4


def test_items_are_spread_evenly_over_positions() -> None:
    # Where item 0 lands, over many keys, should cover the positions roughly uniformly.
    size, keys = 16, 1600
    landing = [KeyedPermutation(size, key)(torch.arange(size)).tolist().index(0) for key in range(keys)]
    counts = torch.bincount(torch.tensor(landing), minlength=size).double()
    expected = keys / size
    assert float(((counts - expected) ** 2 / expected).sum()) < 60  # chi-square, 15 dof: p << 1e-6


def test_mix64_spreads_neighbouring_inputs() -> None:
    keys = {mix64(0, epoch) for epoch in range(1000)}
    assert len(keys) == 1000
    assert mix64(1, 2) != mix64(2, 1)
    assert all(0 <= key < 2**64 for key in keys)


@pytest.mark.parametrize("size", [-1, 2**62 + 1, 1.5, True])
def test_bad_sizes_are_refused(size: object) -> None:
    with pytest.raises(ValueError, match="size"):
        KeyedPermutation(size, 0)  # type: ignore[arg-type]


def test_a_position_outside_the_range_is_refused() -> None:
    with pytest.raises(IndexError, match="outside"):
        KeyedPermutation(10, 0).at(10)
