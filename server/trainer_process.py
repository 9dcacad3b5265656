"""The spawned trainer's entry point: the pipe-backed channel around ``trainer_core.train.run``.

The child ignores SIGINT: a Ctrl-C in the terminal reaches the whole process group, and the
server answers it by sending ``quit`` down the pipe, so the trainer saves exactly once and
neither process prints a KeyboardInterrupt traceback. SIGTERM sent to the child alone is a
quit request too. Whatever kills the loop is reported on the pipe as a ``crash`` message with
its traceback; the server shows it, so the child prints nothing itself.
"""

from __future__ import annotations

import signal
import sys
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from types import FrameType
from typing import Any

from server.protocol import PipeChannel

EXIT_CRASHED = 1


@dataclass(frozen=True)
class TrainerSpec:
    """Everything the child needs, as plain picklable data."""

    recipe: str
    config: dict[str, Any]
    run_dir: str
    resume: bool = False
    nproc_per_node: int = 1


def main(conn: Connection, spec: TrainerSpec) -> None:
    """Process target; exits with the loop's exit code (1 when it crashed)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = PipeChannel(conn)

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        channel.request_quit("SIGTERM")

    signal.signal(signal.SIGTERM, on_sigterm)
    sys.exit(_run(channel, spec))


def _run(channel: PipeChannel, spec: TrainerSpec) -> int:
    try:
        if spec.nproc_per_node != 1:
            raise ValueError(f"nproc_per_node={spec.nproc_per_node}: launching several ranks is not supported yet")
        from trainer_core.config import config_from_dict
        from trainer_core.train import run

        config = config_from_dict(spec.config)
    except Exception as exc:
        channel.send({"type": "crash", "traceback": "".join(traceback.format_exception(exc))})
        channel.close()
        return EXIT_CRASHED
    try:
        return run(spec.recipe, config, Path(spec.run_dir), resume=spec.resume, channel=channel,
                   install_signal_handlers=False)
    except Exception:
        return EXIT_CRASHED  # run() has sent the crash report with its traceback and closed the channel
