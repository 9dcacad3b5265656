"""The metrics store: round trips, resumed ids, concurrent readers, exact downsampling."""

from __future__ import annotations

import json
import math
import multiprocessing
import random
import sqlite3
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainer_core import sqlite_rows, store
from trainer_core.store import MetricsStore, StoreError, query_metrics


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "metrics.sqlite"


def test_metrics_round_trip_through_the_public_schema(db: Path) -> None:
    with MetricsStore(db) as writer:
        for step in range(5):
            writer.log_metrics(step, {"train/loss": 1.0 / (step + 1), "train/lr": 0.1}, time=100.0 + step)
    rows = sqlite3.connect(db).execute("SELECT step, name, value, time FROM metrics ORDER BY name, step").fetchall()
    assert rows[:2] == [(0, "train/loss", 1.0, 100.0), (1, "train/loss", 0.5, 101.0)]
    assert len(rows) == 10
    assert store.metric_names(db) == ["train/loss", "train/lr"]
    assert store.last_step(db) == 4
    series = query_metrics(db, ["train/loss"])["train/loss"]
    assert series["step"] == [0, 1, 2, 3, 4]
    assert series["value"] == series["min"] == series["max"] == [1.0, 0.5, 1 / 3, 0.25, 0.2]


def test_events_round_trip_with_ids_assigned_at_once(db: Path) -> None:
    with MetricsStore(db) as writer:
        first = writer.log_event("command", 3, {"id": "c1", "line": "save", "source": "web"})
        second = writer.log_event("pause", 4, {})
        assert (first["id"], second["id"]) == (1, 2)
        assert first["data"] == {"id": "c1", "line": "save", "source": "web"}
        assert set(first) == {"id", "time", "step", "kind", "data"}
    events = store.query_events(db)
    assert [e["id"] for e in events] == [1, 2]
    assert events[0] == first
    assert store.query_events(db, since_id=1) == [second]
    assert store.query_events(db, kinds=["pause"]) == [second]
    assert store.query_events(db, limit=1) == [first]
    raw = sqlite3.connect(db).execute("SELECT data FROM events WHERE id = 1").fetchone()[0]
    assert json.loads(raw)["line"] == "save"


def test_event_data_is_strict_json_with_non_finite_numbers_as_null(db: Path) -> None:
    with MetricsStore(db) as writer:
        row = writer.log_event("eval", 5, {"metrics": {"loss": float("nan"), "ppl": float("inf"), "acc": 0.5}})
        with pytest.raises(ValueError, match=r"'eval'.*not JSON"):
            writer.log_event("eval", 5, {"metrics": object()})
        with pytest.raises(ValueError, match="mapping"):
            writer.log_event("eval", 5, [1, 2])  # type: ignore[arg-type]
    assert row["data"] == {"metrics": {"loss": None, "ppl": None, "acc": 0.5}}
    raw = sqlite3.connect(db).execute("SELECT data FROM events").fetchone()[0]
    assert json.loads(raw, parse_constant=lambda c: pytest.fail(f"non-standard JSON {c}")) == row["data"]
    assert store.query_events(db) == [row]


def test_event_ids_continue_when_a_resumed_run_reopens_the_file(db: Path) -> None:
    with MetricsStore(db) as writer:
        for step in range(3):
            writer.log_event("lr", step, {"lr": 0.1})
    with MetricsStore(db) as writer:
        assert writer.log_event("start", 3, {"resume_from": "step_00000002"})["id"] == 4
    assert [e["id"] for e in store.query_events(db)] == [1, 2, 3, 4]


def test_flush_makes_queued_rows_visible_to_another_connection(db: Path) -> None:
    writer = MetricsStore(db, flush_interval=60.0)
    try:
        writer.log_metrics(7, {"a": 1.5})
        writer.log_event("eval", 7, {"metrics": {"a": 1.5}})
        writer.flush()
        assert query_metrics(db, "a")["a"]["value"] == [1.5]
        assert store.query_events(db)[0]["kind"] == "eval"
    finally:
        writer.close()


def test_a_large_batch_is_written_without_waiting_for_the_interval(db: Path) -> None:
    writer = MetricsStore(db, flush_interval=60.0, batch_rows=100)
    try:
        for step in range(200):
            writer.log_metrics(step, {"a": float(step)})
        deadline = threading.Event()
        for _ in range(100):
            if (store.last_step(db) or 0) >= 99:
                break
            deadline.wait(0.05)
        assert (store.last_step(db) or 0) >= 99
    finally:
        writer.close()


def test_logging_a_step_again_replaces_its_row(db: Path) -> None:
    with MetricsStore(db) as writer:
        writer.log_metrics(1, {"a": 1.0})
        writer.flush()
        writer.log_metrics(1, {"a": 2.0})
    assert sqlite3.connect(db).execute("SELECT step, value FROM metrics").fetchall() == [(1, 2.0)]


def test_nan_reads_back_as_none_and_infinities_as_floats(db: Path) -> None:
    with MetricsStore(db) as writer:
        writer.log_metrics(0, {"a": float("nan"), "b": float("inf"), "c": float("-inf")})
        writer.log_metrics(1, {"a": 2.0, "b": 1.0, "c": 1.0})
    result = query_metrics(db, ["a", "b", "c"])
    assert result["a"]["value"] == [None, 2.0]
    assert result["b"]["value"] == [math.inf, 1.0]
    assert result["c"]["value"] == [-math.inf, 1.0]
    squeezed = query_metrics(db, ["a", "b"], max_points=1)
    assert squeezed["a"] == {"step": [1], "value": [2.0], "min": [2.0], "max": [2.0]}
    assert squeezed["b"] == {"step": [1], "value": [1.0], "min": [1.0], "max": [math.inf]}


def test_truncate_after_drops_later_metric_rows_and_keeps_events(db: Path) -> None:
    with MetricsStore(db) as writer:
        for step in range(10):
            writer.log_metrics(step, {"a": float(step)})
        writer.log_event("checkpoint", 9, {"path": "x", "bytes": 1})
    with MetricsStore(db) as writer:
        writer.log_metrics(20, {"a": 20.0})  # queued before the truncation: dropped too
        writer.truncate_after(4)
        assert store.last_step(db) == 4
        writer.log_metrics(5, {"a": -5.0})
    assert query_metrics(db, "a")["a"]["value"] == [0.0, 1.0, 2.0, 3.0, 4.0, -5.0]
    assert len(store.query_events(db)) == 1


def test_a_missing_store_reads_as_empty(tmp_path: Path) -> None:
    missing = tmp_path / "nothing.sqlite"
    assert store.metric_names(missing) == []
    assert store.last_step(missing) is None
    assert store.query_events(missing) == []
    assert query_metrics(missing, ["a"]) == {"a": {"step": [], "value": [], "min": [], "max": []}}
    assert not missing.exists()


def test_a_file_that_is_not_sqlite_gets_an_error_naming_it(tmp_path: Path) -> None:
    bogus = tmp_path / "metrics.sqlite"
    bogus.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"metrics\.sqlite"):
        store.metric_names(bogus)
    with pytest.raises(StoreError, match=r"metrics\.sqlite"):
        MetricsStore(bogus)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_points": 0}, "max_points"),
        ({"max_points": 100_001}, "max_points"),
        ({"max_points": 2.5}, "max_points"),
        ({"from_step": "3"}, "from_step"),
        ({"from_step": 10, "to_step": 2}, "from_step"),
        ({"names": [""]}, "names"),
    ],
)
def test_bad_query_arguments_raise_value_errors_naming_them(db: Path, kwargs: dict, message: str) -> None:
    args = {"names": ["a"], **kwargs}
    with pytest.raises(ValueError, match=message):
        query_metrics(db, **args)


def test_bad_event_arguments_raise_value_errors(db: Path) -> None:
    with pytest.raises(ValueError, match="limit"):
        store.query_events(db, limit=0)
    with pytest.raises(ValueError, match="since_id"):
        store.query_events(db, since_id=-1)
    with MetricsStore(db) as writer, pytest.raises(ValueError, match="kind"):
        writer.log_event("", 0, {})


def test_bad_metric_values_and_names_raise_value_errors_naming_them(db: Path) -> None:
    with MetricsStore(db) as writer:
        with pytest.raises(ValueError, match="'train/loss': 'high'"):
            writer.log_metrics(3, {"train/loss": "high", "train/lr": 0.1})
        with pytest.raises(ValueError, match="names"):
            writer.log_metrics(3, {"": 1.0})
        with pytest.raises(TypeError):
            writer.log_metrics(1.5, {"a": 1.0})
        writer.log_metrics(4, {"a": 1})
    assert query_metrics(db, "a")["a"]["step"] == [4]


def test_logging_after_close_is_an_error(db: Path) -> None:
    writer = MetricsStore(db)
    writer.close()
    writer.close()
    with pytest.raises(StoreError, match="closed"):
        writer.log_metrics(0, {"a": 1.0})


def _write_steps(path: str, steps: int, started: multiprocessing.synchronize.Event) -> None:
    with MetricsStore(path, flush_interval=0.01) as writer:
        started.set()
        for step in range(steps):
            writer.log_metrics(step, {"a": float(step), "b": -float(step)})
            if step % 500 == 0:
                writer.log_event("lr", step, {"lr": 0.1})
                writer.flush()


def test_a_reader_in_another_process_sees_consistent_data_while_the_writer_runs(db: Path) -> None:
    context = multiprocessing.get_context("spawn")
    started = context.Event()
    child = context.Process(target=_write_steps, args=(str(db), 20_000, started))
    child.start()
    try:
        assert started.wait(30)
        seen = 0
        while child.is_alive() and seen < 2000:
            result = query_metrics(db, ["a", "b"], max_points=50)
            a, b = result["a"], result["b"]
            assert len(a["step"]) <= 50
            assert a["step"] == sorted(a["step"])
            assert all(lo <= v <= hi for lo, v, hi in zip(a["min"], a["value"], a["max"], strict=True))
            assert all(value == float(step) for step, value in zip(a["step"], a["value"], strict=True))
            assert len(b["step"]) <= 50
            store.query_events(db)
            seen += 1
        child.join(60)
        assert child.exitcode == 0
    finally:
        if child.is_alive():
            child.kill()
            child.join(10)
    assert store.last_step(db) == 19_999
    assert len(store.query_events(db)) == 40


def _reference(points: dict[int, float | None], max_points: int, low: int | None, high: int | None) -> dict:
    """Bucketing done the slow obvious way in Python, the contract query_metrics must match."""
    rows = sorted((s, v) for s, v in points.items()
                  if (low is None or s >= low) and (high is None or s <= high))
    if len(rows) <= max_points:
        values = [v for _, v in rows]
        return {"step": [s for s, _ in rows], "value": values, "min": values, "max": values}
    lo, hi = rows[0][0], rows[-1][0]
    origin, width = lo, math.ceil((hi - lo + 1) / max_points)
    if width >= 4 * 64:  # wide buckets: aligned to 64-step blocks
        origin = lo - lo % 64
        width = math.ceil(math.ceil((hi - origin + 1) / max_points) / 64) * 64
    buckets: dict[int, list[tuple[int, float | None]]] = {}
    for step, value in rows:
        buckets.setdefault((step - origin) // width, []).append((step, value))
    assert len(buckets) <= max_points
    out: dict[str, list] = {"step": [], "value": [], "min": [], "max": []}
    for key in sorted(buckets):
        members = buckets[key]
        finite = [v for _, v in members if v is not None]
        out["step"].append(members[-1][0])
        out["value"].append(members[-1][1])
        out["min"].append(min(finite) if finite else None)
        out["max"].append(max(finite) if finite else None)
    return out


values = st.one_of(st.floats(allow_nan=False, width=64), st.just(float("nan")))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    points=st.dictionaries(st.integers(-10**12, 10**12) | st.integers(0, 300), values, max_size=300),
    max_points=st.integers(1, 40),
    low=st.none() | st.integers(-50, 200),
    span=st.none() | st.integers(0, 10**12),
)
def test_downsampling_keeps_last_min_and_max_of_every_bucket_exactly(
        tmp_path_factory: pytest.TempPathFactory, points: dict[int, float], max_points: int,
        low: int | None, span: int | None) -> None:
    path = tmp_path_factory.mktemp("prop") / "metrics.sqlite"
    with MetricsStore(path) as writer:
        for step, value in points.items():
            writer.log_metrics(step, {"m": value})
    high = None if span is None else (low or 0) + span
    stored = {s: (None if math.isnan(v) else v) for s, v in points.items()}
    got = query_metrics(path, ["m"], max_points=max_points, from_step=low, to_step=high)["m"]
    assert got == _reference(stored, max_points, low, high)
    assert len(got["step"]) <= max_points


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    start=st.integers(-500, 500), stride=st.integers(1, 9), count=st.integers(1, 1500), seed=st.integers(0, 2**32),
    max_points=st.integers(1, 60), window=st.none() | st.tuples(st.integers(-600, 9000), st.integers(0, 9000)),
)
def test_downsampling_stays_exact_after_rows_are_replaced_and_truncated(
        tmp_path_factory: pytest.TempPathFactory, start: int, stride: int, count: int, seed: int,
        max_points: int, window: tuple[int, int] | None) -> None:
    rng = random.Random(seed)
    path = tmp_path_factory.mktemp("blocks") / "metrics.sqlite"
    steps = list(range(start, start + count * stride, stride))
    expected: dict[int, float | None] = {}
    with MetricsStore(path, batch_rows=rng.choice([50, 5000])) as writer:
        for step in steps:
            expected[step] = rng.choice([rng.gauss(0, 1), rng.gauss(0, 1), None])
            writer.log_metrics(step, {"m": math.nan if expected[step] is None else expected[step]})
        writer.flush()
        for step in rng.sample(steps, min(len(steps), 20)):  # a resumed run logging a step again
            expected[step] = rng.uniform(-10, 10)
            writer.log_metrics(step, {"m": expected[step]})
        cut = rng.choice(steps)
        writer.truncate_after(cut)
        expected = {s: v for s, v in expected.items() if s <= cut}
        for step in sorted(rng.sample(range(cut + 1, cut + 3000), rng.randrange(0, 60))):  # gaps over old blocks
            expected[step] = rng.uniform(-5, 5)
            writer.log_metrics(step, {"m": expected[step]})
    low, high = (None, None) if window is None else (window[0], window[0] + window[1])
    got = query_metrics(path, "m", max_points=max_points, from_step=low, to_step=high)["m"]
    assert got == _reference(expected, max_points, low, high)


def test_one_batch_larger_than_a_statement_holds_is_written_whole(db: Path) -> None:
    points = {step: math.cos(step / 11.0) for step in range(3 * sqlite_rows.MAX_ROWS_PER_STATEMENT // 2)}
    with MetricsStore(db, flush_interval=3600, batch_rows=10**9) as writer:
        for step, value in points.items():
            writer.log_metrics(step, {"a": value, "b": -value})
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM metrics").fetchone()[0] == 2 * len(points)
    got = query_metrics(db, ["a", "b"], max_points=37)
    assert got["a"] == _reference(points, 37, None, None)
    assert got["b"] == _reference({s: -v for s, v in points.items()}, 37, None, None)


def test_steps_logged_far_apart_in_one_batch_summarise_only_their_own_blocks(db: Path) -> None:
    points = {0: 1.0, 5: -2.0, 10**6: 3.0, 10**6 + 1: 4.0, 2 * 10**7: 5.0}
    with MetricsStore(db, flush_interval=3600, batch_rows=10**9) as writer:
        for step, value in points.items():
            writer.log_metrics(step, {"m": value})
    blocks = sqlite3.connect(db).execute("SELECT block, low, high FROM metric_blocks ORDER BY block").fetchall()
    assert blocks == [(0, -2.0, 1.0), (10**6 // 64, 3.0, 4.0), (2 * 10**7 // 64, 5.0, 5.0)]
    assert query_metrics(db, "m", max_points=2)["m"] == _reference(points, 2, None, None)


def test_a_store_made_without_the_block_summary_is_read_and_then_summarised(db: Path) -> None:
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE metrics(step INTEGER, name TEXT, value REAL, time REAL)")
    points = {step: math.sin(step / 37.0) * step for step in range(-1000, 3000, 3)}
    conn.executemany("INSERT INTO metrics VALUES (?, 'm', ?, 0)", points.items())
    conn.commit()
    conn.close()
    expected = {n: _reference(points, n, None, None) for n in (3, 50)}
    assert {n: query_metrics(db, "m", max_points=n)["m"] for n in (3, 50)} == expected
    MetricsStore(db).close()  # the writer adds the summary from the rows already there
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM metric_blocks").fetchone()[0] > 0
    assert {n: query_metrics(db, "m", max_points=n)["m"] for n in (3, 50)} == expected
    assert query_metrics(db, "m", max_points=2, from_step=-900, to_step=10)["m"] == _reference(points, 2, -900, 10)


def test_ranges_select_the_steps_between_from_and_to_inclusive(db: Path) -> None:
    with MetricsStore(db) as writer:
        for step in range(0, 1000, 10):
            writer.log_metrics(step, {"a": float(step)})
    assert query_metrics(db, "a", from_step=100, to_step=150)["a"]["step"] == [100, 110, 120, 130, 140, 150]
    assert query_metrics(db, "a", from_step=985)["a"]["step"] == [990]
    assert query_metrics(db, "a", to_step=5)["a"]["step"] == [0]
    zoomed = query_metrics(db, "a", max_points=10, from_step=100, to_step=990)["a"]
    assert len(zoomed["step"]) == 10
    assert zoomed["min"][0] == 100.0 and zoomed["max"][-1] == 990.0
    assert zoomed["step"][-1] == 990


def test_unknown_names_come_back_empty_next_to_known_ones(db: Path) -> None:
    with MetricsStore(db) as writer:
        writer.log_metrics(0, {"a": 1.0})
    result = query_metrics(db, ["a", "nope"])
    assert result["nope"] == {"step": [], "value": [], "min": [], "max": []}
    assert result["a"]["value"] == [1.0]


def test_float_steps_from_the_loop_are_stored_like_checked_ones(db: Path) -> None:
    with MetricsStore(db) as writer:
        writer.log_float_steps([(1, {"a": 1.5, "b": math.nan}, 100.0), (2, {"a": 2.5}, 101.0)])
        writer.log_metrics(3, {"a": 3.5, "b": 3.0})
    got = query_metrics(db, ["a", "b"])
    assert got["a"]["step"] == [1, 2, 3] and got["a"]["value"] == [1.5, 2.5, 3.5]
    assert got["b"]["step"] == [1, 3] and got["b"]["value"] == [None, 3.0]
