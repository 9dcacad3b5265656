"""The pipe protocol, with both ends in this process: a thread plays the server or the trainer."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from server.protocol import (
    Outbox,
    PipeChannel,
    ProtocolError,
    TrainerLink,
    check_server_message,
    check_trainer_batch,
    merge_metrics,
)

WAIT_S = 5.0


def wait_for(predicate: Any, timeout: float = WAIT_S) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


class Collector:
    """The server's view of what the trainer sent."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.closed = threading.Event()
        self.lock = threading.Lock()

    def on_batch(self, batch: list[dict[str, Any]]) -> None:
        with self.lock:
            self.messages.extend(batch)

    def on_closed(self) -> None:
        self.closed.set()

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        with self.lock:
            return [m for m in self.messages if m["type"] == kind]


@pytest.fixture
def pair() -> Iterator[tuple[PipeChannel, TrainerLink, Collector]]:
    server_end, trainer_end = multiprocessing.Pipe()
    collector = Collector()
    link = TrainerLink(server_end, collector.on_batch, collector.on_closed)
    channel = PipeChannel(trainer_end, flush_interval=0.005, close_timeout=2.0)
    yield channel, link, collector
    channel.close()
    link.close()


def metrics(step: int, **values: float) -> dict[str, Any]:
    return {"type": "metrics", "step": step, "time": time.time(), "values": values}


def test_commands_from_the_server_arrive_as_requests_with_their_ids(pair: Any) -> None:
    channel, link, _ = pair
    assert link.send_command("c1", "save")
    assert link.send_command("c2", "lr 0.1")
    got: list[Any] = []
    assert wait_for(lambda: got.extend(channel.poll()) or len(got) == 2)
    assert [(r.id, r.line) for r in got] == [("c1", "save"), ("c2", "lr 0.1")]
    assert channel.poll() == []


def test_trainer_messages_reach_the_server_in_order(pair: Any) -> None:
    channel, _, collector = pair
    for step in range(50):
        channel.send(metrics(step, loss=1.0 / (step + 1)))
    channel.send({"type": "result", "id": "c1", "ok": True, "command": "save", "step": 49, "message": "", "data": {}})
    assert wait_for(lambda: len(collector.of_type("result")) == 1)
    assert [m["step"] for m in collector.of_type("metrics")] == list(range(50))


def test_quit_message_becomes_a_quit_request(pair: Any) -> None:
    channel, link, _ = pair
    link.send_quit()
    got: list[Any] = []
    assert wait_for(lambda: got.extend(channel.poll()) or got)
    assert [r.line for r in got] == ["quit"]


def test_a_closed_pipe_reads_as_quit_on_the_trainer_side() -> None:
    server_end, trainer_end = multiprocessing.Pipe()
    channel = PipeChannel(trainer_end, close_timeout=1.0)
    server_end.close()
    got: list[Any] = []
    assert wait_for(lambda: got.extend(channel.poll()) or got)
    assert [r.line for r in got] == ["quit"]
    assert channel.pipe_closed
    channel.send(metrics(1, loss=1.0))  # sending into a closed pipe is silently discarded
    channel.close()


def test_the_server_learns_when_the_trainer_end_closes() -> None:
    server_end, trainer_end = multiprocessing.Pipe()
    collector = Collector()
    link = TrainerLink(server_end, collector.on_batch, collector.on_closed)
    trainer_end.close()
    assert collector.closed.wait(WAIT_S)
    assert link.closed
    assert not link.send_command("c1", "save")
    link.close()


def test_a_stalled_server_gets_coalesced_metrics_but_every_result_and_event() -> None:
    """The server stops reading; the trainer keeps sending without blocking, then the server catches up."""
    server_end, trainer_end = multiprocessing.Pipe()
    channel = PipeChannel(trainer_end, max_pending=8, flush_interval=0.001, close_timeout=5.0)
    payload = "x" * 2000  # big messages fill the pipe buffer quickly
    started = time.monotonic()
    for step in range(3000):
        channel.send({"type": "metrics", "step": step, "time": 0.0, "values": {"loss": float(step)}, "pad": payload})
        if step % 100 == 0:
            channel.send({"type": "event", "id": step, "time": 0.0, "step": step, "kind": "lr", "data": {}})
            channel.send({"type": "status", "state": "running", "step": step})
    channel.send({"type": "result", "id": "last", "ok": True, "command": "save", "step": 2999,
                  "message": "", "data": {}})
    assert time.monotonic() - started < 5.0  # never blocked on the stalled pipe
    assert wait_for(lambda: channel.dropped > 0)

    collector = Collector()
    link = TrainerLink(server_end, collector.on_batch, collector.on_closed)
    assert wait_for(lambda: len(collector.of_type("result")) == 1, timeout=10)
    events = collector.of_type("event")
    assert [e["id"] for e in events] == list(range(0, 3000, 100))
    received = collector.of_type("metrics")
    assert len(received) < 3000
    assert received[-1]["values"]["loss"] == 2999.0  # the newest value survives coalescing
    delivered = sum(m.get("coalesced", 1) for m in received)
    assert delivered == 3000
    statuses = collector.of_type("status")
    assert statuses and statuses[-1]["metrics_dropped"] == channel.dropped
    channel.close()
    link.close()


def test_close_flushes_results_before_releasing_the_pipe() -> None:
    server_end, trainer_end = multiprocessing.Pipe()
    channel = PipeChannel(trainer_end, flush_interval=10.0)  # only close() can flush the metrics
    channel.send(metrics(1, loss=1.0))
    channel.close()
    batches = []
    while server_end.poll(0.5):
        try:
            batches.append(server_end.recv())
        except EOFError:
            break
    assert [m["type"] for batch in batches for m in batch] == ["metrics"]


def test_request_quit_is_delivered_by_poll() -> None:
    server_end, trainer_end = multiprocessing.Pipe()
    channel = PipeChannel(trainer_end)
    channel.request_quit("SIGTERM")
    requests = channel.poll()
    assert [r.line for r in requests] == ["quit"] and requests[0].id.startswith("SIGTERM")
    channel.close()
    server_end.close()


def test_malformed_messages_are_rejected() -> None:
    with pytest.raises(ProtocolError):
        check_server_message({"type": "command", "id": 3, "line": "save"})
    with pytest.raises(ProtocolError):
        check_server_message(["quit"])
    with pytest.raises(ProtocolError):
        check_trainer_batch({"type": "metrics"})
    with pytest.raises(ProtocolError):
        check_trainer_batch([{"type": "bogus"}])


names = st.text(alphabet="abcdefgh/", min_size=1, max_size=6)
values = st.dictionaries(names, st.floats(allow_nan=False), max_size=4)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(values, min_size=1, max_size=20))
def test_merging_keeps_the_newest_value_of_every_name(sequence: list[dict[str, float]]) -> None:
    merged = {"type": "metrics", "step": 0, "values": sequence[0]}
    for step, vals in enumerate(sequence[1:], start=1):
        merged = merge_metrics(merged, {"type": "metrics", "step": step, "values": vals})
    expected: dict[str, float] = {}
    for vals in sequence:
        expected.update(vals)
    assert merged["values"] == expected
    assert merged["step"] == len(sequence) - 1
    assert merged.get("coalesced", 1) == len(sequence)


kinds = st.sampled_from(["metrics", "metrics", "metrics", "status", "event", "result"])


@settings(max_examples=80, deadline=None)
@given(st.lists(st.lists(kinds, max_size=12), max_size=6), st.integers(1, 10))
def test_put_many_queues_exactly_what_one_put_per_message_would(groups: list[list[str]], bound: int) -> None:
    one_by_one, at_once = Outbox(bound), Outbox(bound)
    for step, group in enumerate(groups):
        messages = [{"type": kind, "step": step, "values": {"loss": float(i)}} for i, kind in enumerate(group)]
        urgent = [one_by_one.put(dict(m, values=dict(m["values"]))) for m in messages]
        assert at_once.put_many(messages) == any(urgent)
    assert at_once.take() == one_by_one.take()
    assert at_once.dropped == one_by_one.dropped


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors through /proc")
def test_closing_both_ends_stops_their_readers_and_releases_every_descriptor() -> None:
    before = open_descriptors()
    for _ in range(10):
        server_end, trainer_end = multiprocessing.Pipe()
        collector = Collector()
        link = TrainerLink(server_end, collector.on_batch, collector.on_closed)
        channel = PipeChannel(trainer_end, close_timeout=2.0)
        channel.close()
        link.close()
        assert not channel._receiver.is_alive() and not link._reader.is_alive()
        assert collector.closed.is_set()
    assert wait_for(lambda: open_descriptors() <= before), f"{open_descriptors() - before} descriptors left open"


def voluntary_switches(thread: threading.Thread) -> int:
    with open(f"/proc/self/task/{thread.native_id}/status") as status:
        line = next(line for line in status if line.startswith("voluntary_ctxt_switches"))
    return int(line.split()[1])


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts thread wake-ups through /proc")
def test_the_readers_sleep_through_a_quiet_spell_and_wake_for_a_command() -> None:
    """A reader that woke on a timer would take the GIL from the training loop several times a second."""
    server_end, trainer_end = multiprocessing.Pipe()
    collector = Collector()
    link = TrainerLink(server_end, collector.on_batch, collector.on_closed)
    channel = PipeChannel(trainer_end, close_timeout=2.0)
    try:
        time.sleep(0.1)
        readers = (channel._receiver, link._reader)
        before = [voluntary_switches(t) for t in readers]
        time.sleep(0.6)
        assert [voluntary_switches(t) for t in readers] == before
        assert link.send_command("late", "save")
        got: list[Any] = []
        assert wait_for(lambda: got.extend(channel.poll()) or got)
        assert [r.id for r in got] == ["late"]
    finally:
        channel.close()
        link.close()
