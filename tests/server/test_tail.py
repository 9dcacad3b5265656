"""A read-only view's live feed and status, from a real store written by the trainer's writer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from server.stored_status import stored_status
from server.tail import StoreTail
from trainer_core.store import MetricsStore


def write(run_dir: Path, steps: range, events: list[tuple[str, dict]]) -> None:
    with MetricsStore(run_dir / "metrics.sqlite") as store:
        for step in steps:
            store.log_metrics(step, {"train/loss": 1.0 / step, "train/lr": 0.1})
        for kind, data in events:
            store.log_event(kind, steps.stop - 1, data)


def dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def test_the_tail_turns_only_new_rows_into_live_messages(tmp_path: Path) -> None:
    write(tmp_path, range(1, 4), [("start", {"pid": os.getpid(), "iterations": 10})])
    tail = StoreTail(tmp_path / "metrics.sqlite", lambda m: None, lambda: stored_status(tmp_path))
    tail.skip_history()
    assert tail.poll() == [{"type": "status", **stored_status(tmp_path)}]  # history is not replayed
    write(tmp_path, range(4, 6), [("checkpoint", {"path": "p", "bytes": 1})])
    messages = tail.poll()
    assert [m["kind"] for m in messages if m["type"] == "event"] == ["checkpoint"]
    metrics = [m for m in messages if m["type"] == "metrics"]
    assert [m["step"] for m in metrics] == [4, 5]
    assert metrics[0]["values"] == {"train/loss": 0.25, "train/lr": 0.1}
    assert tail.poll() == []


def test_stored_status_follows_the_newest_start_or_finish(tmp_path: Path) -> None:
    assert stored_status(tmp_path)["state"] == "stopped"  # nothing there yet
    write(tmp_path, range(1, 3), [("start", {"pid": os.getpid(), "iterations": 7})])
    running = stored_status(tmp_path)
    assert running["state"] == "running" and running["iterations"] == 7 and running["step"] == 2
    write(tmp_path, range(3, 4), [("finish", {"exit_code": 0, "reason": "quit"})])
    assert stored_status(tmp_path)["state"] == "stopped"
    write(tmp_path, range(4, 5), [("start", {"pid": dead_pid()})])
    assert stored_status(tmp_path)["state"] == "crashed"
    write(tmp_path, range(5, 6), [("finish", {"exit_code": 0, "reason": "finished"})])
    assert stored_status(tmp_path)["state"] == "finished"
