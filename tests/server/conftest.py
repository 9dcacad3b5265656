"""A real `traindeck serve` (uvicorn on a free loopback port, a spawned trainer) for the server tests.

One demo run is shared by the whole session (``served``); it is paused once it has a few steps
of history so it does not burn the CPU the other tests need. Tests that change the run's
fate (kill, quit, signals) start their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection, connect

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120.0
PR_SET_PDEATHSIG = 1
DASHBOARD_RE = re.compile(r"Dashboard: (http://([^/]+))/\?token=(\S+)")
TINY = ["--set", "trainer.iterations=1000000", "--set", "trainer.save_frequency=0", "--set", "trainer.eval_frequency=0",
        "--set", "trainer.status_every_s=0.2", "--set", "recipe.items=512", "--set", "recipe.eval_items=16"]


# One intra-op thread: the demo model is tiny, and on a small shared machine several processes
# spinning two OpenMP threads each slow every step down by orders of magnitude.
TEST_ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def die_with_parent() -> None:
    """In the child before exec: SIGTERM it if the test process dies (no server outlives a killed run)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


class Served:
    """`python -m server.cli ARGS` in its own session, with its output collected line by line."""

    def __init__(self, args: list[str], *, cwd: Path = REPO) -> None:
        self.args = args
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", *args],
            cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True, env={**os.environ, **TEST_ENV}, preexec_fn=die_with_parent,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers = [threading.Thread(target=self._collect, args=(stream, sink), daemon=True)
                         for stream, sink in ((self.proc.stdout, self.stdout), (self.proc.stderr, self.stderr))]
        for thread in self._readers:
            thread.start()
        match = wait_until(self._dashboard, START_TIMEOUT_S, "the Dashboard line")
        self.base, self.hostport, self.token = match.group(1), match.group(2), match.group(3)
        self.port = int(self.hostport.rsplit(":", 1)[1])
        self.ws_url = self.base.replace("http://", "ws://") + "/ws"

    @staticmethod
    def _collect(stream: Any, sink: list[str]) -> None:
        for raw in iter(stream.readline, b""):
            sink.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def _dashboard(self) -> re.Match[str] | None:
        if self.proc.poll() is not None:
            raise AssertionError(f"server exited with {self.proc.returncode}: {self.stderr}")
        for line in self.stdout:
            match = DASHBOARD_RE.search(line)
            if match:
                return match
        return None

    # -- HTTP / WebSocket ------------------------------------------------------------------------

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def http(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers=self.auth, timeout=90, **kwargs)

    def ws(self, **kwargs: Any) -> ClientConnection:
        kwargs.setdefault("open_timeout", 30)
        return connect(self.ws_url, additional_headers=self.auth, **kwargs)

    def status(self) -> dict[str, Any]:
        with self.http() as client:
            return client.get("/api/status").json()

    def wait_state(self, states: set[str] | str, timeout: float = 60) -> dict[str, Any]:
        wanted = {states} if isinstance(states, str) else states
        return wait_until(lambda: (s := self.status())["state"] in wanted and s, timeout, f"state in {wanted}")

    def wait_ended(self, state: str, timeout: float = 90) -> dict[str, Any]:
        """``state`` reached and the trainer process gone (its exit code known)."""
        return wait_until(lambda: (s := self.status())["state"] == state and s["exit_code"] is not None and s,
                          timeout, f"the trainer to end as {state}")

    def wait_step(self, step: int, timeout: float = 90) -> dict[str, Any]:
        return wait_until(lambda: (s := self.status())["step"] >= step and s, timeout, f"step {step}")

    def command(self, name: str, body: dict[str, Any] | None = None, **params: Any) -> httpx.Response:
        with self.http() as client:
            return client.post(f"/command/{name}", json=body, params=params)

    # -- process ---------------------------------------------------------------------------------

    def type(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def wait_output(self, pattern: str, timeout: float = 60, stream: str = "stdout") -> str:
        regex = re.compile(pattern)
        lines = self.stdout if stream == "stdout" else self.stderr
        return wait_until(lambda: next((line for line in list(lines) if regex.search(line)), None), timeout,
                          f"{pattern!r} on {stream}")

    def signal(self, sig: int, group: bool = False) -> None:
        if group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)

    def wait_exit(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        """Stop the server (and so its trainer); kill everything left in its session if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(90)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(10)
        for thread in self._readers:
            thread.join(10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes (its parent has not reaped it yet).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def session_members(sid: int) -> list[int]:
    """Live processes whose session is ``sid`` (the server was started as a session leader)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(entry.name))
    return members


def no_orphans(sid: int) -> None:
    """Nothing of the server's session outlives it (multiprocessing's resource tracker needs a moment
    to notice its last user is gone, so allow it that)."""
    wait_until(lambda: session_members(sid) == [], 15, f"every process of session {sid} to exit")


def events_of(served: Served, kind: str, since_id: int = 0) -> list[dict[str, Any]]:
    with served.http() as client:
        return [e for e in client.get("/api/events", params={"since_id": since_id, "limit": 10000}).json()
                if e["kind"] == kind]


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The shared demo run: a few steps of history, then paused (commands still answer)."""
    run_dir = tmp_path_factory.mktemp("shared") / "run"
    server = Served(["serve", "demo", "--port", "0", "--run-dir", str(run_dir), *TINY])
    try:
        server.wait_step(3)
        assert server.command("pause").status_code == 200
        server.wait_state("paused")
        yield server
    finally:
        server.close()


class InProcessServer:
    """The real app under a real uvicorn on a free loopback port, in a thread of this process.

    For tests that need a message rate no trainer on a shared test machine can be relied on
    to produce: they publish straight into the hub with :meth:`publish`.
    """

    def __init__(self, run_dir: Path, **settings: Any) -> None:
        from server.app import create_app
        from server.serve import Server, bind_socket, uvicorn_config
        from server.settings import ServerSettings

        self.sock = bind_socket("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.settings = ServerSettings(token="test-token", run_dir=run_dir, port=self.port, read_only=True,
                                       run_name="inprocess", version="test", **settings)
        self.app = create_app(self.settings)
        self.server = Server(uvicorn_config(self.app, self.settings), on_stop=lambda: None, on_abort=lambda: None)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="inprocess-uvicorn", daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, 30, "uvicorn to start")
        self.base = f"http://127.0.0.1:{self.port}"
        self.hostport = f"127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"
        self.token = self.settings.token

    def _run(self) -> None:
        self.loop.run_until_complete(self.server.serve(sockets=[self.sock]))
        self.loop.close()

    @property
    def hub(self) -> Any:
        return self.app.state.ctx.hub

    def publish(self, messages: list[dict[str, Any]]) -> None:
        def fan_out() -> None:
            for message in messages:
                self.hub.broadcast(message)

        self.loop.call_soon_threadsafe(fan_out)

    def on_loop(self, fn: Callable[[], Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(_call(fn), self.loop).result(30)

    def ws(self, **kwargs: Any) -> ClientConnection:
        kwargs.setdefault("open_timeout", 30)
        return connect(self.ws_url, additional_headers={"Authorization": f"Bearer {self.token}"}, **kwargs)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


async def _call(fn: Callable[[], Any]) -> Any:
    return fn()


@pytest.fixture
def inprocess(tmp_path: Path) -> Iterator[InProcessServer]:
    server = InProcessServer(tmp_path)
    try:
        yield server
    finally:
        server.close()


def next_message(ws: ClientConnection, kind: str, timeout: float = 60) -> dict[str, Any]:
    """The next message of type ``kind`` (status snapshots and live metrics arrive in between)."""
    deadline = time.monotonic() + timeout
    while True:
        message = json.loads(ws.recv(timeout=max(deadline - time.monotonic(), 0.01)))
        if message["type"] == kind:
            return message
