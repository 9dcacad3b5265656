"""Trouble and recovery: quit and restart, non-finite losses, a crash, a server restart.

These tests stop or break the trainer, so they share their own server (running the demo with
switchable faults, see faulty_recipe.py) rather than the suite's shared one. Each test starts
from a running trainer and leaves one running.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.web import faulty_recipe, serving
from tests.web.dashboard_page import LateAnswers, last_step, wait_for_last_step, wait_for_loads

pytestmark = [pytest.mark.browser, pytest.mark.slow]

LONG_MS = 60_000
RECIPE = f"{Path(faulty_recipe.__file__).relative_to(serving.ROOT)}:build"


@dataclass
class Faulty:
    """A run directory, its fault flags folder, and the server currently serving it."""

    run_dir: Path
    faults: Path
    server: serving.Server | None = None

    @property
    def live(self) -> serving.Server:
        assert self.server is not None, "the server was not started"
        return self.server

    def recover(self) -> None:
        """Back to a running trainer with no faults, whatever a failed test left behind."""
        for flag in self.faults.iterdir():
            flag.unlink()
        state = self.live.wait_for_state("running", "paused", "stopped", "finished", "crashed")["state"]
        if state == "paused":
            self.live.request("/command/resume", method="POST")
        elif state != "running":
            self.live.request("/run/restart", method="POST")
        self.live.wait_for_state("running")

    def start(self, **options: Any) -> serving.Server:
        args = serving.serve_args(self.run_dir, recipe=RECIPE, **options)
        self.server = serving.start(args, env={faulty_recipe.FAULTS_ENV: str(self.faults)})
        return self.server


@pytest.fixture(scope="module")
def faulty(tmp_path_factory: pytest.TempPathFactory, browser: Any) -> Iterator[Faulty]:
    base = tmp_path_factory.mktemp("lifecycle")
    run = Faulty(run_dir=base / "run", faults=base / "faults")
    run.faults.mkdir()
    run.start()
    try:
        run.live.wait_for_state("running")
        yield run
    finally:
        if run.server is not None:
            run.server.stop()


@pytest.fixture
def tab(open_tab: Any, faulty: Faulty) -> Any:
    faulty.recover()
    tab = open_tab(faulty.live.url)
    expect(state_badge(tab.page)).to_have_text("running")
    return tab


@pytest.fixture
def page(tab: Any) -> Any:
    return tab.page


def state_badge(page: Any) -> Any:
    return page.get_by_role("status", name="Trainer state")


def assert_in_viewport(page: Any, locator: Any, what: str) -> None:
    """Within the viewport, give or take the sub-pixel rounding of a scrolled sticky box."""
    box = locator.bounding_box()
    height = page.viewport_size["height"]
    where = f"{what}: box {box}, viewport height {height}, scrollY {page.evaluate('window.scrollY')}"
    assert box is not None and box["y"] >= -1 and box["y"] + box["height"] <= height + 1, where


def test_quit_asks_for_confirmation_and_restart_starts_the_trainer_again(page: Any) -> None:
    page.get_by_role("button", name="Quit", exact=True).click()
    dialog = page.get_by_role("dialog", name="Quit training?")
    expect(dialog).to_be_visible()
    dialog.get_by_role("button", name="Cancel", exact=True).click()
    expect(dialog).to_be_hidden()
    expect(state_badge(page)).to_have_text("running")
    expect(page.get_by_role("button", name="Restart")).to_be_hidden()

    page.get_by_role("button", name="Quit", exact=True).click()
    dialog.get_by_role("button", name="Confirm", exact=True).click()
    expect(page.get_by_role("log", name="Event log")).to_contain_text("✓ quit: quitting at step", timeout=LONG_MS)
    expect(state_badge(page)).to_have_text(re.compile("stopped|finished"), timeout=LONG_MS)
    expect(page.get_by_role("button", name="Save", exact=True)).to_be_disabled()

    page.get_by_role("button", name="Restart").click()
    expect(state_badge(page)).to_have_text("running", timeout=LONG_MS)
    expect(page.get_by_role("button", name="Restart")).to_be_hidden()
    expect(page.get_by_role("log", name="Event log")).to_contain_text("resuming from", timeout=LONG_MS)


def test_a_non_finite_loss_raises_an_alert_that_stays_in_view(page: Any, faulty: Faulty) -> None:
    flag = faulty.faults / faulty_recipe.NAN_FLAG
    flag.touch()
    try:
        alert = page.get_by_role("alert").filter(has_text=re.compile("non-finite", re.IGNORECASE))
        expect(alert).to_be_visible(timeout=LONG_MS)
        assert_in_viewport(page, alert, "the alert is not in view")
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        page.wait_for_function("window.scrollY > 0")
        assert_in_viewport(page, alert, "the alert scrolled out of view")
        # After nonfinite_patience bad steps in a row the trainer pauses itself.
        expect(state_badge(page)).to_have_text("paused", timeout=LONG_MS)
    finally:
        flag.unlink()
    page.get_by_role("button", name="Resume", exact=True).click()
    expect(state_badge(page)).to_have_text("running", timeout=LONG_MS)


def open_with_late_answers(open_tab: Any, faulty: Faulty, pattern: str) -> tuple[Any, LateAnswers]:
    """A page on the running trainer whose REST answers matching `pattern` wait for `release()`."""
    faulty.recover()
    page = open_tab("about:blank").page
    late = LateAnswers(page, pattern)
    page.goto(faulty.live.url, wait_until="load")
    expect(state_badge(page)).to_have_text("running")
    return page, late


def test_a_live_alert_outlives_history_that_answers_after_it(open_tab: Any, faulty: Faulty) -> None:
    # History's own "trainer started" must not clear an alert that live data raised since.
    page, late = open_with_late_answers(open_tab, faulty, "**/api/events*")
    flag = faulty.faults / faulty_recipe.NAN_FLAG
    flag.touch()
    try:
        alert = page.get_by_role("alert").filter(has_text=re.compile("non-finite", re.IGNORECASE))
        expect(alert).to_be_visible(timeout=LONG_MS)
    finally:
        flag.unlink()
    alert.evaluate("(el) => { window.liveAlert = el; }")
    assert late.release() > 0, "the page asked for no events"
    wait_for_loads(page)
    expect(page.get_by_role("log", name="Event log")).to_contain_text("trainer started")
    assert page.evaluate("window.liveAlert.isConnected"), "history cleared the alert raised after it"
    expect(alert).to_be_visible()


def test_a_late_status_answer_does_not_undo_a_newer_live_state(open_tab: Any, faulty: Faulty) -> None:
    # The page's first /api/status says "running"; it lands after the live "stopped".
    page, late = open_with_late_answers(open_tab, faulty, "**/api/status")
    faulty.live.request("/command/quit", method="POST")
    faulty.live.wait_for_state("stopped", "finished")  # the process is gone: no more live statuses
    expect(state_badge(page)).to_have_text(re.compile("stopped|finished"), timeout=LONG_MS)
    assert late.release() > 0, "the page asked for no status"
    wait_for_loads(page)
    shown = state_badge(page).text_content()
    assert shown in ("stopped", "finished"), f"the late answer put the badge back to {shown!r}"
    page.get_by_role("button", name="Restart").click()
    expect(state_badge(page)).to_have_text("running", timeout=LONG_MS)


def test_a_crash_shows_its_traceback_and_restart_recovers(tab: Any, faulty: Faulty) -> None:
    page = tab.page
    # The eval request itself fails: its trainer dies before answering (409).
    tab.guard.allow(r"status of 409")
    (faulty.faults / faulty_recipe.CRASH_EVAL_FLAG).touch()
    try:
        page.get_by_role("button", name="Eval", exact=True).click()
        expect(state_badge(page)).to_have_text("crashed", timeout=LONG_MS)
    finally:
        (faulty.faults / faulty_recipe.CRASH_EVAL_FLAG).unlink()
    alert = page.get_by_role("alert").filter(has_text=re.compile("crash", re.IGNORECASE))
    expect(alert).to_be_visible()
    assert_in_viewport(page, alert, "the crash alert is not in view")
    expect(alert.locator("pre")).to_contain_text("evaluation failed on purpose", timeout=LONG_MS)
    expect(alert.locator("pre")).to_contain_text("Traceback")
    page.get_by_role("button", name="Restart").click()
    expect(state_badge(page)).to_have_text("running", timeout=LONG_MS)
    expect(alert).to_have_count(0, timeout=LONG_MS)


def test_the_page_reconnects_and_refetches_history_after_a_server_restart(open_tab: Any, faulty: Faulty) -> None:
    faulty.recover()
    tab = open_tab(faulty.live.url)
    page = tab.page
    connection = page.get_by_role("status", name="Connection")
    expect(connection).to_have_text("live")
    # While the server is down the browser reports the failed connections: expected here.
    tab.guard.allow(r"WebSocket connection|ERR_CONNECTION_REFUSED|Failed to load resource")

    port, token = faulty.live.port, faulty.live.token
    faulty.live.stop()
    expect(connection).to_have_text(re.compile("reconnecting"), timeout=LONG_MS)
    expect(connection).to_have_attribute("data-state", "reconnecting")

    # Listen before the restart: the page may reconnect and refetch while the server is still starting up.
    history: list[Any] = []
    page.on("response", lambda r: history.append(r) if "/api/metrics" in r.url else None)
    faulty.start(port=port, token=token, resume=True)
    expect(connection).to_have_text("live", timeout=LONG_MS)
    deadline = time.monotonic() + LONG_MS / 1000
    while not history:
        assert time.monotonic() < deadline, "no /api/metrics request after the reconnect"
        page.wait_for_timeout(100)
    assert all(response.ok for response in history)
    faulty.live.wait_for_state("running")
    expect(state_badge(page)).to_have_text("running", timeout=LONG_MS)
    wait_for_last_step(page, "train/loss", last_step(page, "train/loss"), LONG_MS)
