"""The pipe between the server and the trainer process; the only module that calls send/recv.

Wire format. Server -> trainer, one message per send::

    {"type": "command", "id": str, "line": str}     apply one command line, answer with a result
    {"type": "quit"}                                 save (if configured) and exit

Trainer -> server, a *batch* (a list) of the channel messages defined in
``trainer_core.channel`` (metrics, status, event, result, crash) per send. Batching keeps the
trainer's cost per poll at one extend under a lock: a background thread pickles and writes
whatever accumulated, so a 0.1 ms step never waits for a syscall or a slow reader. The reader
threads on both ends sleep until data or a stop arrives, never on a timer.

Back-pressure. When the server reads slowly the batches pile up on the trainer side. Past a
bound, metrics are merged into one pending "overflow" message (the newest value of every name
survives) and status keeps only the newest snapshot; the number of metrics messages merged
away is counted and reported as ``metrics_dropped`` in every status message. Events, results
and crash reports are never merged or dropped.

A closed pipe on the trainer side (the server died or closed it) reads as a quit request, so
the loop saves and exits instead of training on with nobody listening.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from typing import Any, Literal, TypedDict

from trainer_core.channel import CRASH, DROPPABLE_TYPES, EVENT, METRICS, RESULT, STATUS, CommandRequest

COMMAND = "command"
QUIT = "quit"
TRAINER_TYPES = frozenset({METRICS, STATUS, EVENT, RESULT, CRASH})
SERVER_TYPES = frozenset({COMMAND, QUIT})

QUIT_LINE = "quit"
# Live metrics go out in batches 10 times a second (results and events at once). Each wake of
# the sender thread takes the GIL from the loop two or three times; at 40 a second that cost a
# 1 ms-step loop about 0.8 % of its speed.
FLUSH_INTERVAL_S = 0.1
# Far more metrics than a 10 000 steps/s loop queues between two flushes: only a server that
# falls behind makes the outbox merge metrics.
MAX_PENDING_DROPPABLE = 4096
CLOSE_TIMEOUT_S = 10.0
READER_JOIN_S = 0.5


class CommandMessage(TypedDict):
    type: Literal["command"]
    id: str
    line: str


class QuitMessage(TypedDict):
    type: Literal["quit"]


class ProtocolError(ValueError):
    """A message that does not follow the pipe protocol."""


def command_message(command_id: str, line: str) -> CommandMessage:
    return {"type": "command", "id": command_id, "line": line}


def quit_message() -> QuitMessage:
    return {"type": "quit"}


def check_server_message(obj: object) -> dict[str, Any]:
    """Validate a message the trainer received from the server."""
    if not isinstance(obj, dict) or obj.get("type") not in SERVER_TYPES:
        raise ProtocolError(f"not a server message: {obj!r:.200}")
    if obj["type"] == COMMAND and not (isinstance(obj.get("id"), str) and isinstance(obj.get("line"), str)):
        raise ProtocolError(f"a command message needs a string id and line: {obj!r:.200}")
    return obj


def check_trainer_batch(obj: object) -> list[dict[str, Any]]:
    """Validate a batch the server received from the trainer."""
    if not isinstance(obj, list):
        raise ProtocolError(f"expected a batch (list) of trainer messages, got {type(obj).__name__}")
    for message in obj:
        if not isinstance(message, dict) or message.get("type") not in TRAINER_TYPES:
            raise ProtocolError(f"not a trainer message: {message!r:.200}")
    return obj


def merge_metrics(older: dict[str, Any], newer: dict[str, Any]) -> dict[str, Any]:
    """One metrics message carrying the newest value of every name seen in either."""
    values = {**older.get("values", {}), **newer.get("values", {})}
    return {**newer, "values": values, "coalesced": older.get("coalesced", 1) + newer.get("coalesced", 1)}


class Outbox:
    """The trainer's bounded, coalescing queue of outgoing messages; thread-safe."""

    def __init__(self, max_droppable: int) -> None:
        self._lock = threading.Lock()
        self._items: deque[dict[str, Any]] = deque()
        self._droppable = 0
        self._max_droppable = max_droppable
        self._overflow: dict[str, dict[str, Any]] = {}
        self.dropped = 0

    def put(self, message: dict[str, Any]) -> bool:
        """Queue one message; returns True when it must go out promptly (never-dropped kinds)."""
        with self._lock:
            return self._put(message)

    def put_many(self, messages: list[dict[str, Any]]) -> bool:
        """``put`` each message in order under one lock; True when any must go out promptly."""
        with self._lock:
            if len(messages) <= self._max_droppable - self._droppable and all(
                    m.get("type") == METRICS for m in messages):
                self._droppable += len(messages)
                self._items.extend(messages)
                return False
            urgent = [self._put(message) for message in messages]
        return any(urgent)

    def _put(self, message: dict[str, Any]) -> bool:
        kind = message.get("type")
        if kind not in DROPPABLE_TYPES:
            self._items.append(message)
            return True
        if self._droppable < self._max_droppable:
            self._droppable += 1
            self._items.append(message)
            return False
        old = self._overflow.get(kind)
        if kind == METRICS:
            self.dropped += 1
            self._overflow[kind] = message if old is None else merge_metrics(old, message)
        else:
            self._overflow[kind] = message
        return False

    def take(self) -> list[dict[str, Any]]:
        with self._lock:
            batch = list(self._items)
            batch.extend(self._overflow.values())
            self._items.clear()
            self._overflow.clear()
            self._droppable = 0
        return batch

    def __len__(self) -> int:
        return len(self._items) + len(self._overflow)


class _StopSignal:
    """A descriptor a reader thread waits on next to its pipe: it sleeps until data or a stop comes.

    Waking on a timeout to check a flag would take the GIL from the training loop every time.
    """

    def __init__(self) -> None:
        self._read_fd, self._write_fd = os.pipe()
        self._lock = threading.Lock()
        self._closed = False
        self.is_set = False

    def fileno(self) -> int:
        return self._read_fd

    def set(self) -> None:
        with self._lock:
            if not self.is_set and not self._closed:
                os.write(self._write_fd, b"x")
            self.is_set = True

    def wait_readable(self, conn: Connection) -> bool:
        """Block until ``conn`` has data (True) or the signal is set (False)."""
        return not self.is_set and conn in wait([conn, self]) and not self.is_set

    def close(self) -> None:
        """Release the descriptors (the reader does, as it ends); idempotent and safe from any thread."""
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self._read_fd)
                os.close(self._write_fd)


class PipeChannel:
    """The trainer side of the pipe: a ``trainer_core.channel.Channel``.

    ``send`` only appends to the outbox; a sender thread writes batches every
    ``flush_interval`` seconds, or at once for results, events and crash reports. A receiver
    thread turns incoming commands into requests for ``poll``.
    """

    def __init__(self, conn: Connection, *, max_pending: int = MAX_PENDING_DROPPABLE,
                 flush_interval: float = FLUSH_INTERVAL_S, close_timeout: float = CLOSE_TIMEOUT_S) -> None:
        self._conn = conn
        self._outbox = Outbox(max_pending)
        self._inbox: deque[CommandRequest] = deque()
        self._flush_interval = flush_interval
        self._close_timeout = close_timeout
        self._wake = threading.Event()
        self._closing = threading.Event()
        self._stop_reading = _StopSignal()
        self._quit_ids = itertools.count(1)
        self.pipe_closed = False
        self._sender = threading.Thread(target=self._send_loop, name="traindeck-pipe-send", daemon=True)
        self._receiver = threading.Thread(target=self._recv_loop, name="traindeck-pipe-recv", daemon=True)
        self._sender.start()
        self._receiver.start()

    @property
    def dropped(self) -> int:
        """Metrics messages merged away because the server read too slowly."""
        return self._outbox.dropped

    # -- Channel -------------------------------------------------------------------------------

    def poll(self) -> list[CommandRequest]:
        if not self._inbox:
            return []
        requests = []
        while self._inbox:
            requests.append(self._inbox.popleft())
        return requests

    def send(self, message: dict[str, Any]) -> None:
        if self._outbox.put(message) and not self._wake.is_set():
            self._wake.set()

    def send_many(self, messages: list[dict[str, Any]]) -> None:
        if self._outbox.put_many(messages) and not self._wake.is_set():
            self._wake.set()

    def close(self) -> None:
        """Flush what is queued (bounded in time), then release the pipe; idempotent."""
        if self._closing.is_set():
            return
        self._closing.set()
        self._wake.set()
        self._sender.join(self._close_timeout)
        self._stop_reading.set()
        self._receiver.join(READER_JOIN_S)
        self._conn.close()

    # -- for signal handlers and tests -----------------------------------------------------------

    def request_quit(self, reason: str) -> None:
        """Queue a quit request as if the server had sent one (a deque append: signal-safe)."""
        self._inbox.append(CommandRequest(f"{reason}-{next(self._quit_ids)}", QUIT_LINE))

    # -- threads -----------------------------------------------------------------------------------

    def _send_loop(self) -> None:
        while True:
            self._wake.wait(self._flush_interval)
            self._wake.clear()
            closing = self._closing.is_set()
            batch = self._outbox.take()
            if batch and not self.pipe_closed:
                self._write(batch)
            if closing and not len(self._outbox):
                return

    def _write(self, batch: list[dict[str, Any]]) -> None:
        for i, message in enumerate(batch):
            if message.get("type") == STATUS:
                batch[i] = {**message, "metrics_dropped": self._outbox.dropped}
        try:
            self._conn.send(batch)
        except (OSError, ValueError):
            self._on_pipe_closed()

    def _recv_loop(self) -> None:
        try:
            while True:
                try:
                    if not self._stop_reading.wait_readable(self._conn):
                        return
                    message = check_server_message(self._conn.recv())
                except (EOFError, OSError):
                    self._on_pipe_closed()
                    return
                except ProtocolError:
                    continue
                if message["type"] == QUIT:
                    self.request_quit("server")
                else:
                    self._inbox.append(CommandRequest(message["id"], message["line"]))
        finally:
            self._stop_reading.close()

    def _on_pipe_closed(self) -> None:
        if not self.pipe_closed and not self._closing.is_set():
            self.pipe_closed = True
            self.request_quit("pipe-closed")
        self.pipe_closed = True


class TrainerLink:
    """The server side of the pipe: sends commands, hands received batches to a callback.

    ``on_batch`` and ``on_closed`` run on the reader thread; the supervisor forwards them to
    its event loop. ``on_closed`` is called exactly once, when the trainer's end goes away.
    """

    def __init__(self, conn: Connection, on_batch: Callable[[list[dict[str, Any]]], None],
                 on_closed: Callable[[], None]) -> None:
        self._conn = conn
        self._on_batch = on_batch
        self._on_closed = on_closed
        self._send_lock = threading.Lock()
        self._stop = _StopSignal()
        self.closed = False
        self.protocol_errors = 0
        self.last_receive = time.monotonic()
        self._reader = threading.Thread(target=self._read_loop, name="traindeck-link-read", daemon=True)
        self._reader.start()

    def send_command(self, command_id: str, line: str) -> bool:
        """False when the trainer's end is gone (the command was not delivered)."""
        return self._send(command_message(command_id, line))

    def send_quit(self) -> bool:
        return self._send(quit_message())

    def _send(self, message: CommandMessage | QuitMessage) -> bool:
        if self.closed:
            return False
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError):
            return False
        return True

    def close(self) -> None:
        """Stop reading and close the server's end (the trainer then sees a closed pipe)."""
        self._stop.set()
        if self._reader is not threading.current_thread():
            self._reader.join(READER_JOIN_S)
        with self._send_lock:
            self._conn.close()

    def _read_loop(self) -> None:
        try:
            while self._stop.wait_readable(self._conn):
                try:
                    batch = check_trainer_batch(self._conn.recv())
                except ProtocolError:
                    self.protocol_errors += 1
                    continue
                self.last_receive = time.monotonic()
                self._on_batch(batch)
        except (EOFError, OSError):
            pass
        finally:
            self.closed = True
            self._on_closed()
            self._stop.close()
