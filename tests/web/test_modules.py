"""The page's pure JavaScript modules, run in Chromium: thinning, smoothing, parsing, markers.

The static folder is served as is by a plain HTTP server on 127.0.0.1 (ES modules need an
http origin); the modules are imported with dynamic import() and called with generated data.
"""

from __future__ import annotations

import functools
import http.server
import math
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.web import serving
from tests.web.conftest import Tab

pytestmark = [pytest.mark.browser]

WEB = serving.ROOT / "web"


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        return None


@pytest.fixture(scope="module")
def static_page(browser: Any) -> Iterator[Any]:
    handler = functools.partial(QuietHandler, directory=str(WEB))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, name="static-files", daemon=True)
    thread.start()
    tab = Tab(browser, {"width": 800, "height": 600})
    try:
        tab.page.goto(f"http://127.0.0.1:{httpd.server_address[1]}/")
        yield tab.page
        tab.guard.assert_clean()
    finally:
        tab.close()
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def run(page: Any, module: str, body: str, arg: Any = None) -> Any:
    """Evaluate `body` (an async function body with `m` = the module and `arg`) in the page."""
    return page.evaluate(f"async (arg) => {{ const m = await import('/static/js/{module}'); {body} }}", arg)


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
values = st.lists(st.one_of(finite, st.none()), min_size=1, max_size=300)
SLOW_HEALTH = [HealthCheck.too_slow]


def appended(page: Any, steps: list[int], vals: list[float | None], cap: int) -> dict[str, list[Any]]:
    return run(page, "series.js", """
        const s = new m.Series(arg.cap);
        arg.steps.forEach((step, i) => s.append(step, arg.values[i]));
        return {step: s.step, value: s.value, min: s.min, max: s.max};
    """, {"steps": steps, "values": vals, "cap": cap})


@settings(max_examples=40, deadline=None, suppress_health_check=SLOW_HEALTH)
@given(vals=values, cap=st.integers(min_value=4, max_value=64), gap=st.integers(min_value=1, max_value=5))
def test_thinning_keeps_the_cap_the_newest_point_and_every_extreme(static_page: Any, vals: list[float | None],
                                                                   cap: int, gap: int) -> None:
    steps = [1 + i * gap for i in range(len(vals))]
    s = appended(static_page, steps, vals, cap)
    assert len(s["step"]) <= cap
    assert s["step"] == sorted(set(s["step"]))
    assert s["step"][-1] == steps[-1] and s["value"][-1] == vals[-1]
    by_step = dict(zip(steps, vals, strict=True))
    assert all(by_step[step] == value for step, value in zip(s["step"], s["value"], strict=True))
    previous = -math.inf
    for step, low, high in zip(s["step"], s["min"], s["max"], strict=True):
        covered = [v for st_, v in zip(steps, vals, strict=True) if previous < st_ <= step and v is not None]
        assert low == (min(covered) if covered else None)
        assert high == (max(covered) if covered else None)
        previous = step


def test_a_step_that_goes_back_replaces_the_newer_points(static_page: Any) -> None:
    s = appended(static_page, [1, 2, 3, 4, 2, 3], [1.0, 2.0, 3.0, 4.0, 20.0, 30.0], 64)
    assert s["step"] == [1, 2, 3]
    assert s["value"] == [1.0, 20.0, 30.0]


@settings(max_examples=30, deadline=None, suppress_health_check=SLOW_HEALTH)
@given(history=st.integers(min_value=0, max_value=50), live_from=st.integers(min_value=1, max_value=80),
       live=st.integers(min_value=0, max_value=30))
def test_history_keeps_live_points_newer_than_itself(static_page: Any, history: int, live_from: int,
                                                     live: int) -> None:
    result = run(static_page, "series.js", """
        const s = new m.Series(1000);
        for (let k = 0; k < arg.live; k += 1) s.append(arg.live_from + k, -1);
        const steps = Array.from({length: arg.history}, (_, i) => i + 1);
        s.loadHistory({step: steps, value: steps.map(() => 1), min: steps.map(() => 0), max: steps.map(() => 2)});
        return {step: s.step, value: s.value};
    """, {"history": history, "live_from": live_from, "live": live})
    newer = [step for step in range(live_from, live_from + live) if step > history]
    assert result["step"] == list(range(1, history + 1)) + newer
    assert result["value"] == [1] * history + [-1] * len(newer)


@settings(max_examples=30, deadline=None, suppress_health_check=SLOW_HEALTH)
@given(vals=values, weight=st.floats(min_value=0.01, max_value=0.99))
def test_ema_is_debiased_skips_gaps_and_stays_within_the_range_seen(static_page: Any, vals: list[float | None],
                                                                    weight: float) -> None:
    out = run(static_page, "series.js", "return m.ema(arg.values, arg.weight);", {"values": vals, "weight": weight})
    seen: list[float] = []
    for v, smoothed in zip(vals, out, strict=True):
        if v is None:
            assert smoothed is None
            continue
        seen.append(v)
        if len(seen) == 1:
            assert smoothed == pytest.approx(v)
        assert min(seen) - 1e-6 * (1 + abs(min(seen))) <= smoothed <= max(seen) + 1e-6 * (1 + abs(max(seen)))


def test_ema_of_a_constant_is_the_constant_and_weight_zero_is_the_identity(static_page: Any) -> None:
    assert run(static_page, "series.js", "return m.ema([2, 2, 2, 2], 0.9);") == pytest.approx([2, 2, 2, 2])
    assert run(static_page, "series.js", "return m.ema([1, null, 3], 0);") == [1, None, 3]


def test_log_scale_turns_non_positive_values_into_gaps(static_page: Any) -> None:
    assert run(static_page, "series.js", "return m.positiveOnly([1, 0, -2, null, 3]);") == [1, None, None, None, 3]


def test_json_with_python_nan_and_infinity_parses_as_gaps(static_page: Any) -> None:
    text = '{"type": "metrics", "step": 3, "values": {"a": NaN, "b": -Infinity, "c": 1.5, "d": "NaN ok"}}'
    parsed = run(static_page, "api.js", "return m.parseJson(arg);", text)
    assert parsed["values"] == {"a": None, "b": None, "c": 1.5, "d": "NaN ok"}


def test_error_text_reads_fastapi_and_trainer_bodies(static_page: Any) -> None:
    body = "return [m.errorText({detail: 'bad'}, 'x'), m.errorText({detail: [{msg: 'm1'}, {msg: 'm2'}]}, 'x'), " \
           "m.errorText({message: 'refused'}, 'x'), m.errorText(null, 'fallback')];"
    assert run(static_page, "api.js", body) == ["bad", "m1; m2", "refused", "fallback"]


def test_reconnect_delays_double_up_to_a_cap(static_page: Any) -> None:
    delays = run(static_page, "connection.js", "return [0, 1, 2, 3, 10, 40].map(a => m.backoffDelay(a, () => 0));")
    assert delays == [500, 1000, 2000, 4000, 10000, 10000]
    jittered = run(static_page, "connection.js", "return m.backoffDelay(2, () => 1);")
    assert jittered == 2500


@pytest.mark.parametrize(("text", "expected"), [
    ("1e-4", {"value": 1e-4}), (" 0.5 ", {"value": 0.5}),
    ("", {"error": 'Learning rate must be a number, got ""'}),
    ("-1", {"error": "Learning rate must not be negative, got -1"}),
])
def test_learning_rate_field_parsing(static_page: Any, text: str, expected: dict[str, Any]) -> None:
    assert run(static_page, "controls.js", "return m.parseLearningRate(arg);", text) == expected


@pytest.mark.parametrize(("text", "expected"), [
    ("", {"value": None}), ("120", {"value": 120}),
    ("1.5", {"error": '"At step" must be a whole step number, got "1.5"'}),
    ("-3", {"error": '"At step" must be a whole step number, got "-3"'}),
])
def test_at_step_field_parsing(static_page: Any, text: str, expected: dict[str, Any]) -> None:
    assert run(static_page, "controls.js", "return m.parseAtStep(arg);", text) == expected


def test_markers_closer_than_a_few_pixels_merge_into_one(static_page: Any) -> None:
    groups = run(static_page, "markers.js", """
        const ms = [{step: 10, kind: 'lr', text: 'a'}, {step: 12, kind: 'eval', text: 'b'},
                    {step: 50, kind: 'checkpoint', text: 'c'}, {step: 500, kind: 'lr', text: 'outside'}];
        return m.clusterMarkers(ms, (s) => s, 100).map(g => g.items.map(i => i.text));
    """)
    assert groups == [["a", "b"], ["c"]]


def test_marker_descriptions_name_the_step_and_the_change(static_page: Any) -> None:
    texts = run(static_page, "markers.js", """
        return [m.describeMarker('lr', {lr: 0.0005}, 120),
                m.describeMarker('checkpoint', {path: '/r/checkpoints/step_00000120', bytes: 2048}, 120),
                m.describeMarker('eval', {metrics: {loss: 1.23456}}, 200), m.describeMarker('pause', {}, 7)];
    """)
    assert texts == ["step 120: lr → 5e-4", "step 120: checkpoint step_00000120 (2.0 KB)",
                     "step 200: eval loss=1.235", "step 7: paused"]


def test_chart_order_puts_loss_lr_and_grad_norm_first_and_train_before_eval(static_page: Any) -> None:
    names = ["eval/loss", "train/tokens_per_s", "train/grad_norm", "other", "train/lr", "train/loss/b",
             "train/loss/a", "custom/x"]
    ordered = run(static_page, "charts.js", "return arg.slice().sort(m.compareNames);", names)
    assert ordered == ["train/loss/a", "train/loss/b", "train/lr", "train/grad_norm", "train/tokens_per_s",
                       "eval/loss", "custom/x", "other"]


def test_formatting_of_values_durations_and_sizes(static_page: Any) -> None:
    out = run(static_page, "format.js", """
        return [m.formatValue(0.00012345), m.formatValue(2.718281), m.formatValue(null), m.formatLr(3e-4),
                m.formatLr(0.05), m.formatDuration(3725), m.formatDuration(59), m.formatBytes(1536),
                m.formatTick(250000), m.formatTick(1500000)];
    """)
    assert out == ["1.23e-4", "2.718", "—", "3e-4", "0.05", "1h 02m", "59s", "1.5 KB", "250k", "1.5M"]


def alert_keys(page: Any, script: str) -> list[str]:
    """Run `script` against a fresh Alerts `a` (with `live`/`history` event helpers); the keys left showing."""
    return run(page, "alerts.js", f"""
        const box = document.createElement('div');
        const a = new m.Alerts(box);
        const start = (id) => ({{id, kind: 'start', step: 0, data: {{}}}});
        const alert = (id, message) => ({{id, kind: 'alert', step: 5, data: {{level: 'warning', message}}}});
        {script}
        return [...box.children].map((el) => el.dataset.key);
    """)


def test_a_start_read_from_history_keeps_a_live_non_finite_alert(static_page: Any) -> None:
    # The page loads: a NaN arrives live before /api/events answers with an earlier restart.
    assert alert_keys(static_page, "a.nonFinite('train/loss', 40); a.trainerStarted(start(7), false);") == ["nonfinite"]


def test_a_live_start_clears_the_previous_process_alerts(static_page: Any) -> None:
    script = "a.nonFinite('train/loss', 40); a.crashed('Traceback', 1); a.trainerStarted(start(9), true);"
    assert alert_keys(static_page, script) == []


def test_history_alerts_before_a_start_in_history_are_cleared(static_page: Any) -> None:
    script = """a.fromEvent(alert(3, 'non-finite loss at step 5')); a.fromEvent(alert(4, 'skipped checkpoint x'));
                a.trainerStarted(start(6), false);"""
    assert alert_keys(static_page, script) == ["alert:skipped checkpoint x"]


def test_a_non_finite_alert_from_before_a_seen_start_is_not_shown(static_page: Any) -> None:
    # A live start arrived first; then history replays the old process's alerts.
    script = """a.trainerStarted(start(6), true); a.fromEvent(alert(3, 'non-finite loss at step 5'));
                a.fromEvent(alert(4, 'skipped checkpoint x'));"""
    assert alert_keys(static_page, script) == ["alert:skipped checkpoint x"]


def test_an_alert_event_is_shown_once_even_when_dismissed_and_replayed(static_page: Any) -> None:
    script = """a.fromEvent(alert(3, 'skipped checkpoint x')); box.querySelector('button').click();
                a.fromEvent(alert(3, 'skipped checkpoint x'));"""
    assert alert_keys(static_page, script) == []


def test_a_checkpoint_list_answer_older_than_the_one_shown_is_dropped(static_page: Any) -> None:
    labels = run(static_page, "checkpoints.js", """
        const table = document.createElement('table');
        table.createTBody();
        const answers = [];
        const fetchList = () => new Promise((resolve) => answers.push(resolve));
        const t = new m.CheckpointTable(table, document.createElement('p'), fetchList, () => {});
        const first = t.refresh();
        const second = t.refresh();
        answers[1]([{step: 20, time: 2, bytes: 1, path: 'b'}, {step: 10, time: 1, bytes: 1, path: 'a'}]);
        await second;
        answers[0]([{step: 10, time: 1, bytes: 1, path: 'a'}]);
        await first;
        return [...table.tBodies[0].rows].map((tr) => tr.cells[1].textContent);
    """)
    assert labels == ["20", "10"]
