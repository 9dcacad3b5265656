"""Layout: a 390-px phone gets one column without sideways scrolling; the colour scheme is followed."""

from __future__ import annotations

from typing import Any

import pytest
from playwright.sync_api import expect

from tests.web import serving
from tests.web.conftest import DESKTOP, PHONE
from tests.web.dashboard_page import wait_for_history, wait_for_last_step

pytestmark = [pytest.mark.browser, pytest.mark.slow]



def test_phone_viewport_renders_one_column_without_horizontal_scroll(open_tab: Any, shared_server: serving.Server,
                                                                      artifacts: Any) -> None:
    page = open_tab(shared_server.url, PHONE).page
    wait_for_history(page)
    wait_for_last_step(page, "train/loss", 10)
    widths = page.evaluate("[document.documentElement.scrollWidth, document.body.scrollWidth, window.innerWidth]")
    assert widths[0] <= widths[2] and widths[1] <= widths[2], widths
    lefts = page.eval_on_selector_all("figure.chart", "els => els.map(e => Math.round(e.getBoundingClientRect().left))")
    assert len(set(lefts)) == 1, f"charts are not in one column: {lefts}"
    for name in ("Save", "Eval", "Pause", "Quit"):
        box = page.get_by_role("button", name=name, exact=True).bounding_box()
        assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
    page.screenshot(path=str(artifacts / "dashboard-phone.png"), full_page=True)


def test_desktop_viewport_puts_charts_side_by_side(open_tab: Any, shared_server: serving.Server) -> None:
    page = open_tab(shared_server.url, DESKTOP).page
    wait_for_last_step(page, "train/loss", 10)
    lefts = page.eval_on_selector_all("figure.chart", "els => els.map(e => Math.round(e.getBoundingClientRect().left))")
    assert len(set(lefts)) >= 2, lefts
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


@pytest.mark.parametrize(("scheme", "background"), [("light", "rgb(246, 247, 249)"), ("dark", "rgb(13, 17, 23)")])
def test_colours_follow_the_preferred_colour_scheme(open_tab: Any, shared_server: serving.Server, scheme: str,
                                                    background: str) -> None:
    page = open_tab(shared_server.url, DESKTOP, color_scheme=scheme).page
    expect(page.locator("body")).to_have_css("background-color", background)
