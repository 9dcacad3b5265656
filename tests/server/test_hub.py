"""The hub's per-client queues, driven by real asyncio tasks (the WebSocket end is a coroutine)."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from server.hub import Hub, HubLimits, RateLimiter, to_json


class Reader:
    """A client end that records what it receives; ``gate`` closed means it stopped reading."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.gate = asyncio.Event()
        self.gate.set()

    async def send(self, text: str) -> None:
        await self.gate.wait()
        self.received.append(json.loads(text))


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 10))


def metrics(step: int) -> dict[str, Any]:
    return {"type": "metrics", "step": step, "time": time.time(), "values": {"loss": 1.0}}


def test_every_client_gets_every_message_when_all_keep_up() -> None:
    async def scenario() -> None:
        hub = Hub()
        readers = [Reader() for _ in range(3)]
        for reader in readers:
            hub.connect().start(reader.send)
        for step in range(100):
            hub.broadcast(metrics(step))
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        for reader in readers:
            assert [m["step"] for m in reader.received] == list(range(100))

    run(scenario())


def test_a_stalled_client_is_thinned_and_does_not_slow_the_others() -> None:
    async def scenario() -> None:
        hub = Hub(HubLimits(thin_at=10, max_queue=1000, stall_timeout_s=60))
        fast, slow = Reader(), Reader()
        slow.gate.clear()
        hub.connect().start(fast.send)
        slow_client = hub.connect()
        slow_client.start(slow.send)
        for step in range(500):
            hub.broadcast(metrics(step))
            if step % 50 == 0:
                hub.broadcast({"type": "event", "id": step, "kind": "lr", "step": step, "data": {}})
            await asyncio.sleep(0)
        await asyncio.sleep(0.05)
        assert len([m for m in fast.received if m["type"] == "metrics"]) == 500
        assert slow_client.dropped > 0 and slow_client.backlog <= 10 + 10
        slow.gate.set()  # it starts reading again: every event is still there, in order
        await asyncio.sleep(0.05)
        events = [m["id"] for m in slow.received if m["type"] == "event"]
        assert events == list(range(0, 500, 50))
        assert hub.stats()["ws_dropped_messages"] == slow_client.dropped

    run(scenario())


def test_a_client_that_never_reads_is_dropped_after_its_queue_limit() -> None:
    async def scenario() -> None:
        hub = Hub(HubLimits(thin_at=4, max_queue=20, stall_timeout_s=60))
        fast, stuck = Reader(), Reader()
        stuck.gate.clear()
        hub.connect().start(fast.send)
        stuck_client = hub.connect()
        task = stuck_client.start(stuck.send)
        for i in range(50):
            hub.broadcast({"type": "result", "id": str(i), "ok": True})
            await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        assert stuck_client.closed_reason is not None and "too slow" in stuck_client.closed_reason
        assert task.cancelled() or task.done()
        hub.disconnect(stuck_client)
        assert hub.stats()["ws_dropped_clients"] == 1
        assert len(fast.received) == 50

    run(scenario())


def test_a_send_blocked_past_the_stall_timeout_drops_the_client() -> None:
    async def scenario() -> None:
        hub = Hub(HubLimits(thin_at=100, max_queue=1000, stall_timeout_s=0.05))
        stuck = Reader()
        stuck.gate.clear()
        client = hub.connect()
        client.start(stuck.send)
        hub.broadcast({"type": "event", "id": 1})
        await asyncio.sleep(0.1)
        hub.broadcast({"type": "event", "id": 2})
        assert client.closed_reason is not None

    run(scenario())


def test_status_is_collapsed_to_the_newest_snapshot_and_sent_first() -> None:
    async def scenario() -> None:
        hub = Hub()
        reader = Reader()
        reader.gate.clear()
        hub.connect().start(reader.send)
        await asyncio.sleep(0)
        for step in range(5):
            hub.broadcast({"type": "status", "state": "running", "step": step})
        hub.broadcast({"type": "result", "id": "r"})
        reader.gate.set()
        await asyncio.sleep(0.02)
        statuses = [m["step"] for m in reader.received if m["type"] == "status"]
        assert statuses[-1] == 4 and len(statuses) <= 2
        assert any(m["type"] == "result" for m in reader.received)

    run(scenario())


def test_non_finite_numbers_travel_as_null() -> None:
    text = to_json({"type": "metrics", "values": {"loss": float("nan"), "x": float("inf"), "y": 1.5}})
    assert json.loads(text)["values"] == {"loss": None, "x": None, "y": 1.5}


def test_rate_limiter_allows_a_burst_then_throttles() -> None:
    limiter = RateLimiter(rate=0.001, burst=3)
    assert [limiter.allow() for _ in range(5)] == [True, True, True, False, False]


@settings(max_examples=50, deadline=None)
@given(st.lists(st.sampled_from(["metrics", "status", "event", "result"]), max_size=300))
def test_a_client_queue_never_exceeds_its_bounds(kinds: list[str]) -> None:
    async def scenario() -> None:
        limits = HubLimits(thin_at=8, max_queue=40, stall_timeout_s=60)
        hub = Hub(limits)
        reader = Reader()
        reader.gate.clear()
        client = hub.connect()
        client.start(reader.send)
        for kind in kinds:
            hub.broadcast({"type": kind})
            assert client.backlog <= limits.max_queue + 1
        never_dropped = sum(k in ("event", "result") for k in kinds)
        if never_dropped <= limits.max_queue:
            assert client.closed_reason is None
        client.close("done")

    asyncio.run(scenario())
