"""The terminal side of ``traindeck serve``: commands typed on stdin, and what the user should see.

Stdin uses the same grammar as the browser. Each typed command's result is printed when it
arrives; so are the trainer's starts and ends (with the traceback when it crashed).
"""

from __future__ import annotations

import asyncio
from typing import Any

from server import dispatch
from server.serve import say
from server.supervisor import CRASHED, FINISHED, STARTING, STOPPED, Supervisor

END_STATES = frozenset({STOPPED, FINISHED, CRASHED})


def format_result(result: dict[str, Any]) -> str:
    mark = "ok" if result.get("ok") else "error"
    message = str(result.get("message", ""))
    if "\n" in message:
        return f"[{mark}] {result.get('command')}:\n{message}"
    return f"[{mark}] {result.get('command')}: {message}"


class Console:
    def __init__(self, supervisor: Supervisor, loop: asyncio.AbstractEventLoop) -> None:
        self.supervisor = supervisor
        self.loop = loop
        self._announced: set[tuple[str, Any]] = set()
        self.shutting_down = False

    def on_line(self, line: str) -> None:
        """Called on the stdin thread."""
        if line.strip():
            self.loop.call_soon_threadsafe(self.submit, line.strip())

    def submit(self, line: str) -> None:
        try:
            command = dispatch.parse_line(line)
            _, future = dispatch.send(self.supervisor, command, "stdin")
        except dispatch.CommandRejected as exc:
            say(f"[error] {line}: {exc.detail}")
            return
        future.add_done_callback(self._answered)

    def _answered(self, future: asyncio.Future[dict[str, Any]]) -> None:
        if future.cancelled():
            return
        exc = future.exception()
        say(f"[error] {exc}" if exc is not None else format_result(future.result()))

    def on_message(self, message: dict[str, Any]) -> None:
        if message.get("type") != "status":
            return
        state, pid = message.get("state"), message.get("pid")
        if state == STARTING and ("start", pid) not in self._announced:
            self._announced.add(("start", pid))
            say(f"trainer starting (pid {pid})")
        elif state in END_STATES and message.get("exit_code") is not None and ("end", pid) not in self._announced:
            self._announced.add(("end", pid))
            self._report_end(message)

    def _report_end(self, status: dict[str, Any]) -> None:
        code = status.get("exit_code")
        if status.get("state") != CRASHED:
            say(f"trainer {status.get('state')} at step {status.get('step')} (exit code {code})")
            return
        signal_name = status.get("signal")
        how = f"exit code {code}" + (f", {signal_name}" if signal_name else "")
        hint = "" if self.shutting_down else "; POST /run/restart resumes it"
        say(f"trainer crashed at step {status.get('step')} ({how}){hint}", err=True)
        if status.get("traceback"):
            say(str(status["traceback"]).rstrip(), err=True)
