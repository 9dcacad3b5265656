"""Checkpoints: the manifest commits, rotation follows commits, corrupt ones are skipped, kills leave no harm."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
import torch

from trainer_core import checkpoint
from trainer_core.checkpoint import (
    LATEST,
    MANIFEST,
    CheckpointError,
    CheckpointManager,
    latest_checkpoint,
    list_checkpoints,
    list_exports,
    step_dir_name,
)

NO_SUCH_PID = 999_999_999  # above any kernel's pid_max


def make_parts(step: int) -> dict[str, object]:
    return {
        "model.main": {"weight": torch.full((32, 256), float(step)), "bias": torch.arange(8, dtype=torch.int64) + step},
        "optimizer.main": {"state": {"0": {"exp_avg": torch.full((32, 256), -float(step))}},
                           "param_groups": [{"lr": 0.1, "params": [0]}]},
        "trainer_state": {"step": step, "rng": torch.arange(16, dtype=torch.uint8), "note": "ok"},
    }


def assert_parts_of(step: int, parts: dict[str, object]) -> None:
    model, optim, state = parts["model.main"], parts["optimizer.main"], parts["trainer_state"]
    assert torch.equal(model["weight"], torch.full((32, 256), float(step)))
    assert torch.equal(model["bias"], torch.arange(8, dtype=torch.int64) + step)
    assert torch.equal(optim["state"]["0"]["exp_avg"], torch.full((32, 256), -float(step)))
    assert optim["param_groups"][0]["lr"] == 0.1
    assert state["step"] == step
    assert state["note"] == "ok"


@pytest.fixture(params=["safetensors", "pt"])
def manager(request: pytest.FixtureRequest, tmp_path: Path) -> CheckpointManager:
    return CheckpointManager(tmp_path / "run", keep_last=3, weights_format=request.param)


def test_save_commits_a_step_folder_whose_manifest_lists_every_file(manager: CheckpointManager) -> None:
    folder = manager.save(120, make_parts(120))
    assert folder == manager.root / "step_00000120"
    manifest = json.loads((folder / MANIFEST).read_text())
    ext = manager.weights_format
    assert set(manifest["files"]) == {f"model.main.{ext}", f"optimizer.main.{ext}", f"trainer_state.{ext}"}
    for name, entry in manifest["files"].items():
        assert entry["bytes"] == (folder / name).stat().st_size
    assert manifest["step"] == 120
    assert sorted(p.name for p in folder.iterdir()) == sorted([*manifest["files"], MANIFEST])
    assert (manager.root / LATEST).read_text().strip() == "step_00000120"
    assert sorted(p.name for p in manager.root.iterdir()) == [LATEST, "step_00000120"]


def test_load_latest_returns_the_newest_checkpoint_with_every_part(manager: CheckpointManager) -> None:
    for step in (10, 20):
        manager.save(step, make_parts(step))
    found = manager.load_latest()
    assert found is not None
    path, parts = found
    assert path.name == "step_00000020"
    assert_parts_of(20, parts)
    assert manager.skipped == []


def test_a_part_can_be_written_as_json(manager: CheckpointManager) -> None:
    parts = {**make_parts(5), "sampler": {"epoch": 2, "order": [3, 1, 2]}}
    folder = manager.save(5, parts, formats={"sampler": "json"})
    assert json.loads((folder / "sampler.json").read_text()) == {"epoch": 2, "order": [3, 1, 2]}
    assert manager.load(folder)["sampler"] == {"epoch": 2, "order": [3, 1, 2]}


def test_a_folder_without_manifest_is_ignored_and_cleaned(manager: CheckpointManager) -> None:
    manager.save(1, make_parts(1))
    torn = manager.root / step_dir_name(2)
    torn.mkdir()
    (torn / "model.main.safetensors").write_bytes(b"partial")
    path, _ = manager.load_latest()
    assert path.name == "step_00000001"
    assert manager.skipped == []
    assert [c["step"] for c in list_checkpoints(manager.run_dir)] == [1]
    with pytest.raises(CheckpointError, match="not committed"):
        manager.load(torn)
    assert manager.clean_partial() == [torn]
    assert not torn.exists()
    assert (manager.root / "step_00000001" / MANIFEST).exists()


def test_rotation_keeps_the_newest_and_removes_old_ones_only_after_a_commit(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (1, 2, 3):
        manager.save(step, make_parts(step))
    assert [c["step"] for c in list_checkpoints(tmp_path)] == [2, 3]
    with pytest.raises(Exception):  # noqa: B017 - whatever io raises for an object it cannot store
        manager.save(4, {"model.main": object()})
    assert [c["step"] for c in list_checkpoints(tmp_path)] == [2, 3]
    assert sorted(p.name for p in manager.root.iterdir()) == [LATEST, "step_00000002", "step_00000003"]


def test_rotation_never_removes_the_checkpoint_just_saved(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    for step in (50, 60):
        manager.save(step, make_parts(step))
    manager.save(40, make_parts(40))
    assert [c["step"] for c in list_checkpoints(tmp_path)] == [40, 60]
    assert (manager.root / LATEST).read_text().strip() == "step_00000040"


def test_a_damaged_checkpoint_takes_no_rotation_slot_and_is_kept_as_evidence(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(10, make_parts(10))
    damaged = manager.save(20, make_parts(20))
    (damaged / "model.main.safetensors").write_bytes(b"torn")
    path, _ = manager.load_latest()
    assert path.name == "step_00000010"
    for step in (11, 12, 13):  # the run continues from step 10
        manager.save(step, make_parts(step))
    assert [c["step"] for c in list_checkpoints(tmp_path)] == [12, 13, 20]
    path, parts = manager.load_latest()
    assert_parts_of(13, parts)
    assert path.name == "step_00000013"
    assert [p.name for p, _ in manager.skipped] == ["step_00000020"]


def test_keep_last_zero_keeps_every_checkpoint(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=0)
    for step in range(5):
        manager.save(step, {"trainer_state": {"step": step}})
    assert [c["step"] for c in list_checkpoints(tmp_path)] == [0, 1, 2, 3, 4]


def test_saving_the_same_step_twice_replaces_it_cleanly(manager: CheckpointManager) -> None:
    manager.save(7, make_parts(7))
    manager.save(7, {**make_parts(7), "trainer_state": {"step": 7, "note": "second", "rng": torch.zeros(2)}})
    _, parts = manager.load_latest()
    assert parts["trainer_state"]["note"] == "second"
    assert sorted(p.name for p in manager.root.iterdir()) == [LATEST, "step_00000007"]


def test_a_truncated_weights_file_is_skipped_with_a_reason_and_the_older_one_loads(
        manager: CheckpointManager) -> None:
    manager.save(10, make_parts(10))
    newest = manager.save(20, make_parts(20))
    weights = newest / f"model.main.{manager.weights_format}"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    path, parts = manager.load_latest()
    assert path.name == "step_00000010"
    assert_parts_of(10, parts)
    [(skipped, reason)] = manager.skipped
    assert skipped == newest
    assert weights.name in reason and "bytes" in reason and "\n" not in reason
    assert manager.clean_partial() == []  # a damaged committed checkpoint is evidence, not debris
    assert newest.exists()


def test_a_corrupt_manifest_is_skipped_and_named_by_load(manager: CheckpointManager) -> None:
    manager.save(10, make_parts(10))
    newest = manager.save(20, make_parts(20))
    (newest / MANIFEST).write_text('{"format": "traindeck-checkpoint", "files": {')
    path, _ = manager.load_latest()
    assert path.name == "step_00000010"
    assert manager.skipped[0][0] == newest
    assert "manifest.json is corrupt" in manager.skipped[0][1]
    with pytest.raises(CheckpointError, match=r"step_00000020: manifest\.json is corrupt"):
        manager.load(newest)
    assert [c["step"] for c in list_checkpoints(manager.run_dir)] == [10]
    assert latest_checkpoint(manager.run_dir) == manager.root / "step_00000010"


@pytest.mark.parametrize("files", [{"../escape.pt": {"part": "x", "bytes": 1, "edge_crc32": 0}}, {}, []])
def test_a_manifest_listing_bad_files_is_refused(manager: CheckpointManager, files: object) -> None:
    folder = manager.save(3, make_parts(3))
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / MANIFEST).write_text(json.dumps({**manifest, "files": files}))
    with pytest.raises(CheckpointError, match=r"manifest\.json is corrupt"):
        manager.load(folder)


def test_overwritten_header_bytes_fail_the_checksum(manager: CheckpointManager) -> None:
    folder = manager.save(3, make_parts(3))
    weights = folder / f"model.main.{manager.weights_format}"
    data = bytearray(weights.read_bytes())
    data[9] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum"):
        manager.load(folder)
    assert manager.load_latest() is None
    assert len(manager.skipped) == 1


def test_a_missing_part_file_is_named(manager: CheckpointManager) -> None:
    folder = manager.save(3, make_parts(3))
    (folder / f"optimizer.main.{manager.weights_format}").unlink()
    with pytest.raises(CheckpointError, match=r"optimizer\.main\.\w+ is missing"):
        manager.load(folder)


def test_an_empty_run_dir_has_nothing_to_load(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "fresh")
    assert manager.load_latest() is None
    assert manager.clean_partial() == []
    assert list_checkpoints(tmp_path / "fresh") == []
    assert list_exports(tmp_path / "fresh") == []
    assert latest_checkpoint(tmp_path / "fresh") is None


def test_list_checkpoints_reports_step_path_time_and_bytes(manager: CheckpointManager) -> None:
    before = time.time()
    folder = manager.save(9, make_parts(9))
    [entry] = list_checkpoints(manager.run_dir)
    assert entry["step"] == 9
    assert entry["path"] == str(folder)
    assert before <= entry["time"] <= time.time()
    assert entry["bytes"] == sum(p.stat().st_size for p in folder.iterdir() if p.name != MANIFEST)
    assert latest_checkpoint(manager.run_dir) == folder


def test_list_exports_reports_weight_files_oldest_first(tmp_path: Path) -> None:
    exports = tmp_path / "exports"
    exports.mkdir()
    for i, name in enumerate(["first.safetensors", "second.pt", "notes.txt", ".hidden.safetensors"]):
        (exports / name).write_bytes(b"x" * (10 + i))
        os.utime(exports / name, (1000 + i, 1000 + i))
    listed = list_exports(tmp_path)
    assert [(e["name"], e["bytes"], e["time"]) for e in listed] == [("first", 10, 1000.0), ("second", 11, 1001.0)]
    assert listed[0]["path"] == str(exports / "first.safetensors")


def test_clean_partial_removes_staging_debris_of_dead_processes_only(manager: CheckpointManager) -> None:
    manager.save(1, make_parts(1))
    dead = manager.root / f".tmp-step_00000002-{NO_SUCH_PID}"
    dead.mkdir()
    (dead / "model.main.safetensors").write_bytes(b"half")
    trash = manager.root / f".trash-step_00000000-{NO_SUCH_PID}-5"
    trash.mkdir()
    live = manager.root / f".tmp-step_00000003-{os.getppid()}"
    live.mkdir()
    assert sorted(manager.clean_partial()) == sorted([dead, trash])
    assert live.exists()
    assert (manager.root / "step_00000001").exists()


def test_clean_partial_promotes_a_complete_replacement_interrupted_between_renames(
        manager: CheckpointManager) -> None:
    folder = manager.save(4, make_parts(4))
    staged = manager.root / f".tmp-step_00000004-{NO_SUCH_PID}"
    os.rename(folder, staged)  # as if killed after moving the old copy away, before the new one's rename
    assert manager.load_latest() is None
    assert manager.clean_partial() == []
    path, parts = manager.load_latest()
    assert path == folder
    assert_parts_of(4, parts)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: m.save(-1, {"a": {}}), "step"),
        (lambda m: m.save(1, {}), "at least one part"),
        (lambda m: m.save(1, {"../x": {}}), "part name"),
        (lambda m: m.save(1, {"a": {}}, formats={"a": "npz"}), "format"),
        (lambda m: m.save(1, {"a": {}}, formats={"b": "json"}), "unknown checkpoint part"),
    ],
)
def test_bad_save_arguments_raise_value_errors(tmp_path: Path, call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call(CheckpointManager(tmp_path))


def test_bad_manager_arguments_raise_value_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="weights_format"):
        CheckpointManager(tmp_path, weights_format="bin")
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last="3")


# -- SIGKILL at random moments -------------------------------------------------------------------
#
# A spawned "zygote" imports torch once and forks one saver per round; the test kills the saver
# at a random moment. Forking from a process that never ran a torch op keeps the children safe.

def _save_forever(run_dir: str, start: int, weights_format: str) -> None:
    manager = CheckpointManager(run_dir, keep_last=2, weights_format=weights_format)
    for i in range(10_000):
        step = start + i // 2  # every step twice: the same-step replace gets killed too
        manager.save(step, make_parts(step))


def _zygote(conn: Connection) -> None:
    while (request := conn.recv()) is not None:
        run_dir, start, weights_format = request
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                conn.close()
                _save_forever(run_dir, start, weights_format)
                code = 0
            finally:
                os._exit(code)
        conn.send(pid)
        conn.recv()  # the test has killed it
        conn.send(os.waitpid(pid, 0)[1])


@pytest.fixture
def zygote() -> Iterator[Connection]:
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=_zygote, args=(theirs,), daemon=True)
    process.start()
    try:
        yield ours
    finally:
        ours.send(None)
        process.join(2)  # it holds nothing worth waiting for
        if process.is_alive():
            process.kill()
            process.join(10)


def _assert_only_committed_checkpoints_remain(root: Path) -> None:
    for entry in root.iterdir():
        if entry.name == LATEST:
            assert (root / entry.read_text().strip() / MANIFEST).exists()
            continue
        assert checkpoint.STEP_DIR.fullmatch(entry.name), f"debris left: {entry.name}"
        manifest = json.loads((entry / MANIFEST).read_text())
        assert sorted(p.name for p in entry.iterdir()) == sorted([*manifest["files"], MANIFEST])


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_sigkill_at_random_moments_never_leaves_a_broken_latest(tmp_path: Path, zygote: Connection) -> None:
    rng = random.Random(1234)
    manager = CheckpointManager(tmp_path, keep_last=2)
    last_step, debris_seen = -1, 0
    for kill in range(22):
        zygote.send((str(tmp_path), last_step + 1, ("safetensors", "pt")[kill % 2]))
        pid = zygote.recv()
        time.sleep(rng.uniform(0.0, 0.12))
        os.kill(pid, signal.SIGKILL)
        zygote.send("reaped?")
        assert zygote.poll(10), "the killed saver was not reaped"
        assert os.WIFSIGNALED(status := zygote.recv()) and os.WTERMSIG(status) == signal.SIGKILL

        before_cleaning = manager.load_latest()
        assert manager.skipped == [], f"a committed checkpoint was damaged: {manager.skipped}"
        debris_seen += len(manager.clean_partial())
        _assert_only_committed_checkpoints_remain(manager.root)
        found = manager.load_latest()  # cleaning may promote a complete same-step replacement
        assert manager.skipped == []
        if before_cleaning is not None:
            assert found is not None and found[0].name >= before_cleaning[0].name
        if found is not None:
            path, parts = found
            step = parts["trainer_state"]["step"]
            assert path.name == step_dir_name(step)
            assert_parts_of(step, parts)
            assert step >= last_step
            last_step = step
    print(f"{debris_seen} debris entries cleaned, last step {last_step}")
    assert last_step > 5, "the savers never got to commit"
    assert debris_seen > 0, "no kill landed inside a save"
