"""The metrics store: one SQLite file per run that the loop writes and anyone can read.

The schema is public (users open it with ``sqlite3`` or pandas)::

    metrics(step INTEGER, name TEXT, value REAL, time REAL)   PRIMARY KEY (name, step), WITHOUT ROWID
    events(id INTEGER PRIMARY KEY, time REAL, step INTEGER, kind TEXT, data TEXT)   data is JSON

``metrics`` is clustered on ``(name, step)``: that key is the index every read goes through, it
keeps one row per metric per step (logging a step again replaces the row, which is what a resumed
run wants), and a range scan reads values without a second lookup, so the file is about half the
size of a rowid table plus a covering index. A third table, ``metric_blocks``, is a summary derived
from ``metrics`` (see :mod:`trainer_core.store_blocks`) that keeps downsampled queries fast.

NaN cannot be stored in a SQLite REAL (SQLite turns it into NULL), so a NaN is stored as NULL and
every reader here returns it as ``None`` (JSON ``null``); ``inf``/``-inf`` are stored and returned
as floats. Bucket minima and maxima ignore NULLs (``None`` when a bucket holds only NaNs).

Writing never blocks the loop on disk: :meth:`MetricsStore.log_metrics` and
:meth:`MetricsStore.log_event` append to in-memory lists under a lock, and a background thread
commits them in batches. Readers open the file read-only, so the server and user scripts can
query a run while it trains (WAL mode lets readers and the writer proceed together).
"""

from __future__ import annotations

import json
import math
import operator
import sqlite3
import threading
import time as _time
from collections.abc import Iterable, Mapping, Sequence
from itertools import chain, repeat
from pathlib import Path
from typing import Any
from urllib.parse import quote

from trainer_core import store_blocks
from trainer_core.sqlite_rows import insert_rows

SCHEMA = (
    "CREATE TABLE IF NOT EXISTS metrics(step INTEGER, name TEXT, value REAL, time REAL, "
    "PRIMARY KEY (name, step)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS events(id INTEGER PRIMARY KEY, time REAL, step INTEGER, kind TEXT, data TEXT)",
    store_blocks.SCHEMA,
)
INSERT_METRICS = "INSERT OR REPLACE INTO metrics(step, name, value, time) VALUES "
INSERT_EVENT = "INSERT OR REPLACE INTO events(id, time, step, kind, data) VALUES (?, ?, ?, ?, ?)"

FLUSH_INTERVAL_S = 0.25
BATCH_ROWS = 5000
WRITE_TIMEOUT_S = 30.0
READ_BUSY_TIMEOUT_S = 2.0
MAX_POINTS_LIMIT = 100_000
MAX_EVENTS_LIMIT = 100_000

MetricRow = tuple[int, str, float | None, float]
EventRow = tuple[int, float, int, str, str]


class StoreError(OSError):
    """The store file cannot be read or written; the message names the file."""


def _metric_rows(step: int, values: Mapping[str, Any], now: float) -> list[MetricRow]:
    if not all(type(name) is str and name for name in values):
        raise ValueError(f"metric names at step {step} must be non-empty strings, got {list(values)!r}")
    try:
        return [(step, name, None if math.isnan(v := float(value)) else v, now) for name, value in values.items()]
    except (TypeError, ValueError):
        bad = {name: value for name, value in values.items() if not _is_number(value)}
        raise ValueError(f"metric values at step {step} must be numbers, got {bad!r}") from None


def _flatten(batch: list[tuple[int, Mapping[str, float | None], float]]) -> tuple[list[Any], set[str], int, int]:
    """The batch as one flat parameter list (step, name, value, time per row), its names and step range.

    The writer binds many rows to one statement (see :mod:`trainer_core.sqlite_rows`). The rows are
    laid out by C iterators, one call per logged step, since the writer's Python time is taken from the loop's
    (a NaN binds as NULL by itself).
    """
    flat: list[Any] = []
    extend = flat.extend
    names: set[str] = set()
    low = high = batch[0][0]
    for step, values, now in batch:
        count = len(values)
        extend(chain.from_iterable(zip(repeat(step, count), values, values.values(), repeat(now, count),
                                       strict=True)))
        names.update(values)
        if step > high:
            high = step
        elif step < low:
            low = step
    return flat, names, low, high


def _event_json(kind: str, data: Mapping[str, Any] | None) -> tuple[dict[str, Any], str]:
    """The event's data and its JSON text; NaN/inf become null, since strict JSON has neither."""
    if data is not None and not isinstance(data, Mapping):
        raise ValueError(f"event {kind!r}: data must be a mapping, got {type(data).__name__}")
    payload = dict(data or {})
    try:
        return payload, json.dumps(payload, allow_nan=False)
    except ValueError:
        payload = _finite_json(payload)
        return payload, json.dumps(payload, allow_nan=False)
    except TypeError as exc:
        raise ValueError(f"event {kind!r}: data is not JSON-serialisable ({exc})") from None


def _finite_json(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: _finite_json(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_json(item) for item in value]
    return value


def _is_number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


class MetricsStore:
    """The writer: lives in the trainer process (rank 0), one per run directory.

    ``log_*`` calls cost the loop a few microseconds; rows reach disk within ``flush_interval``
    seconds, or sooner when ``batch_rows`` rows are waiting. ``flush()`` waits for disk.
    """

    def __init__(self, path: str | Path, *, flush_interval: float = FLUSH_INTERVAL_S,
                 batch_rows: int = BATCH_ROWS) -> None:
        self.path = Path(path)
        self.flush_interval = flush_interval
        self.batch_rows = batch_rows
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(self.path, timeout=WRITE_TIMEOUT_S, isolation_level=None,
                                         check_same_thread=False)
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            summarised = store_blocks.present(self._conn)
            for statement in SCHEMA:
                self._conn.execute(statement)
            if not summarised:
                store_blocks.rebuild(self._conn)
            (max_id,) = self._conn.execute("SELECT MAX(id) FROM events").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"cannot open metrics store {self.path}: {exc}") from exc
        self._next_id = (max_id or 0) + 1
        self._lock = threading.Lock()
        self._written = threading.Condition(self._lock)
        self._wake = threading.Event()
        self._metrics: list[tuple[int, Mapping[str, float | None], float]] = []  # (step, values, time)
        self._pending_rows = 0
        self._events: list[EventRow] = []
        self._truncate: int | None = None
        self._queued = 0
        self._done = 0
        self._error: BaseException | None = None
        self._closing = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"metrics-store:{self.path.name}", daemon=True)
        self._thread.start()

    # -- the loop's side: cheap, never touches disk ------------------------------------------

    def log_metrics(self, step: int, values: Mapping[str, float], time: float | None = None) -> None:
        """Queue one row per metric for ``step``; NaN is stored as NULL.

        The loop calls this every step, so plain float values are queued as the mapping itself
        and turned into rows by the writer thread; anything else is checked here, so a bad value
        is reported to the caller, not to the writer.
        """
        if type(step) is not int:
            step = operator.index(step)
        now = _time.time() if time is None else float(time)
        for name, value in values.items():  # a plain loop: this runs every step
            if type(value) is not float or type(name) is not str or not name:
                values = {name: value for _, name, value, _ in _metric_rows(step, values, now)}
                break
        self.log_float_steps([(step, values, now)])

    def log_float_steps(self, rows: list[tuple[int, Mapping[str, float | None], float]]) -> None:
        """Queue several steps at once, each ``(step, values, time)``, with no per-value check.

        For the training loop: it builds every value with ``float()`` and hands over the steps
        trained since its last poll, so a step costs it one list append and the store one lock
        per batch.
        """
        with self._lock:
            if self._closing or self._error is not None:
                self._check_open()
            self._metrics += rows
            self._queued += len(rows)
            self._pending_rows = pending = self._pending_rows + sum(len(values) for _, values, _ in rows)
        if pending >= self.batch_rows:
            self._wake.set()

    def log_event(self, kind: str, step: int, data: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Queue an event and return its row; the id is final at once (ids never repeat in a file)."""
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"event kind must be a non-empty string, got {kind!r}")
        step = operator.index(step)
        payload, text = _event_json(kind, data)
        now = _time.time()
        with self._lock:
            self._check_open()
            event_id = self._next_id
            self._next_id += 1
            self._events.append((event_id, now, step, kind, text))
            self._queued += 1
        self._wake.set()
        return {"id": event_id, "time": now, "step": step, "kind": kind, "data": payload}

    def truncate_after(self, step: int) -> None:
        """Delete metric rows with a step above ``step`` (events stay), then wait for disk.

        A resumed run calls this with its checkpoint's step so the interrupted run's later
        points do not mix into the new curve. Rows logged after this call are kept.
        """
        step = operator.index(step)
        with self._lock:
            self._check_open()
            self._metrics = [entry for entry in self._metrics if entry[0] <= step]
            self._pending_rows = sum(len(values) for _, values, _ in self._metrics)
            self._truncate = step if self._truncate is None else min(self._truncate, step)
            self._queued += 1
        self.flush()

    def flush(self, timeout: float = WRITE_TIMEOUT_S) -> None:
        """Return once everything queued before the call is committed to the file."""
        with self._lock:
            target = self._queued
        self._wake.set()
        with self._written:
            finished = self._written.wait_for(
                lambda: self._done >= target or self._error is not None or not self._thread.is_alive(), timeout)
            if self._error is not None:
                raise StoreError(f"writing metrics store {self.path} failed: {self._error}") from self._error
            if not finished:
                raise StoreError(f"metrics store {self.path}: flush did not finish within {timeout:.0f} s")

    def close(self, timeout: float = WRITE_TIMEOUT_S) -> None:
        """Flush, stop the writer thread and close the file; safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closing = True
        self._wake.set()
        self._thread.join(timeout)
        with self._lock:
            self._closed = True
        if self._thread.is_alive():
            raise StoreError(f"metrics store {self.path}: writer did not stop within {timeout:.0f} s")
        self._conn.close()
        if self._error is not None:
            raise StoreError(f"writing metrics store {self.path} failed: {self._error}") from self._error

    def __enter__(self) -> MetricsStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closing or self._closed:
            raise StoreError(f"metrics store {self.path} is closed")
        if self._error is not None:
            raise StoreError(f"writing metrics store {self.path} failed: {self._error}") from self._error

    # -- the writer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            self._wake.wait(self.flush_interval)
            self._wake.clear()
            with self._lock:
                batch, self._metrics = self._metrics, []
                self._pending_rows = 0
                events, self._events = self._events, []
                truncate, self._truncate = self._truncate, None
                target = self._queued
                closing = self._closing
            try:
                self._write(batch, events, truncate)
            except BaseException as exc:  # reported by flush/close/log_*; the thread must not die silently
                with self._written:
                    self._error = exc
                    self._written.notify_all()
                return
            with self._written:
                self._done = target
                self._written.notify_all()
            if closing:
                return

    def _write(self, batch: list[tuple[int, Mapping[str, float | None], float]], events: list[EventRow],
               truncate: int | None) -> None:
        if not batch and not events and truncate is None:
            return
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            if truncate is not None:
                names = [name for (name,) in conn.execute(_NAMES_QUERY)]
                conn.executemany("DELETE FROM metrics WHERE name = ? AND step > ?", [(n, truncate) for n in names])
                store_blocks.truncate(conn, names, truncate)
            if batch:
                flat, names, low, high = _flatten(batch)
                insert_rows(conn, INSERT_METRICS, 4, flat)
                if not store_blocks.refresh_span(conn, names, low, high):
                    store_blocks.refresh(conn, zip(flat[1::4], flat[::4], strict=True))
            if events:
                conn.executemany(INSERT_EVENT, events)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


# -- the read side: any process, read-only, a missing file reads as empty ----------------------

def _connect_ro(path: str | Path) -> sqlite3.Connection | None:
    file = Path(path)
    if not file.is_file():
        return None
    uri = f"file:{quote(str(file.resolve()))}?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=READ_BUSY_TIMEOUT_S, isolation_level=None)
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"cannot open metrics store {file}: {exc}") from exc
    return conn


def _read(path: str | Path, query: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> list[tuple[Any, ...]]:
    """Run one read query; a missing file or a file without the tables reads as no rows."""
    conn = _connect_ro(path)
    if conn is None:
        return []
    try:
        return conn.execute(query, params).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise StoreError(f"cannot read metrics store {path}: {exc}") from exc
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"cannot read metrics store {path}: {exc}") from exc
    finally:
        conn.close()


# Walks the (name, step) key from one name to the next: O(names * log rows), not a full scan.
_NAMES_CTE = """
WITH RECURSIVE names(name) AS (
    SELECT MIN(name) FROM metrics
    UNION ALL
    SELECT (SELECT MIN(name) FROM metrics WHERE name > names.name) FROM names WHERE names.name IS NOT NULL
)
"""
_NAMES_QUERY = _NAMES_CTE + "SELECT name FROM names WHERE name IS NOT NULL"
# The highest step of each name is one key lookup; MAX(step) over the table would scan it all.
_LAST_STEP_QUERY = _NAMES_CTE + (
    "SELECT MAX((SELECT MAX(step) FROM metrics WHERE metrics.name = names.name)) FROM names "
    "WHERE names.name IS NOT NULL"
)


def metric_names(path: str | Path) -> list[str]:
    """Every metric name in the store, sorted."""
    return [name for (name,) in _read(path, _NAMES_QUERY)]


def last_step(path: str | Path) -> int | None:
    """The highest step with a metric row, or None for an empty or missing store."""
    rows = _read(path, _LAST_STEP_QUERY)
    return rows[0][0] if rows else None


def query_events(path: str | Path, since_id: int = 0, limit: int = 1000,
                 kinds: Iterable[str] | None = None) -> list[dict[str, Any]]:
    """Events with ``id > since_id``, oldest first, at most ``limit``; ``data`` parsed from JSON."""
    since_id = _int_arg("since_id", since_id, 0, None)
    limit = _int_arg("limit", limit, 1, MAX_EVENTS_LIMIT)
    query = "SELECT id, time, step, kind, data FROM events WHERE id > ?"
    params: list[Any] = [since_id]
    if kinds is not None:
        wanted = [kinds] if isinstance(kinds, str) else list(kinds)
        if not all(isinstance(kind, str) for kind in wanted):
            raise ValueError(f"kinds must be strings, got {wanted!r}")
        query += f" AND kind IN ({', '.join('?' * len(wanted))})"
        params.extend(wanted)
    query += " ORDER BY id LIMIT ?"
    params.append(limit)
    return [{"id": i, "time": t, "step": s, "kind": k, "data": json.loads(d) if d else {}}
            for i, t, s, k, d in _read(path, query, params)]


def _int_arg(name: str, value: Any, low: int | None, high: int | None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"{low if low is not None else '-inf'}..{high if high is not None else 'inf'}"
        raise ValueError(f"{name} must be in {bounds}, got {value}")
    return value


_FIRST_ROWS = "SELECT step, value FROM metrics WHERE name = ? AND step BETWEEN ? AND ? ORDER BY step LIMIT ?"
_LAST_STEP = "SELECT step FROM metrics WHERE name = ? AND step BETWEEN ? AND ? ORDER BY step DESC LIMIT 1"
_STEP_MIN = -(2**63)
_STEP_MAX = 2**63 - 1

Series = store_blocks.Series


def query_metrics(path: str | Path, names: str | Iterable[str], max_points: int = 2000,
                  from_step: int | None = None, to_step: int | None = None) -> dict[str, Series]:
    """Each metric's points in ``[from_step, to_step]``, downsampled to at most ``max_points``.

    Returns ``{name: {"step", "value", "min", "max"}}`` (parallel lists). With more rows than
    ``max_points`` in range, the range ``[lo, hi]`` of steps actually present is cut into at most
    ``max_points`` buckets of ``width`` steps from ``origin`` (step ``s`` goes to bucket
    ``(s - origin) // width``; see :func:`trainer_core.store_blocks.bucket_grid`: ``origin = lo``
    and ``width = ceil((hi - lo + 1) / max_points)``, except that buckets of 256 steps or more start
    on a multiple of 64 and are a multiple of 64 wide); each non-empty bucket gives its last step,
    that step's value, and the bucket's min and max.
    Otherwise every row comes back with ``min == max == value``. Unknown names get empty lists.
    """
    wanted = _names_arg(names)
    max_points = _int_arg("max_points", max_points, 1, MAX_POINTS_LIMIT)
    low = _STEP_MIN if from_step is None else _int_arg("from_step", from_step, _STEP_MIN, _STEP_MAX)
    high = _STEP_MAX if to_step is None else _int_arg("to_step", to_step, _STEP_MIN, _STEP_MAX)
    if low > high:
        raise ValueError(f"from_step ({from_step}) must not be greater than to_step ({to_step})")
    result = {name: _series() for name in wanted}
    conn = _connect_ro(path)
    if conn is None:
        return result
    try:
        conn.execute("PRAGMA temp_store = MEMORY")
        conn.execute("BEGIN")  # one snapshot for every name, and one transaction for the bucket table
        conn.execute(store_blocks.BUCKETS_TABLE)
        use_blocks = store_blocks.present(conn)
        for name in wanted:
            result[name] = _query_one(conn, name, max_points, low, high, use_blocks)
        conn.execute("ROLLBACK")
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise StoreError(f"cannot read metrics store {path}: {exc}") from exc
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"cannot read metrics store {path}: {exc}") from exc
    finally:
        conn.close()
    return result


def _query_one(conn: sqlite3.Connection, name: str, max_points: int, low: int, high: int,
               use_blocks: bool) -> Series:
    rows = conn.execute(_FIRST_ROWS, (name, low, high, max_points + 1)).fetchall()
    if len(rows) <= max_points:
        values = [value for _, value in rows]
        return {"step": [step for step, _ in rows], "value": values, "min": list(values), "max": list(values)}
    (hi,) = conn.execute(_LAST_STEP, (name, rows[0][0], high)).fetchone()
    return store_blocks.downsample(conn, name, rows[0][0], hi, max_points, use_blocks)


def _series() -> Series:
    return {"step": [], "value": [], "min": [], "max": []}


def _names_arg(names: str | Iterable[str]) -> list[str]:
    wanted = [names] if isinstance(names, str) else list(names)
    for name in wanted:
        if not isinstance(name, str) or not name:
            raise ValueError(f"metric names must be non-empty strings, got {name!r}")
    return list(dict.fromkeys(wanted))
