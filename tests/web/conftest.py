"""Browser fixtures: the system Chromium driven by Playwright, real servers, guarded pages.

Without a Chromium the browser tests skip with a message, unless TRAINDECK_REQUIRE_BROWSER=1
(set by .ci/run), where a missing browser fails them instead. TRAINDECK_TEST_LATE_REST_MS=N holds
every REST answer a page receives for N ms after it arrived (WebSocket frames are not held): the
server's history then reaches the page after newer live data, as it can on a loaded machine,
which shakes out ordering races in the page.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest

from tests.web import serving

ARTIFACTS = serving.ROOT / "test-artifacts"
BROWSER_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 390, "height": 844}
LOOPBACK = "127.0.0.1"
DEFAULT_TIMEOUT_MS = 15_000
LATE_REST_SCRIPT = """
(() => {
  const holdMs = %d;
  const fetchNow = window.fetch.bind(window);
  window.fetch = (input, init) => fetchNow(input, init).then(
    (response) => new Promise((resolve) => setTimeout(() => resolve(response), holdMs)));
})();
"""


def _unavailable(reason: str) -> None:
    if os.environ.get("TRAINDECK_REQUIRE_BROWSER") == "1":
        pytest.fail(f"browser tests are required (TRAINDECK_REQUIRE_BROWSER=1) but {reason}", pytrace=False)
    pytest.skip(f"browser tests skipped: {reason} (install chromium to run them)")


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = shutil.which("chromium")
    if path is None:
        _unavailable("no `chromium` on PATH")
    return path


@pytest.fixture(scope="session")
def browser(chromium_path: str) -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _unavailable(f"the playwright package is not importable ({exc})")
    from playwright.sync_api import expect

    expect.set_options(timeout=DEFAULT_TIMEOUT_MS)
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=chromium_path, headless=True, args=BROWSER_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


class PageGuard:
    """Records what a page does that it must not: leave 127.0.0.1, log errors, throw.

    Every request of the browser context passes through a route that aborts and records any
    request to another host; WebSocket URLs are checked too. Tests that provoke an error on
    purpose (a 422, a server going away) declare it with `allow`.
    """

    def __init__(self, context: Any, page: Any) -> None:
        self.foreign: list[str] = []
        self.console_errors: list[str] = []
        self.page_errors: list[str] = []
        self.allowed: list[re.Pattern[str]] = []
        context.route("**/*", self._route)
        page.on("console", self._console)
        page.on("pageerror", lambda exc: self.page_errors.append(str(exc)))
        page.on("websocket", lambda ws: self._check_url(ws.url))

    def _check_url(self, url: str) -> bool:
        host = urlparse(url).hostname
        if host != LOOPBACK:
            self.foreign.append(url)
            return False
        return True

    def _route(self, route: Any) -> None:
        if self._check_url(route.request.url):
            route.continue_()
        else:
            route.abort()

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.console_errors.append(message.text)

    def allow(self, pattern: str) -> None:
        self.allowed.append(re.compile(pattern))

    def unexpected_errors(self) -> list[str]:
        return [e for e in self.console_errors if not any(p.search(e) for p in self.allowed)]

    def assert_clean(self) -> None:
        assert self.foreign == [], f"requests left {LOOPBACK}: {self.foreign}"
        assert self.page_errors == [], f"uncaught errors in the page: {self.page_errors}"
        assert self.unexpected_errors() == [], f"console errors: {self.unexpected_errors()}"


class Tab:
    """One browser context with one guarded page."""

    def __init__(self, browser: Any, viewport: dict[str, int], color_scheme: str = "light") -> None:
        self.context = browser.new_context(viewport=viewport, device_scale_factor=1, color_scheme=color_scheme)
        self.context.set_default_timeout(DEFAULT_TIMEOUT_MS)
        self.page = self.context.new_page()
        self.guard = PageGuard(self.context, self.page)
        late_ms = int(os.environ.get("TRAINDECK_TEST_LATE_REST_MS", "0"))
        if late_ms > 0:
            self.context.add_init_script(LATE_REST_SCRIPT % late_ms)

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def open_tab(browser: Any) -> Iterator[Any]:
    """open_tab(url, viewport=DESKTOP, color_scheme="light") -> a loaded Tab; guards are checked at teardown."""
    tabs: list[Tab] = []

    def open_(url: str, viewport: dict[str, int] | None = None, color_scheme: str = "light") -> Tab:
        tab = Tab(browser, viewport or DESKTOP, color_scheme)
        tabs.append(tab)
        tab.page.goto(url, wait_until="load")
        return tab

    yield open_
    try:
        for tab in tabs:
            tab.guard.assert_clean()
    finally:
        for tab in tabs:
            tab.close()


@pytest.fixture(scope="session")
def shared_server(tmp_path_factory: pytest.TempPathFactory, browser: Any) -> Iterator[serving.Server]:
    """One training demo behind `traindeck serve`, shared by the tests that do not stop it."""
    run_dir = tmp_path_factory.mktemp("shared") / "run"
    server = serving.start(serving.serve_args(run_dir))
    try:
        server.wait_for_state("running")
        yield server
    finally:
        server.stop()
