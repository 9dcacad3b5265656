"""Codebook patterns against a reference written straight from the definitions in patterns.md."""

from __future__ import annotations

import math
import pickle
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trainer_core.pattern as pattern_module
from trainer_core.pattern import KINDS, PatternError, get_pattern

Layout = list[list[tuple[int, int]]]

# -- the reference: the pseudo-code of patterns.md, line for line --------------------------------


def ref_delayed(n_q: int, T: int, delays: list[int] | None = None, flatten_first: int = 0,
                empty_initial: int = 0) -> Layout:
    delays = list(range(n_q)) if delays is None else list(delays)
    layout: Layout = [] if empty_initial < 0 else [[]]
    if empty_initial > 0:
        layout += [[] for _ in range(empty_initial)]
    for t in range(min(T, flatten_first)):
        for q in range(n_q):
            layout.append([(t, q)])
    for t in range(flatten_first, T + max(delays)):
        layout.append([(t - delays[q], q) for q in range(n_q) if t - delays[q] >= flatten_first])
    return layout


def ref_parallel(n_q: int, T: int, empty_initial: int = 0) -> Layout:
    return ref_delayed(n_q, T, delays=[0] * n_q, empty_initial=empty_initial)


def ref_unrolled(n_q: int, T: int, flattening: list[int] | None = None, delays: list[int] | None = None) -> Layout:
    flattening = list(range(n_q)) if flattening is None else list(flattening)
    delays = [0] * n_q if delays is None else list(delays)
    groups: dict[int, list[int]] = {}
    for q, value in enumerate(flattening):
        groups.setdefault(value, []).append(q)
    group_delay = {value: delays[qs[0]] for value, qs in groups.items()}
    assert all(delays[q] == group_delay[value] for value, qs in groups.items() for q in qs)
    inner = max(flattening) + 1
    M = T + max(delays)
    items: list[tuple[int, list[tuple[int, int]]]] = [(-1, [])]
    for t in range(M):
        for i in range(inner):
            if i in groups:
                if t + group_delay[i] < M:
                    items.append((t + group_delay[i], [(t, q) for q in groups[i]]))
            else:
                items.append((t, []))
    return [coords for key, coords in sorted(items)]


def ref_coarse_first(n_q: int, T: int, delays: list[int] | None = None) -> Layout:
    delays = [0] * (n_q - 1) if delays is None else list(delays)
    layout: Layout = [[]] + [[(t, 0)] for t in range(T)]
    for t in range(T + max(delays, default=0)):  # one codebook: no delays, max taken as 0
        layout.append([(t - delays[q], q + 1) for q in range(n_q - 1) if t - delays[q] >= 0])
    return layout


def ref_musiclm(n_q: int, T: int, group_by: int = 2) -> Layout:
    layout: Layout = [[]]
    for offset in range(0, n_q, group_by):
        for t in range(T):
            for q in range(offset, offset + group_by):
                layout.append([(t, q)])
    return layout


REFERENCES = {"parallel": ref_parallel, "delayed": ref_delayed, "unrolled": ref_unrolled,
              "coarse_first": ref_coarse_first, "musiclm": ref_musiclm}


def ref_build(layout: Layout, codes: torch.Tensor, special: float, keep_only_valid_steps: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
    B, K, T = codes.shape
    if keep_only_valid_steps:
        max_delay = max((t + 1 for step in layout[1:] for (t, q) in step), default=0) - T
        layout = layout[: len(layout) - max_delay]
    seq = torch.full((B, K, len(layout)), special, dtype=codes.dtype)
    mask = torch.zeros(K, len(layout), dtype=torch.bool)
    for s, step in enumerate(layout):
        for t, q in step:
            if t < T:
                seq[:, q, s] = codes[:, q, t]
                mask[q, s] = True
    return seq, mask


def ref_revert(layout: Layout, seq: torch.Tensor, special: float, T: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Works on [..., K, S]: the logits' class dimension rides along."""
    K, S = seq.shape[-2:]
    out = torch.full((*seq.shape[:-1], T), special, dtype=seq.dtype)
    mask = torch.zeros(K, T, dtype=torch.bool)
    for s, step in enumerate(layout):
        if s < S:
            for t, q in step:
                if t < T:
                    out[..., q, t] = seq[..., q, s]
                    mask[q, t] = True
    return out, mask


def ref_revert_logits(layout: Layout, logits: torch.Tensor, special: float, T: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    if layout and layout[0] == []:
        layout = layout[1:]
    return ref_revert(layout, logits, special, T)


# -- random patterns ------------------------------------------------------------------------------

small = st.integers(0, 4)


@st.composite
def sorted_list(draw: st.DrawFn, length: int) -> list[int]:
    return sorted(draw(st.lists(small, min_size=length, max_size=length)))


@st.composite
def pattern_options(draw: st.DrawFn) -> tuple[str, int, dict[str, Any]]:
    kind = draw(st.sampled_from(KINDS))
    n_q = draw(st.integers(1, 6))
    options: dict[str, Any] = {}
    maybe = st.booleans()
    if kind in ("parallel", "delayed") and draw(maybe):
        options["empty_initial"] = draw(st.integers(-2, 3))
    if kind == "delayed":
        if draw(maybe):
            options["delays"] = draw(sorted_list(n_q))
        if draw(maybe):
            options["flatten_first"] = draw(small)
    if kind == "unrolled":
        flattening = draw(sorted_list(n_q)) if draw(maybe) else None
        if flattening is not None:
            options["flattening"] = flattening
        if draw(maybe):
            values = flattening if flattening is not None else list(range(n_q))
            distinct = sorted(set(values))
            group_delays = dict(zip(distinct, draw(sorted_list(len(distinct))), strict=True))
            options["delays"] = [group_delays[v] for v in values]
    if kind == "coarse_first" and draw(maybe):
        options["delays"] = draw(sorted_list(n_q - 1))
    if kind == "musiclm":
        options["group_by"] = draw(st.sampled_from([g for g in range(1, n_q + 1) if n_q % g == 0]))
    return kind, n_q, options


def random_codes(seed: int, shape: tuple[int, ...], dtype: torch.dtype = torch.long) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    return torch.randint(0, 100, shape, generator=generator).to(dtype)


seeds = st.integers(0, 2**31 - 1)
timesteps = st.integers(0, 9)


# -- agreement with the definitions --------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(pattern_options(), timesteps, st.integers(1, 3), seeds, st.booleans())
def test_build_places_every_code_where_the_definition_puts_it(spec, T, B, seed, keep_only_valid_steps):
    kind, n_q, options = spec
    layout = REFERENCES[kind](n_q, T, **options)
    codes = random_codes(seed, (B, n_q, T))
    pattern = get_pattern(kind, n_q, **options)
    seq, mask = pattern.build(codes, -1, keep_only_valid_steps=keep_only_valid_steps)
    want_seq, want_mask = ref_build(layout, codes, -1, keep_only_valid_steps)
    assert pattern.num_steps(T) == len(layout)
    assert torch.equal(seq, want_seq)
    assert torch.equal(mask, want_mask)


@settings(max_examples=80, deadline=None)
@given(pattern_options(), timesteps, st.integers(1, 3), seeds, st.data())
def test_revert_reads_back_any_sequence_prefix_as_the_definition_does(spec, T, B, seed, data):
    kind, n_q, options = spec
    layout = REFERENCES[kind](n_q, T, **options)
    length = data.draw(st.integers(0, len(layout)), label="sequence steps")
    seq = random_codes(seed, (B, n_q, length))
    codes, mask = get_pattern(kind, n_q, **options).revert(seq, 1000, timesteps=T)
    want_codes, want_mask = ref_revert(layout, seq, 1000, T)
    assert torch.equal(codes, want_codes)
    assert torch.equal(mask, want_mask)


@settings(max_examples=80, deadline=None)
@given(pattern_options(), timesteps, st.integers(1, 2), st.integers(1, 3), seeds, st.data())
def test_revert_logits_shifts_by_the_empty_start_step_as_the_definition_does(spec, T, B, C, seed, data):
    kind, n_q, options = spec
    layout = REFERENCES[kind](n_q, T, **options)
    length = data.draw(st.integers(0, len(layout)), label="sequence steps")
    logits = random_codes(seed, (B, C, n_q, length), torch.float32)
    values, mask = get_pattern(kind, n_q, **options).revert_logits(logits, float("nan"), timesteps=T)
    want_values, want_mask = ref_revert_logits(layout, logits, float("nan"), T)
    assert torch.equal(mask, want_mask)
    assert torch.equal(values.isnan(), want_values.isnan())
    assert torch.equal(values.nan_to_num(), want_values.nan_to_num())


@settings(max_examples=60, deadline=None)
@given(pattern_options(), timesteps)
def test_the_step_table_gives_each_coordinate_the_step_the_definition_gives_it(spec, T):
    """The table behind the generic gather/scatter, also for layouts that move data by strided copies."""
    kind, n_q, options = spec
    where = {(t, q): s for s, step in enumerate(REFERENCES[kind](n_q, T, **options)) for t, q in step if t < T}
    table = get_pattern(kind, n_q, **options)._step_table(T, torch.device("cpu"))
    assert table.tolist() == [[where[t, q] for t in range(T)] for q in range(n_q)]


@settings(max_examples=60, deadline=None)
@given(pattern_options(), st.integers(1, 12), seeds, st.booleans())
def test_build_then_revert_gives_back_the_codes_on_every_filled_position(spec, T, seed, keep_only_valid_steps):
    kind, n_q, options = spec
    pattern = get_pattern(kind, n_q, **options)
    codes = random_codes(seed, (2, n_q, T))
    seq, _ = pattern.build(codes, -1, keep_only_valid_steps=keep_only_valid_steps)
    back, mask = pattern.revert(seq, -1, timesteps=T)
    assert torch.equal(back[:, mask], codes[:, mask])
    assert torch.equal(back[:, ~mask], torch.full_like(back[:, ~mask], -1))
    if not keep_only_valid_steps:
        assert bool(mask.all())


CORNERS = [  # rare corners of the definitions that random draws seldom reach
    ("delayed", 1, 1, {"flatten_first": 1, "empty_initial": -1}),  # the only step is step 0
    ("delayed", 1, 1, {"flatten_first": 3, "empty_initial": -1}),
    ("delayed", 2, 0, {"delays": [1, 3], "flatten_first": 1, "empty_initial": -1}),
    ("delayed", 2, 3, {"delays": [2, 2], "empty_initial": -2}),  # step 0 empty without a start step
    ("delayed", 3, 2, {"delays": [0, 0, 4], "flatten_first": 9}),  # flattening longer than T
    ("delayed", 2, 0, {"delays": [0, 0], "empty_initial": -1}),  # no step at all
    ("delayed", 2, 0, {"delays": [0, 1], "empty_initial": -1}),  # one step, holding a coordinate past T
    ("coarse_first", 1, 3, {}),
    ("unrolled", 4, 3, {"flattening": [0, 2, 2, 5], "delays": [0, 1, 1, 1]}),
    ("unrolled", 3, 0, {"flattening": [1, 1, 3], "delays": [2, 2, 2]}),
]


@pytest.mark.parametrize(("kind", "n_q", "T", "options"), CORNERS)
def test_corner_layouts_match_the_definition_in_every_operation(kind, n_q, T, options):
    layout = REFERENCES[kind](n_q, T, **options)
    pattern = get_pattern(kind, n_q, **options)
    codes = random_codes(0, (2, n_q, T))
    for keep in (False, True):
        assert all(map(torch.equal, pattern.build(codes, -1, keep), ref_build(layout, codes, -1, keep)))
    for length in range(len(layout) + 1):
        seq = random_codes(length, (2, n_q, length))
        assert all(map(torch.equal, pattern.revert(seq, -1, timesteps=T), ref_revert(layout, seq, -1, T)))
        logits = seq[:, None].float()
        got, want = pattern.revert_logits(logits, -1.0, timesteps=T), ref_revert_logits(layout, logits, -1.0, T)
        assert all(map(torch.equal, got, want))


def test_the_design_example_delays_each_codebook_by_its_index():
    codes = torch.tensor([[1, 2, 3, 4]] * 3)[None]
    seq, mask = get_pattern("delayed", 3).build(codes, 0)
    assert seq[0].tolist() == [[0, 1, 2, 3, 4, 0, 0], [0, 0, 1, 2, 3, 4, 0], [0, 0, 0, 1, 2, 3, 4]]
    assert mask.tolist() == (seq[0] != 0).tolist()
    valid, _ = get_pattern("delayed", 3).build(codes, 0, keep_only_valid_steps=True)
    assert valid[0].tolist() == [[0, 1, 2, 3, 4], [0, 0, 1, 2, 3], [0, 0, 0, 1, 2]]


def test_parallel_and_single_group_unrolled_are_the_same_layout():
    codes = random_codes(3, (2, 4, 7))
    parallel = get_pattern("parallel", 4).build(codes, -1)
    unrolled = get_pattern("unrolled", 4, flattening=[0, 0, 0, 0]).build(codes, -1)
    assert all(torch.equal(a, b) for a, b in zip(parallel, unrolled, strict=True))


# -- the drawings in the documentation are real outputs ----------------------------------------


def drawing(kind: str, n_q: int, T: int, **options: Any) -> str:
    names = "abcdefgh"
    codes = torch.tensor([[10 * q + t for t in range(T)] for q in range(n_q)])[None]
    seq, mask = get_pattern(kind, n_q, **options).build(codes, -1)
    cells = [[f"{names[v // 10]}{v % 10}" if m else "." for v, m in zip(row, mrow, strict=True)]
             for row, mrow in zip(seq[0].tolist(), mask.tolist(), strict=True)]
    width = [max(len(row[s]) for row in cells) for s in range(seq.shape[-1])]
    return "\n".join(" ".join(c.ljust(w) for c, w in zip(row, width, strict=True)).rstrip() for row in cells)


@pytest.mark.parametrize(("kind", "options"), [
    ("parallel", {}), ("delayed", {}), ("unrolled", {}), ("coarse_first", {}), ("musiclm", {"group_by": 1}),
])
def test_each_drawing_in_the_module_documentation_is_what_build_returns(kind, options):
    drawn = "\n".join("    " + line for line in drawing(kind, 3, 4, **options).splitlines())
    assert drawn in pattern_module.__doc__


# -- devices, dtypes and caching -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
@pytest.mark.parametrize("kind", KINDS)
def test_integer_codes_keep_their_dtype(kind, dtype):
    n_q = 4
    codes = random_codes(0, (2, n_q, 5), dtype)
    pattern = get_pattern(kind, n_q)
    seq, _ = pattern.build(codes, 7)
    back, _ = pattern.revert(seq, 7, timesteps=5)
    assert seq.dtype == back.dtype == dtype
    assert torch.equal(back, codes)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_float_logits_keep_their_dtype_and_special_value(kind, dtype):
    n_q, T = 4, 5
    pattern = get_pattern(kind, n_q)
    logits = random_codes(1, (2, 3, n_q, pattern.num_steps(T)), dtype)
    values, mask = pattern.revert_logits(logits, -math.inf, timesteps=T)
    want, want_mask = ref_revert_logits(REFERENCES[kind](n_q, T), logits, -math.inf, T)
    assert values.dtype == dtype
    assert torch.equal(values, want)
    assert torch.equal(mask, want_mask)


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_reach_the_logits_as_through_the_reference(kind):
    pattern, T = get_pattern(kind, 4), 5
    logits = random_codes(4, (2, 3, 4, pattern.num_steps(T)), torch.float64).requires_grad_()
    weights = random_codes(5, (2, 3, 4, T), torch.float64)
    (pattern.revert_logits(logits, 0.0, timesteps=T)[0] * weights).sum().backward()
    ours, logits.grad = logits.grad, None
    (ref_revert_logits(REFERENCES[kind](4, T), logits, 0.0, T)[0] * weights).sum().backward()
    assert torch.equal(ours, logits.grad)


@pytest.mark.parametrize("kind", KINDS)
def test_every_operation_runs_on_the_meta_device_so_nothing_reads_values_back(kind):
    pattern = get_pattern(kind, 4)
    codes = torch.empty(2, 4, 6, dtype=torch.long, device="meta")
    seq, mask = pattern.build(codes, 0, keep_only_valid_steps=True)
    back, back_mask = pattern.revert(seq, 0, timesteps=6)
    logits = torch.empty(2, 3, 4, pattern.num_steps(6), device="meta")
    values, _ = pattern.revert_logits(logits, 0.0, timesteps=6)
    assert seq.device.type == mask.device.type == back.device.type == back_mask.device.type == "meta"
    assert back.shape == (2, 4, 6) and values.shape == (2, 3, 4, 6)


@pytest.mark.parametrize("kind", KINDS)
def test_non_contiguous_inputs_are_read_correctly(kind):
    pattern = get_pattern(kind, 4)
    codes = random_codes(2, (6, 4, 3)).transpose(0, 2)  # [3, 4, 6], not contiguous
    seq, _ = pattern.build(codes, -1)
    assert torch.equal(seq, ref_build(REFERENCES[kind](4, 6), codes.contiguous(), -1)[0])
    back, _ = pattern.revert(seq.transpose(0, 1).contiguous().transpose(0, 1), -1, timesteps=6)
    assert torch.equal(back, codes)
    padded = torch.full((4, 4, seq.shape[-1] + 3), -5)
    padded[1:, :, 2:-1] = seq
    assert torch.equal(pattern.revert(padded[1:, :, 2:-1], -1, timesteps=6)[0], codes)  # offset view
    logits = random_codes(3, (4, 2, 4, seq.shape[-1]), torch.float32)
    permuted = logits.permute(3, 1, 2, 0).contiguous().permute(3, 1, 2, 0)
    want = ref_revert_logits(REFERENCES[kind](4, 6), logits, 0.5, 6)[0]
    assert torch.equal(pattern.revert_logits(permuted, 0.5, timesteps=6)[0], want)


def test_returned_masks_are_fresh_so_editing_one_leaves_later_calls_alone():
    pattern = get_pattern("delayed", 2)
    codes = random_codes(0, (1, 2, 4))
    _, first = pattern.build(codes, -1)
    first.fill_(False)
    assert bool(pattern.build(codes, -1)[1].any())
    reverted_mask = pattern.revert(pattern.build(codes, -1)[0], -1, timesteps=4)[1]
    reverted_mask.fill_(False)
    assert bool(pattern.revert(pattern.build(codes, -1)[0], -1, timesteps=4)[1].all())


def test_the_index_cache_stays_bounded_when_every_batch_has_a_new_length():
    pattern = get_pattern("unrolled", 3, flattening=[0, 1, 1], delays=[0, 2, 2])
    for T in range(1, 3 * pattern.cache_size):
        seq, _ = pattern.build(random_codes(T, (1, 3, T)), -1)
        assert torch.equal(pattern.revert(seq, -1, timesteps=T)[0], random_codes(T, (1, 3, T)))
    assert len(pattern._cache) <= pattern.cache_size


@pytest.mark.parametrize("kind", KINDS)
def test_a_pattern_pickles_for_dataloader_workers_and_builds_the_same(kind):
    pattern = get_pattern(kind, 4)
    codes = random_codes(5, (2, 4, 6))
    pattern.build(codes, -1)  # fill the caches first
    copy = pickle.loads(pickle.dumps(pattern))
    assert repr(copy) == repr(pattern)
    assert all(map(torch.equal, copy.build(codes, -1), pattern.build(codes, -1)))


# -- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "options", "message"), [
    ("delayed", {"delays": [0, 2, 1]}, "sorted"),
    ("delayed", {"delays": [0, 1]}, "3 entries"),
    ("delayed", {"delays": [-1, 0, 1]}, "delays[0] must be >= 0"),
    ("delayed", {"delays": "012"}, "list of integers"),
    ("delayed", {"delays": [0, 1.5, 2]}, "must be an integer"),
    ("delayed", {"flatten_first": -1}, "flatten_first must be >= 0"),
    ("coarse_first", {"delays": [1, 0]}, "sorted"),
    ("coarse_first", {"delays": [0, 1, 2]}, "2 entries"),
    ("unrolled", {"flattening": [0, 1, 1], "delays": [0, 1, 2]}, "share one delay"),
    ("unrolled", {"flattening": [1, 0, 0]}, "sorted"),
    ("unrolled", {"delays": [0, 0]}, "3 entries"),
    ("musiclm", {"group_by": 2}, "group_by=2 must divide n_q=3"),
    ("musiclm", {"group_by": 0}, "group_by must be >= 1"),
    ("delayed", {"delay": [0, 1, 2]}, "unknown option 'delay'; did you mean 'delays'?"),
    ("parallel", {"delays": [0, 0, 0]}, "unknown option 'delays'"),
])
def test_bad_options_are_refused_with_a_message_naming_them(kind, options, message):
    with pytest.raises(PatternError, match=message.replace("[", r"\[").replace("?", r"\?")):
        get_pattern(kind, 3, **options)


def test_an_unknown_kind_lists_the_kinds_and_suggests_the_nearest():
    with pytest.raises(ValueError, match=r"did you mean 'delayed'.*parallel, delayed, unrolled, coarse_first, musiclm"):
        get_pattern("delay", 4)
    with pytest.raises(ValueError, match=r"unknown pattern kind 'xyz'. Known kinds"):
        get_pattern("xyz", 4)
    with pytest.raises(ValueError, match=r"unknown pattern kind \['delayed'\]"):
        get_pattern(["delayed"], 4)


@pytest.mark.parametrize("n_q", [0, -2, 2.0, True])
def test_a_bad_number_of_codebooks_is_refused(n_q):
    with pytest.raises(PatternError, match="n_q"):
        get_pattern("delayed", n_q)


def test_tensors_of_the_wrong_rank_or_codebook_count_are_refused():
    pattern = get_pattern("delayed", 4)
    with pytest.raises(PatternError, match=r"codes must have shape \[B, K, T\], got \(4, 10\)"):
        pattern.build(torch.zeros(4, 10, dtype=torch.long), 0)
    with pytest.raises(PatternError, match=r"K=3 codebooks.*n_q=4"):
        pattern.build(torch.zeros(2, 3, 10, dtype=torch.long), 0)
    with pytest.raises(PatternError, match=r"must be a torch.Tensor"):
        pattern.build([[[1]]], 0)
    with pytest.raises(PatternError, match=r"seq must have shape \[B, K, S\]"):
        pattern.revert(torch.zeros(2, 3, 4, 10), 0, timesteps=5)
    with pytest.raises(PatternError, match="K=5 codebooks"):
        pattern.revert(torch.zeros(2, 5, 10), 0, timesteps=5)
    with pytest.raises(PatternError, match=r"logits must have shape \[B, C, K, S\]"):
        pattern.revert_logits(torch.zeros(2, 4, 10), 0.0, timesteps=5)
    with pytest.raises(PatternError, match="K=2 codebooks"):
        pattern.revert_logits(torch.zeros(1, 8, 2, 10), 0.0, timesteps=5)


def test_a_sequence_longer_than_the_pattern_is_refused():
    pattern = get_pattern("delayed", 4)
    assert pattern.num_steps(5) == 9
    pattern.revert(torch.zeros(1, 4, 9, dtype=torch.long), 0, timesteps=5)
    with pytest.raises(PatternError, match=r"10 steps, longer than the 9 steps.*timesteps=5"):
        pattern.revert(torch.zeros(1, 4, 10, dtype=torch.long), 0, timesteps=5)
    with pytest.raises(PatternError, match="10 steps, longer than the 9 steps"):
        pattern.revert_logits(torch.zeros(1, 2, 4, 10), 0.0, timesteps=5)


@pytest.mark.parametrize("timesteps", [-1, 2.5, None])
def test_bad_timesteps_are_refused(timesteps):
    with pytest.raises(PatternError, match="timesteps"):
        get_pattern("musiclm", 4).revert(torch.zeros(1, 4, 3, dtype=torch.long), 0, timesteps=timesteps)
