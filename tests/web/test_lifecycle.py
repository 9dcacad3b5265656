"""Stopping and starting: quit with confirmation, restart, and a page that outlives its server.

These tests stop the trainer or the server, so they use their own server, not the shared one.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.web import serving

pytestmark = [pytest.mark.browser, pytest.mark.slow]

LONG_MS = 60_000


@pytest.fixture(scope="module")
def own_server(tmp_path_factory: pytest.TempPathFactory, browser: Any) -> Iterator[tuple[serving.Server, Path]]:
    run_dir = tmp_path_factory.mktemp("lifecycle") / "run"
    server = serving.start(serving.serve_args(run_dir))
    try:
        server.wait_for_state("running")
        yield server, run_dir
    finally:
        server.stop()


def state_badge(page: Any) -> Any:
    return page.get_by_role("status", name="Trainer state")


def test_quit_asks_for_confirmation_and_restart_starts_the_trainer_again(
        open_tab: Any, own_server: tuple[serving.Server, Path]) -> None:
    server, _ = own_server
    page = open_tab(server.url).page
    expect(state_badge(page)).to_have_text("running")

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


def test_the_page_reconnects_and_refetches_history_after_a_server_restart(
        open_tab: Any, own_server: tuple[serving.Server, Path]) -> None:
    server, run_dir = own_server
    server.wait_for_state("running")
    tab = open_tab(server.url)
    page = tab.page
    connection = page.get_by_role("status", name="Connection")
    expect(connection).to_have_text("live")
    # While the server is down the browser reports failed connections: expected here.
    tab.guard.allow(r"WebSocket connection|ERR_CONNECTION_REFUSED|Failed to load resource")

    port, token = server.port, server.token
    server.stop()
    expect(connection).to_have_text(re.compile("reconnecting"), timeout=LONG_MS)
    expect(connection).to_have_attribute("data-state", "reconnecting")

    restarted = serving.start(serving.serve_args(run_dir, port=port, token=token, resume=True))
    try:
        with page.expect_response(lambda r: "/api/metrics" in r.url, timeout=LONG_MS) as history:
            expect(connection).to_have_text("live", timeout=LONG_MS)
        assert history.value.ok
        restarted.wait_for_state("running")
        expect(state_badge(page)).to_have_text("running", timeout=LONG_MS)
        before = int(page.locator('figure[data-metric="train/loss"]').get_attribute("data-last-step") or 0)
        page.wait_for_function(
            "s => Number(document.querySelector(\"figure[data-metric='train/loss']\").dataset.lastStep) > s",
            arg=before, timeout=LONG_MS,
        )
    finally:
        restarted.stop()
