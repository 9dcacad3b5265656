"""The machinery shared by every codebook pattern: validation, caches, build and revert.

A concrete pattern (see ``trainer_core.pattern``) only states its layout in closed form: how many steps
T timesteps take, which step each coordinate (t, q) lands on (a ``[K, T]`` tensor for :class:`Pattern`,
a few strided runs for :class:`SlicedPattern`), whether step 0 is empty, and the largest timestep after
step 0. Everything else — moving data, masks, the one-step shift of ``revert_logits``,
``keep_only_valid_steps`` — is derived here, identically for all kinds.
"""

from __future__ import annotations

import operator
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from typing import Any, ClassVar, NamedTuple, TypeVar

import torch

_V = TypeVar("_V")


class PatternError(ValueError):
    """A bad pattern option or a tensor that does not fit the pattern."""


def check_count(kind: str, name: str, value: Any, minimum: int | None = 0) -> int:
    """``value`` as a plain int (bools and floats refused), at least ``minimum`` unless that is None."""
    if isinstance(value, bool):
        raise PatternError(f"{kind}: {name} must be an integer, got {value!r}")
    try:
        number = operator.index(value)
    except TypeError:
        raise PatternError(f"{kind}: {name} must be an integer, got {value!r}") from None
    if minimum is not None and number < minimum:
        raise PatternError(f"{kind}: {name} must be >= {minimum}, got {number}")
    return number


def check_sorted_counts(kind: str, name: str, values: Any, length: int) -> tuple[int, ...]:
    """A sorted list of ``length`` non-negative ints, as a tuple."""
    if isinstance(values, str | bytes) or not isinstance(values, Sequence | range):
        raise PatternError(f"{kind}: {name} must be a list of integers, got {values!r}")
    numbers = tuple(check_count(kind, f"{name}[{i}]", v) for i, v in enumerate(values))
    if len(numbers) != length:
        raise PatternError(f"{kind}: {name} must have {length} entries, got {len(numbers)}: {list(numbers)}")
    if list(numbers) != sorted(numbers):
        raise PatternError(f"{kind}: {name} must be sorted (non-decreasing), got {list(numbers)}")
    return numbers


def arithmetic_runs(values: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(q0, q1, step)``: maximal ranges where ``values`` grow by ``step`` per codebook, so that one
    strided view covers them all (MusicGen's delays 0..K-1 are a single run)."""
    runs: list[tuple[int, int, int]] = []
    q0 = 0
    while q0 < len(values):
        q1 = q0 + 1
        step = values[q1] - values[q0] if q1 < len(values) else 0
        while q1 < len(values) and values[q1] - values[q1 - 1] == step:
            q1 += 1
        runs.append((q0, q1, step))
        q0 = q1
    return runs


class Segment(NamedTuple):
    """Codebooks ``q0..q1-1``, timesteps ``t0 .. t0+length-1``: codebook ``q0 + j`` at steps
    ``s0 + j*q_step``, then every ``stride`` steps. One strided view of the sequence holds it all."""

    q0: int
    q1: int
    t0: int
    s0: int
    length: int
    stride: int
    q_step: int

    def counts_below(self, limit: int, shift: int = 0) -> list[int]:
        """Per codebook, how many of its steps (moved ``shift`` earlier) lie below ``limit``."""
        rooms = [limit - (self.s0 - shift + j * self.q_step) for j in range(self.q1 - self.q0)]
        return [0 if room <= 0 else min(self.length, -(-room // self.stride)) for room in rooms]

    def steps_view(self, seq: torch.Tensor, j0: int, j1: int, i0: int, n: int, shift: int) -> torch.Tensor:
        """The ``[..., j1-j0, n]`` view of ``seq [..., K, S]`` at items ``i0..i0+n-1`` of codebooks j0..j1-1."""
        *lead, q_stride, s_stride = seq.stride()
        first = self.s0 - shift + j0 * self.q_step + i0 * self.stride
        offset = seq.storage_offset() + (self.q0 + j0) * q_stride + first * s_stride
        return seq.as_strided((*seq.shape[:-2], j1 - j0, n),
                              (*lead, q_stride + self.q_step * s_stride, self.stride * s_stride), offset)


class _LRU:
    """A small thread-safe least-recently-used map; values are built outside the lock."""

    def __init__(self, maxsize: int) -> None:
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._maxsize = maxsize

    def get(self, key: Hashable, make: Callable[[], _V]) -> _V:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        value = make()
        with self._lock:
            self._items[key] = value
            while len(self._items) > self._maxsize:
                self._items.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._items)


class Pattern(ABC):
    """A codebook interleaving layout over ``n_q`` codebooks, for any number of timesteps."""

    kind: ClassVar[str]
    cache_size: ClassVar[int] = 64  # (T, device) entries; real batches bring a handful of distinct T at a time

    def __init__(self, n_q: int) -> None:
        self.n_q = check_count(self.kind, "n_q", n_q, minimum=1)
        self._cache = _LRU(self.cache_size)
        self._constants: dict[tuple[str, torch.device], torch.Tensor] = {}

    # -- the layout, in closed form -------------------------------------------------------------

    @abstractmethod
    def num_steps(self, timesteps: int) -> int:
        """S, the number of sequence steps the layout takes for ``timesteps`` timesteps."""

    @abstractmethod
    def _options(self) -> dict[str, Any]: ...

    @abstractmethod
    def _step_table(self, timesteps: int, device: torch.device) -> torch.Tensor:
        """The ``[K, T]`` long tensor of the step holding each coordinate (t, q), t < T."""

    @abstractmethod
    def _max_t_after_first(self, timesteps: int) -> int:
        """``max(t + 1 for (t, q) in layout[1:])``, 0 when there is none (coordinates past T count)."""

    def _starts_empty(self, timesteps: int) -> bool:
        """Whether step 0 holds no coordinate: then model output s predicts step s + 1."""
        return True

    def valid_steps(self, timesteps: int) -> int:
        """The steps ``build(..., keep_only_valid_steps=True)`` keeps: ``layout[:S - max_delay]``."""
        steps = self.num_steps(timesteps)
        max_delay = self._max_t_after_first(timesteps) - timesteps
        return len(range(steps)[: steps - max_delay])  # the definition's slice, negative ends included

    def __getstate__(self) -> dict[str, Any]:
        """Pickles without the caches (their lock cannot travel), e.g. into DataLoader workers."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_cache", "_constants")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._cache = _LRU(self.cache_size)
        self._constants = {}

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={list(v) if isinstance(v, tuple) else v!r}" for k, v in self._options().items())
        return f"get_pattern({self.kind!r}, {self.n_q}{', ' if options else ''}{options})"

    # -- public operations ----------------------------------------------------------------------

    def build(self, codes: torch.Tensor, special_token: float, keep_only_valid_steps: bool = False
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, K, T]`` codes -> ``[B, K, S]`` sequence and its ``[K, S]`` mask of placed codes."""
        self._check(codes, 3, "build", "codes", "[B, K, T]")
        timesteps = codes.shape[-1]
        total = self.num_steps(timesteps)
        kept = self.valid_steps(timesteps) if keep_only_valid_steps else total
        seq = self._place(codes, special_token, total, kept)
        mask = self._cached(("build_mask", timesteps, codes.device), lambda: self._build_mask(timesteps, codes.device))
        return seq, mask[:, :kept].clone()

    def revert(self, seq: torch.Tensor, special_token: float, timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, K, S]`` sequence -> ``[B, K, T]`` codes and the ``[K, T]`` mask of filled positions."""
        self._check(seq, 3, "revert", "seq", "[B, K, S]")
        return self._revert(seq, special_token, self._fits(seq, timesteps, "revert"), shift=0)

    def revert_logits(self, logits: torch.Tensor, special_value: float, timesteps: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, C, K, S]`` model outputs -> ``[B, C, K, T]``; output s is the prediction for step s + 1."""
        self._check(logits, 4, "revert_logits", "logits", "[B, C, K, S]")
        timesteps = self._fits(logits, timesteps, "revert_logits")
        return self._revert(logits, special_value, timesteps, shift=int(self._starts_empty(timesteps)))

    # -- validation -----------------------------------------------------------------------------

    def _timesteps(self, timesteps: int) -> int:
        return check_count(self.kind, "timesteps", timesteps)

    def _check(self, tensor: Any, rank: int, op: str, name: str, shape: str) -> None:
        if not isinstance(tensor, torch.Tensor):
            raise PatternError(f"{self.kind}.{op}: {name} must be a torch.Tensor of shape {shape}, got {type(tensor)}")
        if tensor.dim() != rank:
            raise PatternError(f"{self.kind}.{op}: {name} must have shape {shape}, got {tuple(tensor.shape)}")
        if tensor.shape[-2] != self.n_q:
            raise PatternError(
                f"{self.kind}.{op}: {name} has K={tensor.shape[-2]} codebooks (shape {tuple(tensor.shape)}) "
                f"but the pattern has n_q={self.n_q}"
            )

    def _fits(self, tensor: torch.Tensor, timesteps: int, op: str) -> int:
        timesteps = self._timesteps(timesteps)
        if tensor.shape[-1] > self.num_steps(timesteps):
            raise PatternError(
                f"{self.kind}.{op}: the sequence has {tensor.shape[-1]} steps, longer than the "
                f"{self.num_steps(timesteps)} steps of the pattern for timesteps={timesteps}"
            )
        return timesteps

    # -- cached index tensors -------------------------------------------------------------------

    def _cached(self, key: Hashable, make: Callable[[], _V]) -> _V:
        return self._cache.get(key, make)

    def _constant(self, name: str, values: Sequence[int], device: torch.device) -> torch.Tensor:
        """A per-option tensor made once per device, so the hot path never copies from the host."""
        key = (name, device)
        if key not in self._constants:
            self._constants[key] = torch.tensor(values, dtype=torch.long, device=device)
        return self._constants[key]

    def _steps(self, timesteps: int, device: torch.device) -> torch.Tensor:
        return self._cached(("steps", timesteps, device), lambda: self._step_table(timesteps, device))

    def _build_mask(self, timesteps: int, device: torch.device) -> torch.Tensor:
        mask = torch.zeros(self.n_q, self.num_steps(timesteps), dtype=torch.bool, device=device)
        return mask.scatter_(1, self._steps(timesteps, device), True)

    def _revert_plan(self, timesteps: int, length: int, shift: int, device: torch.device) -> RevertPlan:
        steps = self._steps(timesteps, device) - shift
        filled = steps < length
        return RevertPlan(filled, steps.clamp(0, max(length - 1, 0)), ~filled)

    def _revert(self, src: torch.Tensor, special: float, timesteps: int, shift: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("revert", timesteps, src.shape[-1], shift, src.device)
        plan = self._cached(key, lambda: self._revert_plan(timesteps, src.shape[-1], shift, src.device))
        return self._take(src, special, timesteps, shift, plan), plan.filled.clone()

    # -- moving data: one scatter / one gather over the step table ------------------------------

    def _place(self, codes: torch.Tensor, special: float, total: int, kept: int) -> torch.Tensor:
        seq = codes.new_full((*codes.shape[:-1], total), special)
        steps = self._steps(codes.shape[-1], codes.device)
        seq.scatter_(-1, steps.expand(codes.shape), codes)
        return seq if kept == total else seq[..., :kept].contiguous()

    def _take(self, src: torch.Tensor, special: float, timesteps: int, shift: int, plan: RevertPlan) -> torch.Tensor:
        if src.shape[-1] == 0:
            return src.new_full((*src.shape[:-1], timesteps), special)
        assert plan.index is not None and plan.unfilled is not None, "a gather plan carries its index"
        values = src.gather(-1, plan.index.expand(*src.shape[:-1], timesteps))
        return values.masked_fill_(plan.unfilled, special)


class RevertPlan(NamedTuple):
    """What reverting ``length`` steps needs, cached per (T, length, shift, device)."""

    filled: torch.Tensor  # [K, T] bool: positions the sequence holds
    index: torch.Tensor | None = None  # [K, T] gather index, clamped into the sequence
    unfilled: torch.Tensor | None = None  # ~filled, kept to skip a kernel per call


class SlicedPattern(Pattern):
    """A pattern whose layout is a few strided runs (:meth:`_segments`): data and masks move by
    strided copies, with no step table, gather or scatter at all — fewer, cheaper kernels, and on a
    cache miss (a new T) only two small mask fills."""

    @abstractmethod
    def _segments(self, timesteps: int) -> list[Segment]:
        """The runs covering every coordinate (t, q) with t < T exactly once."""

    def _cached_segments(self, timesteps: int) -> list[Segment]:
        return self._cached(("segments", timesteps), lambda: self._segments(timesteps))

    def _step_table(self, timesteps: int, device: torch.device) -> torch.Tensor:
        """Not needed by the strided copies; kept exact so the generic gather works on these layouts too."""
        table = torch.empty(self.n_q, timesteps, dtype=torch.long, device=device)
        for seg in self._cached_segments(timesteps):
            codebooks = torch.arange(seg.q1 - seg.q0, device=device)[:, None] * seg.q_step
            table[seg.q0:seg.q1, seg.t0:seg.t0 + seg.length] = (
                codebooks + torch.arange(seg.length, device=device) * seg.stride + seg.s0
            )
        return table

    def _build_mask(self, timesteps: int, device: torch.device) -> torch.Tensor:
        steps = self.num_steps(timesteps)
        mask = torch.zeros(self.n_q, steps, dtype=torch.bool, device=device)
        for seg in self._cached_segments(timesteps):
            for j0, j1, i0, n in _pieces(seg.counts_below(steps)):
                seg.steps_view(mask, j0, j1, i0, n, 0).fill_(True)
        return mask

    def _revert_plan(self, timesteps: int, length: int, shift: int, device: torch.device) -> RevertPlan:
        filled = torch.zeros(self.n_q, timesteps, dtype=torch.bool, device=device)
        for seg in self._cached_segments(timesteps):
            for j0, j1, i0, n in _pieces(seg.counts_below(length, shift)):
                filled[seg.q0 + j0:seg.q0 + j1, seg.t0 + i0:seg.t0 + i0 + n] = True
        return RevertPlan(filled)

    def _place(self, codes: torch.Tensor, special: float, total: int, kept: int) -> torch.Tensor:
        seq = codes.new_full((*codes.shape[:-1], kept), special)
        for seg in self._cached_segments(codes.shape[-1]):
            for j0, j1, i0, n in _pieces(seg.counts_below(kept)):
                t0 = seg.t0 + i0
                seg.steps_view(seq, j0, j1, i0, n, 0).copy_(codes[..., seg.q0 + j0:seg.q0 + j1, t0:t0 + n])
        return seq

    def _take(self, src: torch.Tensor, special: float, timesteps: int, shift: int, plan: RevertPlan) -> torch.Tensor:
        out = src.new_full((*src.shape[:-1], timesteps), special)
        for seg in self._cached_segments(timesteps):
            for j0, j1, i0, n in _pieces(seg.counts_below(src.shape[-1], shift)):
                t0 = seg.t0 + i0
                out[..., seg.q0 + j0:seg.q0 + j1, t0:t0 + n] = seg.steps_view(src, j0, j1, i0, n, shift)
        return out


def _pieces(counts: list[int]) -> list[tuple[int, int, int, int]]:
    """Rectangles ``(j0, j1, i0, n)`` covering the first ``counts[j]`` items of each codebook j.

    Counts never grow with j (later codebooks sit later), so one rectangle covers what every codebook
    has and only a truncated sequence leaves per-codebook tails.
    """
    common = counts[-1]
    pieces = [(0, len(counts), 0, common)] if common else []
    pieces += [(j, j + 1, common, n - common) for j, n in enumerate(counts) if n > common]
    return pieces
