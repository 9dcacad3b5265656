"""The parent side of the trainer: spawn it, watch it, talk to it, restart it, stop it.

One trainer process (rank 0, the one holding the pipe) at a time. Its state is derived from
what it reports and how it ends:

``starting``  spawned, no status yet · ``running``/``paused``  as the trainer reports ·
``finished``  reached ``trainer.iterations`` · ``stopped``  quit on request ·
``crashed``   died with a non-zero exit code or a signal (``exit_code`` -9 for SIGKILL).

Process ends are noticed by a thread blocked on the process sentinel (immediately, not by
polling), after the pipe has delivered everything the trainer wrote before dying, so the
crash report and final events are never lost to a race.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import multiprocessing
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from multiprocessing.process import BaseProcess
from typing import Any

from server.protocol import TrainerLink
from server.trainer_process import TrainerSpec, main

STARTING, RUNNING, PAUSED = "starting", "running", "paused"
STOPPED, FINISHED, CRASHED = "stopped", "finished", "crashed"
ALIVE_STATES = frozenset({STARTING, RUNNING, PAUSED})
PIPE_DRAIN_S = 1.0
TERM_GRACE_S = 5.0
KILL_WAIT_S = 5.0

Listener = Callable[[dict[str, Any]], None]
spawn = multiprocessing.get_context("spawn")


class NotRunning(RuntimeError):
    """A command or restart that needs a different trainer state; the message says which."""


class TrainerGone(RuntimeError):
    """The trainer exited before answering a command."""


@contextlib.contextmanager
def sigint_ignored() -> Iterator[None]:
    """Let the spawned child start with SIGINT ignored (inherited through exec, kept by Python)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class Supervisor:
    """Owns the trainer process; all methods run on the event loop's thread."""

    def __init__(self, spec: TrainerSpec, *, quit_timeout_s: float = 60.0, term_grace_s: float = TERM_GRACE_S) -> None:
        self.spec = spec
        self.quit_timeout_s = quit_timeout_s
        self.term_grace_s = term_grace_s
        self.listeners: list[Listener] = []
        self.state = STOPPED
        self.restarts = -1
        self.exit_code: int | None = None
        self.signal: str | None = None
        self.traceback: str | None = None
        self.started_at: float | None = None
        self.ended_at: float | None = None
        self._trainer_status: dict[str, Any] = {}
        self._finish_reason: str | None = None
        self._proc: BaseProcess | None = None
        self._link: TrainerLink | None = None
        self._generation = 0
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._exited = asyncio.Event()
        self._exited.set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- queries ---------------------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.exitcode is None and not self._exited.is_set()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def status(self) -> dict[str, Any]:
        """The trainer's last status merged with what only the supervisor knows."""
        merged = {k: v for k, v in self._trainer_status.items() if k != "type"}
        merged.update(
            state=self.state,
            pid=self.pid,
            exit_code=self.exit_code,
            signal=self.signal,
            traceback=self.traceback,
            restarts=max(self.restarts, 0),
            started_at=self.started_at,
            ended_at=self.ended_at,
            run_dir=self.spec.run_dir,
            read_only=False,
        )
        merged.setdefault("step", 0)
        merged.setdefault("iterations", self.spec.config.get("trainer", {}).get("iterations"))
        return merged

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, resume: bool | None = None) -> None:
        """Spawn the trainer (``resume`` defaults to the spec's); NotRunning if one is alive."""
        if self.alive:
            raise NotRunning(f"the trainer is already {self.state} (pid {self.pid})")
        self._loop = asyncio.get_running_loop()
        spec = self.spec if resume is None else dataclasses.replace(self.spec, resume=resume)
        self._generation += 1
        generation = self._generation
        parent_end, child_end = spawn.Pipe(duplex=True)
        proc = spawn.Process(target=main, args=(child_end, spec), name="traindeck-trainer", daemon=False)
        with sigint_ignored():
            proc.start()
        child_end.close()
        self._proc = proc
        self._exited.clear()
        self.restarts += 1
        self.state, self.exit_code, self.signal, self.traceback = STARTING, None, None, None
        self.started_at, self.ended_at = time.time(), None
        self._finish_reason = None
        link_closed = threading.Event()
        loop = self._loop

        def on_batch(batch: list[dict[str, Any]]) -> None:
            loop.call_soon_threadsafe(self._on_batch, generation, batch)

        def on_closed() -> None:
            link_closed.set()

        self._link = TrainerLink(parent_end, on_batch, on_closed)
        threading.Thread(target=self._watch, args=(proc, generation, link_closed), name="traindeck-watch",
                         daemon=True).start()
        self._publish_status()

    async def restart(self) -> None:
        """Start again with resume; a trainer that already ended its loop is given time to exit."""
        if self.state in ALIVE_STATES:
            raise NotRunning(f"the trainer is {self.state} (pid {self.pid}); quit it first")
        if self.alive and not await self.wait_exit(self.quit_timeout_s):
            raise NotRunning(f"the trainer (pid {self.pid}) has not exited yet")
        self.start(resume=True)

    def request_quit(self) -> bool:
        """Ask the trainer to save (if configured) and exit; False when there is none to ask."""
        return self._link is not None and self.alive and self._link.send_quit()

    async def wait_exit(self, timeout: float | None) -> bool:
        try:
            await asyncio.wait_for(self._exited.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self, timeout: float | None = None) -> None:
        """Quit politely, then SIGTERM, then SIGKILL; returns once the trainer is gone."""
        if not self.alive:
            return
        self.request_quit()
        if await self.wait_exit(self.quit_timeout_s if timeout is None else timeout):
            return
        if self._proc is not None and self._proc.exitcode is None:
            self._proc.terminate()
        if await self.wait_exit(self.term_grace_s):
            return
        self.abort()
        await self.wait_exit(KILL_WAIT_S)

    def abort(self) -> None:
        """SIGKILL the trainer now (a second Ctrl-C)."""
        if self._proc is not None and self._proc.exitcode is None:
            with contextlib.suppress(OSError):
                self._proc.kill()

    def ensure_stopped(self) -> None:
        """Last line of defence when the event loop is gone: never leave an orphan behind."""
        proc = self._proc
        if proc is None or proc.exitcode is not None:
            return
        if self._link is not None:
            self._link.send_quit()
        proc.join(self.quit_timeout_s)
        if proc.exitcode is None:
            proc.kill()
            proc.join(KILL_WAIT_S)

    # -- commands --------------------------------------------------------------------------------

    def submit(self, line: str, source: str) -> tuple[str, asyncio.Future[dict[str, Any]]]:
        """Send one command line; the future resolves with the trainer's result message."""
        if self.state not in ALIVE_STATES or self._link is None:
            raise NotRunning(f"the trainer is not running (state: {self.state})")
        command_id = f"{source}-{uuid.uuid4().hex[:12]}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[command_id] = future
        if not self._link.send_command(command_id, line):
            del self._pending[command_id]
            raise NotRunning("the trainer's pipe is closed")
        return command_id, future

    # -- messages from the trainer (event loop thread) -----------------------------------------

    def _on_batch(self, generation: int, batch: list[dict[str, Any]]) -> None:
        if generation != self._generation:
            return
        for message in batch:
            kind = message.get("type")
            if kind == "status":
                self._on_status(message)
                continue
            if kind == "crash":
                self.traceback = str(message.get("traceback", ""))
                continue
            if kind == "result":
                future = self._pending.pop(str(message.get("id")), None)
                if future is not None and not future.done():
                    future.set_result(message)
            elif kind == "event" and message.get("kind") == "finish":
                self._finish_reason = str((message.get("data") or {}).get("reason", "finished"))
            self._emit(message)

    def _on_status(self, message: dict[str, Any]) -> None:
        self._trainer_status = message
        reported = message.get("state")
        if self.state in ALIVE_STATES:
            if reported in (RUNNING, PAUSED):
                self.state = reported
            elif reported in (FINISHED, STOPPED):
                self.state = FINISHED if self._finish_reason in (None, FINISHED) else STOPPED
        self._publish_status()

    def _watch(self, proc: BaseProcess, generation: int, link_closed: threading.Event) -> None:
        proc.join()
        exit_code = proc.exitcode
        deadline = time.monotonic() + PIPE_DRAIN_S
        while exit_code is None and time.monotonic() < deadline:
            # another thread's poll() may be reaping the child right now; its code is set just after
            time.sleep(0.01)
            exit_code = proc.exitcode
        link_closed.wait(PIPE_DRAIN_S)  # let the reader hand over what the trainer wrote last
        if self._loop is not None and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._on_exit, generation, exit_code)

    def _on_exit(self, generation: int, exit_code: int | None) -> None:
        if generation != self._generation:
            return
        self.exit_code = exit_code
        self.ended_at = time.time()
        if exit_code is not None and exit_code < 0:
            self.signal = signal.Signals(-exit_code).name
        if exit_code == 0:
            self.state = FINISHED if self._finish_reason in (None, FINISHED) else STOPPED
        else:
            self.state = CRASHED
        if self._link is not None:
            self._link.close()
        gone = TrainerGone(f"the trainer exited (code {exit_code}) before answering")
        for future in self._pending.values():
            if not future.done():
                future.set_exception(gone)
                future.exception()  # nobody may be waiting: mark it retrieved
        self._pending.clear()
        self._exited.set()
        self._publish_status()

    # -- fan-out ---------------------------------------------------------------------------------

    def _publish_status(self) -> None:
        self._emit({"type": "status", **self.status()})

    def _emit(self, message: dict[str, Any]) -> None:
        for listener in list(self.listeners):
            listener(message)
