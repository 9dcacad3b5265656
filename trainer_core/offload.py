"""Activation offload ("unsloth"): each chosen block keeps only a host copy of its input.

A wrapped block runs under non-reentrant ``torch.utils.checkpoint``, so autograd keeps none of
the block's intermediate tensors; the one thing checkpoint does keep, the block's input, goes
through saved-tensor hooks that copy it to (pinned) host memory. The backward pass brings the
input back, recomputes the block with the forward's RNG and autocast state, and differentiates
it. Composing these two kept-up torch primitives gives dropout, kwargs, tuple outputs, frozen
parameters, AMP and DDP support without a hand-written autograd Function.

Wrapping replaces the block's ``forward`` on the instance only: parameter names, module
registration and state-dict keys are untouched, so checkpoints and DDP see the same model.

:class:`ActivationMeter` measures what autograd keeps for the backward pass, separating what
stays on the compute device from what the offload moved to host memory.
"""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import checkpoint

BlockSpec = type[nn.Module] | tuple[type[nn.Module], ...] | str | None
# Containers are never called, so wrapping their forward would offload nothing.
_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)

ACTIVATION_BYTES = "train/activation_bytes"
ACTIVATION_CPU_BYTES = "train/activation_cpu_bytes"


class NoBlocksWarning(UserWarning):
    """Activation offload was asked for but no module matched, so nothing is saved."""


# ---------------------------------------------------------------------------------------------
# Choosing blocks


def find_repeated_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's repeated blocks (its transformer layers), as (name, module) pairs.

    A stack is an ``nn.ModuleList`` or ``nn.Sequential`` with at least two children, all of one
    class; the blocks are all modules of the class that fills the biggest stack (the one holding
    the most parameters), wherever they sit. Returns [] when there is no stack.
    """
    best: type[nn.Module] | None = None
    best_size = (-1, -1)
    for container in model.modules():
        if not isinstance(container, nn.ModuleList | nn.Sequential):
            continue
        classes = {type(child) for child in container.children()}
        if len(container) < 2 or len(classes) != 1 or issubclass(cls := classes.pop(), _CONTAINERS):
            continue
        size = (sum(p.numel() for p in container.parameters()), len(container))
        if size > best_size:
            best, best_size = cls, size
    return [] if best is None else select_blocks(model, best)


def select_blocks(model: nn.Module, blocks: BlockSpec = None) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs ``blocks`` picks, outermost only, each module once.

    ``blocks`` is None (the repeated blocks), a module class or tuple of classes, or a regular
    expression matched in full against module names such as ``"layers\\.\\d+"``.
    """
    if blocks is None:
        return find_repeated_blocks(model)
    matches = _matcher(blocks)
    chosen: list[tuple[str, nn.Module]] = []
    seen: set[int] = set()
    for name, module in _outermost(model, matches):
        if id(module) not in seen:
            seen.add(id(module))
            chosen.append((name, module))
    return chosen


def _matcher(blocks: type[nn.Module] | tuple[type[nn.Module], ...] | str) -> Callable[[str, nn.Module], bool]:
    if isinstance(blocks, str):
        try:
            pattern = re.compile(blocks)
        except re.error as exc:
            raise ValueError(f"offload blocks: {blocks!r} is not a valid regular expression: {exc}") from exc
        return lambda name, _module: pattern.fullmatch(name) is not None
    classes = blocks if isinstance(blocks, tuple) else (blocks,)
    if not classes or not all(isinstance(c, type) and issubclass(c, nn.Module) for c in classes):
        raise ValueError(f"offload blocks must be module classes or a name pattern, got {blocks!r}")
    return lambda _name, module: isinstance(module, classes)


def _outermost(model: nn.Module, matches: Callable[[str, nn.Module], bool]) -> Iterator[tuple[str, nn.Module]]:
    """Matching submodules, not descending into a match (a block is never nested in a block).

    Containers (ModuleList, ModuleDict) are looked into, never matched: they have no forward.
    """
    stack = [(name, child) for name, child in reversed(list(model.named_children()))]
    while stack:
        name, module = stack.pop()
        if not isinstance(module, _CONTAINERS) and matches(name, module):
            yield name, module
            continue
        stack.extend((f"{name}.{n}", c) for n, c in reversed(list(module.named_children())))


# ---------------------------------------------------------------------------------------------
# Wrapping


class OffloadedForward:
    """A block's forward under checkpoint, with the checkpoint's saved inputs moved to host memory.

    Stored as the instance attribute ``forward`` so that ``nn.Module.__call__`` (and its hooks)
    run as before, once per call, while the recomputation reruns only the original forward.
    """

    def __init__(self, inner: Callable[..., Any], pin_memory: bool) -> None:
        self.inner = inner
        self.pin_memory = pin_memory

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not torch.is_grad_enabled():
            return self.inner(*args, **kwargs)
        function, flat = self.inner, args
        if kwargs or any(isinstance(arg, list | tuple | dict) for arg in args):
            # Checkpoint saves only top-level tensor arguments through the hooks; anything nested
            # (kwargs, tuples of tensors) would stay referenced on the device, so flatten it all.
            flat, spec = pytree.tree_flatten((args, kwargs))
            inner = self.inner

            def function(*leaves: Any) -> Any:
                call_args, call_kwargs = pytree.tree_unflatten(list(leaves), spec)
                return inner(*call_args, **call_kwargs)

        with torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack):
            return checkpoint(function, *flat, use_reentrant=False, preserve_rng_state=True)

    def _pack(self, tensor: torch.Tensor) -> tuple[torch.device, torch.Tensor]:
        if _is_parameter(tensor):  # model state lives on the device anyway: no copy, not counted
            return tensor.device, tensor.detach()
        if tensor.device.type == "cpu" or tensor.layout != torch.strided:
            host = tensor.detach()
        else:
            pin = self.pin_memory and tensor.device.type == "cuda"
            host = torch.empty(tensor.size(), dtype=tensor.dtype, pin_memory=pin)
            # Ordered after the producing kernel on the same stream, so the device memory may be
            # reused at once; the copy back in backward is queued behind it as well.
            host.copy_(tensor, non_blocking=pin)
        for meter in _active_meters():
            meter.count(host, offloaded=True)
        return tensor.device, host


def _unpack(packed: tuple[torch.device, torch.Tensor]) -> torch.Tensor:
    device, host = packed
    return host.to(device, non_blocking=True)


def apply_activation_offload(
    model: nn.Module, blocks: BlockSpec = None, *, pin_memory: bool | None = None
) -> list[str]:
    """Offload the activations of ``blocks`` (default: the repeated blocks); returns their names.

    ``pin_memory`` defaults to whether CUDA is available. Applying it twice wraps nothing twice.
    Call it before wrapping the model in DDP; the wrapped model trains to the same gradients.
    """
    chosen = select_blocks(model, blocks)
    if not chosen:
        what = f"nothing matched {blocks!r}" if blocks is not None else "no repeated blocks (one-class ModuleList)"
        warnings.warn(f"activation offload: {what} in {type(model).__name__}; nothing offloaded",
                      NoBlocksWarning, stacklevel=2)
        return []
    pin = torch.cuda.is_available() if pin_memory is None else pin_memory
    for _name, module in chosen:
        if not is_offloaded(module):
            module.forward = OffloadedForward(module.forward, pin)
    return [name for name, _module in chosen]


def is_offloaded(module: nn.Module) -> bool:
    """Whether ``module``'s forward is already wrapped by :func:`apply_activation_offload`."""
    return isinstance(module.__dict__.get("forward"), OffloadedForward)


# ---------------------------------------------------------------------------------------------
# Measuring

_local = threading.local()


def _active_meters() -> list[ActivationMeter]:
    return getattr(_local, "meters", [])


class ActivationMeter:
    """Counts the bytes autograd keeps for backward during a forward: ``with meter: loss = f(x)``.

    ``bytes`` are the saved tensors left where they were computed (the compute device);
    ``cpu_bytes`` the host copies made by activation offload (on a CPU-only machine the
    offloaded inputs are kept as they are and counted here). Each storage counts once, so a
    tensor saved by several operations is not counted twice; parameters (and views of them)
    are model state, not activations, and are not counted. Entering the meter resets it.
    """

    def __init__(self) -> None:
        self.bytes = 0
        self.cpu_bytes = 0
        self._seen: set[tuple[str, int]] = set()
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None

    def __enter__(self) -> ActivationMeter:
        self.bytes, self.cpu_bytes, self._seen = 0, 0, set()
        # Detached so the packed value never points back at its own grad_fn (a leak for outputs).
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _same)
        self._hooks.__enter__()
        _local.meters = [*_active_meters(), self]
        return self

    def __exit__(self, *exc: object) -> None:
        _local.meters = [m for m in _active_meters() if m is not self]
        if self._hooks is not None:
            self._hooks.__exit__(*exc)
            self._hooks = None

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        self.count(tensor, offloaded=False)
        return tensor.detach()

    def count(self, tensor: torch.Tensor, *, offloaded: bool) -> None:
        """Add ``tensor`` unless its storage was already counted or it is a parameter."""
        if _is_parameter(tensor):
            return
        key, nbytes = _storage_key(tensor)
        if key in self._seen:
            return
        self._seen.add(key)
        if offloaded:
            self.cpu_bytes += nbytes
        else:
            self.bytes += nbytes

    def metrics(self) -> dict[str, float]:
        """The figures under their metric names, for the loop to log."""
        return {ACTIVATION_BYTES: float(self.bytes), ACTIVATION_CPU_BYTES: float(self.cpu_bytes)}


def _is_parameter(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter)


def _same(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


def _storage_key(tensor: torch.Tensor) -> tuple[tuple[str, int], int]:
    try:
        storage = tensor.untyped_storage()
        return (str(tensor.device), storage.data_ptr()), storage.nbytes()
    except (RuntimeError, NotImplementedError):  # sparse or tensor subclasses without one storage
        return ("object", id(tensor)), tensor.numel() * tensor.element_size()
