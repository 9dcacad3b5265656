"""A run with 10^6 points per metric, opened read-only with `traindeck view`.

The store is written with sqlite3 directly, following the public schema, so this also checks
that a store made by other tools opens. The time to first paint is recorded in
test-artifacts/first-paint-*.json (speed is reported, not asserted).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.web import serving
from tests.web.dashboard_page import wait_for_history
from trainer_core.store import MetricsStore

pytestmark = [pytest.mark.browser, pytest.mark.slow]

POINTS = 1_000_000
MAX_POINTS = 2000
# Values computed by SQLite itself: generating 3 * 10^6 rows in Python would take longer than the test.
METRICS = {
    "train/loss": "3.0 / (1 + x / 1e5) + (x % 97) / 1000.0",
    "train/lr": "CASE WHEN x < 500000 THEN 1e-3 ELSE 5e-4 END",
    "train/grad_norm": "1 + ((x * 7919) % 1000) / 2000.0",
}
SCHEMA = (
    "CREATE TABLE metrics(step INTEGER, name TEXT, value REAL, time REAL, PRIMARY KEY (name, step)) WITHOUT ROWID",
    "CREATE TABLE events(id INTEGER PRIMARY KEY, time REAL, step INTEGER, kind TEXT, data TEXT)",
)
EVENTS = (
    (500_000, "lr", {"lr": 5e-4}),
    (POINTS, "checkpoint", {"path": "checkpoints/step_01000000", "bytes": 123456}),
    (POINTS, "finish", {"exit_code": 0, "reason": "finished"}),
)


def write_store(path: Path) -> float:
    """Fill a metrics store; returns the seconds it took."""
    started = time.perf_counter()
    con = sqlite3.connect(path)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=OFF")
        for statement in SCHEMA:
            con.execute(statement)
        t0 = 1.7e9
        for name, expression in METRICS.items():
            con.execute(
                "WITH RECURSIVE s(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM s WHERE x < ?) "
                f"INSERT INTO metrics(step, name, value, time) SELECT x, ?, {expression}, ? + x * 0.01 FROM s",
                (POINTS, name, t0),
            )
        con.executemany("INSERT INTO events(time, step, kind, data) VALUES (?, ?, ?, ?)",
                        [(t0 + step * 0.01, step, kind, json.dumps(data)) for step, kind, data in EVENTS])
        con.commit()
    finally:
        con.close()
    return time.perf_counter() - started


@pytest.fixture(scope="module", params=["foreign", "traindeck"])
def viewer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
           browser: Any) -> Iterator[serving.Server]:
    """The same run as another tool writes it (raw rows only), and as traindeck's own writer leaves it
    (with its per-block summaries, which a writer opening the file rebuilds)."""
    run_dir = tmp_path_factory.mktemp("large") / "run"
    run_dir.mkdir()
    write_store(run_dir / "metrics.sqlite")
    if request.param == "traindeck":
        MetricsStore(run_dir / "metrics.sqlite").close()
    server = serving.start(["view", str(run_dir), "--port", "0"])
    server.store_kind = request.param  # type: ignore[attr-defined]
    try:
        yield server
    finally:
        server.stop()


def test_first_paint_of_a_million_points_per_metric_receives_at_most_2000_each(
        open_tab: Any, viewer: serving.Server, artifacts: Path) -> None:
    tab = open_tab("about:blank")
    page = tab.page
    responses: list[Any] = []
    page.on("response", lambda r: responses.append(r) if "/api/metrics" in r.url else None)
    page.goto(viewer.url)
    wait_for_history(page)

    received: dict[str, int] = {}
    for response in responses:
        assert response.ok, response.url
        for name, series in response.json().items():
            assert len(series["step"]) <= MAX_POINTS, (name, len(series["step"]), response.url)
            received[name] = max(received.get(name, 0), len(series["step"]))
    assert set(received) == set(METRICS)
    assert all(count > MAX_POINTS // 2 for count in received.values()), received
    for name in METRICS:
        chart = page.locator(f'figure.chart[data-metric="{name}"]')
        expect(chart).to_have_attribute("data-last-step", str(POINTS))
        assert int(chart.get_attribute("data-points") or 0) <= MAX_POINTS

    timings = page.evaluate("""() => ({
        first_paint_ms: Number(document.documentElement.dataset.firstPaintMs),
        history_paint_ms: Number(document.documentElement.dataset.historyPaintMs),
        metrics_requests: performance.getEntriesByType('resource').filter(e => e.name.includes('/api/metrics'))
            .map(e => ({url: e.name.replace(location.origin, ''), ms: Math.round(e.duration)})),
    })""")
    kind = viewer.store_kind  # type: ignore[attr-defined]
    report = {"store": kind, "points_per_metric": POINTS, "metrics": len(METRICS), "points_received": received,
              **timings}
    (artifacts / f"first-paint-{kind}.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"{kind} store: first paint {timings['first_paint_ms']} ms, all history drawn "
          f"{timings['history_paint_ms']} ms ({len(METRICS)} metrics x {POINTS} points)")


def test_view_is_read_only_and_still_shows_markers_and_history(open_tab: Any, viewer: serving.Server) -> None:
    page = open_tab(viewer.url).page
    expect(page.get_by_text("read-only")).to_be_visible()
    for name in ("Save", "Eval", "Quit", "Pause", "Restart", "Set", "Export"):
        expect(page.get_by_role("button", name=name, exact=True)).to_have_count(0)
    expect(page.get_by_label("Learning rate")).to_have_count(0)
    lr_chart = page.get_by_role("figure", name="train/lr", exact=True)
    expect(lr_chart.get_by_role("img", name="step 500000: lr → 5e-4")).to_have_count(1)
    expect(page.get_by_role("log", name="Event log")).to_contain_text("trainer finished (exit code 0, finished)")
