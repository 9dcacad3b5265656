"""Every control sends its command to a live trainer and shows the result in the event log."""

from __future__ import annotations

import re
import time
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.web import serving

pytestmark = [pytest.mark.browser, pytest.mark.slow]

RESULT_TIMEOUT_MS = 30_000


@pytest.fixture
def tab(open_tab: Any, shared_server: serving.Server) -> Any:
    tab = open_tab(shared_server.url)
    page = tab.page
    expect(page.get_by_role("status", name="Trainer state")).to_have_text(re.compile("running|paused"))
    if page.get_by_role("button", name="Resume", exact=True).is_visible():
        page.get_by_role("button", name="Resume", exact=True).click()
    expect(page.get_by_role("status", name="Trainer state")).to_have_text("running")
    return tab


@pytest.fixture
def page(tab: Any) -> Any:
    return tab.page


def event_log(page: Any) -> Any:
    return page.get_by_role("log", name="Event log")


def test_save_shows_the_checkpoint_path_and_lists_the_checkpoint(page: Any) -> None:
    page.get_by_role("button", name="Save", exact=True).click()
    expect(event_log(page)).to_contain_text(re.compile(r"✓ save: saved \S*checkpoints"), timeout=RESULT_TIMEOUT_MS)
    table = page.get_by_role("table", name="Checkpoints and exports")
    expect(table.locator("tbody tr[data-kind=checkpoint]").first).to_be_visible(timeout=RESULT_TIMEOUT_MS)
    expect(page.locator("#status-checkpoint")).to_contain_text("checkpoints", timeout=RESULT_TIMEOUT_MS)


def test_export_with_a_name_shows_the_exported_file(page: Any) -> None:
    page.get_by_label("Export name").fill("from-browser")
    page.get_by_role("button", name="Export", exact=True).click()
    expect(event_log(page)).to_contain_text(re.compile(r"✓ export from-browser: exported \S*from-browser"),
                                            timeout=RESULT_TIMEOUT_MS)
    expect(page.get_by_label("Export name")).to_have_value("")
    table = page.get_by_role("table", name="Checkpoints and exports")
    expect(table.locator("tbody tr[data-kind=export]", has_text="from-browser")).to_be_visible(
        timeout=RESULT_TIMEOUT_MS)


def test_eval_shows_its_metrics_and_adds_eval_charts(page: Any) -> None:
    page.get_by_role("button", name="Eval", exact=True).click()
    expect(event_log(page)).to_contain_text(re.compile(r"✓ eval: eval at step \d+"), timeout=RESULT_TIMEOUT_MS)
    expect(page.get_by_role("region", name="Eval")).to_be_visible(timeout=RESULT_TIMEOUT_MS)
    expect(page.locator('figure.chart[data-metric^="eval/"]').first).to_be_visible()
    expect(page.get_by_role("img", name=re.compile(r"step \d+: eval")).first).to_be_attached()


def hover_until_active(page: Any, marker: Any, timeout_s: float = 15.0) -> None:
    """Point at the marker until its tooltip shows: live points rescale the axis and move it."""
    deadline = time.monotonic() + timeout_s
    while True:
        box = marker.bounding_box()
        if box is not None:
            page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
            if "active" in (marker.get_attribute("class") or "").split():
                return
        assert time.monotonic() < deadline, "the lr marker never showed its tooltip under the pointer"
        page.wait_for_timeout(100)


def test_lr_change_shows_on_the_lr_chart_as_a_marker_and_a_new_value(page: Any) -> None:
    page.get_by_label("Learning rate").fill("5e-4")
    page.get_by_role("button", name="Set", exact=True).click()
    expect(event_log(page)).to_contain_text("✓ lr 0.0005: lr set to 0.0005", timeout=RESULT_TIMEOUT_MS)
    lr_chart = page.get_by_role("figure", name="train/lr", exact=True)
    marker = lr_chart.get_by_role("img", name=re.compile(r"step \d+: lr → 5e-4")).last
    expect(marker).to_be_attached()
    hover_until_active(page, marker)
    expect(page.locator("#status-lr")).to_have_text("5e-4", timeout=RESULT_TIMEOUT_MS)
    page.wait_for_function(
        "Math.abs(Number(document.querySelector('figure.chart[data-metric=\"train/lr\"]')?.dataset.lastValue) - 5e-4)"
        " < 1e-9", timeout=RESULT_TIMEOUT_MS)


def test_an_invalid_lr_is_refused_in_the_page(page: Any) -> None:
    page.get_by_label("Learning rate").fill("fast")
    page.get_by_role("button", name="Set", exact=True).click()
    expect(event_log(page)).to_contain_text('✗ lr: Learning rate must be a number, got "fast"')
    expect(page.get_by_label("Learning rate")).to_have_attribute("aria-invalid", "true")


def test_pause_and_resume_switch_the_state_and_the_button(page: Any) -> None:
    page.get_by_role("button", name="Pause", exact=True).click()
    expect(page.get_by_role("status", name="Trainer state")).to_have_text("paused", timeout=RESULT_TIMEOUT_MS)
    expect(event_log(page)).to_contain_text("✓ pause: paused at step")
    page.get_by_role("button", name="Resume", exact=True).click()
    expect(page.get_by_role("status", name="Trainer state")).to_have_text("running", timeout=RESULT_TIMEOUT_MS)
    expect(page.get_by_role("button", name="Pause", exact=True)).to_be_visible()


def test_a_command_at_a_step_is_listed_and_can_be_cancelled(page: Any) -> None:
    page.get_by_label("At step").fill("900000")
    page.get_by_role("button", name="Save", exact=True).click()
    expect(event_log(page)).to_contain_text("scheduled 'save' at step 900000", timeout=RESULT_TIMEOUT_MS)
    expect(page.get_by_label("At step")).to_have_value("")
    scheduled = page.get_by_role("list", name="Scheduled commands")
    expect(scheduled).to_contain_text("save@900000", timeout=RESULT_TIMEOUT_MS)
    scheduled.get_by_role("button", name="Cancel scheduled save@900000").click()
    expect(scheduled.get_by_role("listitem")).to_have_count(0, timeout=RESULT_TIMEOUT_MS)
    expect(page.get_by_text("Nothing scheduled.")).to_be_visible()


def test_a_mistyped_command_line_shows_the_error_with_a_suggestion(tab: Any, page: Any) -> None:
    tab.guard.allow(r"status of 422")
    page.get_by_label("Command line").fill("sav")
    page.get_by_role("button", name="Send", exact=True).click()
    refused = event_log(page).locator("li[data-ok=false]").last
    expect(refused).to_contain_text("✗ sav: unknown command 'sav'; did you mean 'save'?", timeout=RESULT_TIMEOUT_MS)
    expect(page.get_by_label("Command line")).to_have_value("sav")


def test_controls_are_disabled_while_a_command_is_in_flight(page: Any) -> None:
    held: list[Any] = []
    page.route("**/command/eval", lambda route: held.append(route))
    page.get_by_role("button", name="Eval", exact=True).click()
    for name in ("Save", "Eval", "Pause", "Quit", "Set", "Export", "Send"):
        expect(page.get_by_role("button", name=name, exact=True)).to_be_disabled()
    assert len(held) == 1
    held[0].continue_()
    expect(event_log(page)).to_contain_text("✓ eval", timeout=RESULT_TIMEOUT_MS)
    for name in ("Save", "Eval", "Pause", "Quit"):
        expect(page.get_by_role("button", name=name, exact=True)).to_be_enabled()
