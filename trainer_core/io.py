"""Saving and loading tensors and nested Python values, alike for ``.pt`` and ``.safetensors``.

``save(obj, path)`` picks the format from the suffix (``.pt``/``.pth``: torch's zip pickle;
``.sft``/``.safetensors``: safetensors) and writes atomically: a temp file in the same folder,
fsync, ``os.replace``, fsync of the folder. ``load(path)`` gives back the same nesting of dicts,
lists, tuples and scalars, with tensors that share storage still sharing it.

A safetensors file keeps each distinct tensor storage once, as an ordinary safetensors tensor
(a plain tensor under its own key, so ``safetensors.torch.load_file`` reads a flat state dict
unchanged). The nesting, the views into those storages and the exact dtypes live as JSON in one
``__metadata__`` string. The writer streams the header and then each storage's bytes straight from
tensor memory; the reader maps the file and builds every tensor as a view of the mapping, so
loading copies nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import errno
import json
import os
import pickle
import re
import secrets
import stat
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import torch

from trainer_core import io_safetensors
from trainer_core.io_structure import Encoder, RefusedValue
from trainer_core.pid import pid_alive

TORCH_SUFFIXES = frozenset({".pt", ".pth"})
SAFETENSORS_SUFFIXES = frozenset({".sft", ".safetensors"})
TEMP_MARK = ".tmp-"
# What torch's weights-only unpickler says when a pickle asks for code rather than data.
_NEEDS_CODE = re.compile(r"GLOBAL|unrecognized function|Can only create new object|Can only build")
_TEMP_NAME = re.compile(r"^\.(?P<final>.+)\.tmp-(?P<pid>\d+)-[0-9a-f]{8}$")


class StorageError(ValueError):
    """A file or value that this module cannot store or read; the message starts with the path."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        super().__init__(f"{os.fspath(path)}: {problem}")
        self.path = Path(path)


class CorruptFileError(StorageError):
    """The file is empty, truncated, malformed or not of the format its suffix promises."""


class UnsafeFileError(StorageError):
    """The pickle references code that a weights-only load refuses to run."""


class UnsupportedValueError(StorageError):
    """The object holds a value (type, dtype, layout) that this format cannot store."""


class UnsupportedSuffixError(StorageError):
    """The suffix names no known format."""


# --------------------------------------------------------------------------- atomic writes


def is_temp_file(path: str | os.PathLike[str]) -> bool:
    """True for the names that atomic writes use while a file is still being written."""
    return _TEMP_NAME.match(Path(path).name) is not None


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def fsync_dir(folder: Path) -> None:
    """Make a rename or a new entry in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: str | os.PathLike[str], *, fsync: bool = True, mode: int = 0o666) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` only once the block finishes without error.

    A process killed at any moment leaves either the old file or the new one under ``path``;
    an unfinished temp file (``.NAME.tmp-PID-XXXXXXXX``) may remain, which ``load`` refuses and
    ``remove_stale_temp_files`` deletes. ``mode`` applies at creation (before the umask), so a
    secret never exists with wider permissions. ``fsync=False`` keeps atomicity against crashes of
    the process but not against power loss.
    """
    final = Path(path)
    tmp = _temp_path(final)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), mode)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None:  # a full disk says ENOSPC, not which file
            raise OSError(e.errno, e.strerror, str(final)) from e
        raise
    if fsync:
        fsync_dir(final.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | bytearray | memoryview, *,
                       fsync: bool = True, mode: int = 0o666) -> None:
    """Replace ``path`` with ``data`` atomically (and durably unless ``fsync=False``)."""
    with atomic_open(path, fsync=fsync, mode=mode) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, *, encoding: str = "utf-8",
                      fsync: bool = True, mode: int = 0o666) -> None:
    """Replace ``path`` with ``text`` atomically (and durably unless ``fsync=False``)."""
    atomic_write_bytes(path, text.encode(encoding), fsync=fsync, mode=mode)


def remove_stale_temp_files(folder: str | os.PathLike[str], *, max_age_s: float | None = None) -> list[Path]:
    """Delete temp files left by interrupted atomic writes in ``folder``; return what was removed.

    A temp file counts as stale when the process that wrote it is gone, or, with ``max_age_s``,
    when it is older than that (for a writer on another machine sharing the folder).
    """
    removed = []
    with os.scandir(folder) as entries:
        for entry in entries:
            match = _TEMP_NAME.match(entry.name)
            if match is None or not entry.is_file(follow_symlinks=False):
                continue
            too_old = max_age_s is not None and _age_s(entry) > max_age_s
            if too_old or not pid_alive(int(match["pid"])):
                Path(entry.path).unlink(missing_ok=True)
                removed.append(Path(entry.path))
    return removed


def _age_s(entry: os.DirEntry[str]) -> float:
    return time.time() - entry.stat(follow_symlinks=False).st_mtime


# --------------------------------------------------------------------------- save / load


def _format_of(path: Path) -> str:
    if is_temp_file(path):
        raise CorruptFileError(path, "is the temp file of an unfinished atomic write, not a saved file")
    suffix = path.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        return "torch"
    if suffix in SAFETENSORS_SUFFIXES:
        return "safetensors"
    known = ", ".join(sorted(TORCH_SUFFIXES | SAFETENSORS_SUFFIXES))
    raise UnsupportedSuffixError(path, f"unknown suffix {suffix or '(none)'!r}; expected one of {known}")


def save(obj: Any, path: str | os.PathLike[str], *, fsync: bool = True) -> None:
    """Write ``obj`` to ``path`` in the format its suffix names, atomically.

    The whole object is checked first, so a value neither format can store raises
    ``UnsupportedValueError`` (naming its key path) before anything touches the disk.
    """
    _save(obj, Path(path), fsync, None)


def _save(obj: Any, path: Path, fsync: bool, metadata: dict[str, str] | None) -> None:
    kind = _format_of(path)
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a directory; cannot save over it", str(path))
    if not path.parent.is_dir():
        raise FileNotFoundError(errno.ENOENT, "the folder to save into does not exist", str(path.parent))
    encoder = Encoder()
    try:
        tree = encoder.encode(obj)
        layout = None
        if kind == "safetensors":
            layout = io_safetensors.plan(tree, encoder.tensors, encoder.where, metadata)
    except RefusedValue as e:
        raise UnsupportedValueError(path, str(e)) from None
    with atomic_open(path, fsync=fsync) as f:
        if layout is not None:
            layout.write(f)
            return
        try:
            torch.save(obj, f)
        except (RuntimeError, TypeError, KeyError, pickle.PicklingError) as e:
            raise UnsupportedValueError(path, f"torch.save refused it: {e}") from None


def save_weights(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike[str],
                 metadata: Mapping[str, str] | None = None, *, fsync: bool = True) -> None:
    """Export a flat ``{name: tensor}`` for other tools, with free-form strings in ``__metadata__``.

    Only safetensors files carry metadata; ``.pt`` takes the tensors alone. ``load`` gives the
    mapping back as a dict; ``read_metadata`` gives the strings.
    """
    path = Path(path)
    if not all(type(k) is str and isinstance(v, torch.Tensor) for k, v in tensors.items()):
        raise UnsupportedValueError(path, "weights must map names (str) to tensors")
    metadata = dict(metadata or {})
    if not all(type(k) is str and type(v) is str for k, v in metadata.items()):
        raise UnsupportedValueError(path, "metadata must map str to str")
    if io_safetensors.STRUCTURE_KEY in metadata:
        raise UnsupportedValueError(path, f"metadata key {io_safetensors.STRUCTURE_KEY!r} is reserved")
    if metadata and _format_of(path) != "safetensors":
        raise UnsupportedValueError(path, "only .safetensors/.sft files carry metadata")
    _save(dict(tensors), path, fsync, metadata)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The free-form ``__metadata__`` strings of a safetensors file (its structure JSON left out)."""
    path = Path(path)
    if _format_of(path) != "safetensors":
        raise UnsupportedSuffixError(path, "only .safetensors/.sft files carry metadata")
    size = _regular_file_size(path)
    try:
        with open(path, "rb") as f:
            return io_safetensors.read_metadata(f, size)
    except io_safetensors.FormatError as e:
        raise CorruptFileError(path, f"not a valid safetensors file: {e}") from None


def load(path: str | os.PathLike[str], map_location: Any = "cpu", unsafe: bool = False) -> Any:
    """Read what ``save`` wrote (or any torch / safetensors file) back from ``path``.

    Pickles are read with ``weights_only=True`` unless ``unsafe=True``: one that needs code raises
    ``UnsafeFileError`` and runs nothing. Safetensors files are mapped, not read: tensors are
    copy-on-write views of the file. Every malformed file raises ``CorruptFileError`` naming it.
    """
    path = Path(path)
    kind = _format_of(path)
    size = _regular_file_size(path)
    if kind == "torch":
        return _load_torch(path, map_location, unsafe)
    device = _device(path, map_location)
    try:
        with open(path, "rb") as f:
            return io_safetensors.read(f, size, device)
    except io_safetensors.FormatError as e:
        raise CorruptFileError(path, f"not a valid safetensors file: {e}") from None


def convert(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, unsafe: bool = False,
            fsync: bool = True) -> None:
    """Rewrite ``src`` in the format of ``dst``'s suffix (``.pt`` <-> ``.safetensors``)."""
    save(load(src, unsafe=unsafe), dst, fsync=fsync)


def _regular_file_size(path: Path) -> int:
    """Size of ``path``; refuses what is not a non-empty regular file (a FIFO would block a reader)."""
    info = os.stat(path)
    if stat.S_ISDIR(info.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a saved file", str(path))
    if not stat.S_ISREG(info.st_mode):
        raise CorruptFileError(path, "is not a regular file")
    if info.st_size == 0:
        raise CorruptFileError(path, "is empty")
    return info.st_size


def _device(path: Path, map_location: Any) -> torch.device:
    if map_location is None:
        return torch.device("cpu")
    if not isinstance(map_location, (str, torch.device)):
        raise StorageError(path, "safetensors files take map_location as a device or device name only")
    try:
        return torch.device(map_location)
    except RuntimeError as e:
        raise StorageError(path, f"bad map_location {map_location!r}: {e}") from None


def _load_torch(path: Path, map_location: Any, unsafe: bool) -> Any:
    try:
        return torch.load(path, map_location=map_location, weights_only=not unsafe)
    except pickle.UnpicklingError as e:
        reason = next((line for line in str(e).splitlines() if "WeightsUnpickler error" in line), str(e))
        if not _NEEDS_CODE.search(reason):
            raise CorruptFileError(path, f"not a valid torch file ({reason.strip()})") from None
        raise UnsafeFileError(path, "refused: unpickling it needs code beyond tensors and plain containers"
                              f" ({reason.strip()}); load(..., unsafe=True) runs it, for trusted files only") from None
    except (OSError, MemoryError):
        raise
    except Exception as e:
        raise CorruptFileError(path, f"not a valid torch file ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------- JSON


def json_read(path: str | os.PathLike[str], default: Any = None) -> Any:
    """The JSON value in ``path``, or ``default`` when the file does not exist."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return default
    if not raw.strip():
        raise CorruptFileError(path, "is empty, not JSON")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise CorruptFileError(path, f"is not valid JSON ({e})") from None


def json_write(obj: Any, path: str | os.PathLike[str], pretty: bool = False, *, fsync: bool = True) -> None:
    """Write ``obj`` as JSON atomically; tensors, numpy values, paths, enums, sets and dataclasses are converted."""
    try:
        text = json.dumps(obj, default=_json_default, ensure_ascii=False,
                          indent=2 if pretty else None, separators=None if pretty else (",", ":"))
        data = (text + "\n").encode("utf-8")
    except (TypeError, ValueError, RecursionError) as e:
        raise UnsupportedValueError(path, f"cannot be written as JSON: {e}") from None
    atomic_write_bytes(path, data, fsync=fsync)


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        try:
            return sorted(value)
        except TypeError:
            return list(value)
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, complex):
        return [value.real, value.imag]
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (datetime.date, datetime.time)):
        return value.isoformat()
    raise TypeError(f"{type(value).__qualname__} is not JSON serialisable")
