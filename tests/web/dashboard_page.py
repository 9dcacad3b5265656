"""Small helpers that read the dashboard the way the tests need it."""

from __future__ import annotations

from typing import Any

# The chart's data attributes follow its newest live point.
_LAST_STEP_ABOVE = """([name, step]) => {
    const figure = document.querySelector(`figure.chart[data-metric="${name}"]`);
    return figure !== null && Number(figure.dataset.lastStep) > step;
}"""


def chart(page: Any, name: str) -> Any:
    return page.locator(f'figure.chart[data-metric="{name}"]')


def last_step(page: Any, name: str) -> int:
    return int(chart(page, name).get_attribute("data-last-step") or 0)


def wait_for_last_step(page: Any, name: str, above: int, timeout_ms: float = 30_000) -> None:
    """Wait (bounded) until the chart of `name` has a point after step `above`."""
    page.wait_for_function(_LAST_STEP_ABOVE, arg=[name, above], timeout=timeout_ms)


def wait_for_history(page: Any, timeout_ms: float = 60_000) -> None:
    """Wait (bounded) until every metric's history is drawn (the page marks it on <html>)."""
    page.wait_for_function("document.documentElement.dataset.historyPaintMs !== undefined", timeout=timeout_ms)


def wait_for_loads(page: Any, count: int = 1, timeout_ms: float = 60_000) -> None:
    """Wait (bounded) until the page finished `count` full loads of its REST data (first load, reconnects)."""
    page.wait_for_function("(n) => Number(document.documentElement.dataset.loads ?? 0) >= n", arg=count,
                           timeout=timeout_ms)


class LateAnswers:
    """REST answers the server gives at once but the page receives only on `release()`.

    That is history arriving after newer live data, as it can on a loaded machine. Install it
    before the page loads; requests after the release pass through untouched.
    """

    def __init__(self, page: Any, pattern: str) -> None:
        self.held: list[tuple[Any, Any]] = []
        self.released = False
        page.route(pattern, self._hold)

    def _hold(self, route: Any) -> None:
        if self.released:
            route.fallback()
        else:
            self.held.append((route, route.fetch()))

    def release(self) -> int:
        """Deliver the held answers; how many there were."""
        self.released = True
        for route, response in self.held:
            route.fulfill(response=response)
        return len(self.held)
