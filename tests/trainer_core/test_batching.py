"""Greedy length batching: the vectorised grouping equals the plain one-item-at-a-time loop."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer_core.batching import group_by_length, lengths_tensor


def greedy_reference(lengths: list[float], max_tokens: float, max_batch_size: int, drop_last: bool) -> list[list[int]]:
    """The obvious loop: sort (stable), add the next item while both limits still hold."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        too_long = max_tokens > 0 and (len(current) + 1) * lengths[i] > max_tokens
        too_many = max_batch_size > 0 and len(current) + 1 > max_batch_size
        if current and (too_long or too_many):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        longest = lengths[current[-1]]
        token_bound = max_tokens > 0 and longest > 0
        full = (
            (token_bound and (len(current) + 1) * longest > max_tokens)
            or (max_batch_size > 0 and len(current) + 1 > max_batch_size)
            or (not token_bound and max_batch_size == 0)
        )
        if full or not drop_last:
            batches.append(current)
    return batches


def batches_of(lengths: list[float], **limits: object) -> list[list[int]]:
    grouped = group_by_length(lengths, **limits)  # type: ignore[arg-type]
    return [grouped.batch(b) for b in range(len(grouped))]


integer_lengths = st.lists(st.integers(0, 30), max_size=60)
decimal_lengths = st.lists(st.floats(0, 6, allow_nan=False).map(lambda x: round(x, 2)), max_size=60)
limits = st.tuples(st.sampled_from([0, 0.3, 1, 4, 7.5, 10, 33, 100]), st.integers(0, 6)).filter(lambda t: t != (0, 0))


@settings(max_examples=100, deadline=None)
@given(lengths=st.one_of(integer_lengths, decimal_lengths), limit=limits, drop_last=st.booleans())
def test_vectorised_grouping_equals_the_greedy_loop(
    lengths: list[float], limit: tuple[float, int], drop_last: bool
) -> None:
    max_tokens, max_batch_size = limit
    got = batches_of(lengths, max_tokens=max_tokens, max_batch_size=max_batch_size, drop_last=drop_last)
    assert got == greedy_reference(lengths, max_tokens, max_batch_size, drop_last)


@settings(max_examples=60, deadline=None)
@given(lengths=integer_lengths, limit=limits)
def test_every_batch_respects_both_limits_unless_it_is_one_oversized_item(
    lengths: list[float], limit: tuple[float, int]
) -> None:
    max_tokens, max_batch_size = limit
    batches = batches_of(lengths, max_tokens=max_tokens, max_batch_size=max_batch_size, drop_last=False)
    assert sorted(i for batch in batches for i in batch) == list(range(len(lengths)))
    for batch in batches:
        longest = max(lengths[i] for i in batch)
        if max_batch_size:
            assert len(batch) <= max_batch_size
        if max_tokens and not (len(batch) == 1 and longest > max_tokens):
            assert longest * len(batch) <= max_tokens


@pytest.mark.parametrize(("max_tokens", "max_batch_size"), [(50, 0), (1000, 0), (1000, 7), (0, 33), (3.7, 0)])
def test_thousands_of_mixed_lengths_batch_like_the_greedy_loop(max_tokens: float, max_batch_size: int) -> None:
    generator = torch.Generator().manual_seed(int(max_tokens * 10) + max_batch_size)
    lengths = (torch.rand(4000, generator=generator, dtype=torch.float64) ** 3 * 60).tolist()
    lengths[::50] = [0.0] * len(lengths[::50])
    lengths[1::97] = [-0.0] * len(lengths[1::97])
    for drop_last in (False, True):
        got = batches_of(lengths, max_tokens=max_tokens, max_batch_size=max_batch_size, drop_last=drop_last)
        assert got == greedy_reference(lengths, max_tokens, max_batch_size, drop_last)


def test_runs_of_equal_capacity_are_cut_every_capacity_items() -> None:
    lengths = [10] * 10 + [20] * 7 + [50] * 3
    batches = batches_of(lengths, max_tokens=40, max_batch_size=0, drop_last=False)
    assert [len(b) for b in batches] == [4, 4, 2, 2, 2, 2, 1, 1, 1, 1]


def test_oversized_items_are_counted_and_kept_alone() -> None:
    grouped = group_by_length([5, 50, 3, 70], max_tokens=10, max_batch_size=0, drop_last=True)
    assert grouped.oversized == 2
    assert [grouped.batch(b) for b in range(len(grouped))] == [[2, 0], [1], [3]]


def test_drop_last_drops_only_a_final_batch_that_could_take_more() -> None:
    full = [4, 4, 4, 4]
    short = [4, 4, 4, 4, 4]
    assert batches_of(full, max_tokens=8, max_batch_size=0, drop_last=True) == [[0, 1], [2, 3]]
    assert batches_of(short, max_tokens=8, max_batch_size=0, drop_last=True) == [[0, 1], [2, 3]]
    assert batches_of(short, max_tokens=8, max_batch_size=0, drop_last=False) == [[0, 1], [2, 3], [4]]


def test_a_tensor_of_lengths_batches_like_the_list() -> None:
    lengths = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5]
    from_list = batches_of(lengths, max_tokens=12, max_batch_size=3, drop_last=False)
    grouped = group_by_length(torch.tensor(lengths), max_tokens=12, max_batch_size=3, drop_last=False)
    assert [grouped.batch(b) for b in range(len(grouped))] == from_list


@pytest.mark.parametrize(
    ("lengths", "problem"),
    [
        ([1, -2, 3], "non-negative"),
        ([1.0, float("nan")], "finite"),
        ([1.0, float("inf")], "finite"),
        (["a", "b"], "numbers"),
        ([[1, 2], [3, 4]], "numbers"),
        ([10**400], "numbers"),
        (torch.ones(2, 2), "one-dimensional"),
        ({1: 2}, "list, tuple or tensor"),
        (torch.tensor([True, False]), "real numbers"),
    ],
)
def test_bad_lengths_get_an_error_naming_the_problem(lengths: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        lengths_tensor(lengths)  # type: ignore[arg-type]
