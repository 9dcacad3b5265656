"""The dashboard page against a live `traindeck serve demo`: loading, live charts, chart options."""

from __future__ import annotations

import os
import re
import shutil
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.web import serving
from tests.web.conftest import DESKTOP

pytestmark = [pytest.mark.browser, pytest.mark.slow]

UPDATE_DOCS_SCREENSHOT = "TRAINDECK_UPDATE_SCREENSHOT"


def chart(page: Any, name: str) -> Any:
    return page.locator(f'figure.chart[data-metric="{name}"]')


def last_step(page: Any, name: str) -> int:
    text = chart(page, name).get_attribute("data-last-step") or "0"
    return int(text or 0)


def test_page_loads_with_the_token_and_shows_the_running_trainer(open_tab: Any,
                                                                  shared_server: serving.Server) -> None:
    page = open_tab(shared_server.url).page
    expect(page.get_by_role("status", name="Trainer state")).to_have_text("running")
    expect(page.get_by_role("status", name="Connection")).to_have_text("live")
    expect(page.get_by_role("heading", level=1)).not_to_be_empty()
    expect(page.locator("#status-iterations")).to_have_text("1000000")
    expect(page.get_by_role("progressbar", name="Training progress")).to_be_visible()


def test_every_metric_gets_a_chart_that_receives_live_points(open_tab: Any, shared_server: serving.Server) -> None:
    page = open_tab(shared_server.url).page
    for name in ("train/loss", "train/lr", "train/grad_norm", "train/steps_per_s"):
        expect(chart(page, name)).to_be_visible()
    expect(page.get_by_role("region", name="Train")).to_be_visible()
    expect(chart(page, "train/loss")).to_have_attribute("data-last-step", re.compile(r"\d+"))
    first = last_step(page, "train/loss")
    page.wait_for_function(
        "([name, step]) => Number(document.querySelector(`figure[data-metric='${name}']`).dataset.lastStep) > step",
        arg=["train/loss", first + 5], timeout=30_000,
    )
    points = int(chart(page, "train/loss").get_attribute("data-points") or 0)
    assert points > 5
    assert page.locator('figure[data-metric="train/loss"] canvas').count() >= 1


def test_history_is_fetched_downsampled_and_the_first_paint_is_marked(open_tab: Any,
                                                                       shared_server: serving.Server,
                                                                       browser: Any) -> None:
    tab = open_tab(shared_server.url)
    tab.page.wait_for_function("document.documentElement.dataset.firstPaintMs !== undefined")
    with tab.page.expect_response(re.compile(r"/api/metrics\?")) as response_info:
        tab.page.reload()
    response = response_info.value
    assert "max_points=" in response.url
    max_points = int(re.search(r"max_points=(\d+)", response.url).group(1))
    assert max_points <= 2000
    assert all(len(series["step"]) <= max_points for series in response.json().values())


def test_smoothing_and_log_scale_redraw_the_charts(open_tab: Any, shared_server: serving.Server) -> None:
    page = open_tab(shared_server.url).page
    expect(chart(page, "train/loss").locator("canvas")).to_have_count(1)
    page.get_by_label("Log scale").check()
    expect(chart(page, "train/loss").locator("canvas")).to_have_count(1)
    page.get_by_label("Smoothing").fill("0")
    expect(page.locator("#smoothing-value")).to_have_text("0.00")
    page.get_by_label("Smoothing").fill("0.9")
    expect(page.locator("#smoothing-value")).to_have_text("0.90")
    page.get_by_label("Log scale").uncheck()
    page.reload()
    expect(page.locator("#smoothing-value")).to_have_text("0.90")


def test_dragging_over_a_chart_refetches_that_range_and_reset_zoom_restores(open_tab: Any,
                                                                            shared_server: serving.Server) -> None:
    page = open_tab(shared_server.url).page
    loss = chart(page, "train/loss")
    page.wait_for_function("Number(document.querySelector(\"figure[data-metric='train/loss']\").dataset.lastStep) > 20",
                           timeout=30_000)
    over = loss.locator(".u-over")
    box = over.bounding_box()
    assert box is not None
    with page.expect_response(lambda r: "/api/metrics" in r.url and "from_step=" in r.url) as zoom_info:
        page.mouse.move(box["x"] + box["width"] * 0.2, box["y"] + 40)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.6, box["y"] + 60, steps=6)
        page.mouse.up()
    url = zoom_info.value.url
    from_step = int(re.search(r"from_step=(-?\d+)", url).group(1))
    to_step = int(re.search(r"to_step=(-?\d+)", url).group(1))
    assert from_step < to_step
    expect(page.get_by_role("button", name="Reset zoom")).to_be_visible()
    expect(page.locator("#zoom-range")).to_have_text(f"steps {from_step}\N{EN DASH}{to_step}")
    page.get_by_role("button", name="Reset zoom").click()
    expect(page.get_by_role("button", name="Reset zoom")).to_be_hidden()


def test_desktop_screenshot_is_saved(open_tab: Any, shared_server: serving.Server, artifacts: Any) -> None:
    page = open_tab(shared_server.url, DESKTOP).page
    page.wait_for_function("Number(document.querySelector(\"figure[data-metric='train/loss']\").dataset.lastStep) > 30",
                           timeout=30_000)
    path = artifacts / "dashboard-desktop.png"
    page.screenshot(path=str(path), full_page=False)
    assert path.stat().st_size > 10_000
    if os.environ.get(UPDATE_DOCS_SCREENSHOT) == "1":
        shutil.copyfile(path, serving.ROOT / "docs" / "dashboard.png")
