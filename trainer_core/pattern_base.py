"""The machinery shared by every codebook pattern: validation, caches, build and revert.

A concrete pattern (see ``trainer_core.pattern``) only states its layout in closed form: how many steps
T timesteps take, which step each coordinate (t, q) lands on (as a ``[K, T]`` tensor), whether step 0
is empty, and the largest timestep after step 0. Everything else — moving data, masks, the one-step
shift of ``revert_logits``, ``keep_only_valid_steps`` — is derived here, identically for all kinds.
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


def slice_runs(values: Sequence[int]) -> list[tuple[int, int]]:
    """``[q0, q1)`` ranges of consecutive equal values: codebooks that one slice copy can move together."""
    runs: list[tuple[int, int]] = []
    start = 0
    for q in range(1, len(values) + 1):
        if q == len(values) or values[q] != values[start]:
            runs.append((start, q))
            start = q
    return runs


class Segment(NamedTuple):
    """Codebooks ``q0..q1-1``, timesteps ``t0 .. t0+length-1`` at steps ``s0, s0+stride, ...``."""

    q0: int
    q1: int
    t0: int
    s0: int
    length: int
    stride: int

    def count_below(self, limit: int, shift: int = 0) -> int:
        """How many of the segment's steps (moved ``shift`` earlier) lie below ``limit``."""
        room = limit - (self.s0 - shift)
        return 0 if room <= 0 else min(self.length, -(-room // self.stride))


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

    def _segments(self, timesteps: int) -> list[Segment]:
        raise NotImplementedError(f"{self.kind} moves data by gather, not by slices")

    def valid_steps(self, timesteps: int) -> int:
        """The steps ``build(..., keep_only_valid_steps=True)`` keeps: ``layout[:S - max_delay]``."""
        steps = self.num_steps(timesteps)
        max_delay = self._max_t_after_first(timesteps) - timesteps
        return len(range(steps)[: steps - max_delay])  # the definition's slice, negative ends included

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

    def _revert_index(self, timesteps: int, length: int, shift: int, device: torch.device
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gather index clamped into the sequence, filled mask, its complement) for ``length`` steps."""
        steps = self._steps(timesteps, device) - shift
        filled = steps < length
        return steps.clamp(0, max(length - 1, 0)), filled, ~filled

    def _revert(self, src: torch.Tensor, special: float, timesteps: int, shift: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("revert", timesteps, src.shape[-1], shift, src.device)
        index, filled, unfilled = self._cached(
            key, lambda: self._revert_index(timesteps, src.shape[-1], shift, src.device)
        )
        return self._take(src, special, timesteps, shift, index, unfilled), filled.clone()

    # -- moving data: gather/scatter for any layout, slices where the layout is a few strided runs ---

    def _place(self, codes: torch.Tensor, special: float, total: int, kept: int) -> torch.Tensor:
        seq = codes.new_full((*codes.shape[:-1], total), special)
        steps = self._steps(codes.shape[-1], codes.device)
        seq.scatter_(-1, steps.expand(codes.shape), codes)
        return seq if kept == total else seq[..., :kept].contiguous()

    def _take(self, src: torch.Tensor, special: float, timesteps: int, shift: int,
              index: torch.Tensor, unfilled: torch.Tensor) -> torch.Tensor:
        if src.shape[-1] == 0:
            return src.new_full((*src.shape[:-1], timesteps), special)
        values = src.gather(-1, index.expand(*src.shape[:-1], timesteps))
        return values.masked_fill_(unfilled, special)

    def _cached_segments(self, timesteps: int) -> list[Segment]:
        return self._cached(("segments", timesteps), lambda: self._segments(timesteps))

    def _place_by_slices(self, codes: torch.Tensor, special: float, total: int, kept: int) -> torch.Tensor:
        seq = codes.new_full((*codes.shape[:-1], kept), special)
        for seg in self._cached_segments(codes.shape[-1]):
            n = seg.count_below(kept)
            if n:
                seq[..., seg.q0:seg.q1, seg.s0:seg.s0 + (n - 1) * seg.stride + 1:seg.stride] = (
                    codes[..., seg.q0:seg.q1, seg.t0:seg.t0 + n]
                )
        return seq

    def _take_by_slices(self, src: torch.Tensor, special: float, timesteps: int, shift: int,
                        index: torch.Tensor, unfilled: torch.Tensor) -> torch.Tensor:
        out = src.new_full((*src.shape[:-1], timesteps), special)
        for seg in self._cached_segments(timesteps):
            n = seg.count_below(src.shape[-1], shift)
            if n:
                s0 = seg.s0 - shift
                steps = slice(s0, s0 + (n - 1) * seg.stride + 1, seg.stride)
                out[..., seg.q0:seg.q1, seg.t0:seg.t0 + n] = src[..., seg.q0:seg.q1, steps]
        return out
