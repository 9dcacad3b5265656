"""Real `traindeck serve` / `traindeck view` processes for the browser tests.

Each process runs in its own session (process group) so teardown can stop the server and the
trainer it spawned; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, urlparse

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD_LINE = re.compile(r"Dashboard: (http://\S+)")
START_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0

# A small, quick demo that keeps running for the whole suite: constant lr so a changed lr shows
# unchanged on the lr chart, no periodic saves or evals so the tests decide what happens.
DEMO_SETTINGS = (
    "trainer.iterations=1000000",
    "trainer.save_frequency=0",
    "trainer.eval_frequency=0",
    "trainer.log_every=0",
    "trainer.status_every_s=0.5",
    "optimizer.schedule=constant",
    "optimizer.warmup_steps=0",
    "recipe.dim=16",
    "recipe.layers=1",
    "recipe.items=512",
    "recipe.eval_items=32",
)


def traindeck_command() -> list[str]:
    """The console script next to this interpreter, or the module when it is not installed."""
    script = Path(sys.executable).with_name("traindeck")
    return [str(script)] if script.exists() else [sys.executable, "-m", "server.cli"]


def serve_args(run_dir: Path, *, recipe: str = "demo", port: int = 0, token: str | None = None,
               resume: bool = False, settings: tuple[str, ...] = DEMO_SETTINGS) -> list[str]:
    args = ["serve", recipe, "--port", str(port), "--run-dir", str(run_dir)]
    if token:
        args.append(f"--token={token}")
    if resume:
        args.append("--resume")
    for setting in settings:
        args += ["--set", setting]
    return args


@dataclass
class Server:
    """One running server; `url` is the Dashboard link it printed (with its token)."""

    proc: subprocess.Popen[str]
    url: str
    output: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def base(self) -> str:
        parts = urlparse(self.url)
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def port(self) -> int:
        port = urlparse(self.url).port
        assert port is not None, self.url
        return port

    @property
    def token(self) -> str:
        return parse_qs(urlparse(self.url).query)["token"][0]

    def log(self) -> str:
        return "".join(self.output[-60:])

    def request(self, path: str, method: str = "GET") -> dict[str, object]:
        headers = {"Authorization": f"Bearer {self.token}"}
        request = urllib.request.Request(f"{self.base}{path}", headers=headers, method=method)
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())

    def status(self) -> dict[str, object]:
        return self.request("/api/status")

    def wait_for_state(self, *states: str, timeout: float = START_TIMEOUT_S) -> dict[str, object]:
        """Poll /api/status until the trainer is in one of `states` (the first start imports torch)."""
        deadline = time.monotonic() + timeout
        last: dict[str, object] = {}
        while time.monotonic() < deadline:
            try:
                last = self.status()
            except (OSError, urllib.error.URLError, ValueError):
                last = {}
            if last.get("state") in states:
                return last
            time.sleep(0.2)
        raise TimeoutError(f"trainer not {'/'.join(states)} within {timeout:.0f} s (last status {last}):\n{self.log()}")

    def stop(self) -> None:
        stop_process(self.proc)
        if self.reader is not None:
            self.reader.join(STOP_TIMEOUT_S)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def start(args: list[str], timeout: float = START_TIMEOUT_S, env: dict[str, str] | None = None) -> Server:
    """Start `traindeck ARGS` and wait (bounded) for its Dashboard line."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(
        [*traindeck_command(), *args], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    output: list[str] = []
    found: list[str] = []
    ready = threading.Event()

    def drain() -> None:
        # Keep reading for the whole life of the process so a full pipe never blocks the server.
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            match = DASHBOARD_LINE.search(line)
            if match and not found:
                found.append(match.group(1))
                ready.set()
        ready.set()

    reader = threading.Thread(target=drain, name="traindeck-output", daemon=True)
    reader.start()
    if not ready.wait(timeout) or not found:
        Server(proc=proc, url="", output=output, reader=reader).stop()
        raise RuntimeError(f"traindeck {' '.join(args)} printed no Dashboard line within {timeout:.0f} s:\n"
                           + "".join(output[-60:]))
    return Server(proc=proc, url=found[0], output=output, reader=reader)


def stop_process(proc: subprocess.Popen[str]) -> None:
    """SIGTERM (the server saves and stops its trainer), then SIGKILL for the whole group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT_S)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(STOP_TIMEOUT_S)
