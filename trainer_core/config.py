"""The run's configuration: nested dataclasses, YAML files and ``--set`` overrides.

Precedence, lowest first: dataclass defaults < ``defaults`` (a recipe's own) < YAML file <
``--set section.key=value``. Every layer is checked on its own before merging, so an error
names the key path and where the bad value came from. Sections are fixed and typed; the
``recipe`` section is a free-form mapping handed to the recipe.

YAML is read with YAML 1.2 core scalars (see ``config_yaml``): ``lr: 1e-4`` is a number.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import operator
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, get_type_hints

import yaml

from trainer_core import config_yaml


class ConfigError(ValueError):
    """A bad configuration; the message names the key path (``key``) and what was expected."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


def _setting(default: Any, help: str, **checks: Any) -> Any:
    """A config field: its default, one line of help (the reference docs) and its checks.

    Checks: ``choices`` (allowed values), ``min``/``max`` (inclusive), ``above``/``below``
    (exclusive; for lists, per item), ``length`` (lists), ``pattern`` (regex, description).
    """
    return field(default=default, metadata={"help": help, **checks})


class _Section:
    """Validates (and normalises) every field on construction, naming ``section.key``."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            path = f"{self.SECTION}.{f.name}"
            value = _check_value(path, getattr(self, f.name), _hints(type(self))[f.name], f.metadata)
            object.__setattr__(self, f.name, value)


@cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


# The same names as trainer_core.attention.KNOWN_ATTENTION (which needs torch; a test keeps them equal).
ATTENTION_CHOICES = ("", "sdpa", "sdpa:flash", "sdpa:efficient", "sdpa:cudnn", "sdpa:math", "math")
DEVICE_PATTERN = (r"auto|cpu|mps|cuda(:[0-9]+)?", "auto, cpu, cuda, cuda:N or mps")


@dataclass
class TrainerConfig(_Section):
    SECTION: ClassVar[str] = "trainer"

    iterations: int = _setting(1000, "optimizer steps to train; reaching it saves a final checkpoint", min=0)
    save_frequency: int = _setting(0, "save a checkpoint every N steps (0: only the final and quit saves)", min=0)
    eval_frequency: int = _setting(0, "evaluate every N steps (0: only on the eval command)", min=0)
    keep_last: int = _setting(3, "committed checkpoints to keep; older ones are deleted (0: keep all)", min=0)
    save_on_quit: bool = _setting(True, "save a checkpoint on quit, on a signal and when the server goes away")
    export_on_save: bool = _setting(False, "also export the weights at every checkpoint")
    export_on_quit: bool = _setting(False, "export the weights when quitting")
    seed: int = _setting(0, "random seed (torch, the samplers, data order)", min=0)
    device: str = _setting("auto", "auto, cpu, cuda, cuda:N or mps (auto: cuda if available)", pattern=DEVICE_PATTERN)
    dtype: str = _setting("float32", "autocast dtype on CUDA (float32: no autocast)",
                          choices=("float32", "bfloat16", "float16"))
    grad_accumulation: int = _setting(1, "micro-batches per optimizer step", min=1)
    grad_clip: float = _setting(0.0, "clip the gradient norm to this (0: off; grad_norm is measured anyway)", min=0)
    grad_norm_every: int = _setting(50, "without clipping, measure grad_norm every N steps (with clipping: every "
                                    "step)", min=1)
    detect_anomaly: bool = _setting(False, "torch.autograd anomaly detection (slow; for debugging)")
    nonfinite_patience: int = _setting(10, "non-finite losses in a row (updates skipped) before the run pauses",
                                       min=0)
    weights_format: str = _setting("safetensors", "format of checkpoint weights and exports",
                                   choices=("safetensors", "pt"))
    log_every: int = _setting(10, "print a plain-text progress line every N steps, at most one a second (0: never)",
                              min=0)
    status_every_s: float = _setting(1.0, "seconds between status messages to the dashboard", above=0)
    tensorboard: bool = _setting(False, "also write TensorBoard event files in the run directory")
    deterministic: bool = _setting(True, "deterministic cuDNN algorithms, no benchmark autotuning")


@dataclass
class DataConfig(_Section):
    SECTION: ClassVar[str] = "data"

    batch_size: int = _setting(16, "items per batch (per rank)", min=1)
    max_tokens: int = _setting(0, "token budget per batch for the batched sampler (0: batches of batch_size)", min=0)
    sampler: str = _setting("auto", "auto, random, ordered or batched (auto: batched when max_tokens > 0 and "
                                    "the recipe gives lengths, else random if shuffle, else ordered)",
                            choices=("auto", "random", "ordered", "batched"))
    num_workers: int = _setting(0, "DataLoader worker processes (0: load in the training process)", min=0)
    prefetch_factor: int = _setting(2, "batches each worker loads ahead", min=1)
    shuffle: bool = _setting(True, "shuffle the data every epoch")
    drop_last: bool = _setting(True, "drop the last incomplete batch of an epoch")


@dataclass
class OptimizerConfig(_Section):
    SECTION: ClassVar[str] = "optimizer"

    name: str = _setting("adamw", "adamw, adam or sgd", choices=("adamw", "adam", "sgd"))
    lr: float = _setting(1e-3, "peak learning rate", above=0)
    weight_decay: float = _setting(0.0, "weight decay", min=0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata={
        "help": "Adam betas: two numbers in [0, 1)", "length": 2, "min": 0, "below": 1})
    momentum: float = _setting(0.9, "SGD momentum, in [0, 1)", min=0, below=1)
    eps: float = _setting(1e-8, "Adam epsilon", above=0)
    warmup_steps: int = _setting(0, "linear warm-up to lr over the first N steps", min=0)
    schedule: str = _setting("constant", "lr after warm-up: constant, cosine or linear decay to min_lr_ratio * lr",
                             choices=("constant", "cosine", "linear"))
    min_lr_ratio: float = _setting(0.0, "final lr of a decaying schedule, as a fraction of lr", min=0, max=1)


@dataclass
class OptimizationsConfig(_Section):
    SECTION: ClassVar[str] = "optimizations"

    activation_offload: bool = _setting(False, "keep activations of offloaded blocks on the CPU for the backward")
    unsloth: bool = _setting(False, "alias of activation_offload (true turns it on)")
    offload_blocks: str = _setting("", "comma-separated block class names, or a regex on module names "
                                       "(empty: found automatically)")
    linear: str = _setting("", "swap nn.Linear layers: linear, bf16 or fp16 (compute in that dtype); empty: keep")
    embedding: str = _setting("", "swap nn.Embedding layers: embedding or sparse (sparse gradients); empty: keep")
    attention: str = _setting("", "attention kernel: sdpa, sdpa:flash, sdpa:efficient, sdpa:cudnn, sdpa:math or "
                                  "math (empty: the model's own)", choices=ATTENTION_CHOICES)
    compile: bool = _setting(False, "torch.compile the model")
    compile_backend: str = _setting("auto", "torch.compile backend (auto: torch's default)", pattern=(r".+", "a name"))
    measure_activations: bool = _setting(False, "log the activation memory of each step")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.unsloth:
            self.activation_offload = True


SECTION_CLASSES: dict[str, type[_Section]] = {
    "trainer": TrainerConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "optimizations": OptimizationsConfig,
}
RECIPE = "recipe"
SECTIONS: tuple[str, ...] = (*SECTION_CLASSES, RECIPE)


@dataclass
class Config:
    """The whole configuration of a run; ``recipe`` is free-form, for the recipe's ``build``."""

    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    optimizations: OptimizationsConfig = field(default_factory=OptimizationsConfig)
    recipe: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, cls in SECTION_CLASSES.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"{name}: expected {cls.__name__}, got {type(getattr(self, name)).__name__}", name)
        self.recipe = _check_recipe(RECIPE, self.recipe)


# ---------------------------------------------------------------------------------- values


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, Mapping):
        return f"a mapping {dict(value)!r}"
    if isinstance(value, list | tuple):
        return f"a list {list(value)!r}"
    if isinstance(value, str | int | float):
        return repr(value)
    return f"a {type(value).__name__}"


def _check_value(path: str, value: object, hint: Any, meta: Mapping[str, Any]) -> Any:
    """Check a value against its field's type and constraints; returns it normalised."""
    if hint == list[float]:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list of numbers, got {_describe(value)}", path)
        value = [_check_type(f"{path}[{i}]", item, float) for i, item in enumerate(value)]
        if "length" in meta and len(value) != meta["length"]:
            raise ConfigError(f"{path}: expected {meta['length']} numbers, got {len(value)}: {value!r}", path)
        for i, item in enumerate(value):
            _check_range(f"{path}[{i}]", item, meta)
        return value
    value = _check_type(path, value, hint)
    if "choices" in meta and value not in meta["choices"]:
        shown = ", ".join(repr(c) if c == "" else c for c in meta["choices"])
        close = difflib.get_close_matches(str(value).lower(), meta["choices"], n=1)
        hint_text = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{path}: expected one of {shown}; got {_describe(value)}{hint_text}", path)
    if "pattern" in meta and not re.fullmatch(meta["pattern"][0], value):
        raise ConfigError(f"{path}: expected {meta['pattern'][1]}; got {_describe(value)}", path)
    if isinstance(value, int | float) and not isinstance(value, bool):
        _check_range(path, value, meta)
    return value


def _check_type(path: str, value: object, hint: Any) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_describe(value)}", path)
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_describe(value)}", path)
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {_describe(value)}", path)
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{path}: expected a finite number, got {value!r}", path)
    elif hint is str and not isinstance(value, str):
        raise ConfigError(f"{path}: expected a string, got {_describe(value)}", path)
    return value


_BOUNDS = (("min", operator.ge, ">="), ("max", operator.le, "<="), ("above", operator.gt, ">"),
           ("below", operator.lt, "<"))


def _check_range(path: str, value: float, meta: Mapping[str, Any]) -> None:
    for key, holds, word in _BOUNDS:
        if key in meta and not holds(value, meta[key]):
            kind = "an integer" if isinstance(value, int) else "a number"
            raise ConfigError(f"{path}: expected {kind} {word} {meta[key]}, got {value!r}", path)


def _check_recipe(path: str, value: object) -> Any:
    """A deep copy of a plain YAML value: mappings with string keys, lists and scalars."""
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(f"{path}: keys must be strings, got {_describe(key)}", path)
            out[key] = _check_recipe(f"{path}.{key}", item)
        return out
    if path == RECIPE:
        raise ConfigError(f"{RECIPE}: expected a mapping, got {_describe(value)}", RECIPE)
    if isinstance(value, list | tuple):
        return [_check_recipe(f"{path}[{i}]", item) for i, item in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise ConfigError(f"{path}: expected a plain value (number, string, boolean, list or mapping), "
                      f"got {_describe(value)}", path)


# ---------------------------------------------------------------------------------- layers


def _unknown_section(name: object) -> ConfigError:
    owners = [s for s, cls in SECTION_CLASSES.items() if name in _hints(cls)]
    if owners:
        hint = f"; did you mean '{owners[0]}.{name}'?"
    else:
        close = difflib.get_close_matches(str(name), SECTIONS, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else f" (sections: {', '.join(SECTIONS)})"
    return ConfigError(f"unknown section {name!r}{hint}", str(name))


def _unknown_key(section: str, key: object) -> ConfigError:
    path = f"{section}.{key}"
    close = difflib.get_close_matches(str(key), list(_hints(SECTION_CLASSES[section])), n=1)
    if close:
        hint = f"; did you mean '{section}.{close[0]}'?"
    else:
        owners = [s for s, cls in SECTION_CLASSES.items() if key in _hints(cls)]
        hint = f"; did you mean '{owners[0]}.{key}'?" if owners else ""
    return ConfigError(f"unknown key {path!r}{hint}", path)


def _check_layer(data: object, source: str | None) -> dict[str, dict[str, Any]]:
    """Check one layer (defaults, a file, an override) alone; returns its normalised sections."""
    try:
        return _read_layer(data)
    except ConfigError as exc:
        if source is None:
            raise
        raise ConfigError(f"{exc} (in {source})", exc.key) from None


def _read_layer(data: object) -> dict[str, dict[str, Any]]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping of sections ({', '.join(SECTIONS)}), got {_describe(data)}")
    layer: dict[str, dict[str, Any]] = {}
    for section, body in data.items():
        if section not in SECTIONS:
            raise _unknown_section(section)
        if body is None:
            body = {}
        if section == RECIPE:
            layer[RECIPE] = _check_recipe(RECIPE, body)
            continue
        if not isinstance(body, Mapping):
            raise ConfigError(f"{section}: expected a mapping of settings, got {_describe(body)}", section)
        cls = SECTION_CLASSES[section]
        metadata = {f.name: f.metadata for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        values = {}
        for key, value in body.items():
            if key not in metadata:
                raise _unknown_key(section, key)
            values[key] = _check_value(f"{section}.{key}", value, _hints(cls)[key], metadata[key])
        layer[section] = values
    return layer


def _deep_merge(base: dict[str, Any], update: Mapping[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def _merge(base: dict[str, dict[str, Any]], layer: Mapping[str, dict[str, Any]]) -> None:
    """Settings of a typed section are replaced whole; the recipe mapping merges deeply."""
    for section, values in layer.items():
        target = base.setdefault(section, {})
        if section == RECIPE:
            _deep_merge(target, values)
        else:
            target.update(copy.deepcopy(values))


def parse_override(item: str) -> dict[str, Any]:
    """``section.key=value`` -> a nested mapping; the value is read as a YAML scalar or list."""
    if not isinstance(item, str) or "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set trainer.iterations=200")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"--set {item!r}: the key before '=' is empty, e.g. --set trainer.iterations=200")
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: the key {key!r} has an empty part", key)
    try:
        value = config_yaml.load(text) if text.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({config_yaml.problem(exc)})", key) from None
    for part in reversed(parts):
        value = {part: value}
    return value


# ---------------------------------------------------------------------------------- public API


def config_from_dict(data: Mapping[str, Any]) -> Config:
    """A validated Config from a (possibly partial) nested mapping; missing keys keep defaults."""
    return _build(_check_layer(data, None))


def _build(merged: Mapping[str, dict[str, Any]]) -> Config:
    sections: dict[str, Any] = {name: cls(**merged.get(name, {})) for name, cls in SECTION_CLASSES.items()}
    return Config(**sections, recipe=merged.get(RECIPE, {}))


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (JSON- and YAML-safe); ``config_from_dict`` inverts it."""
    return dataclasses.asdict(cfg)


def load_config(path: str | os.PathLike[str] | None = None, overrides: Sequence[str] = (),
                defaults: Mapping[str, Any] | None = None) -> Config:
    """Resolve a run's configuration: defaults < ``defaults`` < YAML file < ``--set`` overrides."""
    if isinstance(overrides, str):
        raise ConfigError(f"overrides must be a list of KEY=VALUE strings, got the string {overrides!r}")
    merged: dict[str, dict[str, Any]] = {}
    if defaults is not None:
        _merge(merged, _check_layer(defaults, "the recipe's defaults"))
    if path is not None:
        _merge(merged, _check_layer(read_yaml(path), str(path)))
    for item in overrides:
        _merge(merged, _check_layer(parse_override(item), f"--set {item}"))
    return _build(merged)


def read_yaml(path: str | os.PathLike[str]) -> Any:
    """Parse a YAML file with the config's scalar rules; errors name the file and the line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from None
    try:
        return config_yaml.load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {config_yaml.problem(exc)}") from None


def config_to_yaml(cfg: Config) -> str:
    return config_yaml.dump(config_to_dict(cfg))


def dump_yaml(cfg: Config, path: str | os.PathLike[str]) -> Path:
    """Write the config atomically (temp file, fsync, rename): a crash never leaves half a file."""
    target = Path(path)
    text = config_to_yaml(cfg)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)
    return target


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
