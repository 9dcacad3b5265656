"""The ``optimizations:`` config section, applied to a built model in one call.

The loop calls :func:`apply_optimizations` once, after building the model and before wrapping
it in DDP or creating the optimizer, and logs the lines it returns. When
``measure_activations`` is on it wraps each forward in ``trainer_core.offload.ActivationMeter``
and logs ``meter.metrics()`` (``train/activation_bytes``, ``train/activation_cpu_bytes``).
Config validation can call :func:`validate_options` without a model and list the names below.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from trainer_core import wrapper
from trainer_core.attention import KNOWN_ATTENTION
from trainer_core.offload import BlockSpec, apply_activation_offload, select_blocks

OPTION_DEFAULTS: dict[str, Any] = {
    "activation_offload": False,
    "unsloth": False,  # the same as activation_offload, under the name users search for
    "offload_blocks": "",  # comma-separated class names, or a regex on module names; "" = automatic
    "linear": "",
    "embedding": "",
    "attention": "",
    "compile": False,
    "compile_backend": "auto",
    "measure_activations": False,
}

KNOWN_LINEAR: tuple[str, ...] = tuple(wrapper.KNOWN_LINEAR)
KNOWN_EMBEDDING: tuple[str, ...] = tuple(wrapper.KNOWN_EMBEDDING)
__all__ = ["KNOWN_ATTENTION", "KNOWN_EMBEDDING", "KNOWN_LINEAR", "OPTION_DEFAULTS", "apply_optimizations",
           "known_compile_backends", "validate_options"]

_CHOICES: dict[str, tuple[str, ...]] = {"linear": KNOWN_LINEAR, "embedding": KNOWN_EMBEDDING,
                                        "attention": KNOWN_ATTENTION}
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")


def known_compile_backends() -> tuple[str, ...]:
    """``auto`` and the backends torch.compile knows here (importing the compiler takes seconds)."""
    import torch

    return ("auto", *torch.compiler.list_backends(exclude_tags=()))


def validate_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The options over their defaults, or a ValueError naming the first bad key or value."""
    unknown = [key for key in options if key not in OPTION_DEFAULTS]
    if unknown:
        near = difflib.get_close_matches(str(unknown[0]), OPTION_DEFAULTS, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"optimizations: unknown option {unknown[0]!r}{hint}; known: {', '.join(OPTION_DEFAULTS)}")
    merged = {**OPTION_DEFAULTS, **options}
    for key, default in OPTION_DEFAULTS.items():
        if type(merged[key]) is not type(default):
            raise ValueError(f"optimizations.{key}: expected {type(default).__name__}, got {merged[key]!r}")
    for key, choices in _CHOICES.items():
        if merged[key] and merged[key] not in choices:
            raise ValueError(f"optimizations.{key}: unknown name {merged[key]!r}; known: {', '.join(choices)}")
    _block_spec_syntax(merged["offload_blocks"])
    if merged["compile"] or merged["compile_backend"] != "auto":
        backends = known_compile_backends()
        if merged["compile_backend"] not in backends:
            raise ValueError(f"optimizations.compile_backend: unknown name {merged['compile_backend']!r}; "
                             f"known: {', '.join(backends)}")
    return merged


def _block_spec_syntax(text: str) -> None:
    if text and not _class_names(text):
        try:
            re.compile(text)
        except re.error as exc:
            raise ValueError(f"optimizations.offload_blocks: {text!r} is neither class names nor a valid "
                             f"regular expression ({exc})") from exc


def _class_names(text: str) -> list[str]:
    """The names in ``"Block, DecoderLayer"``; [] when the text is a pattern rather than names."""
    names = [part.strip() for part in text.split(",")]
    return names if all(_IDENTIFIER.fullmatch(name) for name in names) else []


def resolve_blocks(model: nn.Module, text: str) -> BlockSpec:
    """``offload_blocks`` for this model: None (automatic), a tuple of its classes, or a pattern."""
    if not text:
        return None
    names = _class_names(text)
    if not names:
        return text
    classes = {type(module).__name__: type(module) for module in model.modules()}
    for name in names:
        if name not in classes:
            raise ValueError(f"optimizations.offload_blocks: no module of class {name!r} in {type(model).__name__} "
                             f"(classes: {', '.join(sorted(classes)[:20])}); to select by module name use a pattern "
                             r"such as 'layers\.\d+'")
    return tuple(classes[name] for name in names)


def apply_optimizations(model: nn.Module, options: Mapping[str, Any]) -> list[str]:
    """Apply what ``options`` (the optimizations section) asks to ``model``; returns what was done."""
    opts = validate_options(options)
    lines: list[str] = []
    if opts["linear"]:
        names = wrapper.replace_linear(model, opts["linear"])
        lines.append(f"linear: {len(names)} nn.Linear -> {opts['linear']}")
    if opts["embedding"]:
        names = wrapper.replace_embedding(model, opts["embedding"])
        lines.append(f"embedding: {len(names)} nn.Embedding -> {opts['embedding']}")
    if opts["attention"]:
        names = wrapper.replace_attention(model, opts["attention"])
        lines.append(f"attention: {len(names)} modules -> {opts['attention']}")
    if opts["activation_offload"] or opts["unsloth"]:
        lines.append(_offload(model, opts["offload_blocks"]))
    elif opts["offload_blocks"]:
        lines.append("offload_blocks ignored: activation_offload is off")
    if opts["compile"]:
        wrapper.compile_model(model, opts["compile_backend"])
        compiled = getattr(model, "_compiled_call_impl", None) is not None
        lines.append(f"compile: backend {opts['compile_backend']}" if compiled else "compile: skipped (see warning)")
    if opts["measure_activations"]:
        lines.append("measure_activations: logging train/activation_bytes and train/activation_cpu_bytes")
    return lines


def _offload(model: nn.Module, blocks_text: str) -> str:
    blocks = resolve_blocks(model, blocks_text)
    if not select_blocks(model, blocks):
        if blocks is None:
            raise ValueError(f"optimizations.activation_offload: {type(model).__name__} has no repeated blocks "
                             "(a ModuleList/Sequential of one class); set offload_blocks to class names or a pattern")
        raise ValueError(f"optimizations.offload_blocks: {blocks_text!r} matched no module")
    names = apply_activation_offload(model, blocks)
    shown = ", ".join(names) if len(names) <= 4 else f"{names[0]}, {names[1]}, ..., {names[-1]}"
    return f"activation offload: {len(names)} blocks ({shown}) recompute from a CPU copy of their input"
