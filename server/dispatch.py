"""From a request (REST, WebSocket, stdin) to a command sent to the trainer and its result.

The server parses every command before it reaches the pipe, so a typo is answered at once
with the parser's message (422) and never costs the trainer a step. What travels down the
pipe is the canonical line of the parsed command.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from server.supervisor import NotRunning, Supervisor, TrainerGone
from trainer_core.commands import Command, CommandError, from_name, from_request, parse


class CommandRejected(Exception):
    """A command that cannot be run now; ``status_code`` is the HTTP status that says why."""

    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


def parse_line(line: object) -> Command:
    try:
        return parse(line)  # type: ignore[arg-type]
    except CommandError as exc:
        raise CommandRejected(422, str(exc)) from None


def parse_named(name: str, body: Mapping[str, Any] | None) -> Command:
    try:
        return from_name(name, body)
    except CommandError as exc:
        raise CommandRejected(422, str(exc)) from None


def parse_request(obj: object) -> Command:
    try:
        return from_request(obj)
    except CommandError as exc:
        raise CommandRejected(422, str(exc)) from None


def send(supervisor: Supervisor | None, command: Command, source: str) -> tuple[str, asyncio.Future[dict[str, Any]]]:
    if supervisor is None:
        raise CommandRejected(409, "read-only view: this server does not drive a trainer")
    try:
        return supervisor.submit(command.to_line(), source)
    except NotRunning as exc:
        raise CommandRejected(409, str(exc)) from None


async def execute(supervisor: Supervisor | None, command: Command, source: str,
                  wait_s: float) -> tuple[int, dict[str, Any]]:
    """(200, result) · (422, result) when the trainer refused it · (202, pending) past ``wait_s``."""
    command_id, future = send(supervisor, command, source)
    try:
        result = await asyncio.wait_for(asyncio.shield(future), wait_s) if wait_s > 0 else None
    except TimeoutError:
        result = None
    except TrainerGone as exc:
        raise CommandRejected(409, str(exc)) from None
    if result is None:
        return 202, {"id": command_id, "command": command.to_line(), "state": "pending",
                     "detail": f"no result within {wait_s:g} s; it will arrive as a 'result' event"}
    body = {k: v for k, v in result.items() if k != "type"}
    if not body.get("ok", False):
        body["detail"] = body.get("message", "the trainer refused the command")
        return 422, body
    return 200, body
