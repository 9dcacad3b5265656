"""Commands waiting for a step (``COMMAND@STEP``), kept across checkpoints.

The loop calls :meth:`Scheduler.due` at every step boundary, so the common case (nothing
due) costs one comparison against the top of a heap. The state is plain JSON so it can ride
in a checkpoint and be validated whole before a resumed run uses it.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trainer_core.commands import Command, CommandError, parse


@dataclass(frozen=True)
class ScheduledCommand:
    """A command waiting for its step; the command itself carries no ``@STEP``."""

    id: int
    step: int
    command: Command

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "step": self.step, "line": self.command.to_line()}


class SchedulerStateError(ValueError):
    """A scheduler state (from a checkpoint) that cannot be restored; names the bad entry."""


KEY_VERSION = "version"
KEY_NEXT_ID = "next_id"
KEY_SCHEDULED = "scheduled"
KEY_ID = "id"
KEY_STEP = "step"
KEY_LINE = "line"
STATE_VERSION = 1
MAX_SCHEDULED = 10_000


class Scheduler:
    """Commands waiting for a step, popped in (step, id) order; cancelled ones leave the heap lazily."""

    def __init__(self) -> None:
        self._entries: dict[int, ScheduledCommand] = {}
        self._heap: list[tuple[int, int]] = []
        self._next_id = 1

    def __len__(self) -> int:
        return len(self._entries)

    def add(self, command: Command, current_step: int) -> ScheduledCommand:
        """Schedule ``command`` (which must carry ``at_step``) for a step not yet passed."""
        if not isinstance(command, Command) or command.at_step is None:
            raise CommandError("only a command with '@STEP' can be scheduled, e.g. 'save@100'")
        step = command.at_step
        if step < current_step:
            raise CommandError(f"{command.to_line()}: step {step} has passed (the run is at step {current_step})")
        if len(self._entries) >= MAX_SCHEDULED:
            raise CommandError(f"too many scheduled commands ({MAX_SCHEDULED}); cancel some with 'event clear'")
        return self._insert(self._next_id, step, command.unscheduled())

    def _insert(self, entry_id: int, step: int, command: Command) -> ScheduledCommand:
        entry = ScheduledCommand(entry_id, step, command)
        self._entries[entry_id] = entry
        heapq.heappush(self._heap, (step, entry_id))
        self._next_id = max(self._next_id, entry_id + 1)
        return entry

    def due(self, step: int) -> list[ScheduledCommand]:
        """Remove and return every command whose step is <= ``step``, in (step, id) order."""
        heap = self._heap
        if not heap or heap[0][0] > step:
            return []
        ready = []
        while heap and heap[0][0] <= step:
            _, entry_id = heapq.heappop(heap)
            entry = self._entries.pop(entry_id, None)
            if entry is not None:
                ready.append(entry)
        return ready

    def has_due(self, step: int) -> bool:
        """Whether ``due(step)`` may return something (a cancelled entry can make this a false alarm)."""
        return bool(self._heap) and self._heap[0][0] <= step

    def next_step(self) -> int | None:
        """The step of the next scheduled command, or None when nothing is scheduled."""
        while self._heap and self._heap[0][1] not in self._entries:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def cancel(self, entry_id: int) -> ScheduledCommand:
        entry = self._entries.pop(entry_id, None)
        if entry is None:
            known = ", ".join(str(i) for i in sorted(self._entries)) or "none"
            raise CommandError(f"no scheduled command with id {entry_id} (scheduled ids: {known})")
        if len(self._heap) > 2 * len(self._entries) + 64:  # cancelled entries must not pile up
            self._heap = [(e.step, e.id) for e in self._entries.values()]
            heapq.heapify(self._heap)
        return entry

    def clear(self) -> int:
        """Drop every scheduled command; returns how many there were."""
        count = len(self._entries)
        self._entries.clear()
        self._heap.clear()
        return count

    def entries(self) -> list[ScheduledCommand]:
        return sorted(self._entries.values(), key=lambda e: (e.step, e.id))

    def show(self) -> list[dict[str, Any]]:
        """JSON-able list of ``{"id", "step", "line"}`` in the order they will run."""
        return [entry.to_dict() for entry in self.entries()]

    def state_dict(self) -> dict[str, Any]:
        return {KEY_VERSION: STATE_VERSION, KEY_NEXT_ID: self._next_id, KEY_SCHEDULED: self.show()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore scheduled commands after a resume; the state is checked whole before use."""
        next_id, entries = _read_state(state)
        self.clear()
        for entry in entries:
            self._insert(entry.id, entry.step, entry.command)
        self._next_id = next_id


def _read_state(state: object) -> tuple[int, list[ScheduledCommand]]:
    if not isinstance(state, Mapping):
        raise SchedulerStateError(f"scheduler state must be a mapping, got {type(state).__name__}")
    expected = {KEY_VERSION, KEY_NEXT_ID, KEY_SCHEDULED}
    if set(state) != expected:
        raise SchedulerStateError(f"scheduler state keys must be {sorted(expected)}, got {sorted(map(str, state))}")
    if state[KEY_VERSION] != STATE_VERSION:
        raise SchedulerStateError(f"scheduler state version {state[KEY_VERSION]!r} is not {STATE_VERSION}")
    next_id = state[KEY_NEXT_ID]
    if isinstance(next_id, bool) or not isinstance(next_id, int) or next_id < 1:
        raise SchedulerStateError(f"scheduler state {KEY_NEXT_ID!r} must be a positive integer, got {next_id!r}")
    raw_entries = state[KEY_SCHEDULED]
    if not isinstance(raw_entries, list):
        raise SchedulerStateError(f"scheduler state {KEY_SCHEDULED!r} must be a list")
    entries = [_read_entry(i, raw) for i, raw in enumerate(raw_entries)]
    ids = [entry.id for entry in entries]
    if len(set(ids)) != len(ids):
        raise SchedulerStateError(f"scheduler state has duplicate ids: {sorted(ids)}")
    if ids and max(ids) >= next_id:
        raise SchedulerStateError(f"scheduler state id {max(ids)} is not below {KEY_NEXT_ID} {next_id}")
    return next_id, entries


def _read_entry(index: int, raw: object) -> ScheduledCommand:
    where = f"scheduler state {KEY_SCHEDULED}[{index}]"
    if not isinstance(raw, Mapping) or set(raw) != {KEY_ID, KEY_STEP, KEY_LINE}:
        raise SchedulerStateError(f"{where} must be a mapping with keys {KEY_ID!r}, {KEY_STEP!r}, {KEY_LINE!r}")
    for key in (KEY_ID, KEY_STEP):
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise SchedulerStateError(f"{where}.{key} must be a non-negative integer, got {value!r}")
    try:
        command = parse(raw[KEY_LINE])
    except CommandError as exc:
        raise SchedulerStateError(f"{where}.{KEY_LINE}: {exc}") from None
    if command.at_step is not None or not command.schedulable:
        raise SchedulerStateError(f"{where}.{KEY_LINE}: {raw[KEY_LINE]!r} is not a schedulable command")
    return ScheduledCommand(raw[KEY_ID], raw[KEY_STEP], command)
