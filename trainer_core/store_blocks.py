"""The block summary that lets a downsampled query read far fewer rows than the metric has.

``metric_blocks(name, block, low, high)`` holds, for every metric and every aligned block of
``BLOCK`` steps (``block = step // BLOCK``), the minimum and maximum value logged in it. The
writer refreshes the blocks a batch touched, from the raw rows, in the same transaction, so a
reader's snapshot always sees the two agree. Wide query buckets are aligned to blocks (see
:func:`bucket_grid`), so a bucket takes its min/max from the whole blocks inside it (plus raw rows
only at the two ends of the range) and its last point from one key lookup: about
``max_points * steps_per_bucket / BLOCK`` summary rows instead of every row, the same answer.

The table is derived data: a store without it (made by hand, or by another tool) is read from
the raw rows, and :func:`rebuild` recreates it from ``metrics``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from typing import Any

from trainer_core.sqlite_rows import insert_rows

BLOCK = 64
TABLE = "metric_blocks"
SCHEMA = (f"CREATE TABLE IF NOT EXISTS {TABLE}(name TEXT, block INTEGER, low REAL, high REAL, "
          "PRIMARY KEY (name, block)) WITHOUT ROWID")

_REFRESH = f"""
INSERT OR REPLACE INTO {TABLE}(name, block, low, high)
SELECT :name, :block, MIN(value), MAX(value) FROM metrics
WHERE name = :name AND step BETWEEN :block * {BLOCK} AND :block * {BLOCK} + {BLOCK - 1}
HAVING COUNT(*) > 0
"""

FLOOR_BLOCK = f"((step - ((step % {BLOCK}) + {BLOCK}) % {BLOCK}) / {BLOCK})"  # SQLite's % truncates toward 0
MAX_SPAN_BLOCKS = 64

# Each query walks the bucket table by its primary key, so grouping needs no sort.
_LAST = """
SELECT b.i, m.step, m.value FROM temp.buckets AS b
JOIN metrics AS m ON m.name = :name
 AND m.step = (SELECT MAX(step) FROM metrics WHERE name = :name AND step BETWEEN b.lo AND b.hi)
ORDER BY b.i
"""
_RAW_RANGE = """
SELECT b.i, MIN(r.value), MAX(r.value) FROM temp.buckets AS b
JOIN metrics AS r ON r.name = :name AND r.step BETWEEN b.{lo} AND b.{hi}
WHERE b.{hi} >= b.{lo}
GROUP BY b.i
"""
_BLOCK_RANGE = f"""
SELECT b.i, MIN(k.low), MAX(k.high) FROM temp.buckets AS b
JOIN {TABLE} AS k ON k.name = :name AND k.block BETWEEN b.first_block AND b.last_block
GROUP BY b.i
"""
# Narrow buckets hold no whole block: one pass over the raw rows, bucket by bucket, is cheaper
# than the three range queries above. (GROUP BY on a computed bucket number would sort every row.)
_SINGLE_PASS = """
SELECT g.i, g.last, m.value, g.low, g.high
FROM (SELECT b.i AS i, MAX(r.step) AS last, MIN(r.value) AS low, MAX(r.value) AS high
      FROM temp.buckets AS b JOIN metrics AS r ON r.name = :name AND r.step BETWEEN b.lo AND b.hi
      GROUP BY b.i) AS g
JOIN metrics AS m ON m.name = :name AND m.step = g.last
ORDER BY g.i
"""
MIN_BLOCKS_PER_BUCKET = 4
BUCKETS_TABLE = ("CREATE TEMP TABLE buckets(i INTEGER PRIMARY KEY, lo INTEGER, hi INTEGER, head_hi INTEGER, "
                 "first_block INTEGER, last_block INTEGER, tail_lo INTEGER)")

Series = dict[str, list[Any]]


# -- the writer's side ---------------------------------------------------------------------------

def refresh(conn: sqlite3.Connection, touched: Iterable[tuple[str, int]]) -> None:
    """Recompute the blocks holding these (name, step) pairs from the raw rows."""
    keys = {(name, step // BLOCK) for name, step in touched}
    conn.executemany(_REFRESH, [{"name": name, "block": block} for name, block in keys])


def refresh_span(conn: sqlite3.Connection, names: Iterable[str], low: int, high: int) -> bool:
    """Recompute every block of ``names`` between steps ``low`` and ``high``; False (and nothing done) when too wide.

    A running loop's batch covers a short span of consecutive steps, so these are about the blocks
    it wrote to (a block a name has no row in is left alone). A span over more than
    ``MAX_SPAN_BLOCKS`` blocks (steps logged far apart) is left to :func:`refresh` with the exact
    steps, so a refresh never walks a long stretch of empty blocks.
    """
    first, last = low // BLOCK, high // BLOCK
    if last - first > MAX_SPAN_BLOCKS:
        return False
    conn.executemany(_REFRESH, [{"name": name, "block": block} for name in names for block in range(first, last + 1)])
    return True


def truncate(conn: sqlite3.Connection, names: Iterable[str], step: int) -> None:
    """Follow ``DELETE FROM metrics WHERE step > step``: drop later blocks, redo the cut one."""
    cut = step // BLOCK
    for name in names:
        conn.execute(f"DELETE FROM {TABLE} WHERE name = ? AND block >= ?", (name, cut))
        conn.execute(_REFRESH, {"name": name, "block": cut})


def rebuild(conn: sqlite3.Connection) -> None:
    """Recreate every block from ``metrics`` (for a store whose summary is missing or stale)."""
    conn.execute(f"DELETE FROM {TABLE}")
    conn.execute(f"INSERT INTO {TABLE}(name, block, low, high) SELECT name, {FLOOR_BLOCK}, MIN(value), MAX(value) "
                 f"FROM metrics GROUP BY name, {FLOOR_BLOCK}")


def present(conn: sqlite3.Connection) -> bool:
    row = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,)).fetchone()
    return row is not None


# -- the reader's side ---------------------------------------------------------------------------

def bucket_grid(lo: int, hi: int, max_points: int) -> tuple[int, int]:
    """``(origin, width)``: step ``s`` of ``[lo, hi]`` belongs to bucket ``(s - origin) // width``.

    ``width`` is the smallest that fits ``[lo, hi]`` into ``max_points`` buckets from ``origin = lo``.
    Buckets of ``MIN_BLOCKS_PER_BUCKET`` blocks or more are aligned to the block summary instead:
    ``origin`` is ``lo`` rounded down to a block and ``width`` a whole number of blocks, so every
    bucket but the first and last is made of whole blocks and reads no raw row at all.
    """
    width = -(-(hi - lo + 1) // max_points)
    if width < MIN_BLOCKS_PER_BUCKET * BLOCK:
        return lo, width
    origin = lo - lo % BLOCK
    width = -(-(hi - origin + 1) // max_points)
    return origin, -(-width // BLOCK) * BLOCK


def bucket_rows(lo: int, hi: int, max_points: int, use_blocks: bool) -> list[tuple[int, ...]]:
    """Rows of the bucket table for the grid of :func:`bucket_grid`, each bucket clipped to ``[lo, hi]``.

    Each bucket ``[start, end]`` is split into a raw head ``[start, head_hi]``, whole blocks
    ``[first_block, last_block]`` and a raw tail ``[tail_lo, end]``; a bucket too narrow to hold
    a whole block is all head.
    """
    origin, width = bucket_grid(lo, hi, max_points)
    rows = []
    for i in range((hi - origin) // width + 1):
        start, end = max(lo, origin + i * width), min(hi, origin + (i + 1) * width - 1)
        first, last = -(-start // BLOCK), (end + 1) // BLOCK - 1
        if use_blocks and first <= last:
            rows.append((i, start, end, first * BLOCK - 1, first, last, (last + 1) * BLOCK))
        else:
            rows.append((i, start, end, end, 1, 0, end + 1))
    return rows


def downsample(conn: sqlite3.Connection, name: str, lo: int, hi: int, max_points: int,
               use_blocks: bool) -> Series:
    """Last step, its value, and min/max of every non-empty bucket of ``[lo, hi]``."""
    use_blocks = use_blocks and bucket_grid(lo, hi, max_points)[1] >= MIN_BLOCKS_PER_BUCKET * BLOCK
    conn.execute("DELETE FROM temp.buckets")
    insert_rows(conn, "INSERT INTO temp.buckets VALUES ", 7,
                [value for row in bucket_rows(lo, hi, max_points, use_blocks) for value in row])
    args = {"name": name}
    if not use_blocks:
        rows = conn.execute(_SINGLE_PASS, args).fetchall()
        return {"step": [r[1] for r in rows], "value": [r[2] for r in rows],
                "min": [r[3] for r in rows], "max": [r[4] for r in rows]}
    lows: dict[int, float] = {}
    highs: dict[int, float] = {}
    for query in (_RAW_RANGE.format(lo="lo", hi="head_hi"), _RAW_RANGE.format(lo="tail_lo", hi="hi"), _BLOCK_RANGE):
        for i, low, high in conn.execute(query, args):
            if low is not None:
                lows[i] = low if i not in lows else min(lows[i], low)
                highs[i] = high if i not in highs else max(highs[i], high)
    series: Series = {"step": [], "value": [], "min": [], "max": []}
    for i, step, value in conn.execute(_LAST, args):
        series["step"].append(step)
        series["value"].append(value)
        series["min"].append(lows.get(i))
        series["max"].append(highs.get(i))
    return series
