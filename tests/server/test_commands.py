"""Every command over REST and over the WebSocket, answered by the real trainer.

``quit`` and ``eval_quit`` end the run, so they are covered in test_lifecycle.py.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection

from tests.server.conftest import Served, events_of, next_message, wait_until

# (command name, its REST body, the same command as a WebSocket message)
COMMANDS: list[tuple[str, dict[str, Any] | None, dict[str, Any]]] = [
    ("save", None, {"line": "save"}),
    ("export", {"name": "cmd_export"}, {"command": "export", "name": "cmd_export_ws"}),
    ("eval", None, {"line": "eval"}),
    ("pause", None, {"line": "pause"}),
    ("lr", {"value": 0.002}, {"command": "lr", "value": 0.002}),
    ("loss_scale", {"value": 1024}, {"line": "loss_scale 1024"}),
    ("time", None, {"line": "time"}),
    ("status", None, {"command": "status"}),
    ("help", None, {"line": "help"}),
    ("event", {"action": "show"}, {"line": "event show"}),
]


def check_result(name: str, result: dict[str, Any]) -> None:
    if name == "loss_scale":  # the demo trains in fp32 on the CPU: a clear refusal is the right answer
        assert result["ok"] is False and "fp16" in result["message"]
        return
    assert result["ok"] is True, result
    assert result["command"].split()[0] == name
    data, message = result["data"], result["message"]
    if name in ("save", "export"):
        assert Path(data["path"]).exists()
    elif name == "eval":
        assert data["metrics"]
    elif name == "lr":
        assert data["lr"] == pytest.approx(0.002)
    elif name == "status":
        assert data["state"] == "paused"
    elif name == "help":
        assert "export [NAME]" in message


@pytest.mark.parametrize(("name", "body", "_ws"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_rest_command_answers_with_the_trainers_result(served: Served, name: str, body: Any, _ws: Any) -> None:
    response = served.command(name, body)
    assert response.status_code == (422 if name == "loss_scale" else 200), response.text
    check_result(name, response.json())


def first_word(line: str) -> str:
    return re.split(r"[\s@]", line.strip(), maxsplit=1)[0]


def ws_result(ws: ClientConnection, request: dict[str, Any], timeout: float = 90) -> dict[str, Any]:
    """Send one command and return the first result that answers it (results reach every client)."""
    ws.send(json.dumps({"type": "command", **request}))
    word = first_word(request.get("line") or request["command"])
    deadline = time.monotonic() + timeout
    while True:
        message = next_message(ws, "result", timeout=max(deadline - time.monotonic(), 0.01))
        if first_word(message["command"] or "") == word:
            return message


@pytest.mark.parametrize(("name", "_body", "request_"), COMMANDS, ids=[c[0] for c in COMMANDS])
def test_websocket_command_answers_with_the_trainers_result(served: Served, name: str, _body: Any,
                                                            request_: dict[str, Any]) -> None:
    with served.ws() as ws:
        first = json.loads(ws.recv(timeout=30))
        assert first["type"] == "status"
        check_result(name, ws_result(ws, request_))


def test_resume_then_pause_over_rest(served: Served) -> None:
    assert served.command("resume").json()["message"].startswith("resumed")
    assert served.wait_state("running")["state"] == "running"
    assert served.command("pause").status_code == 200
    served.wait_state("paused")


def test_command_line_endpoint_takes_the_stdin_grammar(served: Served) -> None:
    with served.http() as client:
        response = client.post("/command", json={"line": "LR 3e-3"})
    assert response.status_code == 200
    assert response.json()["data"]["lr"] == pytest.approx(3e-3)


def test_scheduled_commands_can_be_listed_and_cancelled(served: Served) -> None:
    step = served.status()["step"]
    scheduled = served.command("save", {"at_step": step + 10_000})
    assert scheduled.status_code == 200
    entry_id = scheduled.json()["data"]["id"]
    shown = served.command("event", {"action": "show"}).json()["data"]["scheduled"]
    assert any(e["id"] == entry_id for e in shown)
    assert served.command("event", {"action": "cancel", "id": entry_id}).status_code == 200
    assert served.command("event", {"action": "clear"}).status_code == 200


def test_the_run_ending_commands_are_accepted_on_both_transports(served: Served) -> None:
    """quit and eval_quit end the run (their effect: test_lifecycle.py); here scheduled far ahead."""
    far = served.status()["step"] + 1_000_000
    for name in ("quit", "eval_quit"):
        response = served.command(name, {"at_step": far})
        assert response.status_code == 200
        assert response.json()["message"].startswith(f"scheduled '{name}' at step {far}")
        with served.ws() as ws:
            result = ws_result(ws, {"command": name, "at_step": far + 1})
        assert result["ok"] is True and result["data"]["step"] == far + 1
    assert served.command("event", {"action": "clear"}).json()["data"]["cleared"] == 4
    assert served.status()["state"] == "paused"


@pytest.mark.parametrize(("name", "body", "needle"), [
    ("lrr", None, "did you mean 'lr'"),
    ("lr", None, "needs a value"),
    ("lr", {"value": -1}, "positive"),
    ("export", {"name": "../escape"}, "not allowed"),
    ("status", {"at_step": 5}, "cannot be scheduled"),
    ("save", {"value": 3}, "does not take"),
])
def test_a_bad_command_is_422_with_the_parsers_message(served: Served, name: str, body: Any, needle: str) -> None:
    response = served.command(name, body)
    assert response.status_code == 422
    assert needle in response.json()["detail"]


def test_a_malformed_body_is_422(served: Served) -> None:
    with served.http() as client:
        not_json = client.post("/command/lr", content=b"{nope", headers={"content-type": "application/json"})
        unknown_field = client.post("/command/lr", json={"value": 1e-3, "bogus": 1})
        no_line = client.post("/command", json={})
    assert not_json.status_code == unknown_field.status_code == no_line.status_code == 422


def test_a_result_slower_than_the_wait_is_202_and_arrives_as_an_event(served: Served) -> None:
    response = served.command("status", wait=0)
    assert response.status_code == 202
    command_id = response.json()["id"]
    found = wait_until(lambda: [e for e in events_of(served, "result") if e["data"]["id"] == command_id], 30,
                       "the result event")
    assert found[0]["data"]["ok"] is True


def test_a_websocket_command_error_is_answered_to_that_client(served: Served) -> None:
    with served.ws() as ws:
        result = ws_result(ws, {"line": "sav"})
    assert result["ok"] is False and "did you mean 'save'" in result["message"]
