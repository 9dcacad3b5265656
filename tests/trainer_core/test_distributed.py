"""Two real ranks (torchrun, gloo on CPU): one voice to the outside, the same commands at the same step."""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from tests.trainer_core.loop_helpers import SMALL_DEMO
from trainer_core import io
from trainer_core.checkpoint import list_checkpoints

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(*target: str) -> list[str]:
    """The command that starts `target` (a script or ``-m module``, with its arguments) on 2 local ranks."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), *target]


def torchrun_train(
    run_dir: Path, *overrides: str, resume: bool = False, stdin: str = ""
) -> subprocess.CompletedProcess:
    args = torchrun("-m", "server.cli", "train", "demo", "--run-dir", str(run_dir))
    for item in (*SMALL_DEMO, *overrides):
        args += ["--set", item]
    if resume:
        args.append("--resume")
    return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=240, cwd=ROOT)


def torchrun_script(script: str, *args: str) -> subprocess.CompletedProcess:
    path = Path(args[0]) / "script.py"
    path.write_text(textwrap.dedent(script))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(torchrun(str(path), *args), capture_output=True, text=True, timeout=240, cwd=ROOT, env=env)


LEAVE_GROUP_SCRIPT = """
    import sys
    from pathlib import Path

    import torch.distributed as dist

    from tests.trainer_core.loop_helpers import small_config
    from trainer_core.channel import NullChannel
    from trainer_core.train import run

    code = run("demo", small_config("trainer.iterations=2"), Path(sys.argv[1]) / "run", resume=False,
               channel=NullChannel(), install_signal_handlers=False)
    print(f"exit {code}, still in the group: {dist.is_initialized()}")
"""


def test_every_rank_leaves_the_process_group_before_it_exits(tmp_path: Path) -> None:
    # Left to interpreter shutdown, Gloo's threads now and then abort a rank after a clean run.
    done = torchrun_script(LEAVE_GROUP_SCRIPT, str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("exit 0, still in the group: False") == 2, done.stdout


def logged_steps(run_dir: Path) -> list[int]:
    with sqlite3.connect(run_dir / "metrics.sqlite") as conn:
        return [row[0] for row in conn.execute("SELECT step FROM metrics WHERE name='train/loss' ORDER BY step")]


def test_two_ranks_train_save_per_rank_state_and_resume(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = torchrun_train(run_dir, "trainer.iterations=6", "trainer.save_frequency=3", stdin="export two\n")
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("Run directory:") == 1  # only rank 0 speaks
    assert [c["step"] for c in list_checkpoints(run_dir)] == [3, 6]
    state = io.load(Path(list_checkpoints(run_dir)[-1]["path"]) / "trainer_state.safetensors")
    assert len(state["ranks"]) == 2
    assert state["ranks"][0]["data"] == state["ranks"][1]["data"]  # the same step on every rank
    assert not torch.equal(state["ranks"][0]["rng"]["torch"], state["ranks"][1]["rng"]["torch"])  # own RNG
    assert (run_dir / "exports" / "two.safetensors").is_file()
    assert logged_steps(run_dir) == [1, 2, 3, 4, 5, 6]

    second = torchrun_train(run_dir, "trainer.iterations=8", resume=True)
    assert second.returncode == 0, second.stderr[-3000:]
    assert logged_steps(run_dir) == list(range(1, 9))
    assert [c["step"] for c in list_checkpoints(run_dir)][-1] == 8
