"""Spread a model's layers over devices by a memory budget, moving inputs to each layer's device.

A policy is an ordered mapping (or list of pairs) ``device -> budget``, for example
``{"cuda:0": "20GiB", "cpu": "*"}``: layers are taken in registration order and fill the first
device up to its budget, then the next, never going back, so consecutive layers share a device
and activations cross devices as few times as possible. ``"*"`` means no limit.

A module that does not fit is split into its children unless it is one of the ``no_split``
classes (by default the model's repeated blocks, which must stay whole); a split module's own
parameters go to the device where it starts. Modules sharing a parameter (tied weights) are
placed together, on the device of whichever was placed first. Each placed module gets a forward
pre-hook moving its tensor inputs to its device, and the model's outputs come back to the
device its inputs arrived on.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils.hooks import RemovableHandle

from trainer_core.offload import find_repeated_blocks

Policy = Mapping[str, str | int] | Iterable[tuple[str, str | int]]

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", re.IGNORECASE)
_HANDLES_ATTR = "_traindeck_placement_handles"
# Parameter containers have no forward: their owner uses their tensors, so they go with the owner.
_PARAMETER_CONTAINERS = (nn.ParameterList, nn.ParameterDict)


def parse_size(text: str | int) -> int | None:
    """Bytes in ``"2GiB"``, ``"512MB"``, ``"1.5gib"`` or an int; None for ``"*"`` (no limit)."""
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    if isinstance(text, str):
        if text.strip() == "*":
            return None
        found = _SIZE.fullmatch(text)
        if found and found.group(2).lower() in _UNITS:
            return int(float(found.group(1)) * _UNITS[found.group(2).lower()])
    raise ValueError(f"placement: bad memory budget {text!r}; use bytes, '2GiB', '512MB' or '*'")


@dataclass
class _Device:
    key: str
    device: torch.device
    capacity: int | None
    used: int = 0

    def fits(self, nbytes: int) -> bool:
        return self.capacity is None or self.used + nbytes <= self.capacity


@dataclass
class _Planner:
    devices: list[_Device]
    no_split: tuple[type[nn.Module], ...]
    current: int = 0
    placed: dict[int, int] = field(default_factory=dict)  # id(tensor) -> device index
    plan: dict[str, int] = field(default_factory=dict)  # module name -> device index
    own: dict[str, int] = field(default_factory=dict)  # split module name -> device of its own tensors
    modules: dict[int, int] = field(default_factory=dict)  # id(module) -> device index, for aliases

    def place(self, name: str, module: nn.Module) -> None:
        if id(module) in self.modules:  # registered under a second name: it is already placed
            self.plan[name] = self.modules[id(module)]
            return
        if isinstance(module, nn.ModuleList | nn.ModuleDict):  # never called, so hooks there never run
            self.split(name, module)
            return
        tensors = list(module.parameters()) + list(module.buffers())
        new = {id(t): t for t in tensors if id(t) not in self.placed}
        size = sum(t.numel() * t.element_size() for t in new.values())
        tied = [self.placed[id(t)] for t in tensors if id(t) in self.placed]
        if tied:
            self._assign(name, module, tied[0], new, size)
        elif self.devices[self.current].fits(size):
            self._assign(name, module, self.current, new, size)
        elif not isinstance(module, self.no_split) and any(True for _ in module.children()):
            self.split(name, module)
        else:
            self._assign(name, module, self._next_fitting(name, size), new, size)

    def split(self, name: str, module: nn.Module) -> None:
        """Place a module's children one by one; its own tensors go where it starts."""
        direct = [t for t in _own_tensors(module) if id(t) not in self.placed]
        if direct:
            index = self.current
            size = sum(t.numel() * t.element_size() for t in direct)
            if not self.devices[index].fits(size):
                index = self._next_fitting(name, size)
            self.devices[index].used += size
            self.placed.update((id(t), index) for t in direct)
            self.own[name] = index
        prefix = f"{name}." if name else ""
        for child_name, child in module.named_children():
            if not isinstance(child, _PARAMETER_CONTAINERS):
                self.place(prefix + child_name, child)

    def _assign(self, name: str, module: nn.Module, index: int, new: dict[int, torch.Tensor], size: int) -> None:
        self.devices[index].used += size
        self.placed.update((key, index) for key in new)
        self.plan[name] = self.modules[id(module)] = index

    def _next_fitting(self, name: str, size: int) -> int:
        for index in range(self.current + 1, len(self.devices)):
            if self.devices[index].fits(size):
                self.current = index
                return index
        budgets = ", ".join(f"{d.key}={d.capacity}" for d in self.devices)
        raise ValueError(f"placement: {name or 'the model'} needs {size} more bytes than the policy holds ({budgets})")


def plan_placement(
    model: nn.Module, policy: Policy, no_split: tuple[type[nn.Module], ...] | None = None
) -> dict[str, str]:
    """Which device (the policy's key) each placed module goes to, without moving anything."""
    planner = _plan(model, policy, no_split)
    keys = [d.key for d in planner.devices]
    return {name: keys[index] for name, index in planner.plan.items()}


def offload_model(
    model: nn.Module, policy: Policy, no_split: tuple[type[nn.Module], ...] | None = None
) -> dict[str, str]:
    """Place ``model`` by ``policy`` (see the module doc) and return the plan {module name: device}.

    Applying it again replaces the previous placement's hooks.
    """
    for handle in getattr(model, _HANDLES_ATTR, []):
        handle.remove()
    planner = _plan(model, policy, no_split)
    handles: list[RemovableHandle] = []
    for name, index in planner.plan.items():
        module, device = model.get_submodule(name), planner.devices[index].device
        module.to(device)
        handles.append(module.register_forward_pre_hook(_MoveInputs(device), with_kwargs=True))
    for name, index in planner.own.items():
        module, device = model.get_submodule(name), planner.devices[index].device
        _move_own_tensors(module, device)
        handles.append(module.register_forward_pre_hook(_MoveInputs(device), with_kwargs=True))
    handles.extend(_return_outputs_to_input_device(model))
    setattr(model, _HANDLES_ATTR, handles)
    keys = [d.key for d in planner.devices]
    return {name: keys[index] for name, index in planner.plan.items()}


def _plan(model: nn.Module, policy: Policy, no_split: tuple[type[nn.Module], ...] | None) -> _Planner:
    pairs = list(policy.items() if isinstance(policy, Mapping) else policy)
    if not pairs:
        raise ValueError("placement: the policy names no device")
    devices = []
    for key, budget in pairs:
        try:
            device = torch.device(key)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"placement: {key!r} is not a device") from exc
        devices.append(_Device(key, device, parse_size(budget)))
    if no_split is None:
        no_split = tuple({type(block) for _, block in find_repeated_blocks(model)})
    planner = _Planner(devices, no_split)
    planner.split("", model)
    return planner


def _own_modules(module: nn.Module) -> list[nn.Module]:
    return [module, *(c for c in module.children() if isinstance(c, _PARAMETER_CONTAINERS))]


def _own_tensors(module: nn.Module) -> list[torch.Tensor]:
    """The tensors a module's own forward uses directly: its own and its parameter containers'."""
    return [t for m in _own_modules(module) for t in [*m._parameters.values(), *m._buffers.values()]
            if t is not None]


def _move_own_tensors(module: nn.Module, device: torch.device) -> None:
    """Move a module's own parameters and buffers, keeping Parameter identity for optimizers."""
    with torch.no_grad():
        for owner in _own_modules(module):
            for param in owner._parameters.values():
                if param is not None:
                    param.data = param.data.to(device)
            for key, buffer in owner._buffers.items():
                if buffer is not None:
                    owner._buffers[key] = buffer.to(device)


class _MoveInputs:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return _to(args, self.device), _to(kwargs, self.device)


def _to(tree: Any, device: torch.device) -> Any:
    return pytree.tree_map(lambda x: x.to(device) if isinstance(x, torch.Tensor) else x, tree)


def _return_outputs_to_input_device(model: nn.Module) -> list[RemovableHandle]:
    arrivals: list[torch.device | None] = []

    def remember(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        arrivals.append(leaves[0].device if leaves else None)

    def give_back(_module: nn.Module, _args: tuple[Any, ...], output: Any) -> Any:
        device = arrivals.pop() if arrivals else None
        return output if device is None else _to(output, device)

    return [model.register_forward_pre_hook(remember, with_kwargs=True, prepend=True),
            model.register_forward_hook(give_back, always_call=True)]
