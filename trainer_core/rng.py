"""Every random number generator a resume has to put back exactly."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

PYTHON = "python"
NUMPY = "numpy"
TORCH = "torch"
CUDA = "cuda"


def capture() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        PYTHON: {"version": version, "internal": list(internal), "gauss": gauss},
        NUMPY: {
            "kind": np_kind,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.uint32).view(np.int32).copy()),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        TORCH: torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state[CUDA] = torch.cuda.get_rng_state_all()
    return state


def restore(state: dict[str, Any]) -> None:
    missing = [key for key in (PYTHON, NUMPY, TORCH) if key not in state]
    if missing:
        raise ValueError(f"RNG state lacks {', '.join(missing)}")
    py = state[PYTHON]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    npst = state[NUMPY]
    keys = npst["keys"].numpy().view(np.uint32) if isinstance(npst["keys"], torch.Tensor) else np.asarray(npst["keys"])
    np.random.set_state((npst["kind"], keys.astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"]))
    torch.set_rng_state(state[TORCH].to(torch.uint8))
    if CUDA in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state[CUDA]))
