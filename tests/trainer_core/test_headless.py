"""Headless `traindeck train`: stdin commands, EOF, signals, progress output."""

from __future__ import annotations

import io
import os
import pty
import select
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from tests.trainer_core.loop_helpers import SMALL_DEMO
from trainer_core.checkpoint import list_checkpoints
from trainer_core.headless import StdinChannel

ROOT = Path(__file__).resolve().parents[2]


def traindeck(run_dir: Path, *overrides: str, resume: bool = False) -> list[str]:
    args = [sys.executable, "-m", "server.cli", "train", "demo", "--run-dir", str(run_dir)]
    for item in (*SMALL_DEMO, *overrides):
        args += ["--set", item]
    return [*args, "--resume"] if resume else args


def last_step(run_dir: Path) -> int:
    store = run_dir / "metrics.sqlite"
    if not store.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{store}?mode=ro", uri=True) as conn:
            row = conn.execute("SELECT MAX(step) FROM metrics WHERE name='train/loss'").fetchone()
    except sqlite3.OperationalError:
        return 0
    return row[0] or 0


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while last_step(run_dir) < step:
        assert proc.poll() is None, "trainer exited early"
        assert time.monotonic() < deadline, "trainer made no progress"
        time.sleep(0.1)


def test_commands_from_a_stdin_file_are_applied_and_eof_is_not_a_quit(tmp_path: Path) -> None:
    commands = tmp_path / "commands.txt"
    commands.write_text("save@3\nstatus\nsav\n")
    with commands.open() as stdin:
        done = subprocess.run(traindeck(tmp_path / "run", "trainer.iterations=6"), stdin=stdin, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "save@3: scheduled" in done.stdout
    assert "status: running at step 0/6" in done.stdout
    assert "sav: error: unknown command 'sav'; did you mean 'save'?" in done.stdout
    assert [c["step"] for c in list_checkpoints(tmp_path / "run")] == [3, 6]


def test_commands_typed_into_a_pipe_while_training_are_applied(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(traindeck(run_dir, "trainer.iterations=100000"), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, text=True)
    try:
        wait_for_step(run_dir, 2, proc)
        assert proc.stdin is not None
        proc.stdin.write("lr 0.0001\nquit\n")
        proc.stdin.flush()
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "lr 0.0001: lr set to 0.0001" in out
    assert "quit: quitting at step" in out
    assert len(list_checkpoints(run_dir)) == 1


def run_until_signal(tmp_path: Path, sig: signal.Signals) -> tuple[subprocess.Popen, str, str]:
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(traindeck(run_dir, "trainer.iterations=100000"), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, text=True)
    try:
        wait_for_step(run_dir, 3, proc)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    return proc, out, err


def test_sigterm_finishes_the_step_saves_and_exits_0(tmp_path: Path) -> None:
    proc, out, err = run_until_signal(tmp_path, signal.SIGTERM)
    assert proc.returncode == 0, err
    checkpoints = list_checkpoints(tmp_path / "run")
    assert len(checkpoints) == 1 and checkpoints[0]["step"] == last_step(tmp_path / "run")
    assert "Traceback" not in err + out


def test_sigint_saves_and_exits_0_without_a_traceback(tmp_path: Path) -> None:
    proc, out, err = run_until_signal(tmp_path, signal.SIGINT)
    assert proc.returncode == 0, err
    assert len(list_checkpoints(tmp_path / "run")) == 1
    assert "KeyboardInterrupt" not in err + out


def test_a_second_sigint_aborts_at_once() -> None:
    script = textwrap.dedent("""
        import os, signal, time
        from trainer_core.signals import StopFlag
        flag = StopFlag(); flag.install()
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        print("requested", flag.requested, flag.signal_name, flush=True)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        print("still alive", flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.stdout.strip() == "requested True SIGINT"
    assert done.returncode == 130


def test_stdin_at_eof_ends_the_reader_thread_instead_of_spinning() -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, b"save\n\nstatus\n")
    os.close(write_end)
    with os.fdopen(read_end) as stdin:
        channel = StdinChannel(stdin, io.StringIO())
        assert [r.line for r in channel.poll()] == ["save", "status"]
        assert channel._reader is not None
        channel._reader.join(timeout=5)
        assert not channel._reader.is_alive()
        assert channel.poll() == []


def test_lines_waiting_at_start_are_seen_by_the_first_poll() -> None:
    read_end, write_end = os.pipe()
    os.write(write_end, b"eval_quit\n")
    stdin = os.fdopen(read_end)
    channel = StdinChannel(stdin, io.StringIO())
    try:
        assert [r.line for r in channel.poll()] == ["eval_quit"]
    finally:
        os.close(write_end)  # EOF ends the reader; only then can its file be closed
        assert channel._reader is not None
        channel._reader.join(timeout=5)
        stdin.close()


def test_a_terminal_gets_a_progress_bar(tmp_path: Path) -> None:
    primary, secondary = pty.openpty()
    proc = subprocess.Popen(traindeck(tmp_path / "run", "trainer.iterations=8"), stdin=subprocess.DEVNULL,
                            stdout=secondary, stderr=subprocess.DEVNULL, cwd=ROOT)
    os.close(secondary)
    chunks: list[bytes] = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([primary], [], [], 0.5)
            if ready:
                try:
                    data = os.read(primary, 4096)
                except OSError:
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        assert proc.wait(timeout=10) == 0
    finally:
        proc.kill()
        os.close(primary)
    text = b"".join(chunks).decode(errors="replace")
    assert "\r[" in text and "steps/s" in text and "ETA" in text


def test_plain_progress_lines_come_every_log_every_steps_but_at_most_one_a_second() -> None:
    out = io.StringIO()
    channel = StdinChannel(None, out, log_every=2)
    channel.send({"type": "status", "iterations": 1000})
    for step in range(1, 201):  # far faster than a second
        channel.send({"type": "metrics", "step": step, "time": 0.0,
                      "values": {"train/loss": 1.0, "train/steps_per_s": 1000.0}})
    lines = out.getvalue().splitlines()
    assert lines == ["step 2/1000 loss 1.0000 1000.0 steps/s ETA 1s"]
