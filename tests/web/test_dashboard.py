"""The dashboard page against a live `traindeck serve demo`: loading, live charts, chart options."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.web import serving
from tests.web.conftest import BROWSER_ARGS, DESKTOP, Tab
from tests.web.dashboard_page import chart, last_step, wait_for_history, wait_for_last_step

pytestmark = [pytest.mark.browser, pytest.mark.slow]

UPDATE_DOCS_SCREENSHOT = "TRAINDECK_UPDATE_SCREENSHOT"


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
    wait_for_last_step(page, "train/loss", first + 5)
    points = int(chart(page, "train/loss").get_attribute("data-points") or 0)
    assert points > 5
    assert page.locator('figure[data-metric="train/loss"] canvas').count() >= 1


def test_history_is_fetched_per_metric_downsampled_and_the_paint_is_marked(open_tab: Any,
                                                                          shared_server: serving.Server) -> None:
    page = open_tab("about:blank").page
    responses: list[Any] = []
    page.on("response", lambda r: responses.append(r) if "/api/metrics?" in r.url else None)
    page.goto(shared_server.url)
    wait_for_history(page)
    page.wait_for_function("document.documentElement.dataset.firstPaintMs !== undefined")
    history = [r for r in responses if "names=" in r.url]
    assert {name for r in history for name in r.json()} >= {"train/loss", "train/lr", "train/grad_norm"}
    for response in history:
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
    wait_for_last_step(page, "train/loss", 20)
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
    wait_for_history(page)
    wait_for_last_step(page, "train/loss", 30)
    path = artifacts / "dashboard-desktop.png"
    page.screenshot(path=str(path), full_page=False)
    assert path.stat().st_size > 10_000
    if os.environ.get(UPDATE_DOCS_SCREENSHOT) == "1":
        shutil.copyfile(path, serving.ROOT / "docs" / "dashboard.png")


STRICT_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
              "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


@pytest.fixture
def csp_tab(browser: Any, chromium_path: str) -> Iterator[Tab]:
    """A tab in a browser of its own: a document served through a Playwright route counts as
    non-local for Chromium's local network access checks, which would block the page's socket
    to 127.0.0.1; that check is turned off here (and only here)."""
    args = [*BROWSER_ARGS, "--disable-features=LocalNetworkAccessChecks"]
    chromium = browser.browser_type.launch(executable_path=chromium_path, headless=True, args=args)
    tab = Tab(chromium, DESKTOP)
    try:
        yield tab
        tab.guard.assert_clean()
    finally:
        tab.close()
        chromium.close()


def test_the_page_works_under_a_strict_content_security_policy(csp_tab: Tab, shared_server: serving.Server) -> None:
    page = csp_tab.page
    violations: list[str] = []
    page.on("console", lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None)

    def with_csp(route: Any) -> None:
        response = route.fetch()
        route.fulfill(response=response, headers={**response.headers, "content-security-policy": STRICT_CSP})

    page.route(re.compile(r"^http://127\.0\.0\.1:\d+/(\?.*)?$"), with_csp)
    page.goto(shared_server.url)
    expect(page.get_by_role("status", name="Connection")).to_have_text("live")
    wait_for_last_step(page, "train/loss", last_step(page, "train/loss") + 2)
    assert violations == []
