"""Checkpoint folders that survive a crash at any moment, and finding the newest one that loads.

Layout under ``RUN_DIR/checkpoints/``::

    step_00000120/            one committed checkpoint
        model.main.safetensors    one file per part, written through trainer_core.io
        optimizer.main.safetensors
        trainer_state.safetensors
        manifest.json         written last: the commit marker
    latest                    text: the folder name of the newest save (replaced atomically)

A save writes every part into ``.tmp-step_NNNNNNNN-<pid>/``, writes ``manifest.json`` last (it
lists every file with its size and a CRC-32 of its first and last 64 KiB), then renames the folder
to ``step_NNNNNNNN`` and fsyncs ``checkpoints/``. A folder named ``step_*`` therefore exists only
once it is complete; a crash leaves hidden debris (``.tmp-*``, ``.old-*``, ``.trash-*``) that
:meth:`CheckpointManager.clean_partial` removes.

Why sizes plus edge CRCs rather than a full hash: the failures seen in practice are truncation
(disk full, killed copies) and torn headers/tails, which sizes and the edges catch in two small
reads; hashing every byte of a multi-GB checkpoint would add seconds to each save and load.
A malformed header or structure is also caught when ``trainer_core.io`` parses the file; what
neither catches is bytes changed in the middle of tensor data, which no full hash was paid for.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainer_core import io
from trainer_core.pid import pid_alive

CHECKPOINTS_DIR = "checkpoints"
EXPORTS_DIR = "exports"
LATEST = "latest"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "traindeck-checkpoint"
MANIFEST_VERSION = 1
WEIGHTS_FORMATS = ("safetensors", "pt")
PART_FORMATS = (*WEIGHTS_FORMATS, "json")
EXPORT_SUFFIXES = (".safetensors", ".pt")
EDGE_BYTES = 64 * 1024
DEBRIS_PREFIXES = (".tmp-", ".old-", ".trash-")
STEP_DIR = re.compile(r"step_(\d{8,})")
PART_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")

# manifest keys
K_FORMAT, K_VERSION, K_STEP, K_TIME, K_FILES = "format", "version", "step", "time", "files"
K_PART, K_BYTES, K_EDGE_CRC = "part", "bytes", "edge_crc32"


class CheckpointError(OSError):
    """A checkpoint folder is not committed or cannot be loaded; the message names it and why."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def edge_crc32(path: Path, size: int) -> int:
    """CRC-32 of the first and last EDGE_BYTES of a file (the whole file when it is small)."""
    with open(path, "rb") as f:
        crc = zlib.crc32(f.read(EDGE_BYTES))
        if size > EDGE_BYTES:
            f.seek(max(EDGE_BYTES, size - EDGE_BYTES))
            crc = zlib.crc32(f.read(EDGE_BYTES), crc)
    return crc


def _remove_tree(path: Path) -> None:
    """Delete a folder without ever leaving a half-deleted ``step_*`` behind: rename it away first."""
    trash = path.with_name(f".trash-{path.name}-{os.getpid()}-{time.monotonic_ns()}")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own debris: this process is not saving while it cleans
    return pid_alive(pid)


# -- reading manifests ---------------------------------------------------------------------------

def read_manifest(folder: Path) -> dict[str, Any]:
    """The folder's manifest, checked for shape; CheckpointError naming the folder otherwise."""
    path = folder / MANIFEST
    if not path.is_file():
        raise CheckpointError(f"{folder.name}: not committed (no {MANIFEST})")
    try:
        manifest = io.json_read(path)
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{folder.name}: {MANIFEST} is corrupt ({_one_line(exc)})") from exc
    problem = _manifest_problem(manifest)
    if problem:
        raise CheckpointError(f"{folder.name}: {MANIFEST} is corrupt ({problem})")
    return manifest


def _manifest_problem(manifest: Any) -> str | None:
    if not isinstance(manifest, dict) or manifest.get(K_FORMAT) != MANIFEST_FORMAT:
        return f"not a {MANIFEST_FORMAT} manifest"
    if manifest.get(K_VERSION) != MANIFEST_VERSION:
        return f"unsupported version {manifest.get(K_VERSION)!r}"
    if not isinstance(manifest.get(K_STEP), int) or not isinstance(manifest.get(K_TIME), int | float):
        return "missing step or time"
    files = manifest.get(K_FILES)
    if not isinstance(files, dict) or not files:
        return "no files listed"
    for name, entry in files.items():
        if not PART_NAME.fullmatch(name) or name == MANIFEST or not isinstance(entry, dict):
            return f"bad entry for {name!r}"
        if not isinstance(entry.get(K_BYTES), int):
            return f"bad entry for {name!r}"
        if not isinstance(entry.get(K_PART), str) or not isinstance(entry.get(K_EDGE_CRC), int):
            return f"bad entry for {name!r}"
    return None


def verify_files(folder: Path, manifest: Mapping[str, Any]) -> None:
    """Every listed file is present with its recorded size and edge checksum."""
    for name, entry in manifest[K_FILES].items():
        path = folder / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{folder.name}: {name} is missing") from None
        if size != entry[K_BYTES]:
            raise CheckpointError(f"{folder.name}: {name} has {size} bytes, manifest says {entry[K_BYTES]}")
        if edge_crc32(path, size) != entry[K_EDGE_CRC]:
            raise CheckpointError(f"{folder.name}: {name} fails its checksum (contents changed after the save)")


def _committed_folders(root: Path) -> list[tuple[int, float, Path, dict[str, Any]]]:
    """(step, time, folder, manifest) of every folder whose manifest parses, oldest first."""
    found = []
    if not root.is_dir():
        return found
    for folder in root.iterdir():
        match = STEP_DIR.fullmatch(folder.name)
        if not match or not folder.is_dir():
            continue
        try:
            manifest = read_manifest(folder)
        except CheckpointError:
            continue
        found.append((int(match.group(1)), float(manifest[K_TIME]), folder, manifest))
    found.sort(key=lambda item: (item[0], item[1]))
    return found


# -- module-level listing (used by the server) ---------------------------------------------------

def list_checkpoints(run_dir: str | Path) -> list[dict[str, Any]]:
    """Committed checkpoints, oldest first: ``{"step", "path", "time", "bytes"}``."""
    return [
        {"step": step, "path": str(folder), "time": stamp,
         "bytes": sum(entry[K_BYTES] for entry in manifest[K_FILES].values())}
        for step, stamp, folder, manifest in _committed_folders(Path(run_dir) / CHECKPOINTS_DIR)
    ]


def list_exports(run_dir: str | Path) -> list[dict[str, Any]]:
    """Exported weight files, oldest first: ``{"name", "path", "time", "bytes"}``."""
    folder = Path(run_dir) / EXPORTS_DIR
    if not folder.is_dir():
        return []
    exports = []
    for path in folder.iterdir():
        if path.name.startswith(".") or path.suffix not in EXPORT_SUFFIXES or not path.is_file():
            continue
        try:
            info = path.stat()
        except FileNotFoundError:  # removed while we listed
            continue
        exports.append({"name": path.stem, "path": str(path), "time": info.st_mtime, "bytes": info.st_size})
    exports.sort(key=lambda item: (item["time"], item["name"]))
    return exports


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest committed checkpoint folder (highest step), without loading it."""
    committed = _committed_folders(Path(run_dir) / CHECKPOINTS_DIR)
    return committed[-1][2] if committed else None


# -- the manager ---------------------------------------------------------------------------------

class CheckpointManager:
    """Saves, rotates and finds checkpoints of one run directory (used by rank 0 only)."""

    def __init__(self, run_dir: str | Path, keep_last: int = 3, weights_format: str = "safetensors") -> None:
        if weights_format not in WEIGHTS_FORMATS:
            raise ValueError(f"weights_format must be one of {', '.join(WEIGHTS_FORMATS)}, got {weights_format!r}")
        if isinstance(keep_last, bool) or not isinstance(keep_last, int):
            raise ValueError(f"keep_last must be an integer (<= 0 keeps all), got {keep_last!r}")
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CHECKPOINTS_DIR
        self.keep_last = keep_last
        self.weights_format = weights_format
        self.skipped: list[tuple[Path, str]] = []

    def save(self, step: int, parts: Mapping[str, object], formats: Mapping[str, str] | None = None) -> Path:
        """Write a committed checkpoint for ``step`` and return its folder.

        ``formats`` overrides the file format per part ("safetensors", "pt" or "json" for small
        JSON-able state). Saving a step again replaces that checkpoint.
        """
        step = _step_arg(step)
        formats = dict(formats or {})
        _check_parts(parts, formats)
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / step_dir_name(step)
        staging = self.root / f".tmp-{final.name}-{os.getpid()}"
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir()
        try:
            files = {}
            for part, obj in parts.items():
                path = staging / f"{part}.{formats.get(part, self.weights_format)}"
                if path.suffix == ".json":
                    io.json_write(obj, path)
                else:
                    io.save(obj, path)
                size = path.stat().st_size
                files[path.name] = {K_PART: part, K_BYTES: size, K_EDGE_CRC: edge_crc32(path, size)}
            manifest = {K_FORMAT: MANIFEST_FORMAT, K_VERSION: MANIFEST_VERSION, K_STEP: step,
                        K_TIME: time.time(), K_FILES: files}
            io.json_write(manifest, staging / MANIFEST, pretty=True)
            io.fsync_dir(staging)
            self._commit(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        self._write_latest(final.name)
        self._rotate(final)
        return final

    def load(self, path: str | Path, map_location: Any = "cpu") -> dict[str, object]:
        """Every part of one committed checkpoint; CheckpointError saying why when it cannot."""
        folder = Path(path)
        manifest = read_manifest(folder)
        verify_files(folder, manifest)
        parts: dict[str, object] = {}
        for name, entry in manifest[K_FILES].items():
            file = folder / name
            try:
                parts[entry[K_PART]] = io.json_read(file) if file.suffix == ".json" else io.load(file, map_location)
            except Exception as exc:
                raise CheckpointError(f"{folder.name}: {name} does not load ({_one_line(exc)})") from exc
        return parts

    def load_latest(self, map_location: Any = "cpu") -> tuple[Path, dict[str, object]] | None:
        """The newest committed checkpoint that loads, falling back to older ones.

        Every committed checkpoint passed over is recorded in ``self.skipped`` as
        ``(folder, reason)`` and logged; folders that were never committed are ignored.
        """
        self.skipped = []
        for folder in reversed(self._step_folders()):
            if not (folder / MANIFEST).exists():
                continue
            try:
                return folder, self.load(folder, map_location)
            except CheckpointError as exc:
                reason = str(exc).removeprefix(f"{folder.name}: ")
                self.skipped.append((folder, reason))
                _log.warning("skipping checkpoint %s: %s", folder, reason)
        return None

    def clean_partial(self) -> list[Path]:
        """Remove what interrupted saves and exports left behind; never touches a committed checkpoint.

        A staged folder that was complete (its manifest verifies) but never renamed, because the
        process died between the two renames of a same-step replace, is promoted instead.
        """
        exports = self.run_dir / EXPORTS_DIR
        removed = io.remove_stale_temp_files(exports) if exports.is_dir() else []
        if not self.root.is_dir():
            return removed
        self._promote_complete_debris()
        removed += io.remove_stale_temp_files(self.root)
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(DEBRIS_PREFIXES):
                if _pid_alive(_debris_pid(entry.name)):
                    continue
            elif not (STEP_DIR.fullmatch(entry.name) and entry.is_dir() and not (entry / MANIFEST).exists()):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
        if removed:
            io.fsync_dir(self.root)
        return removed

    # -- internals --------------------------------------------------------------------------

    def _step_folders(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        folders = [p for p in self.root.iterdir() if STEP_DIR.fullmatch(p.name) and p.is_dir()]
        return sorted(folders, key=lambda p: int(p.name[len("step_"):]))

    def _commit(self, staging: Path, final: Path) -> None:
        """Make the staged folder visible under its final name in one rename."""
        old = None
        if final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            if old.exists():
                shutil.rmtree(old)
            os.rename(final, old)
        os.rename(staging, final)
        io.fsync_dir(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def _write_latest(self, name: str) -> None:
        io.atomic_write_text(self.root / LATEST, name + "\n")

    def _rotate(self, newest: Path) -> None:
        """Keep ``newest`` and the ``keep_last - 1`` highest-step intact others.

        A damaged checkpoint (a file missing, truncated or changed) neither counts toward
        ``keep_last`` nor gets deleted: it is evidence, and the good ones stay around it.
        Rotation failing never fails the save that was already committed.
        """
        if self.keep_last <= 0:
            return
        intact = []
        for _, _, folder, manifest in _committed_folders(self.root):
            if folder == newest:
                continue
            try:
                verify_files(folder, manifest)
            except CheckpointError:
                continue
            intact.append(folder)
        for folder in intact[: max(0, len(intact) - (self.keep_last - 1))]:
            try:
                _remove_tree(folder)
            except OSError as exc:
                _log.warning("could not remove old checkpoint %s: %s", folder, exc)

    def _promote_complete_debris(self) -> None:
        for entry in sorted(self.root.iterdir(), key=lambda p: not p.name.startswith(".tmp-")):
            match = re.fullmatch(r"\.(?:tmp|old)-(step_\d{8,})-(\d+)", entry.name)
            if not match or not entry.is_dir() or _pid_alive(int(match.group(2))):
                continue
            final = self.root / match.group(1)
            if final.exists():
                continue
            try:
                verify_files(entry, read_manifest(entry))
            except CheckpointError:
                continue
            os.rename(entry, final)
            io.fsync_dir(self.root)
            _log.warning("recovered checkpoint %s from an interrupted save", final)


_log = logging.getLogger(__name__)


def _debris_pid(name: str) -> int:
    match = re.search(r"-(\d+)(?:-\d+)?$", name)
    return int(match.group(1)) if match else -1


def _step_arg(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"checkpoint step must be a non-negative integer, got {step!r}")
    return step


def _check_parts(parts: Mapping[str, object], formats: Mapping[str, str]) -> None:
    if not parts:
        raise ValueError("a checkpoint needs at least one part")
    for part in parts:
        if not isinstance(part, str) or not PART_NAME.fullmatch(part) or part == "manifest":
            raise ValueError(f"checkpoint part name {part!r} must be a plain file name (letters, digits, . _ -)")
    for part, fmt in formats.items():
        if part not in parts:
            raise ValueError(f"format given for unknown checkpoint part {part!r}")
        if fmt not in PART_FORMATS:
            raise ValueError(f"checkpoint part {part!r}: format must be one of {', '.join(PART_FORMATS)}, got {fmt!r}")


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__
