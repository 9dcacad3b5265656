"""Live updates for a read-only view: new store rows become the same messages a trainer sends.

``traindeck view`` has no pipe; when the run it shows is still training (driven by another
process), the dashboard still moves because this task polls the store about once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainer_core.store import StoreError, last_step, metric_names, query_events, query_metrics

POLL_S = 1.0
MAX_POINTS_PER_POLL = 500
MAX_EVENTS_PER_POLL = 1000

Publish = Callable[[dict[str, Any]], None]


def metrics_messages(series: dict[str, dict[str, list[Any]]]) -> list[dict[str, Any]]:
    """``{name: {"step", "value", ...}}`` -> one metrics message per step, in step order."""
    by_step: dict[int, dict[str, Any]] = {}
    for name, points in series.items():
        for step, value in zip(points["step"], points["value"], strict=True):
            by_step.setdefault(step, {})[name] = value
    now = time.time()
    return [{"type": "metrics", "step": step, "time": now, "values": by_step[step]} for step in sorted(by_step)]


class StoreTail:
    def __init__(self, store: Path, publish: Publish, status: Callable[[], dict[str, Any]],
                 poll_s: float = POLL_S) -> None:
        self.store = store
        self.publish = publish
        self.status = status
        self.poll_s = poll_s
        self.last_event_id = 0
        self.last_step: int | None = None
        self._last_status: dict[str, Any] | None = None

    def skip_history(self) -> None:
        """Start after what the store already holds: the page loads history over REST."""
        events = query_events(self.store, since_id=0, limit=100_000)
        self.last_event_id = events[-1]["id"] if events else 0
        self.last_step = last_step(self.store)

    def poll(self) -> list[dict[str, Any]]:
        """Messages for whatever the store gained since the previous poll (runs in a thread)."""
        messages: list[dict[str, Any]] = []
        for event in query_events(self.store, since_id=self.last_event_id, limit=MAX_EVENTS_PER_POLL):
            self.last_event_id = event["id"]
            messages.append({"type": "event", **event})
        newest = last_step(self.store)
        if newest is not None and (self.last_step is None or newest > self.last_step):
            start = 0 if self.last_step is None else self.last_step + 1
            series = query_metrics(self.store, metric_names(self.store), max_points=MAX_POINTS_PER_POLL,
                                   from_step=start, to_step=newest)
            messages.extend(metrics_messages(series))
            self.last_step = newest
        status = self.status()
        if status != self._last_status:
            self._last_status = status
            messages.append({"type": "status", **status})
        return messages

    async def run(self) -> None:
        with contextlib.suppress(StoreError):
            await asyncio.to_thread(self.skip_history)
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                messages = await asyncio.to_thread(self.poll)
            except StoreError:
                continue
            for message in messages:
                self.publish(message)
