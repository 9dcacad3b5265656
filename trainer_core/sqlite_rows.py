"""Many rows per INSERT statement.

``executemany`` steps its statement once per row and gives up the GIL around every step; with a
training thread (or other request threads) wanting the GIL back, each row can cost a thread
switch. Binding a batch of rows to one multi-row INSERT costs one. Statements have power-of-two
row counts, so a handful of texts cover every batch and each is parsed once and cached.
"""

from __future__ import annotations

import functools
import sqlite3
from typing import Any

MAX_ROWS_PER_STATEMENT = 4096


@functools.cache
def _statement(head: str, columns: int, rows: int) -> str:
    row = "(" + ", ".join("?" * columns) + ")"
    return head + ", ".join([row] * rows)


def insert_rows(conn: sqlite3.Connection, head: str, columns: int, flat: list[Any]) -> None:
    """Insert ``flat`` (``columns`` values per row, row after row) with ``head`` (``INSERT ... VALUES ``)."""
    largest = min(MAX_ROWS_PER_STATEMENT, conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // columns)
    largest = 1 << (max(1, largest).bit_length() - 1)
    start, rows = 0, len(flat) // columns
    while rows:
        count = min(largest, 1 << (rows.bit_length() - 1))
        conn.execute(_statement(head, columns, count), flat[start:start + columns * count])
        start, rows = start + columns * count, rows - count
