"""Exact comparison of loaded objects, shared by the io tests and the kill-test writer."""

from __future__ import annotations

import math
from typing import Any

import torch

SUFFIXES = (".pt", ".safetensors")
_SAME_WIDTH_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def raw_values(t: torch.Tensor) -> torch.Tensor:
    """The tensor's elements as same-width integers, so NaN payloads and odd dtypes compare bitwise."""
    t = t.detach()
    if t.dtype == torch.complex128:
        t = torch.view_as_real(t)
    return t.view(_SAME_WIDTH_INT[t.element_size()]).contiguous()


def assert_same(got: Any, want: Any, where: str = "root") -> None:
    """Equal in type, order, dtype, shape, stride, grad flag and every bit (any NaN equals any NaN)."""
    assert type(got) is type(want), f"{where}: {type(got).__name__} != {type(want).__name__}"
    if isinstance(want, torch.Tensor):
        assert (got.dtype, got.shape, got.stride()) == (want.dtype, want.shape, want.stride()), where
        assert got.requires_grad == want.requires_grad, where
        if want.device.type != "meta":
            assert torch.equal(raw_values(got), raw_values(want)), f"{where}: values differ"
    elif isinstance(want, dict):
        assert list(got) == list(want), f"{where}: keys {list(got)!r:.200} != {list(want)!r:.200}"
        for (gk, gv), (wk, wv) in zip(got.items(), want.items(), strict=True):
            assert_same(gk, wk, f"{where} key")
            assert_same(gv, wv, f"{where}/{wk!r}")
    elif isinstance(want, (list, tuple)):
        assert len(got) == len(want), f"{where}: length {len(got)} != {len(want)}"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_same(g, w, f"{where}/{i}")
    elif isinstance(want, complex):
        assert_same(got.real, want.real, f"{where}.real")
        assert_same(got.imag, want.imag, f"{where}.imag")
    elif isinstance(want, float):
        assert (math.isnan(got) and math.isnan(want)) or (got == want and math.copysign(1, got) == math.copysign(
            1, want)), f"{where}: {got!r} != {want!r}"
    else:
        assert got == want, f"{where}: {got!r:.200} != {want!r:.200}"


def same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
