"""Metrics store speed: logging cost in the loop, and dashboard queries over 10^6 points per metric.

Baselines, measured in the same run on the same file:

* logging: one ``INSERT`` + ``COMMIT`` per step on the loop's thread (what a loop writing
  SQLite directly does), against ``MetricsStore.log_metrics`` (queue, background batches);
* querying: ``SELECT`` every row of the metric and downsample in Python (same buckets, same
  last/min/max), against ``query_metrics``; also SQLite's ``GROUP BY`` on a computed bucket number,
  the obvious all-SQL query, which must sort every row; and ``query_metrics`` on a copy of the
  store without its block summary (one pass over every row).

Usage: ``python bench/store.py [--points 1000000] [--repeat 5]``
"""

from __future__ import annotations

import argparse
import math
import random
import shutil
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from trainer_core import store
from trainer_core.store import MetricsStore, query_metrics

NAMES = ("train/loss", "train/grad_norm")


def median_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fill(path: Path, points: int) -> float:
    """Log ``points`` steps of every metric through the writer, close it; return µs per step, all in."""
    rng = random.Random(0)
    values = [{name: rng.gauss(1.0, 0.3) for name in NAMES} for _ in range(10_000)]
    start = time.perf_counter()
    with MetricsStore(path) as writer:
        for step in range(points):
            writer.log_metrics(step, values[step % 10_000])
    return (time.perf_counter() - start) / points * 1e6


def queue_only_us(path: Path, steps: int) -> float:
    """What log_metrics costs the loop itself while the writer thread is idle."""
    row = dict.fromkeys(NAMES, 1.0)
    with MetricsStore(path, flush_interval=3600, batch_rows=10**9) as writer:
        start = time.perf_counter()
        for step in range(steps):
            writer.log_metrics(step, row)
        return (time.perf_counter() - start) / steps * 1e6


def direct_insert_us(path: Path, steps: int) -> float:
    """The naive loop: write each step's rows and commit before the next step."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE metrics(step INTEGER, name TEXT, value REAL, time REAL)")
    conn.execute("CREATE INDEX metrics_name_step ON metrics(name, step)")
    start = time.perf_counter()
    for step in range(steps):
        conn.execute("BEGIN")
        conn.executemany("INSERT INTO metrics VALUES (?, ?, ?, ?)", [(step, n, 1.0, time.time()) for n in NAMES])
        conn.execute("COMMIT")
    spent = time.perf_counter() - start
    conn.close()
    return spent / steps * 1e6


def naive_query(path: Path, name: str, max_points: int) -> dict[str, list]:
    """Fetch everything, bucket in Python: the baseline."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    rows = conn.execute("SELECT step, value FROM metrics WHERE name = ? ORDER BY step", (name,)).fetchall()
    conn.close()
    if len(rows) <= max_points:
        values = [v for _, v in rows]
        return {"step": [s for s, _ in rows], "value": values, "min": values, "max": values}
    lo, hi = rows[0][0], rows[-1][0]
    width = hi - lo + 1
    out: dict[str, list] = {"step": [], "value": [], "min": [], "max": []}
    current, low, high, last = -1, math.inf, -math.inf, (0, None)
    for step, value in rows:
        bucket = (step - lo) * max_points // width
        if bucket != current and current >= 0:
            _emit(out, last, low, high)
            low, high = math.inf, -math.inf
        current, last = bucket, (step, value)
        if value is not None:
            low, high = min(low, value), max(high, value)
    _emit(out, last, low, high)
    return out


def _emit(out: dict[str, list], last: tuple, low: float, high: float) -> None:
    out["step"].append(last[0])
    out["value"].append(last[1])
    out["min"].append(None if low == math.inf else low)
    out["max"].append(None if high == -math.inf else high)


def group_by_query(path: Path, name: str, max_points: int) -> int:
    """All in SQL with GROUP BY on the computed bucket (sorts every row)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    lo, hi = conn.execute("SELECT MIN(step), MAX(step) FROM metrics WHERE name = ?", (name,)).fetchone()
    rows = conn.execute(
        "SELECT MAX(step), MIN(value), MAX(value) FROM metrics WHERE name = :n "
        "GROUP BY (step - :lo) * :m / (:hi - :lo + 1)", {"n": name, "lo": lo, "hi": hi, "m": max_points}).fetchall()
    conn.close()
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=1_000_000, help="steps per metric")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--max-points", type=int, default=2000)
    args = parser.parse_args()
    name, m = NAMES[0], args.max_points

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "metrics.sqlite"
        start = time.perf_counter()
        total_us = fill(path, args.points)
        fill_s = time.perf_counter() - start
        queue_us = queue_only_us(Path(tmp) / "queue.sqlite", min(args.points, 100_000))
        naive_log_us = direct_insert_us(Path(tmp) / "direct.sqlite", min(args.points, 20_000))
        print(f"store: {args.points:,} steps x {len(NAMES)} metrics, file {path.stat().st_size / 1e6:.0f} MB, "
              f"written in {fill_s:.1f} s")
        print(f"log_metrics ({len(NAMES)} values): {queue_us:.2f} us/call in the loop, {total_us:.1f} us/step "
              f"with the writer thread's work; insert+commit per step {naive_log_us:.0f} us/step -> "
              f"{naive_log_us / queue_us:.0f}x less loop time")

        ours = query_metrics(path, [name], max_points=m)[name]
        assert ours == naive_query(path, name, m), "query_metrics and the Python reference disagree"
        t_ours = median_time(lambda: query_metrics(path, [name], max_points=m), args.repeat)
        t_naive = median_time(lambda: naive_query(path, name, m), args.repeat)
        t_group = median_time(lambda: group_by_query(path, name, m), args.repeat)
        print(f"full range, {m} points of {args.points:,}: query_metrics {t_ours * 1e3:.0f} ms; "
              f"select-all+Python {t_naive * 1e3:.0f} ms -> {t_naive / t_ours:.1f}x faster; "
              f"SQL GROUP BY {t_group * 1e3:.0f} ms -> {t_group / t_ours:.1f}x faster")

        bare = Path(tmp) / "bare.sqlite"
        shutil.copy(path, bare)
        with sqlite3.connect(bare) as conn:
            conn.execute("DROP TABLE metric_blocks")
        assert query_metrics(bare, [name], max_points=m)[name] == ours
        t_bare = median_time(lambda: query_metrics(bare, [name], max_points=m), args.repeat)
        print(f"  same query without the block summary: {t_bare * 1e3:.0f} ms -> {t_bare / t_ours:.1f}x")

        both = median_time(lambda: query_metrics(path, list(NAMES), max_points=m), args.repeat)
        print(f"two metrics, full range: {both * 1e3:.0f} ms")
        lo = args.points // 2
        zoom = median_time(lambda: query_metrics(path, [name], m, lo, lo + args.points // 10), args.repeat)
        tail = median_time(lambda: query_metrics(path, [name], m, args.points - 500), args.repeat)
        names_s = median_time(lambda: store.metric_names(path), args.repeat)
        last_s = median_time(lambda: store.last_step(path), args.repeat)
        print(f"zoom to 10% of the steps: {zoom * 1e3:.0f} ms; newest 500 steps: {tail * 1e3:.1f} ms; "
              f"metric_names {names_s * 1e3:.1f} ms; last_step {last_s * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
