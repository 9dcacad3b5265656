"""Suite-wide collection order.

Browser tests run last, whatever order their files were named in: between calls, Playwright's
sync API leaves its event loop marked as running in the main thread (for the whole session,
since the browser is session-scoped), and `asyncio.run` in any test after that refuses to start.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: item.get_closest_marker("browser") is not None)
