"""The values that ``trainer_core.io`` stores, and their JSON form.

Both formats accept exactly the same values: nested ``dict``/``OrderedDict``/``list``/``tuple``/
``set`` holding tensors, ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``, ``bytearray``,
``complex``, ``torch.Size``, ``torch.dtype`` and ``torch.device``, with keys of any of those
scalar types. This is what a weights-only ``torch.load`` accepts, so a ``.pt`` file written here
always loads back without unpickling code, and the safetensors writer can describe any such
object as JSON in the file's metadata.

The JSON form: ``None``/``bool``/``int``/``str`` and finite floats are themselves, a list is a
JSON array, everything else is a one-key object naming its type (``{"tuple": [...]}``,
``{"dict": [[key, value], ...]}``, ``{"tensor": index}``, ``{"float": "nan"}``, ...).
"""

from __future__ import annotations

import base64
import collections
import math
import re
from typing import Any

import torch

DTYPE_BY_NAME = {str(dt).removeprefix("torch."): dt for dt in vars(torch).values() if isinstance(dt, torch.dtype)}
# Placeholder sub-byte dtypes have no storage type, so torch.save cannot write them either.
UNSAVABLE_DTYPES = frozenset(dt for name, dt in DTYPE_BY_NAME.items() if re.fullmatch(r"u?int[1-7]", name))


class RefusedValue(ValueError):
    """A value the formats cannot store; ``where`` is its key path inside the object."""

    def __init__(self, where: tuple[Any, ...], problem: str) -> None:
        at = "/".join(map(str, where)) or "the root object"
        super().__init__(f"at {at}: {problem}")
        self.where = where


class Encoder:
    """Turns a nested object into JSON-safe nodes, collecting its tensors in first-seen order.

    Every format runs it, so both accept exactly the same values and a refused value is reported
    with its key path before anything touches the disk.
    """

    def __init__(self) -> None:
        self.tensors: list[torch.Tensor] = []
        self.where: list[tuple[Any, ...]] = []
        self._index: dict[int, int] = {}
        self._storage_dtypes: dict[tuple[torch.device, int], torch.dtype] = {}
        self._open: set[int] = set()

    def encode(self, value: Any, where: tuple[Any, ...] = ()) -> Any:
        kind = type(value)
        if value is None or kind in (bool, int, str):
            return value
        if kind is float:
            return value if math.isfinite(value) else {"float": repr(value)}
        if isinstance(value, torch.Tensor):
            return {"tensor": self._tensor(value, where)}
        if kind in (list, tuple, set, dict, collections.OrderedDict):
            return self._container(value, where)
        if kind is bytes and not value:
            raise self._refuse(where, "torch's weights-only loader cannot read back an empty bytes (use bytearray())")
        if kind in (bytes, bytearray):
            return {kind.__name__: base64.b64encode(value).decode("ascii")}
        if kind is complex:
            return {"complex": [self.encode(value.real, where), self.encode(value.imag, where)]}
        if kind is torch.Size:
            return {"size": list(value)}
        if kind is torch.dtype:
            return {"dtype": str(value).removeprefix("torch.")}
        if kind is torch.device:
            return {"device": str(value)}
        raise self._refuse(where, f"cannot store a value of type {kind.__module__}.{kind.__qualname__}")

    def _container(self, value: Any, where: tuple[Any, ...]) -> Any:
        if id(value) in self._open:
            raise self._refuse(where, "the object contains itself")
        self._open.add(id(value))
        try:
            if type(value) is list:
                return [self.encode(item, (*where, i)) for i, item in enumerate(value)]
            if type(value) is tuple:
                return {"tuple": [self.encode(item, (*where, i)) for i, item in enumerate(value)]}
            if type(value) is set:
                return {"set": [self._key(item, where) for item in value]}
            tag = "dict" if type(value) is dict else "odict"
            return {tag: [[self._key(k, where), self.encode(v, (*where, k))] for k, v in value.items()]}
        except RecursionError:
            raise self._refuse(where, "the object is nested too deeply") from None
        finally:
            self._open.discard(id(value))

    def _key(self, key: Any, where: tuple[Any, ...]) -> Any:
        if isinstance(key, torch.Tensor) or (type(key) is tuple and any(isinstance(k, torch.Tensor) for k in key)):
            raise self._refuse(where, "tensors cannot be dict keys or set members")
        return self.encode(key, where)

    def _tensor(self, tensor: torch.Tensor, where: tuple[Any, ...]) -> int:
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            raise self._refuse(where, f"cannot store tensor subclass {type(tensor).__qualname__}")
        if tensor.dtype in UNSAVABLE_DTYPES:
            raise self._refuse(where, f"torch cannot save dtype {tensor.dtype}")
        if tensor.requires_grad and not tensor.is_leaf:
            raise self._refuse(where, "cannot store a non-leaf tensor that requires grad; detach it first")
        dense = tensor.layout == torch.strided and not tensor.is_nested
        storage = (tensor.device, tensor.untyped_storage().data_ptr() if dense else 0)
        if storage[1] and self._storage_dtypes.setdefault(storage, tensor.dtype) != tensor.dtype:
            raise self._refuse(where, "views of one storage with different dtypes cannot be saved by torch; clone one")
        if id(tensor) not in self._index:
            self._index[id(tensor)] = len(self.tensors)
            self.tensors.append(tensor)
            self.where.append(where)
        return self._index[id(tensor)]

    def _refuse(self, where: tuple[Any, ...], problem: str) -> RefusedValue:
        return RefusedValue(where, problem)


class Decoder:
    """Inverse of ``Encoder``; any malformed node raises ValueError (the caller names the file)."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = tensors

    def decode(self, node: Any) -> Any:
        if node is None or type(node) in (bool, int, str, float):
            return node
        if type(node) is list:
            return [self.decode(item) for item in node]
        if type(node) is not dict or len(node) != 1:
            raise ValueError(f"malformed structure node {node!r:.60}")
        ((tag, arg),) = node.items()
        handler = getattr(self, f"_tag_{tag}", None)
        if handler is None:
            raise ValueError(f"unknown structure tag {tag!r:.40}")
        return handler(arg)

    def _tag_tensor(self, arg: Any) -> torch.Tensor:
        if type(arg) is not int or not 0 <= arg < len(self.tensors):
            raise ValueError(f"tensor reference {arg!r:.40} out of range")
        return self.tensors[arg]

    def _tag_float(self, arg: Any) -> float:
        if arg not in ("nan", "inf", "-inf"):
            raise ValueError(f"bad float {arg!r:.40}")
        return float(arg)

    def _tag_tuple(self, arg: list[Any]) -> tuple[Any, ...]:
        return tuple(self.decode(item) for item in _list(arg))

    def _tag_set(self, arg: list[Any]) -> set[Any]:
        return {self.decode(item) for item in _list(arg)}

    def _tag_dict(self, arg: list[Any]) -> dict[Any, Any]:
        return {self.decode(k): self.decode(v) for k, v in _pairs(arg)}

    def _tag_odict(self, arg: list[Any]) -> collections.OrderedDict[Any, Any]:
        return collections.OrderedDict((self.decode(k), self.decode(v)) for k, v in _pairs(arg))

    def _tag_bytes(self, arg: str) -> bytes:
        return base64.b64decode(arg, validate=True)

    def _tag_bytearray(self, arg: str) -> bytearray:
        return bytearray(base64.b64decode(arg, validate=True))

    def _tag_complex(self, arg: list[Any]) -> complex:
        real, imag = (self.decode(part) for part in _list(arg))
        if type(real) is not float or type(imag) is not float:
            raise ValueError("complex parts must be floats")
        return complex(real, imag)

    def _tag_size(self, arg: list[Any]) -> torch.Size:
        if not all(type(item) is int for item in _list(arg)):
            raise ValueError(f"torch.Size needs integers, got {arg!r:.60}")
        return torch.Size(arg)

    def _tag_dtype(self, arg: str) -> torch.dtype:
        return DTYPE_BY_NAME[arg]

    def _tag_device(self, arg: str) -> torch.device:
        if type(arg) is not str:
            raise ValueError("device must be a string")
        return torch.device(arg)


def _list(value: Any) -> list[Any]:
    if type(value) is not list:
        raise ValueError(f"expected a list, got {value!r:.40}")
    return value


def _pairs(value: Any) -> list[tuple[Any, Any]]:
    pairs = _list(value)
    if not all(type(pair) is list and len(pair) == 2 for pair in pairs):
        raise ValueError("dict items must be [key, value] pairs")
    return pairs
