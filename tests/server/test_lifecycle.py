"""One run through its whole life: kill -9, restart with resume, quit, eval_quit, server SIGTERM.

The steps share one server (starting a trainer costs seconds), so they run in file order and
each leaves the run in the state the next one expects.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.server.conftest import TINY, Served, events_of, next_message, no_orphans, pid_alive

NOTICE_LIMIT_S = 2.0
SHARED: dict[str, Any] = {}


@pytest.fixture(scope="module")
def life(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    run_dir = tmp_path_factory.mktemp("life") / "run"
    server = Served(["serve", "demo", "--port", "0", "--run-dir", str(run_dir), *TINY])
    try:
        yield server
    finally:
        server.close()


def test_kill_9_is_reported_as_crashed_with_its_exit_code_within_2_s(life: Served) -> None:
    life.wait_step(3)
    saved = life.command("save").json()["data"]["path"]
    pid = life.status()["pid"]
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    status = life.wait_state("crashed")
    assert status["exit_code"] == -9 and status["signal"] == "SIGKILL"
    assert status["ended_at"] - killed_at < NOTICE_LIMIT_S
    assert status["pid"] == pid
    life.wait_output(r"trainer crashed .*exit code -9, SIGKILL", stream="stderr")
    SHARED["saved"] = saved


def test_commands_are_409_while_no_trainer_runs(life: Served) -> None:
    assert life.command("save").status_code == 409
    with life.http() as client:
        assert client.post("/command", json={"line": "status"}).status_code == 409
    with life.ws() as ws:
        ws.send(json.dumps({"type": "command", "line": "save"}))
        result = next_message(ws, "result")
    assert result["type"] == "result" and result["ok"] is False and "not running" in result["message"]


def test_restart_resumes_from_the_last_checkpoint(life: Served) -> None:
    saved = SHARED["saved"]
    with life.http() as client:
        response = client.post("/run/restart")
        assert response.status_code == 200, response.text
        assert client.post("/run/restart").status_code == 409  # one trainer at a time
    life.wait_state({"running", "paused"})
    starts = events_of(life, "start")
    assert starts[-1]["data"]["resume_from"] == saved
    assert life.status()["restarts"] == 1


def test_quit_over_rest_saves_and_stops(life: Served) -> None:
    checkpoints_before = len(events_of(life, "checkpoint"))
    response = life.command("quit")
    assert response.status_code == 200 and response.json()["ok"] is True
    assert life.wait_ended("stopped")["exit_code"] == 0
    assert len(events_of(life, "checkpoint")) == checkpoints_before + 1
    assert events_of(life, "finish")[-1]["data"]["reason"] == "quit"


def test_eval_quit_over_the_websocket_stops_after_evaluating(life: Served) -> None:
    with life.http() as client:
        assert client.post("/run/restart").status_code == 200
    life.wait_state({"running", "paused"})
    with life.ws() as ws:
        ws.send(json.dumps({"type": "command", "command": "eval_quit"}))
        result = next_message(ws, "result", timeout=120)
    assert result["ok"] is True and result["data"]["metrics"]
    assert life.wait_ended("stopped")["exit_code"] == 0


def test_server_sigterm_makes_the_trainer_save_and_leaves_no_orphan(life: Served) -> None:
    with life.http() as client:
        assert client.post("/run/restart").status_code == 200
    life.wait_state({"running", "paused"})
    life.wait_step(life.status()["step"] + 2)
    pid = life.status()["pid"]
    run_dir = Path(life.status()["run_dir"])
    life.signal(signal.SIGTERM)
    assert life.wait_exit(120) == 0
    assert not pid_alive(pid)
    no_orphans(life.proc.pid)
    assert not (run_dir / "server.json").exists()
    with contextlib.closing(sqlite3.connect(run_dir / "metrics.sqlite")) as db:
        rows = db.execute("SELECT kind, data FROM events WHERE kind IN ('start', 'checkpoint', 'finish') "
                          "ORDER BY id").fetchall()
    tail = [kind for kind, _ in rows[-3:]]
    assert tail == ["start", "checkpoint", "finish"]  # the last trainer saved once, then finished
    assert json.loads(rows[-1][1])["reason"] == "quit"
    assert "Traceback" not in "\n".join(life.stderr)
