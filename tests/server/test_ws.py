"""The live WebSocket of a served run: snapshot, live metrics, slow readers, bad and oversized input."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from tests.server.conftest import InProcessServer, Served, next_message, wait_until


def recv_json(ws: Any, timeout: float = 30) -> dict[str, Any]:
    return json.loads(ws.recv(timeout=timeout))


@contextmanager
def running(served: Served) -> Iterator[None]:
    """Let the shared run train for the duration of the block, then pause it again."""
    assert served.command("resume").status_code == 200
    try:
        yield
    finally:
        assert served.command("pause").status_code == 200
        served.wait_state("paused")


@contextmanager
def stalled_client(server: Served | InProcessServer) -> Iterator[socket.socket]:
    """A WebSocket client that completes the handshake and then never reads (tiny receive buffer)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.settimeout(30)
    sock.connect(("127.0.0.1", server.port))
    key = base64.b64encode(os.urandom(16)).decode()
    request = (f"GET /ws HTTP/1.1\r\nHost: {server.hostport}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
               f"Authorization: Bearer {server.token}\r\n\r\n")
    sock.sendall(request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101")
    try:
        yield sock
    finally:
        sock.close()


def test_a_new_client_first_gets_a_status_snapshot(served: Served) -> None:
    with served.ws() as ws:
        first = recv_json(ws)
    assert first["type"] == "status" and first["state"] == "paused" and first["pid"] == served.status()["pid"]


def test_live_metrics_reach_the_client_while_training(served: Served) -> None:
    with served.ws() as ws, running(served):
        metrics = next_message(ws, "metrics")
    assert metrics["step"] >= 1 and "train/loss" in metrics["values"]


def publish_paced(server: InProcessServer, messages: list[dict[str, Any]], per_tick: int) -> None:
    """Publish like a trainer does: small batches every 10 ms."""
    for start in range(0, len(messages), per_tick):
        server.publish(messages[start:start + per_tick])
        time.sleep(0.01)


def test_a_stalled_client_is_thinned_then_dropped_without_blocking_another(inprocess: InProcessServer) -> None:
    n_metrics, n_events = 3000, 2500
    received: list[dict[str, Any]] = []
    with stalled_client(inprocess), inprocess.ws() as live:
        assert recv_json(live)["type"] == "status"
        wait_until(lambda: inprocess.on_loop(lambda: len(inprocess.hub.clients)) == 2, 30, "both clients")

        def read() -> None:
            with contextlib.suppress(TimeoutError, ConnectionClosed):
                while not received or received[-1].get("id") != n_events - 1:
                    received.append(recv_json(live, timeout=60))

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        pad = "x" * 300
        publish_paced(inprocess, [{"type": "metrics", "step": step, "time": time.time(), "values": {"loss": 1.0},
                                   "pad": pad} for step in range(n_metrics)], per_tick=10)
        thinned = inprocess.on_loop(inprocess.hub.stats)["ws_dropped_messages"]
        publish_paced(inprocess, [{"type": "event", "id": i, "kind": "lr", "step": i, "data": {}}
                                  for i in range(n_events)], per_tick=25)
        reader.join(120)
        stats = inprocess.on_loop(inprocess.hub.stats)
    steps = [m["step"] for m in received if m["type"] == "metrics"]
    events = [m["id"] for m in received if m["type"] == "event"]
    # the live client got every event, in order, and the metrics in order; it was never dropped
    assert events == list(range(n_events))
    assert steps == sorted(steps) and steps
    assert thinned > 0  # the stalled client lost metrics first ...
    assert stats["ws_dropped_clients"] == 1 and stats["ws_clients"] == 1  # ... then its connection


def test_bad_json_is_refused_and_the_connection_stays_usable(served: Served) -> None:
    with served.ws() as ws:
        ws.send("{not json")
        refusal = next_message(ws, "result")
        assert refusal["type"] == "result" and refusal["ok"] is False and "not valid JSON" in refusal["message"]
        ws.send(json.dumps({"type": "subscribe"}))
        assert "type 'command'" in next_message(ws, "result")["message"]
        ws.send(json.dumps({"type": "command", "line": "status"}))
        answer = next_message(ws, "result")
    assert answer["ok"] is True


def test_an_oversized_message_is_refused_and_a_huge_one_closes_the_socket(served: Served) -> None:
    with served.ws() as ws:
        ws.send(json.dumps({"type": "command", "line": "x" * 20_000}))
        assert "too large" in next_message(ws, "result")["message"]
        ws.send("x" * 200_000)
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


def test_commands_from_one_socket_are_rate_limited(served: Served) -> None:
    with served.ws() as ws:
        recv_json(ws)
        for _ in range(40):
            ws.send(json.dumps({"type": "command", "line": "help"}))
        deadline = time.monotonic() + 60
        refused = 0
        answered = 0
        while answered + refused < 40 and time.monotonic() < deadline:
            message = recv_json(ws)
            if message["type"] == "result" and message["ok"] is False:
                assert "too many commands" in message["message"]
                refused += 1
            elif message["type"] == "result" and message["command"] == "help":
                answered += 1
    assert refused > 0 and answered > 0
