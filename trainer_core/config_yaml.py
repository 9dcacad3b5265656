"""The YAML dialect of config files: YAML 1.2 core scalars over PyYAML's safe loader.

PyYAML follows YAML 1.1, where ``1e-4`` is a string (a learning rate silently turning into
text), ``yes``/``no``/``on``/``off`` are booleans and ``2024-01-01`` is a date. Config files
read ``1e-4`` as a number and keep the others as strings. The dumper quotes every string
that either dialect would read as something else, so files written here read back the same
with this loader and with a plain ``yaml.safe_load``.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


def load(text: str) -> Any:
    return yaml.load(text, Loader=Loader)


def dump(data: Any) -> str:
    return yaml.dump(data, Dumper=Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False)


def problem(exc: yaml.YAMLError) -> str:
    """What is wrong and where (1-based line and column), for one-line error messages."""
    mark = getattr(exc, "problem_mark", None)
    what = getattr(exc, "problem", None) or str(exc)
    return f"{what} at line {mark.line + 1}, column {mark.column + 1}" if mark else what


_CORE_RESOLVERS = (
    ("tag:yaml.org,2002:null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:bool", r"true|True|TRUE|false|False|FALSE", list("tTfF")),
    ("tag:yaml.org,2002:int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", list("-+0123456789")),
    ("tag:yaml.org,2002:float", r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                                r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)", list("-+0123456789.")),
    ("tag:yaml.org,2002:merge", r"<<", ["<"]),
)


class Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 core scalars."""


class Dumper(yaml.SafeDumper):
    """SafeDumper that also quotes strings a YAML 1.2 reader would take for numbers."""


def _construct_int(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int:
    text = str(loader.construct_scalar(node))
    sign, digits = (-1, text[1:]) if text.startswith("-") else (1, text.lstrip("+"))
    base = {"0o": 8, "0x": 16}.get(digits[:2], 10)
    return sign * int(digits[2:] if base != 10 else digits, base)


Loader.yaml_implicit_resolvers = {}
for _tag, _pattern, _first in _CORE_RESOLVERS:
    _regex = re.compile(rf"(?:{_pattern})\Z")  # the resolver uses match(): anchor the end
    Loader.add_implicit_resolver(_tag, _regex, _first)
    if _tag.endswith(("int", "float")):
        Dumper.add_implicit_resolver(_tag, _regex, _first)
Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)


def _represent_str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    # PyYAML writes NEL (U+0085) raw inside single quotes, where a reader folds it to a space;
    # double quotes escape it.
    style = '"' if "\x85" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


Dumper.add_representer(str, _represent_str)
