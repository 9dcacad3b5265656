"""The `traindeck` command line: clear errors, Ctrl-C, stdin commands, headless train, view, convert."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.server.conftest import REPO, TEST_ENV, TINY, Served, next_message, no_orphans, pid_alive, wait_until

CLI_TIMEOUT_S = 180


def traindeck(*args: str, stdin: str | None = None, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "server.cli", *args], cwd=cwd, input=stdin, capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S, env={**os.environ, **TEST_ENV})


def store_events(run_dir: Path, kinds: tuple[str, ...]) -> list[tuple[str, dict[str, Any]]]:
    with contextlib.closing(sqlite3.connect(run_dir / "metrics.sqlite")) as db:
        rows = db.execute(f"SELECT kind, data FROM events WHERE kind IN ({','.join('?' * len(kinds))}) ORDER BY id",
                          kinds).fetchall()
    return [(kind, json.loads(data)) for kind, data in rows]


@pytest.mark.parametrize(("args", "needle"), [
    (["serve", "--set", "trainer.iterations=lots"], "trainer.iterations"),
    (["serve", "no_such_package.module:build"], "no_such_package"),
    (["train", "missing_file.py:build"], "missing_file.py"),
    (["serve", "--host", "0.0.0.0"], "--token"),
    (["serve", "--nproc-per-node", "0"], "at least 1"),
    (["view", "/nonexistent/run"], "does not exist"),
    (["convert", "missing.pt", "out.safetensors"], "missing.pt"),
])
def test_bad_input_is_one_clear_line_and_exit_code_2(tmp_path: Path, args: list[str], needle: str) -> None:
    result = traindeck(*args, "--run-dir", str(tmp_path / "run")) if args[0] in ("serve", "train") \
        else traindeck(*args, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(r"traindeck( \w+)?: error: ", lines[0]) and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_convert_round_trips_pt_and_safetensors(tmp_path: Path) -> None:
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(3, dtype=torch.bfloat16)}
    torch.save(state, tmp_path / "model.pt")
    assert traindeck("convert", "model.pt", "model.safetensors", cwd=tmp_path).returncode == 0
    loaded = load_file(tmp_path / "model.safetensors")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


def test_a_command_typed_on_stdin_is_applied_and_its_result_printed(served: Served) -> None:
    served.type("status")
    served.wait_output(r"^\[ok\] status: paused at step \d+")
    served.type("sav")
    served.wait_output(r"^\[error\] sav: unknown command 'sav'; did you mean 'save'")
    served.type("lr 5e-3")
    served.wait_output(r"^\[ok\] lr 0\.005: lr set to 0\.005")


@pytest.fixture
def ctrl_c_run(tmp_path: Path) -> Iterator[Served]:
    server = Served(["serve", "demo", "--port", "0", "--run-dir", str(tmp_path / "run"), *TINY])
    try:
        yield server
    finally:
        server.close()


def test_ctrl_c_saves_once_and_exits_cleanly_without_a_traceback(ctrl_c_run: Served) -> None:
    server = ctrl_c_run
    server.wait_step(2)
    status = server.status()
    assert server.proc.stdin is not None
    server.proc.stdin.close()  # EOF on stdin is not a quit
    assert server.status()["state"] == "running"
    server.signal(signal.SIGINT, group=True)  # the terminal sends it to server and trainer alike
    assert server.wait_exit(120) == 0
    output = "\n".join(server.stdout + server.stderr)
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert not pid_alive(status["pid"])
    no_orphans(server.proc.pid)
    events = store_events(Path(status["run_dir"]), ("start", "checkpoint", "finish"))
    assert [kind for kind, _ in events] == ["start", "checkpoint", "finish"]
    assert events[-1][1]["reason"] == "quit"


def test_a_second_ctrl_c_aborts_at_once(ctrl_c_run: Served) -> None:
    server = ctrl_c_run
    server.wait_state({"running", "paused"})
    pid = server.status()["pid"]
    server.signal(signal.SIGINT, group=True)
    server.wait_output("stopping", stream="stderr")
    server.signal(signal.SIGINT, group=True)
    server.wait_exit(60)
    assert "Traceback" not in "\n".join(server.stderr)
    wait_until(lambda: not pid_alive(pid), 30, "the trainer to be gone")
    no_orphans(server.proc.pid)


def test_a_killed_server_makes_the_trainer_save_and_exit(ctrl_c_run: Served) -> None:
    server = ctrl_c_run
    server.wait_step(2)
    status = server.status()
    server.signal(signal.SIGKILL)
    server.wait_exit(30)
    wait_until(lambda: not pid_alive(status["pid"]), 120, "the trainer to notice the closed pipe and exit")
    no_orphans(server.proc.pid)
    events = store_events(Path(status["run_dir"]), ("start", "checkpoint", "finish"))
    assert [kind for kind, _ in events] == ["start", "checkpoint", "finish"]
    assert events[-1][1]["reason"] == "quit"


def test_headless_train_then_a_read_only_view_of_the_finished_run(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    options = [*TINY, "--set", "trainer.iterations=4"]  # the last --set wins
    trained = traindeck("train", "demo", "--run-dir", str(run_dir), *options)
    assert trained.returncode == 0, trained.stderr
    view = Served(["view", str(run_dir), "--port", "0"])
    try:
        status = view.status()
        assert status["state"] == "finished" and status["read_only"] is True and status["step"] == 4
        with view.http() as client:
            assert 'data-read-only="true"' in client.get("/").text
            assert client.get("/api/metrics", params={"names": "train/loss"}).json()["train/loss"]["step"][-1] == 4
            assert [c["step"] for c in client.get("/api/checkpoints").json() if c["kind"] == "checkpoint"] == [4]
            assert client.post("/command/save").status_code == 409
            assert client.post("/run/restart").status_code == 409
        with view.ws() as ws:
            assert next_message(ws, "status")["state"] == "finished"
            ws.send(json.dumps({"type": "command", "line": "save"}))
            refusal = next_message(ws, "result")
        assert refusal["ok"] is False and "read-only" in refusal["message"]
        assert not (run_dir / "server.json").exists()
    finally:
        view.close()
    assert view.proc.returncode == 0


def test_help_lists_every_subcommand() -> None:
    result = traindeck("--help")
    assert result.returncode == 0 and all(word in result.stdout for word in ("serve", "train", "view", "convert"))
