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
