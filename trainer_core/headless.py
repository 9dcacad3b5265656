"""Headless mode: commands from stdin, progress on the terminal, no server.

stdin is read on a daemon thread so the loop never blocks on it, whether it is a TTY, a pipe
or a file; EOF simply ends the reader (it is not a quit, and nothing spins). Lines already
waiting when the run starts are applied before the first step, so
``echo eval_quit | traindeck train --resume`` evaluates the latest checkpoint and exits.
"""

from __future__ import annotations

import collections
import select
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

from trainer_core.channel import CommandRequest, NullChannel
from trainer_core.config import Config
from trainer_core.progress import format_duration

PRIME_TIMEOUT_S = 1.0
TTY_REFRESH_S = 0.25
LINE_MIN_INTERVAL_S = 1.0
BAR_WIDTH = 24


class StdinChannel:
    """A Channel fed by stdin lines and printing to a terminal or a log."""

    def __init__(self, stdin: TextIO | None, out: TextIO, *, log_every: int = 10) -> None:
        self.out = out
        self.tty = out.isatty()
        self.log_every = log_every
        self._lines: collections.deque[str] = collections.deque()
        self._count = 0
        self._primed = threading.Event()
        self._last_metrics: dict[str, Any] | None = None
        self._last_status: dict[str, Any] = {}
        self._next_draw = 0.0
        self._bar_shown = False
        self._reader: threading.Thread | None = None
        if stdin is not None and not stdin.closed:
            self._start_reader(stdin)
        else:
            self._primed.set()

    def _start_reader(self, stdin: TextIO) -> None:
        try:
            ready = bool(select.select([stdin], [], [], 0)[0])
        except (OSError, ValueError):
            ready = False
        if not ready:
            self._primed.set()
        self._reader = threading.Thread(target=self._read, args=(stdin,), name="traindeck-stdin", daemon=True)
        self._reader.start()

    def _read(self, stdin: TextIO) -> None:
        try:
            for line in stdin:
                line = line.strip()
                if line:
                    self._lines.append(line)
                self._primed.set()
        except (OSError, ValueError):
            pass
        self._primed.set()

    # -- Channel -------------------------------------------------------------------------------

    def poll(self) -> list[CommandRequest]:
        if not self._primed.is_set():
            self._primed.wait(PRIME_TIMEOUT_S)
        requests = []
        while self._lines:
            self._count += 1
            requests.append(CommandRequest(f"stdin-{self._count}", self._lines.popleft()))
        return requests

    def send(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        if kind == "metrics":  # every step: only what it takes to know whether a line is due
            if "train/loss" in message["values"]:
                self._last_metrics = message
                if self.tty or (self.log_every and message["step"] % self.log_every == 0):
                    self._maybe_draw()
        elif kind == "status":
            self._last_status = message
        elif kind == "result":
            self._print_result(message)
        elif kind == "event":
            self._print_event(message)
        elif kind == "crash":
            self._println(f"trainer crashed:\n{message['traceback']}")

    def send_many(self, messages: list[dict[str, Any]]) -> None:
        for message in messages:
            self.send(message)

    def close(self) -> None:
        if self._bar_shown:
            self._draw(force_newline=True)

    # -- output --------------------------------------------------------------------------------

    def _maybe_draw(self) -> None:
        """Draw when the last draw is old enough: a fast loop would otherwise fill a log with lines."""
        now = time.monotonic()
        if now >= self._next_draw:
            self._next_draw = now + (TTY_REFRESH_S if self.tty else LINE_MIN_INTERVAL_S)
            self._draw()

    def _draw(self, force_newline: bool = False) -> None:
        metrics = self._last_metrics
        if metrics is None:
            return
        status = self._last_status
        step, total = metrics["step"], status.get("iterations") or 0
        values = metrics["values"]
        rate = values.get("train/steps_per_s", 0.0)
        eta = (total - step) / rate if rate > 0 and total else None
        text = f"step {step}/{total} loss {values['train/loss']:.4f} {rate:.1f} steps/s ETA {format_duration(eta)}"
        if self.tty:
            filled = int(BAR_WIDTH * step / total) if total else 0
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            self.out.write(f"\r[{bar}] {text}\033[K" + ("\n" if force_newline else ""))
            self._bar_shown = not force_newline
        else:
            self.out.write(text + "\n")
        self.out.flush()

    def _println(self, text: str) -> None:
        if self.tty and self._bar_shown:
            self.out.write("\r\033[K")
            self._bar_shown = False
        self.out.write(text + "\n")
        self.out.flush()

    def _print_result(self, result: dict[str, Any]) -> None:
        if str(result.get("id", "")).startswith("auto-"):
            return
        prefix = f"[step {result['step']}] {result['command']}: "
        self._println(prefix + (result["message"] if result["ok"] else f"error: {result['message']}"))

    def _print_event(self, event: dict[str, Any]) -> None:
        data = event.get("data", {})
        if event["kind"] == "alert":
            self._println(f"[step {event['step']}] {data.get('level', 'warning')}: {data.get('message')}")
        elif event["kind"] == "checkpoint":
            self._println(f"[step {event['step']}] checkpoint {data.get('path')}")
        elif event["kind"] == "eval":
            shown = ", ".join(f"{k}={v:.4g}" for k, v in data.get("metrics", {}).items())
            self._println(f"[step {event['step']}] eval: {shown}")
        elif event["kind"] == "start" and data.get("resume_from"):
            self._println(f"resumed from {data['resume_from']}")


def run_headless(recipe: str, config: Config, run_dir: Path, *, resume: bool) -> int:
    from trainer_core import distributed
    from trainer_core.train import run

    if not distributed.is_leader():
        return run(recipe, config, Path(run_dir), resume=resume, channel=NullChannel())
    print(f"Run directory: {run_dir}", flush=True)
    channel = StdinChannel(sys.stdin, sys.stdout, log_every=config.trainer.log_every)
    return run(recipe, config, Path(run_dir), resume=resume, channel=channel)
