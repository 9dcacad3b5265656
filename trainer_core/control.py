"""Turning command requests into actions, results and events.

Every request — typed on stdin, clicked in the browser, posted over REST or fired by the
scheduler — goes through :meth:`Controller.submit`: it is parsed once, recorded as a
``command`` event, carried out at a step boundary, and answered by exactly one result that is
also recorded. Errors become results too; nothing is applied half-way because every command
validates before it acts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from trainer_core.commands import HELP_TEXT, Command, CommandError, Scheduler, parse
from trainer_core.progress import format_duration


class Actions(Protocol):
    """What the loop offers to commands."""

    step: int
    iterations: int
    paused: bool

    def save(self) -> Path: ...
    def export(self, name: str | None) -> Path: ...
    def evaluate(self) -> dict[str, float]: ...
    def request_quit(self, reason: str) -> None: ...
    def set_paused(self, paused: bool) -> None: ...
    def set_lr(self, value: float) -> float: ...
    def set_loss_scale(self, value: float) -> float: ...
    def eta_s(self, target: int) -> float | None: ...
    def elapsed_s(self) -> float: ...
    def status(self) -> dict[str, Any]: ...


@dataclass
class Outcome:
    ok: bool
    message: str
    data: dict[str, Any] = field(default_factory=dict)


Emit = Callable[[str, dict[str, Any]], Any]
Reply = Callable[[dict[str, Any]], None]


class Controller:
    def __init__(self, actions: Actions, emit_event: Emit, reply: Reply) -> None:
        self.actions = actions
        self.scheduler = Scheduler()
        self._emit_event = emit_event
        self._reply = reply

    def submit(self, request_id: str, line: str, source: str = "stdin") -> dict[str, Any]:
        self._emit_event("command", {"id": request_id, "line": line, "source": source})
        try:
            command = parse(line)
        except CommandError as exc:
            return self._answer(request_id, line, Outcome(False, str(exc)))
        return self.run(request_id, command)

    def run(self, request_id: str, command: Command) -> dict[str, Any]:
        try:
            outcome = self._schedule(command) if command.is_scheduling else self._execute(command)
        except (CommandError, ValueError, OSError) as exc:
            outcome = Outcome(False, str(exc))
        return self._answer(request_id, command.to_line(), outcome)

    def run_due(self) -> None:
        """Fire the scheduled commands whose step has come (cheap when none is due)."""
        for entry in self.scheduler.due(self.actions.step):
            self.run(f"sched-{entry.id}", entry.command)

    def _answer(self, request_id: str, line: str, outcome: Outcome) -> dict[str, Any]:
        result = {
            "type": "result",
            "id": request_id,
            "ok": outcome.ok,
            "command": line,
            "step": self.actions.step,
            "message": outcome.message,
            "data": outcome.data,
        }
        self._emit_event("result", {k: result[k] for k in ("id", "ok", "command", "message", "data")})
        self._reply(result)
        return result

    def _schedule(self, command: Command) -> Outcome:
        entry = self.scheduler.add(command, self.actions.step)
        self._emit_event("schedule", {"id": entry.id, "step": entry.step, "line": entry.command.to_line()})
        line = entry.command.to_line()
        return Outcome(True, f"scheduled '{line}' at step {entry.step} (id {entry.id})", entry.to_dict())

    def _execute(self, cmd: Command) -> Outcome:
        handler = getattr(self, f"_do_{cmd.name}")
        return handler(cmd)

    def _do_save(self, cmd: Command) -> Outcome:
        path = self.actions.save()
        return Outcome(True, f"saved {path}", {"path": str(path)})

    def _do_export(self, cmd: Command) -> Outcome:
        path = self.actions.export(cmd.arg)
        return Outcome(True, f"exported {path}", {"path": str(path)})

    def _do_eval(self, cmd: Command) -> Outcome:
        metrics = self.actions.evaluate()
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()) or "no metrics"
        return Outcome(True, f"eval at step {self.actions.step}: {shown}", {"metrics": metrics})

    def _do_quit(self, cmd: Command) -> Outcome:
        self.actions.request_quit("quit")
        return Outcome(True, f"quitting at step {self.actions.step}")

    def _do_eval_quit(self, cmd: Command) -> Outcome:
        outcome = self._do_eval(cmd)
        self.actions.request_quit("eval_quit")
        return Outcome(True, outcome.message + "; quitting", outcome.data)

    def _do_pause(self, cmd: Command) -> Outcome:
        if self.actions.paused:
            return Outcome(True, f"already paused at step {self.actions.step}")
        self.actions.set_paused(True)
        return Outcome(True, f"paused at step {self.actions.step}")

    def _do_resume(self, cmd: Command) -> Outcome:
        if not self.actions.paused:
            return Outcome(True, "not paused")
        self.actions.set_paused(False)
        return Outcome(True, f"resumed at step {self.actions.step}")

    def _do_lr(self, cmd: Command) -> Outcome:
        assert cmd.value is not None
        lr = self.actions.set_lr(cmd.value)
        return Outcome(True, f"lr set to {lr:.6g}", {"lr": lr})

    def _do_loss_scale(self, cmd: Command) -> Outcome:
        assert cmd.value is not None
        scale = self.actions.set_loss_scale(cmd.value)
        return Outcome(True, f"loss scale set to {scale:.6g}", {"loss_scale": scale})

    def _do_time(self, cmd: Command) -> Outcome:
        target = cmd.target if cmd.target is not None else self.actions.iterations
        if target < self.actions.step:
            raise CommandError(f"time to {target}: step {target} has already passed (at step {self.actions.step})")
        eta = self.actions.eta_s(target)
        elapsed = self.actions.elapsed_s()
        message = f"elapsed {format_duration(elapsed)}; step {target} in {format_duration(eta)}"
        return Outcome(True, message, {"elapsed_s": elapsed, "eta_s": eta, "target": target})

    def _do_status(self, cmd: Command) -> Outcome:
        status = self.actions.status()
        message = f"{status['state']} at step {status['step']}/{status['iterations']}, lr {status['lr']:.6g}"
        return Outcome(True, message, status)

    def _do_help(self, cmd: Command) -> Outcome:
        return Outcome(True, HELP_TEXT)

    def _do_event(self, cmd: Command) -> Outcome:
        if cmd.arg == "show":
            entries = self.scheduler.show()
            lines = [f"{e['id']}: {e['line']} @ step {e['step']}" for e in entries]
            return Outcome(True, "\n".join(lines) or "nothing scheduled", {"scheduled": entries})
        if cmd.arg == "clear":
            count = self.scheduler.clear()
            return Outcome(True, f"cleared {count} scheduled command(s)", {"cleared": count})
        assert cmd.target is not None
        entry = self.scheduler.cancel(cmd.target)
        return Outcome(True, f"cancelled {entry.id}: {entry.command.to_line()} @ step {entry.step}", entry.to_dict())
