"""Nested objects as safetensors files: a streamed writer and a zero-copy reader.

Layout: every distinct tensor storage is kept once, as one ordinary safetensors tensor (an
*entry*) holding the bytes its views use. An entry that is exactly one contiguous tensor gets that
tensor's key path as name, dtype and shape, so ``safetensors.torch.load_file`` on a flat state dict
returns the state dict itself. ``__metadata__["traindeck"]`` holds the object as JSON
(``io_structure``) plus one descriptor per tensor: its entry, byte offset, dtype, shape and stride.

The writer follows the library's layout byte for byte (entries sorted by descending dtype
alignment then name, header padded with spaces to 8 bytes), but streams the header and then each
storage straight from tensor memory instead of building the file in memory. The reader maps the
file copy-on-write and makes every tensor a view of the mapping, like the library's own loader.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import mmap
import struct
from typing import Any, BinaryIO

import torch

from trainer_core.io_structure import DTYPE_BY_NAME, Decoder, RefusedValue

STRUCTURE_KEY = "traindeck"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 100_000_000  # the safetensors library refuses larger headers too
_CHUNK = 256 << 20

# safetensors' dtype codes in the order its writer lays tensors out (descending alignment), with sizes.
_ST_SIZES = {"U64": 8, "I64": 8, "F64": 8, "C64": 8, "F32": 4, "U32": 4, "I32": 4, "BF16": 2, "F16": 2,
             "U16": 2, "I16": 2, "F8_E5M2FNUZ": 1, "F8_E4M3FNUZ": 1, "F8_E8M0": 1, "F8_E4M3": 1, "F8_E5M2": 1,
             "I8": 1, "U8": 1, "BOOL": 1}
_ST_RANK = {code: rank for rank, code in enumerate(_ST_SIZES)}
_ST_NAMES = {"U64": "uint64", "I64": "int64", "F64": "float64", "C64": "complex64", "F32": "float32",
             "U32": "uint32", "I32": "int32", "BF16": "bfloat16", "F16": "float16", "U16": "uint16",
             "I16": "int16", "F8_E5M2FNUZ": "float8_e5m2fnuz", "F8_E4M3FNUZ": "float8_e4m3fnuz",
             "F8_E8M0": "float8_e8m0fnu", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
             "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_ST_DTYPE = {code: DTYPE_BY_NAME[name] for code, name in _ST_NAMES.items() if name in DTYPE_BY_NAME}
_ST_CODE = {dt: code for code, dt in _ST_DTYPE.items()}
# Storages of a dtype safetensors lacks are stored as an array of a code of the same width.
_COMPLEX_CARRIER = {torch.complex128: "F64", torch.complex32: "F16"}
_UINT_CARRIER = {1: "U8", 2: "U16", 4: "U32", 8: "U64", 16: "U64"}


class FormatError(ValueError):
    """The bytes are not a valid safetensors file, or its structure metadata is malformed."""


def _contiguous_strides(shape: list[int]) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return strides[::-1]


def _extent_bytes(shape: list[int], stride: list[int], itemsize: int) -> int:
    """Bytes from a view's first element to the end of its last one (0 when it has no elements)."""
    if 0 in shape:
        return 0
    return (1 + sum((size - 1) * step for size, step in zip(shape, stride, strict=True))) * itemsize


# --------------------------------------------------------------------------- writing


@dataclasses.dataclass
class _Entry:
    name: str
    code: str
    shape: list[int]
    storage: torch.UntypedStorage
    lo: int  # first stored byte of the storage
    hi: int  # end of the stored bytes; past the storage's end the file holds zero padding


@dataclasses.dataclass
class Plan:
    """What ``write`` will put in the file, decided before the file is opened."""

    header: bytes
    entries: list[_Entry]

    def write(self, f: BinaryIO) -> None:
        f.write(struct.pack("<Q", len(self.header)))
        f.write(self.header)
        for entry in self.entries:
            _write_entry(f, entry)


def plan(tree: Any, tensors: list[torch.Tensor], where: list[tuple[Any, ...]],
         metadata: dict[str, str] | None = None) -> Plan:
    """Lay out ``tensors`` (as collected by ``io_structure.Encoder``) and build the header.

    ``metadata`` adds free-form strings to ``__metadata__`` for other readers of the file.
    """
    descs, groups, empties = [], {}, []
    tensors = [_storable(t, w) for t, w in zip(tensors, where, strict=True)]
    for i, t in enumerate(tensors):
        descs.append(_describe(t))
        if t.device.type == "meta":
            continue
        if t.numel() == 0:
            empties.append([i])
        else:
            groups.setdefault((t.device, t.untyped_storage().data_ptr()), []).append(i)
    used = {"__metadata__"}
    entries = [_entry(members, tensors, where, descs, used) for members in [*groups.values(), *empties]]
    entries.sort(key=lambda e: (_ST_RANK[e.code], e.name))
    structure = json.dumps({"version": FORMAT_VERSION, "tree": tree, "tensors": descs}, separators=(",", ":"))
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **(metadata or {}), STRUCTURE_KEY: structure}}
    offset = 0
    for e in entries:
        header[e.name] = {"dtype": e.code, "shape": e.shape, "data_offsets": [offset, offset + e.hi - e.lo]}
        offset += e.hi - e.lo
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return Plan(raw + b" " * (-len(raw) % 8), entries)


def _storable(t: torch.Tensor, where: tuple[Any, ...]) -> torch.Tensor:
    if t.layout != torch.strided or t.is_quantized or t.is_nested:
        kind = "nested" if t.is_nested else "quantized" if t.is_quantized else str(t.layout)
        raise RefusedValue(where, f"safetensors cannot store a {kind} tensor (the .pt format can)")
    if t.is_conj() or t.is_neg():
        resolved = t.detach().resolve_conj().resolve_neg()
        return torch.nn.Parameter(resolved, t.requires_grad) if type(t) is torch.nn.Parameter else resolved
    return t


def _describe(t: torch.Tensor) -> dict[str, Any]:
    desc: dict[str, Any] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)}
    if list(t.stride()) != _contiguous_strides(desc["shape"]):
        desc["stride"] = list(t.stride())
    if t.requires_grad:
        desc["requires_grad"] = True
    if type(t) is torch.nn.Parameter:
        desc["parameter"] = True
    if t.device.type == "meta":
        desc["meta"] = True
    return desc


def _entry(members: list[int], tensors: list[torch.Tensor], where: list[tuple[Any, ...]],
           descs: list[dict[str, Any]], used: set[str]) -> _Entry:
    """One storage's entry: the aligned byte span its views cover, under a readable unique name."""
    views = [tensors[i] for i in members]
    align = max(v.element_size() for v in views)
    starts = [v.storage_offset() * v.element_size() if v.numel() else 0 for v in views]
    lo = min(starts) // align * align
    hi = -(-max(s + _extent_bytes(list(v.shape), list(v.stride()), v.element_size())
                for s, v in zip(starts, views, strict=True)) // align) * align
    code, shape, named = _carrier(members, views, starts, lo, hi, align)
    name = _unique_name(where[named], used, named)
    for i, start in zip(members, starts, strict=True):
        descs[i]["entry"] = name
        if start != lo:
            descs[i]["offset"] = start - lo
    return _Entry(name, code, shape, views[0].untyped_storage(), lo, hi)


def _carrier(members: list[int], views: list[torch.Tensor], starts: list[int], lo: int, hi: int,
             align: int) -> tuple[str, list[int], int]:
    """The entry's safetensors dtype and shape, and which member names it.

    A view that is exactly the whole span keeps its own dtype and shape, so plain readers see the
    real tensor; other spans become flat arrays of the views' dtype, or of a same-width integer.
    """
    dtypes = {v.dtype for v in views}
    dtype = dtypes.pop() if len(dtypes) == 1 else None
    code = _ST_CODE.get(dtype) or _COMPLEX_CARRIER.get(dtype) or _UINT_CARRIER[align]
    for i, v, start in zip(members, views, starts, strict=True):
        whole = start == lo and start + v.numel() * v.element_size() == hi and (v.is_contiguous() or not v.numel())
        if whole and dtype in _ST_CODE:
            return code, list(v.shape), i
        if whole and dtype in _COMPLEX_CARRIER:
            return code, [*v.shape, 2], i
    return code, [(hi - lo) // _ST_SIZES[code]], members[0]


def _unique_name(where: tuple[Any, ...], used: set[str], index: int) -> str:
    name = ".".join(map(str, where)) or "tensor"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        name = f"tensor.{index}"
    base, n = name, 1
    while name in used:
        name, n = f"{base}~{n}", n + 1
    used.add(name)
    return name


def _write_entry(f: BinaryIO, entry: _Entry) -> None:
    end = min(entry.hi, entry.storage.nbytes())
    if entry.storage.device.type == "cpu":
        _write_memory(f, entry.storage.data_ptr() + entry.lo, end - entry.lo)
    else:
        whole = torch.empty(0, dtype=torch.uint8, device=entry.storage.device).set_(entry.storage)
        chunk = whole[entry.lo:end].cpu()
        _write_memory(f, chunk.data_ptr(), chunk.numel())
    if entry.hi > end:
        f.write(bytes(entry.hi - end))


def _write_memory(f: BinaryIO, address: int, nbytes: int) -> None:
    """Write ``nbytes`` at ``address`` without copying them into a Python buffer first."""
    for start in range(0, nbytes, _CHUNK):
        size = min(_CHUNK, nbytes - start)
        f.write(memoryview((ctypes.c_char * size).from_address(address + start)))


# --------------------------------------------------------------------------- reading


def read_metadata(f: BinaryIO, size: int) -> dict[str, str]:
    """The ``__metadata__`` strings of a safetensors file, without its traindeck structure."""
    header, data_start = _read_header(f, size)
    _entries(header, size - data_start)
    metadata = dict(header.get("__metadata__") or {})
    metadata.pop(STRUCTURE_KEY, None)
    return metadata


def read(f: BinaryIO, size: int, device: torch.device) -> Any:
    """Load a safetensors file opened as ``f``: a traindeck object, or a plain ``{name: tensor}``."""
    header, data_start = _read_header(f, size)
    entries = _entries(header, size - data_start)
    buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    structure = (header.get("__metadata__") or {}).get(STRUCTURE_KEY)
    if structure is None:
        return {name: _plain(buffer, data_start, *info).to(device) for name, info in entries.items()}
    try:
        return _Rebuilder(buffer, data_start, entries, device).run(structure)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError, RecursionError, OverflowError) as e:
        raise FormatError(f"its structure metadata is malformed ({type(e).__name__}: {e})") from e


def _read_header(f: BinaryIO, size: int) -> tuple[dict[str, Any], int]:
    if size < 8:
        raise FormatError(f"it is {size} bytes long, too short for a safetensors header")
    (n,) = struct.unpack("<Q", f.read(8))
    if n > size - 8:
        raise FormatError(f"its header claims {n} bytes but the file has only {size - 8} after the length")
    if n > MAX_HEADER_BYTES:
        raise FormatError(f"its header claims {n} bytes, more than the {MAX_HEADER_BYTES} allowed")
    try:
        header = json.loads(f.read(n).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise FormatError(f"its header is not valid JSON ({e})") from e
    if type(header) is not dict:
        raise FormatError("its header is not a JSON object")
    return header, 8 + n


def _entries(header: dict[str, Any], data_bytes: int) -> dict[str, tuple[str, list[int], int, int]]:
    """Validate every tensor's dtype, shape and offsets; return them in file order."""
    found = []
    for name, info in header.items():
        if name == "__metadata__":
            if type(info) is not dict or not all(type(v) is str for v in info.values()):
                raise FormatError("its __metadata__ is not a map of strings")
            continue
        if type(info) is not dict or info.get("dtype") not in _ST_DTYPE:
            raise FormatError(f"tensor {name!r} has no dtype this reader knows ({info!r:.80})")
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not _is_ints(shape) or not _is_ints(offsets) or len(offsets) != 2:
            raise FormatError(f"tensor {name!r} has a malformed shape or data_offsets ({info!r:.80})")
        numel = 1
        for size in shape:
            numel *= size
        if offsets[1] - offsets[0] != numel * _ST_SIZES[info["dtype"]]:
            raise FormatError(f"tensor {name!r}: data_offsets {offsets} do not fit shape {shape}")
        found.append((offsets[0], offsets[1], name, info["dtype"], shape))
    found.sort()
    position = 0
    for start, end, name, _, _ in found:
        if start != position:
            raise FormatError(f"tensor {name!r} starts at byte {start} of the data, expected {position}")
        position = end
    if position != data_bytes:
        raise FormatError(f"the header describes {position} data bytes but the file holds {data_bytes} (truncated?)")
    return {name: (code, shape, start, end) for start, end, name, code, shape in found}


def _is_ints(value: Any) -> bool:
    return type(value) is list and all(type(v) is int for v in value) and min(value, default=0) >= 0


def _plain(buffer: mmap.mmap, data_start: int, code: str, shape: list[int], start: int, end: int) -> torch.Tensor:
    dtype = _ST_DTYPE[code]
    if end == start:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, offset=data_start + start, count=(end - start) // dtype.itemsize
                            ).view(shape)


class _Rebuilder:
    """Turns descriptors into views of each entry's bytes in the mapping, then decodes the tree."""

    def __init__(self, buffer: mmap.mmap, data_start: int, entries: dict[str, tuple[str, list[int], int, int]],
                 device: torch.device) -> None:
        self.buffer, self.data_start, self.entries, self.device = buffer, data_start, entries, device
        self.storages: dict[str, torch.UntypedStorage] = {}

    def run(self, structure: str) -> Any:
        doc = json.loads(structure)
        if type(doc) is not dict or doc.get("version") != FORMAT_VERSION:
            raise ValueError(f"unknown structure version {doc.get('version') if type(doc) is dict else doc!r:.40}")
        tensors = [self._tensor(desc) for desc in doc["tensors"]]
        return Decoder(tensors).decode(doc["tree"])

    def _tensor(self, desc: dict[str, Any]) -> torch.Tensor:
        dtype = DTYPE_BY_NAME[desc["dtype"]]
        shape = desc["shape"]
        if not _is_ints(shape):
            raise ValueError(f"bad shape in {desc!r:.80}")
        stride = desc["stride"] if "stride" in desc else _contiguous_strides(shape)
        if not _is_ints(stride) or len(stride) != len(shape):
            raise ValueError(f"bad stride in {desc!r:.80}")
        if desc.get("meta") is True:
            t = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
        else:
            t = self._view(desc, dtype, shape, stride)
        requires_grad = desc.get("requires_grad", False) is True
        if desc.get("parameter") is True:
            return torch.nn.Parameter(t, requires_grad=requires_grad)
        return t.requires_grad_(True) if requires_grad else t

    def _view(self, desc: dict[str, Any], dtype: torch.dtype, shape: list[int], stride: list[int]) -> torch.Tensor:
        extent = _extent_bytes(shape, stride, dtype.itemsize)
        if extent == 0:
            empty = _empty(dtype, self.device)
            return empty.set_(empty.untyped_storage(), 0, shape, stride)
        name, offset = desc["entry"], desc.get("offset", 0)
        _, _, start, end = self.entries[name]
        if type(offset) is not int or offset < 0 or offset % dtype.itemsize or offset + extent > end - start:
            raise ValueError(f"view {desc!r:.80} does not fit inside entry {name!r} of {end - start} bytes")
        storage = self.storages.get(name)
        if storage is None:
            if self.device.type == "cpu" and extent == end - start and "stride" not in desc and dtype in _ST_CODE:
                whole = torch.frombuffer(self.buffer, dtype=dtype, offset=self.data_start + start,
                                         count=extent // dtype.itemsize).view(shape)
                self.storages[name] = whole.untyped_storage()
                return whole
            data = torch.frombuffer(self.buffer, dtype=torch.uint8, offset=self.data_start + start, count=end - start)
            if self.device.type != "cpu":
                data = data.to(self.device)
            storage = self.storages[name] = data.untyped_storage()
        return _empty(dtype, self.device).set_(storage, offset // dtype.itemsize, shape, stride)


def _empty(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An empty tensor to ``set_`` storage into; complex32 goes through uint8 as creating it warns."""
    if dtype == torch.complex32:
        return torch.empty(0, dtype=torch.uint8, device=device).view(dtype)
    return torch.empty(0, dtype=dtype, device=device)
