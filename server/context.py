"""What every route needs: settings, the hub, the trainer's supervisor (absent when read-only)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.templating import Jinja2Templates

from server.hub import Hub
from server.settings import ServerSettings
from server.stored_status import stored_status
from server.supervisor import Supervisor

STORE_NAME = "metrics.sqlite"


@dataclass
class ServerContext:
    settings: ServerSettings
    hub: Hub
    templates: Jinja2Templates
    supervisor: Supervisor | None = None

    @property
    def read_only(self) -> bool:
        return self.supervisor is None

    @property
    def run_dir(self) -> Path:
        return self.settings.run_dir

    @property
    def store_path(self) -> Path:
        return self.settings.run_dir / STORE_NAME

    def status(self) -> dict[str, Any]:
        """The live status (supervisor) or the one a finished run's store implies (read-only)."""
        status = stored_status(self.run_dir) if self.supervisor is None else self.supervisor.status()
        status.update(self.hub.stats())
        status["read_only"] = self.read_only
        return status
