"""trainer_core.io atomic writes: a writer killed at any moment leaves the old file or the new one."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.trainer_core.io_helpers import SUFFIXES, assert_same
from tests.trainer_core.io_kill_writer import make_version
from trainer_core import io

ROOT = Path(__file__).resolve().parents[2]


def test_atomic_write_replaces_the_file_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "latest"
    io.atomic_write_text(path, "step_1")
    io.atomic_write_text(path, "step_2")
    io.atomic_write_bytes(tmp_path / "blob", b"\x00\x01")
    assert path.read_text() == "step_2" and (tmp_path / "blob").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob", "latest"]


def test_a_failure_inside_an_atomic_write_keeps_the_old_file_and_removes_the_temp(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    io.json_write({"old": True}, path)
    with pytest.raises(RuntimeError, match="boom"), io.atomic_open(path) as f:
        f.write(b"partial")
        raise RuntimeError("boom")
    assert io.json_read(path) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_atomic_write_creates_the_file_with_the_requested_mode(tmp_path: Path) -> None:
    io.atomic_write_text(tmp_path / "server.json", "{}", mode=0o600)
    assert (tmp_path / "server.json").stat().st_mode & 0o777 == 0o600


def test_temp_files_are_refused_by_load_and_removed_once_their_writer_is_gone(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True, timeout=30)
    stale = tmp_path / f".model.safetensors.tmp-{dead.stdout.strip()}-0123abcd"
    live = tmp_path / f".model.safetensors.tmp-{os.getpid()}-89abcdef"
    for temp in (stale, live):
        temp.write_bytes(b"partial")
        assert io.is_temp_file(temp)
        with pytest.raises(io.CorruptFileError, match="unfinished atomic write"):
            io.load(temp)
    assert not io.is_temp_file(tmp_path / "model.safetensors")
    assert io.remove_stale_temp_files(tmp_path) == [stale]
    assert io.remove_stale_temp_files(tmp_path, max_age_s=-1) == [live]
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def kill_writer() -> Iterator[subprocess.Popen[str]]:
    """One warm writer process for both formats: importing torch dominates the kill test's cost."""
    writer = subprocess.Popen([sys.executable, "-m", "tests.trainer_core.io_kill_writer"], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    yield writer
    writer.kill()
    writer.communicate(timeout=30)


def ask(writer: subprocess.Popen[str], line: str) -> str:
    assert writer.stdin is not None and writer.stdout is not None
    writer.stdin.write(line + "\n")
    writer.stdin.flush()
    answer = writer.stdout.readline()
    assert answer, f"the writer process died: {writer.communicate(timeout=30)}"
    return answer


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_writer_killed_at_random_moments_always_leaves_the_old_or_the_new_file(
        tmp_path: Path, suffix: str, kill_writer: subprocess.Popen[str]) -> None:
    target = tmp_path / f"state{suffix}"
    versions = [make_version(0), make_version(1)]
    io.save(versions[0], target)
    period = float(ask(kill_writer, f"calibrate {target}").split()[1])
    rng = random.Random(f"kill{suffix}")
    seen, temps = set(), set()
    for i in range(30):
        # The kill comes 0, 1 or 2 finished saves into the child's run, then somewhere within about
        # one more save: before, inside or just after a save, and the newest finished save differs.
        saves, delay = i % 3, rng.uniform(0.0, period)
        status = int(ask(kill_writer, f"kill {target} {saves} {delay}").split()[1])
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, "the writer died by itself"
        loaded = io.load(target)
        assert_same(loaded, versions[loaded["version"]])
        seen.add(loaded["version"])
        temps |= {p.name for p in tmp_path.iterdir() if io.is_temp_file(p)}
        assert {p.name for p in tmp_path.iterdir()} - temps == {target.name}
    assert seen == {0, 1}, "every kill left the same version: the kills did not land across saves"
    assert temps, "no kill landed while a temp file existed"
    io.remove_stale_temp_files(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [target.name]
