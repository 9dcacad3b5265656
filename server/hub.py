"""WebSocket fan-out: one bounded queue per client, so a slow reader only hurts itself.

``Hub.broadcast`` never awaits: it serialises a message once and offers the text to every
client. Each client's pump task sends at its own pace. A client that falls behind is thinned
first (metrics dropped and counted, status collapsed to the newest snapshot), and dropped once
the messages that are never thinned (events, results) exceed its queue or a single send stays
blocked too long. Neither the trainer nor the other clients ever wait for it.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from trainer_core.channel import METRICS, STATUS

Send = Callable[[str], Awaitable[None]]


@dataclass(frozen=True)
class HubLimits:
    thin_at: int = 64
    """Queued messages past which metrics are dropped for this client."""
    max_queue: int = 2048
    """Queued messages past which the client is disconnected."""
    stall_timeout_s: float = 10.0
    """A single send blocked this long, with more waiting, disconnects the client."""
    max_incoming_bytes: int = 16 * 1024
    """Largest client message the app reads; the WebSocket layer closes above ``max_frame_bytes``."""
    max_frame_bytes: int = 64 * 1024
    commands_per_s: float = 5.0
    command_burst: int = 20


def _finite(obj: Any) -> Any:
    """JSON has no NaN/Infinity; browsers reject them, so they travel as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


def to_json(message: dict[str, Any]) -> str:
    try:
        return json.dumps(message, allow_nan=False, separators=(",", ":"))
    except ValueError:
        return json.dumps(_finite(message), allow_nan=False, separators=(",", ":"))


class Client:
    """One WebSocket's outgoing queue and the task that drains it."""

    def __init__(self, limits: HubLimits) -> None:
        self.limits = limits
        self._queue: deque[str] = deque()
        self._status: str | None = None
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.sending_since: float | None = None
        self.dropped = 0
        self.sent = 0
        self.closed_reason: str | None = None

    @property
    def backlog(self) -> int:
        return len(self._queue) + (self._status is not None)

    def offer(self, kind: str, text: str) -> None:
        """Queue a serialised message for this client; never blocks."""
        if self.closed_reason is not None:
            return
        if kind == STATUS:
            self._status = text
        elif kind == METRICS and len(self._queue) >= self.limits.thin_at:
            self.dropped += 1
            return
        else:
            self._queue.append(text)
        if len(self._queue) > self.limits.max_queue:
            self.close(f"too slow: more than {self.limits.max_queue} messages waiting")
            return
        if self.stalled():
            self.close(f"too slow: one send blocked for more than {self.limits.stall_timeout_s:g} s")
            return
        self._ready.set()

    def stalled(self, now: float | None = None) -> bool:
        if self.sending_since is None:
            return False
        return (now or time.monotonic()) - self.sending_since > self.limits.stall_timeout_s

    def _next(self) -> str | None:
        # The newest status goes first: it is a snapshot, and a late one is worse than none.
        if self._status is not None:
            text, self._status = self._status, None
            return text
        if self._queue:
            return self._queue.popleft()
        return None

    def start(self, send: Send) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self._pump(send))
        return self._task

    async def _pump(self, send: Send) -> None:
        while self.closed_reason is None:
            text = self._next()
            if text is None:
                self._ready.clear()
                await self._ready.wait()
                continue
            self.sending_since = time.monotonic()
            await send(text)
            self.sending_since = None
            self.sent += 1

    def close(self, reason: str) -> None:
        """Stop sending to this client; its endpoint notices the pump ending and hangs up."""
        if self.closed_reason is None:
            self.closed_reason = reason
            self._queue.clear()
            self._status = None
        if self._task is not None and not self._task.done():
            self._task.cancel()


class Hub:
    """The set of connected clients; broadcast serialises once and offers to each."""

    def __init__(self, limits: HubLimits | None = None) -> None:
        self.limits = limits or HubLimits()
        self.clients: set[Client] = set()
        self.dropped_clients = 0
        self._dropped_messages_gone = 0

    def connect(self) -> Client:
        client = Client(self.limits)
        self.clients.add(client)
        return client

    def disconnect(self, client: Client) -> None:
        if client in self.clients:
            self.clients.discard(client)
            self._dropped_messages_gone += client.dropped
            if client.closed_reason is not None:
                self.dropped_clients += 1
        client.close(client.closed_reason or "disconnected")

    def broadcast(self, message: dict[str, Any]) -> None:
        if not self.clients:
            return
        kind = str(message.get("type"))
        text = to_json(message)
        for client in list(self.clients):
            client.offer(kind, text)

    def stats(self) -> dict[str, int]:
        return {
            "ws_clients": len(self.clients),
            "ws_dropped_messages": self._dropped_messages_gone + sum(c.dropped for c in self.clients),
            "ws_dropped_clients": self.dropped_clients,
        }


class RateLimiter:
    """A token bucket: ``burst`` commands at once, then ``rate`` per second."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._stamp = time.monotonic()

    def allow(self) -> bool:
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False
