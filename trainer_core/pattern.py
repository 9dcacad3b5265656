"""Codebook interleaving patterns: multi-codebook audio tokens <-> the sequence a language model trains on.

Codes have shape ``[B, K, T]`` (K codebooks, T timesteps). A pattern lays them out as an interleaved
sequence ``[B, K, S]`` that a model predicts one step at a time, and maps sequences and logits back.
The layouts are exactly those of audiocraft's codebook patterns (MusicGen), so sequences built here
are interchangeable with models trained there; ``tests/trainer_core/test_pattern.py`` spells out their
definitions step by step and checks every kind against them.

Drawn for K=3, T=4: codebook rows ``a``, ``b``, ``c``; ``.`` is the special token. Step 0 is the empty
start step that the model's first prediction comes from.

``parallel`` (``empty_initial``) — all codebooks of a timestep in one step; S = 1 + T::

    . a0 a1 a2 a3
    . b0 b1 b2 b3
    . c0 c1 c2 c3

``delayed`` (``delays``, ``flatten_first``, ``empty_initial``) — codebook q at step 1 + t + delays[q]
(MusicGen's default, delays = 0..K-1); S = 1 + T + max(delays)::

    . a0 a1 a2 a3 .  .
    . .  b0 b1 b2 b3 .
    . .  .  c0 c1 c2 c3

``unrolled`` (``flattening``, ``delays``) — each timestep unrolled over inner steps; codebooks with the
same flattening value share an inner step. Default (full flattening), S = 1 + K*T::

    . a0 .  .  a1 .  .  a2 .  .  a3 .  .
    . .  b0 .  .  b1 .  .  b2 .  .  b3 .
    . .  .  c0 .  .  c1 .  .  c2 .  .  c3

``coarse_first`` (``delays`` for codebooks 1..K-1) — all of codebook 0, then the others as a delayed
pattern; S = 1 + 2*T + max(delays)::

    . a0 a1 a2 a3 .  .  .  .
    . .  .  .  .  b0 b1 b2 b3
    . .  .  .  .  c0 c1 c2 c3

``musiclm`` (``group_by``) — codebooks in groups of ``group_by``, each group flattened over the whole
duration before the next one (group_by=1 shown; it must divide K); S = 1 + K*T::

    . a0 a1 a2 a3 .  .  .  .  .  .  .  .
    . .  .  .  .  b0 b1 b2 b3 .  .  .  .
    . .  .  .  .  .  .  .  .  c0 c1 c2 c3

How it is computed: every layout puts each coordinate (t, q) with t < T on exactly one step, given by
a closed form of (t, q), so nothing is ever laid out step by step. ``unrolled`` builds the ``[K, T]``
table of steps with a few tensor ops on the data's own device, then ``build`` is one scatter and
``revert`` one gather. The other kinds are a few strided runs (one for MusicGen's delays 0..K-1), so
data and masks move by strided copies, faster than the gather (``bench/patterns.py`` measures it)
and with no index tensor at all. Masks and tables are kept per (T, device) in a small per-pattern
LRU; a new T costs a couple of small kernels, and no operation reads a device tensor back to the host.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from typing import Any

import torch

from trainer_core.pattern_base import (
    Pattern,
    PatternError,
    Segment,
    SlicedPattern,
    arithmetic_runs,
    check_count,
    check_sorted_counts,
)

__all__ = [
    "KINDS",
    "CoarseFirstPattern",
    "DelayedPattern",
    "MusicLMPattern",
    "ParallelPattern",
    "Pattern",
    "PatternError",
    "UnrolledPattern",
    "get_pattern",
]


class DelayedPattern(SlicedPattern):
    """Codebook q at step ``prefix + t + delays[q]``; the first ``flatten_first`` timesteps flattened.

    ``empty_initial`` > 0 adds that many empty steps after the start step; < 0 drops the start step.
    """

    kind = "delayed"

    def __init__(self, n_q: int, delays: Sequence[int] | None = None, flatten_first: int = 0,
                 empty_initial: int = 0) -> None:
        super().__init__(n_q)
        self.delays = check_sorted_counts(self.kind, "delays", range(self.n_q) if delays is None else delays, self.n_q)
        self.flatten_first = check_count(self.kind, "flatten_first", flatten_first)
        self.empty_initial = check_count(self.kind, "empty_initial", empty_initial, minimum=None)

    def _options(self) -> dict[str, Any]:
        return {"delays": self.delays, "flatten_first": self.flatten_first, "empty_initial": self.empty_initial}

    @property
    def _prefix(self) -> int:
        return 0 if self.empty_initial < 0 else 1 + self.empty_initial

    def _flat(self, timesteps: int) -> int:
        return min(timesteps, self.flatten_first)

    def _main_steps(self, timesteps: int) -> int:
        return max(0, timesteps + self.delays[-1] - self.flatten_first)

    def num_steps(self, timesteps: int) -> int:
        timesteps = self._timesteps(timesteps)
        return self._prefix + self._flat(timesteps) * self.n_q + self._main_steps(timesteps)

    def _starts_empty(self, timesteps: int) -> bool:
        if self._prefix > 0:
            return True
        # Without a start step, step 0 is a flattened step or the first delayed one: empty only when
        # codebook 0 is itself delayed (coordinates past T still count, as in the definition).
        return self._flat(timesteps) == 0 and self._main_steps(timesteps) > 0 and self.delays[0] > 0

    def _max_t_after_first(self, timesteps: int) -> int:
        steps = self.num_steps(timesteps)
        last_main_t = timesteps + self.delays[-1] - 1 - self.delays[0]
        if last_main_t >= self.flatten_first and steps >= 2:  # lies on the last step
            return last_main_t + 1
        flat = self._flat(timesteps)
        if flat > 0 and self._prefix + flat * self.n_q >= 2:  # the last flattened step is not step 0
            return flat
        return 0

    def _segments(self, timesteps: int) -> list[Segment]:
        flat, prefix, k = self._flat(timesteps), self._prefix, self.n_q
        segments = [Segment(0, k, 0, prefix, flat, k, 1)] if flat > 0 else []
        if timesteps > self.flatten_first:
            main_start = prefix + flat * k
            for q0, q1, step in arithmetic_runs(self.delays):
                segments.append(Segment(q0, q1, flat, main_start + self.delays[q0], timesteps - flat, 1, step))
        return segments


class ParallelPattern(DelayedPattern):
    """All codebooks of timestep t at step ``prefix + t``: delayed with every delay 0."""

    kind = "parallel"

    def __init__(self, n_q: int, empty_initial: int = 0) -> None:
        super().__init__(n_q, delays=[0] * check_count("parallel", "n_q", n_q, minimum=1), empty_initial=empty_initial)

    def _options(self) -> dict[str, Any]:
        return {"empty_initial": self.empty_initial}


class UnrolledPattern(Pattern):
    """Each timestep unrolled over ``max(flattening) + 1`` inner steps, groups shifted by their delay.

    Items are keyed by ``t + delay`` and sorted; within a key the empty inner steps come first, then
    the groups by decreasing delay (their t is smaller) and by codebook. That gives the closed form
    ``s = 1 + k*E + sum_g max(0, k - d_g) + E + rank`` with k = t + d, E the inner steps without a group.
    """

    kind = "unrolled"

    def __init__(self, n_q: int, flattening: Sequence[int] | None = None, delays: Sequence[int] | None = None) -> None:
        super().__init__(n_q)
        default_flat = range(self.n_q) if flattening is None else flattening
        self.flattening = check_sorted_counts(self.kind, "flattening", default_flat, self.n_q)
        self.delays = check_sorted_counts(self.kind, "delays", [0] * self.n_q if delays is None else delays, self.n_q)
        group_delay: dict[int, int] = {}
        for q, (inner, delay) in enumerate(zip(self.flattening, self.delays, strict=True)):
            if group_delay.setdefault(inner, delay) != delay:
                raise PatternError(
                    f"unrolled: codebooks flattened to inner step {inner} must share one delay, but codebook {q} "
                    f"has delay {delay} and an earlier one {group_delay[inner]} (flattening={list(self.flattening)}, "
                    f"delays={list(self.delays)})"
                )
        self._group_delays = tuple(group_delay.values())  # groups in codebook order
        self._empty_inner = self.flattening[-1] + 1 - len(self._group_delays)
        firsts = {inner: self.flattening.index(inner) for inner in group_delay}
        # Constant part of a codebook's rank within its key: empty steps, then same-delay groups before it.
        self._ranks = tuple(
            self._empty_inner + sum(1 for g, d in group_delay.items() if d == delay and firsts[g] < firsts[inner])
            for inner, delay in zip(self.flattening, self.delays, strict=True)
        )

    def _options(self) -> dict[str, Any]:
        return {"flattening": self.flattening, "delays": self.delays}

    def num_steps(self, timesteps: int) -> int:
        m = self._timesteps(timesteps) + self.delays[-1]
        return 1 + m * self._empty_inner + sum(m - d for d in self._group_delays)

    def _max_t_after_first(self, timesteps: int) -> int:
        return timesteps + self.delays[-1] - self.delays[0]

    def _step_table(self, timesteps: int, device: torch.device) -> torch.Tensor:
        t = torch.arange(timesteps, device=device)
        delays = self._constant("delays", self.delays, device)[:, None]
        ranks = self._constant("ranks", self._ranks, device)[:, None]
        group_delays = self._constant("group_delays", self._group_delays, device)
        key = t + delays  # [K, T]
        earlier = (key[..., None] - group_delays).clamp(min=0).sum(-1)
        later_delays = ((group_delays > delays[..., None]) & (group_delays <= key[..., None])).sum(-1)
        return 1 + key * self._empty_inner + earlier + ranks + later_delays


class CoarseFirstPattern(SlicedPattern):
    """All of codebook 0 first, then codebooks 1..K-1 delayed by ``delays`` (K-1 entries)."""

    kind = "coarse_first"

    def __init__(self, n_q: int, delays: Sequence[int] | None = None) -> None:
        super().__init__(n_q)
        self.delays = check_sorted_counts(self.kind, "delays", [0] * (self.n_q - 1) if delays is None else delays,
                                          self.n_q - 1)

    def _options(self) -> dict[str, Any]:
        return {"delays": self.delays}

    @property
    def _max_delay(self) -> int:
        return self.delays[-1] if self.delays else 0  # one codebook: no delays, nothing to wait for

    def num_steps(self, timesteps: int) -> int:
        timesteps = self._timesteps(timesteps)
        return 1 + 2 * timesteps + self._max_delay

    def _max_t_after_first(self, timesteps: int) -> int:
        return timesteps + (self._max_delay - self.delays[0] if self.delays else 0)

    def _segments(self, timesteps: int) -> list[Segment]:
        segments = [Segment(0, 1, 0, 1, timesteps, 1, 0)] if timesteps else []
        for q0, q1, step in arithmetic_runs(self.delays) if timesteps else []:
            segments.append(Segment(q0 + 1, q1 + 1, 0, 1 + timesteps + self.delays[q0], timesteps, 1, step))
        return segments


class MusicLMPattern(SlicedPattern):
    """Groups of ``group_by`` codebooks, each flattened over all timesteps before the next group."""

    kind = "musiclm"

    def __init__(self, n_q: int, group_by: int = 2) -> None:
        super().__init__(n_q)
        self.group_by = check_count(self.kind, "group_by", group_by, minimum=1)
        if self.n_q % self.group_by:
            raise PatternError(f"musiclm: group_by={self.group_by} must divide n_q={self.n_q}")

    def _options(self) -> dict[str, Any]:
        return {"group_by": self.group_by}

    def num_steps(self, timesteps: int) -> int:
        return 1 + self.n_q * self._timesteps(timesteps)

    def _max_t_after_first(self, timesteps: int) -> int:
        return timesteps

    def _segments(self, timesteps: int) -> list[Segment]:
        g = self.group_by
        return [Segment(q0, q0 + g, 0, 1 + q0 * timesteps, timesteps, g, 1)
                for q0 in range(0, self.n_q, g) if timesteps]


_FACTORIES: dict[str, Callable[..., Pattern]] = {
    cls.kind: cls for cls in (ParallelPattern, DelayedPattern, UnrolledPattern, CoarseFirstPattern, MusicLMPattern)
}
KINDS: tuple[str, ...] = tuple(_FACTORIES)
_OPTIONS: dict[str, tuple[str, ...]] = {
    "parallel": ("empty_initial",),
    "delayed": ("delays", "flatten_first", "empty_initial"),
    "unrolled": ("flattening", "delays"),
    "coarse_first": ("delays",),
    "musiclm": ("group_by",),
}


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f"; did you mean {close[0]!r}?" if close else "."


def get_pattern(kind: str, n_q: int, **options: Any) -> Pattern:
    """The pattern ``kind`` over ``n_q`` codebooks; options as in the module docstring.

    Bad kinds, option names and option values raise :class:`PatternError` (a ValueError) naming them.
    """
    if not isinstance(kind, str) or kind not in _FACTORIES:
        raise PatternError(
            f"unknown pattern kind {kind!r}{_did_you_mean(str(kind), KINDS)} Known kinds: {', '.join(KINDS)}"
        )
    for name in options:
        if name not in _OPTIONS[kind]:
            raise PatternError(
                f"{kind}: unknown option {name!r}{_did_you_mean(name, _OPTIONS[kind])} "
                f"Options of {kind}: {', '.join(_OPTIONS[kind])}"
            )
    return _FACTORIES[kind](n_q, **options)

