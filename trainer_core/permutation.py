"""Keyed pseudo-random permutations of ``range(size)`` that are never materialised.

A shuffled epoch over 10^9 items cannot afford ``torch.randperm`` (8 GB) nor a state that
stores the order. Instead the order is a keyed bijection: position ``p`` of the epoch holds
item ``perm(p)``, computed on demand from a 64-bit key. So any position of any epoch can be
reached in O(1), and a sampler's state is just (seed, epoch, position).

The bijection is a small Feistel network over the power-of-two domain ``2**bits >= size``,
with cycle-walking to stay inside ``[0, size)``: values that land outside are encrypted again
until they fall inside, which keeps it a bijection on ``[0, size)`` (the walk stays on the
cycle of the start value, which contains that start value, so it ends). The domain is less
than twice ``size``, so fewer than two walks are needed on average.

Everything works on int64 tensors, a chunk at a time; the round function keeps every product
below ``2**63`` (32-bit values times 31-bit odd multipliers), so there is no reliance on
integer overflow and the output is the same on every platform.
"""

from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
MASK64 = (1 << 64) - 1
# Odd multipliers below 2**31: a 32-bit value times one of them stays below 2**63.
MUL_A = 0x7FEB352D
MUL_B = 0x5BD1E995
ROUNDS = 8
MIN_BITS = 2
MAX_BITS = 62

_GOLDEN = 0x9E3779B97F4A7C15


def mix64(*parts: int) -> int:
    """A 64-bit key from any number of integers (splitmix64 chained over the parts).

    Used to turn (seed, epoch) or (seed, epoch, round) into well-spread keys, so that
    neighbouring seeds or epochs give unrelated permutations.
    """
    state = 0
    for part in parts:
        state = (state + (part & MASK64) + _GOLDEN) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        state = z ^ (z >> 31)
    return state


def _round_function(half: torch.Tensor, key: int, out_mask: int) -> torch.Tensor:
    """A keyed 32-bit mix of one half, cut to the width of the other half.

    Halves have at most 31 bits and keys 32, so ``half ^ key`` already fits in 32 bits.
    """
    h = half ^ key
    h.mul_(MUL_A).bitwise_and_(MASK32)
    h ^= h >> 15
    h.mul_(MUL_B).bitwise_and_(MASK32)
    h ^= h >> 16
    return h.bitwise_and_(out_mask)


class KeyedPermutation:
    """A bijection of ``range(size)`` chosen by ``key``; call it on a tensor of positions."""

    def __init__(self, size: int, key: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"permutation size must be a non-negative int, got {size!r}")
        bits = max(MIN_BITS, (size - 1).bit_length())
        if bits > MAX_BITS:
            raise ValueError(f"permutation size {size} is above the supported 2**{MAX_BITS}")
        self.size = size
        self._right_bits = bits - bits // 2
        self._left_mask = (1 << (bits // 2)) - 1
        self._right_mask = (1 << self._right_bits) - 1
        self._keys = [mix64(key, i) & MASK32 for i in range(ROUNDS)]

    def _encrypt(self, values: torch.Tensor) -> torch.Tensor:
        """One pass of the Feistel network over the whole power-of-two domain.

        Rounds alternate which half they change (``left ^= F(right)``, then
        ``right ^= F(left)``), which is invertible for halves of unequal width too.
        """
        left = values >> self._right_bits
        right = values & self._right_mask
        for i, key in enumerate(self._keys):
            if i % 2 == 0:
                left ^= _round_function(right, key, self._left_mask)
            else:
                right ^= _round_function(left, key, self._right_mask)
        return (left << self._right_bits).bitwise_or_(right)

    def __call__(self, positions: torch.Tensor) -> torch.Tensor:
        """The items at ``positions`` (int64 values in ``[0, size)``), as a new int64 tensor."""
        out = self._encrypt(positions.to(torch.int64))
        pending = (out >= self.size).nonzero().squeeze(1)
        while pending.numel():
            walked = self._encrypt(out[pending])
            out[pending] = walked
            pending = pending[walked >= self.size]
        return out

    def at(self, position: int) -> int:
        """The item at one position; for single look-ups and tests, not for bulk work."""
        if not 0 <= position < self.size:
            raise IndexError(f"position {position} is outside [0, {self.size})")
        return int(self(torch.tensor([position], dtype=torch.int64))[0])
