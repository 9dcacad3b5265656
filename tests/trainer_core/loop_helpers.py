"""A scripted channel and small configs for driving the real loop in-process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from trainer_core.channel import CommandRequest
from trainer_core.recipe import resolve_config
from trainer_core.train import run

SMALL_DEMO = (
    "recipe.items=192",
    "recipe.eval_items=32",
    "recipe.dim=32",
    "recipe.layers=1",
    "recipe.heads=2",
    "recipe.max_len=24",
    "data.max_tokens=384",
    "trainer.save_frequency=0",
    "trainer.eval_frequency=0",
    "trainer.log_every=0",
    "optimizer.warmup_steps=2",
)


def small_config(*overrides: str, recipe: str = "demo") -> Any:
    return resolve_config(recipe, None, [*SMALL_DEMO, *overrides])


class ScriptedChannel:
    """Injects command lines when the run reaches given steps; records every message."""

    def __init__(self, script: list[tuple[int, str]] | None = None) -> None:
        self.script = sorted(script or [], key=lambda item: item[0])
        self.sent: list[dict[str, Any]] = []
        self.step = 0
        self.closed = False
        self._count = 0

    def poll(self) -> list[CommandRequest]:
        due = [line for at, line in self.script if at <= self.step]
        self.script = [(at, line) for at, line in self.script if at > self.step]
        requests = []
        for line in due:
            self._count += 1
            requests.append(CommandRequest(f"t-{self._count}", line))
        return requests

    def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)
        if message.get("type") == "metrics":
            self.step = max(self.step, message["step"])

    def send_many(self, messages: list[dict[str, Any]]) -> None:
        for message in messages:
            self.send(message)

    def close(self) -> None:
        self.closed = True

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [m for m in self.sent if m.get("type") == kind]

    def results(self) -> list[dict[str, Any]]:
        return self.of_type("result")

    def result_for(self, command_prefix: str) -> dict[str, Any]:
        for result in self.results():
            if result["command"].startswith(command_prefix) and not str(result["id"]).startswith("auto-"):
                return result
        raise AssertionError(f"no result for {command_prefix!r}: {[r['command'] for r in self.results()]}")


def train(run_dir: Path, config: Any, script: list[tuple[int, str]] | None = None, *, resume: bool = False,
          recipe: str = "demo") -> tuple[int, ScriptedChannel]:
    channel = ScriptedChannel(script)
    code = run(recipe, config, run_dir, resume=resume, channel=channel, install_signal_handlers=False)
    return code, channel
