"""SIGINT/SIGTERM as a polite request to stop.

The handlers only flip a flag (no I/O, no locks): the loop notices it at the next step
boundary, saves if configured, and exits 0. A second SIGINT means "now": the process exits
at once with 130, leaving at worst an uncommitted checkpoint folder that resume ignores.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType


class StopFlag:
    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            os._exit(130)
        self.requested = True
        self.signal_name = signal.Signals(signum).name
