"""Module injection: swap modules in a built model without losing what the model relied on.

:func:`replace_modules` is the one primitive: the replacement takes the old module's device,
floating dtype, train/eval mode and forward/backward hooks, and keeps tied weights tied. The
named swaps (linear, embedding, attention), the autocast and compile wrappers and device
placement are built on it or beside it, and are what the ``optimizations:`` config section
switches on (see ``trainer_core.optimize``).
"""

from __future__ import annotations

import importlib.util
import itertools
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from trainer_core.attention import KNOWN_ATTENTION, SDPAMultiheadAttention, check_impl
from trainer_core.placement import offload_model, plan_placement

__all__ = [
    "KNOWN_ATTENTION", "KNOWN_EMBEDDING", "KNOWN_LINEAR", "ComputeDtypeLinear", "ExactType", "NoMatchWarning",
    "autocast_forward", "compile_model", "offload_model", "plan_placement", "replace_attention",
    "replace_embedding", "replace_linear", "replace_modules",
]

Target = type[nn.Module] | tuple[type[nn.Module], ...] | Callable[[str, nn.Module], bool]
Factory = Callable[[nn.Module], nn.Module]
_Place = tuple[nn.Module, str, str]  # parent, attribute, full name

_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


class NoMatchWarning(UserWarning):
    """A replacement was asked for but no module in the model matched it."""


def replace_modules(model: nn.Module, target: Target, factory: Factory) -> list[str]:
    """Replace every outermost submodule matching ``target`` by ``factory(old)``; returns their names.

    ``target`` is a module class, a tuple of classes, or a predicate ``(name, module) -> bool``.
    A module registered under several names is built once and stays shared (its first name is
    returned). The root module itself is never replaced. Nothing matching is warned about.
    State-dict hooks describe the old module's layout and are not carried over.
    """
    matches = _find(model, _predicate(target))
    if not matches:
        warnings.warn(f"replace_modules: nothing in {type(model).__name__} matched {_describe(target)}",
                      NoMatchWarning, stacklevel=2)
        return []
    shared = _shared_parameters(model)
    for old, places in matches:
        new = factory(old)
        if not isinstance(new, nn.Module):
            raise TypeError(f"replace_modules: the factory returned {type(new).__name__} for {places[0][2]}")
        if new is not old:
            _adopt(old, new, shared)
            for parent, attribute, _ in places:
                setattr(parent, attribute, new)
    return [places[0][2] for _, places in matches]


class ExactType:
    """A target matching modules of exactly these classes, not their subclasses."""

    def __init__(self, *classes: type[nn.Module]) -> None:
        self.classes = classes
        self.__name__ = " | ".join(c.__name__ for c in classes)

    def __call__(self, _name: str, module: nn.Module) -> bool:
        return type(module) in self.classes


def _predicate(target: Target) -> Callable[[str, nn.Module], bool]:
    if isinstance(target, type | tuple):
        classes = target if isinstance(target, tuple) else (target,)
        if not all(isinstance(c, type) and issubclass(c, nn.Module) for c in classes):
            raise TypeError(f"replace_modules: target must be module classes or a predicate, got {target!r}")
        return lambda _name, module: isinstance(module, classes)
    if callable(target):
        return target
    raise TypeError(f"replace_modules: target must be module classes or a predicate, got {target!r}")


def _describe(target: Target) -> str:
    if isinstance(target, tuple):
        return " | ".join(c.__name__ for c in target)
    return getattr(target, "__name__", repr(target))


def _walk(
    module: nn.Module, prefix: str = "", ancestors: tuple[int, ...] = ()
) -> Iterator[tuple[_Place, nn.Module, tuple[int, ...]]]:
    for attribute, child in module._modules.items():
        if child is None:
            continue
        name = f"{prefix}{attribute}"
        yield (module, attribute, name), child, ancestors
        yield from _walk(child, f"{name}.", (*ancestors, id(child)))


def _find(model: nn.Module, matches: Callable[[str, nn.Module], bool]) -> list[tuple[nn.Module, list[_Place]]]:
    """Matching modules, outermost only, each with every place it is registered at."""
    visits = list(_walk(model))
    matched = {id(child) for (_, _, name), child, _ in visits if matches(name, child)}
    found: dict[int, tuple[nn.Module, list[_Place]]] = {}
    for place, child, ancestors in visits:
        if id(child) in matched and not matched.intersection(ancestors):
            found.setdefault(id(child), (child, []))[1].append(place)
    return list(found.values())


def _shared_parameters(model: nn.Module) -> set[int]:
    """Ids of parameters registered under more than one name (tied weights, shared modules)."""
    counts: dict[int, int] = {}
    for _, param in model.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    return {key for key, count in counts.items() if count > 1}


def _adopt(old: nn.Module, new: nn.Module, shared: set[int]) -> None:
    """Give ``new`` what the model relied on in ``old``: ties, placement, mode and hooks."""
    old_params = dict(old.named_parameters(remove_duplicate=False))
    for name, param in list(new.named_parameters(remove_duplicate=False)):
        before = old_params.get(name)
        if before is not None and before is not param and id(before) in shared and before.shape == param.shape:
            owner, _, attribute = name.rpartition(".")
            setattr(new.get_submodule(owner), attribute, before)
    tensors = list(itertools.chain(old.parameters(), old.buffers()))
    if tensors:
        new.to(device=tensors[0].device)
        floating = [t.dtype for t in tensors if t.is_floating_point()]
        if floating:
            new.to(dtype=floating[0])
    new.train(old.training)
    _move_hooks(old, new)


def _move_hooks(old: nn.Module, new: nn.Module) -> None:
    """Hand the old module's hook dicts to the new one, so existing handles still remove them."""
    for attribute in _HOOK_DICTS:
        hooks = getattr(old, attribute, None)
        if not hooks:
            continue
        mine = getattr(new, attribute)
        if mine:
            mine.update(hooks)
        else:
            setattr(new, attribute, hooks)
    if getattr(old, "_is_full_backward_hook", None) is not None:
        new._is_full_backward_hook = old._is_full_backward_hook


# ---------------------------------------------------------------------------------------------
# Linear and embedding swaps


class ComputeDtypeLinear(nn.Linear):
    """A Linear whose matmul runs in ``compute_dtype`` while its weights keep their own dtype.

    Gives bf16/fp16 matmul speed to chosen layers without autocasting the whole model, keeps
    full-precision master weights (and optimizer state), and returns the input's dtype so the
    surrounding network is unchanged.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 compute_dtype: torch.dtype = torch.bfloat16, device: Any = None, dtype: Any = None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x.to(self.compute_dtype), self.weight.to(self.compute_dtype), bias).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, compute_dtype={self.compute_dtype}"


def _linear_like(old: nn.Linear, cls: type[nn.Linear] = nn.Linear, **options: Any) -> nn.Linear:
    """A new Linear holding the old one's parameter objects: no copy, optimizer state stays valid."""
    new = cls(old.in_features, old.out_features, bias=old.bias is not None, device="meta", **options)
    new.weight = old.weight
    if old.bias is not None:
        new.bias = old.bias
    return new


def _embedding_like(old: nn.Embedding, *, sparse: bool) -> nn.Embedding:
    new = nn.Embedding(old.num_embeddings, old.embedding_dim, padding_idx=old.padding_idx, max_norm=old.max_norm,
                       norm_type=old.norm_type, scale_grad_by_freq=old.scale_grad_by_freq, sparse=sparse,
                       device="meta")
    new.weight = old.weight
    return new


# linear: a plain nn.Linear (undoes another swap); bf16/fp16: ComputeDtypeLinear with that compute dtype.
KNOWN_LINEAR: dict[str, Factory] = {
    "linear": lambda old: _linear_like(old),
    "bf16": lambda old: _linear_like(old, ComputeDtypeLinear, compute_dtype=torch.bfloat16),
    "fp16": lambda old: _linear_like(old, ComputeDtypeLinear, compute_dtype=torch.float16),
}

# embedding: a plain nn.Embedding; sparse: sparse gradients (for SGD or SparseAdam, not AdamW).
KNOWN_EMBEDDING: dict[str, Factory] = {
    "embedding": lambda old: _embedding_like(old, sparse=False),
    "sparse": lambda old: _embedding_like(old, sparse=True),
}


def _factory(registry: dict[str, Factory], kind: str, factory_or_name: str | Factory) -> Factory:
    if callable(factory_or_name):
        return factory_or_name
    if factory_or_name not in registry:
        raise ValueError(f"unknown {kind} {factory_or_name!r}; known: {', '.join(registry)}")
    return registry[factory_or_name]


def replace_linear(model: nn.Module, factory_or_name: str | Factory) -> list[str]:
    """Swap every plain ``nn.Linear`` (and ComputeDtypeLinear) by a factory or a KNOWN_LINEAR name.

    Other Linear subclasses (quantized, adapters, MultiheadAttention's out_proj, which its
    owner never calls) are specialised on purpose and are left alone.
    """
    factory = _factory(KNOWN_LINEAR, "linear", factory_or_name)
    return replace_modules(model, ExactType(nn.Linear, ComputeDtypeLinear), factory)


def replace_embedding(model: nn.Module, factory_or_name: str | Factory) -> list[str]:
    """Swap every plain ``nn.Embedding`` by a factory or a KNOWN_EMBEDDING name."""
    factory = _factory(KNOWN_EMBEDDING, "embedding", factory_or_name)
    return replace_modules(model, ExactType(nn.Embedding), factory)


def replace_attention(model: nn.Module, impl: str) -> list[str]:
    """Switch attention to ``impl`` (one of KNOWN_ATTENTION); returns the names switched.

    Modules with an ``attention_impl`` attribute (see ``trainer_core.attention``) get it set;
    ``nn.MultiheadAttention`` modules are replaced by a weight-sharing SDPAMultiheadAttention.
    """
    check_impl(impl)
    switched = []
    for name, module in model.named_modules():
        if name and hasattr(module, "attention_impl"):
            module.attention_impl = impl
            switched.append(name)
    mha = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    if not mha and not switched:
        warnings.warn(f"replace_attention: {type(model).__name__} has no MultiheadAttention and no module with "
                      "an attention_impl attribute", NoMatchWarning, stacklevel=2)
        return []
    for name, module in mha:  # refuse before replacing anything
        if module.bias_k is not None or module.add_zero_attn:
            raise ValueError(f"replace_attention: {name} uses add_bias_kv or add_zero_attn, which is not supported")
    if mha:
        switched += replace_modules(model, nn.MultiheadAttention, lambda old: SDPAMultiheadAttention(old, impl))
    return switched


# ---------------------------------------------------------------------------------------------
# Forward wrappers


class AutocastForward:
    """A module's forward run under ``torch.autocast`` for the device its parameters are on."""

    def __init__(self, module: nn.Module, inner: Callable[..., Any], dtype: torch.dtype) -> None:
        self.module, self.inner, self.dtype = module, inner, dtype

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        first = next(itertools.chain(self.module.parameters(), self.module.buffers()), None)
        device_type = first.device.type if first is not None else "cpu"
        if not torch.amp.is_autocast_available(device_type):
            return self.inner(*args, **kwargs)
        with torch.autocast(device_type, dtype=self.dtype):
            return self.inner(*args, **kwargs)


def autocast_forward(module: nn.Module, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Run ``module``'s forward under autocast to ``dtype``; parameters and names are untouched."""
    current = module.__dict__.get("forward")
    if isinstance(current, AutocastForward):
        current.dtype = dtype
    else:
        module.forward = AutocastForward(module, module.forward, dtype)
    return module


def compile_model(model: nn.Module, backend: str = "auto", **options: Any) -> nn.Module:
    """``model.compile(...)`` in place (state-dict keys unchanged), or a warned no-op where it can't.

    ``auto`` means inductor where its toolchain is present (Triton for CUDA, a C++ compiler for
    CPU). An unknown backend name is a ValueError. Compilation itself happens at the first call.
    """
    if backend == "auto":
        reason = _inductor_missing(model)
        if reason:
            warnings.warn(f"compile_model: not compiling ({reason})", RuntimeWarning, stacklevel=2)
            return model
        backend = "inductor"
    known = torch.compiler.list_backends(exclude_tags=())
    if backend not in known:
        raise ValueError(f"unknown compile backend {backend!r}; known: auto, {', '.join(known)}")
    try:
        model.compile(backend=backend, **options)
    except (RuntimeError, ImportError) as exc:
        warnings.warn(f"compile_model: not compiling ({exc})", RuntimeWarning, stacklevel=2)
    return model


def _inductor_missing(model: nn.Module) -> str:
    """Why inductor cannot run here, or "". The model may still move to CUDA after this call."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    on_cuda = (first is not None and first.device.type == "cuda") or torch.cuda.is_available()
    if on_cuda and importlib.util.find_spec("triton") is None:
        return "inductor needs triton for CUDA, which is not installed"
    compilers = [c for c in (os.environ.get("CXX", ""), os.environ.get("CC", ""), "g++", "c++", "clang++", "gcc") if c]
    if not any(shutil.which(c) for c in compilers):
        return "inductor needs a C/C++ compiler, none found on PATH"
    return ""
