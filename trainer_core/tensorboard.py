"""Optional TensorBoard event files beside the store, for users who already live in TensorBoard.

The SQLite store stays the source of truth; this is a second, opt-in sink
(``trainer.tensorboard: true``). Without the tensorboard package the run goes on and says so.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class TensorBoardSink:
    def __init__(self, log_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer: Any = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, values: Mapping[str, float]) -> None:
        for name, value in values.items():
            if math.isfinite(value):
                self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


def open_sink(run_dir: Path) -> tuple[TensorBoardSink | None, str | None]:
    """The sink, or None and the reason it could not be opened."""
    try:
        return TensorBoardSink(run_dir / "tensorboard"), None
    except ImportError as exc:
        return None, f"trainer.tensorboard is on but tensorboard is not installed ({exc}); pip install tensorboard"
