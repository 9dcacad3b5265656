"""Whether a process id names a live process: how leftovers of dead writers are told apart."""

from __future__ import annotations

import os


def pid_alive(pid: object) -> bool:
    """True when ``pid`` is a live process (including one we may not signal)."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True
