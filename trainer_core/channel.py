"""The training loop's only window on the outside world.

The loop never knows whether it is driven by a terminal, by the server's pipe or by a test:
it polls a :class:`Channel` for command requests and hands it messages. Messages are plain
JSON-serialisable dicts so they can cross a pipe and reach a browser unchanged.

Message types (trainer -> outside), each a dict with a ``"type"`` key:

``metrics``  ``{"step": int, "time": float, "values": {name: float}}`` — may be coalesced or
             dropped by a slow transport (the store keeps every value anyway).
``status``   ``{"state": "running"|"paused"|"finished"|"stopped", "step", "iterations", "lr", "eta_s",
             "steps_per_s", "epoch", "last_checkpoint", "scheduled": [...], "pid"}``
``event``    ``{"id": int, "time": float, "step": int, "kind": str, "data": dict}`` — the same
             row that goes to the store's ``events`` table; never dropped.
``result``   ``{"id": str, "ok": bool, "command": str, "step": int, "message": str,
             "data": dict}`` — the answer to one command request; never dropped.
``crash``    ``{"traceback": str}`` — sent once when the loop dies of an exception.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

METRICS = "metrics"
STATUS = "status"
EVENT = "event"
RESULT = "result"
CRASH = "crash"

# Messages a transport may coalesce or drop under back-pressure; everything else is kept.
DROPPABLE_TYPES = frozenset({METRICS, STATUS})


@dataclass(frozen=True)
class CommandRequest:
    """One command line to apply, with the id its result will carry."""

    id: str
    line: str


class Channel(Protocol):
    """What the loop needs from whoever drives it."""

    def poll(self) -> list[CommandRequest]:
        """Command requests that arrived since the last call; never blocks."""
        ...

    def send(self, message: dict[str, Any]) -> None:
        """Queue a message for the outside; never blocks the loop."""
        ...

    def send_many(self, messages: list[dict[str, Any]]) -> None:
        """``send`` each of ``messages`` in order: the loop hands over a poll's worth of metrics at once."""
        ...

    def close(self) -> None:
        """Flush what must not be lost (results, events) and release the transport."""
        ...


class NullChannel:
    """A channel with nobody on the other end: for tests and for non-leader ranks."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.pending: list[CommandRequest] = []
        self.keep = False

    def poll(self) -> list[CommandRequest]:
        pending, self.pending = self.pending, []
        return pending

    def send(self, message: dict[str, Any]) -> None:
        if self.keep:
            self.sent.append(message)

    def send_many(self, messages: list[dict[str, Any]]) -> None:
        if self.keep:
            self.sent.extend(messages)

    def close(self) -> None:
        return None
