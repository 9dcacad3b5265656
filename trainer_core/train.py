"""The training loop.

It sees the outside world only through a :class:`~trainer_core.channel.Channel`: it polls for
command requests at step boundaries and sends metrics, status, events and results. The hot
path per step is kept to the model's own work plus a few dict operations. Polling is throttled
by wall-clock time, and each step's metrics wait in a list until the next poll: the store and
the channel take them there, a batch at a time, so a short step does not pay for two calls,
two locks and a message of its own.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
import traceback
from pathlib import Path
from typing import Any

from trainer_core import distributed, rng
from trainer_core.channel import Channel, NullChannel
from trainer_core.checkpoint import CheckpointManager, step_dir_name
from trainer_core.config import Config, config_to_dict, dump_yaml
from trainer_core.control import Controller
from trainer_core.progress import RateMeter
from trainer_core.rundir import check_fresh_or_resume
from trainer_core.session import Session, build_session
from trainer_core.signals import StopFlag
from trainer_core.steps import StepRunner

# Commands are polled, and the steps' metrics handed over, at most this often: often enough that
# a command waits a few milliseconds, rarely enough that a poll (~50 us on a CPU, cold after the
# model's work) costs a fraction of a percent of the time.
POLL_INTERVAL_S = 0.02
DISTRIBUTED_POLL_STEPS = 10
PAUSED_POLL_S = 0.05

STEP = "step"
SAMPLES = "samples_seen"
TOKENS = "tokens_seen"
ENGINES = "engines"
RANKS = "ranks"
COMMANDS = "commands"
CONFIG = "config"
NONFINITE = "nonfinite_total"
VERSION = "version"
STATE_VERSION = 1
TRAINER_STATE = "trainer_state"
EPOCH_METRIC = "train/epoch"
RATE_METRIC = "train/steps_per_s"


def run(
    recipe: str,
    config: Config,
    run_dir: Path,
    *,
    resume: bool,
    channel: Channel,
    install_signal_handlers: bool = True,
) -> int:
    """Train ``recipe`` in ``run_dir``; returns the exit code (0 when it finished or quit cleanly)."""
    stop = StopFlag()
    if install_signal_handlers:
        stop.install()
    trainer: Trainer | None = None
    joined = False
    try:
        joined = distributed.init_from_env()
        session = build_session(recipe, config, Path(run_dir))
        if not distributed.is_leader():
            channel = NullChannel()  # only rank 0 talks to the outside world
        trainer = Trainer(session, channel, stop)
        trainer.start(resume)
        return trainer.loop()
    except BaseException as exc:
        if not isinstance(exc, SystemExit | KeyboardInterrupt):
            report_crash(channel, trainer, exc)
        raise
    finally:
        if trainer is not None:
            trainer.close()
        channel.close()
        stop.uninstall()
        if joined:
            distributed.teardown()


def report_crash(channel: Channel, trainer: Trainer | None, exc: BaseException) -> None:
    text = "".join(traceback.format_exception(exc))
    if trainer is not None:
        with contextlib.suppress(Exception):
            trainer.flush_metrics()
        with contextlib.suppress(Exception):
            trainer.emit_event("alert", {"level": "error", "message": f"trainer crashed: {exc!r}", "traceback": text})
    channel.send({"type": "crash", "traceback": text})


class Trainer:
    """The loop and the actions commands can take (see ``trainer_core.control.Actions``)."""

    def __init__(self, session: Session, channel: Channel, stop: StopFlag) -> None:
        self.s = session
        self.cfg = session.config
        self.channel = channel
        self.stop = stop
        self.leader = distributed.is_leader()
        self.distributed = distributed.is_initialized()
        self.iterations = self.cfg.trainer.iterations
        self.step = 0
        self.paused = False
        self.quit_reason: str | None = None
        self.last_saved_step = -1
        self.last_checkpoint: str | None = None
        self.rate = RateMeter()
        self.started = time.monotonic()
        self.checkpoints = CheckpointManager(
            session.run_dir, keep_last=self.cfg.trainer.keep_last, weights_format=self.cfg.trainer.weights_format
        )
        self.controller = Controller(self, self.emit_event, self.say)
        self.steps = StepRunner(session, self.cfg.trainer)
        self._run_step = self.steps.step_function()
        self._pending: list[tuple[int, float, dict[str, float]]] = []  # (step, perf_counter, values) not yet flushed
        self._next_poll = 0.0
        self._next_status = 0.0
        self._save_every = max(0, self.cfg.trainer.save_frequency)
        self._eval_every = max(0, self.cfg.trainer.eval_frequency) if session.recipe.eval is not None else 0
        self._has_due = self.controller.scheduler.has_due
        self._feed = session.feed

    # -- start / stop -------------------------------------------------------------------------

    def start(self, resume: bool) -> None:
        check_fresh_or_resume(self.s.run_dir, resume)
        if self.leader:
            dump_yaml(self.cfg, self.s.run_dir / "config.yaml")
        for message in self.s.warnings:
            self.emit_event("alert", {"level": "warning", "message": message})
        for message in self.s.optimization_notes:
            self.emit_event("info", {"message": message})
        resumed_from = self._resume() if resume else None
        self.emit_event("start", {"resume_from": resumed_from, "pid": os.getpid(), "iterations": self.iterations})

    def _resume(self) -> str | None:
        if self.leader:
            self.checkpoints.clean_partial()
        distributed.barrier()
        found = self.checkpoints.load_latest()
        for path, reason in self.checkpoints.skipped:
            self.emit_event("alert", {"level": "warning", "message": f"skipped checkpoint {path}: {reason}"})
        if found is None:
            return None
        path, parts = found
        self.load_parts(parts)
        self.last_saved_step = self.step
        self.last_checkpoint = str(path)
        if self.s.store is not None:
            self.s.store.truncate_after(self.step)
        return str(path)

    def loop(self) -> int:
        # Everything built so far (torch's modules, the model, the data) lives for the whole run:
        # freezing it keeps the collector from walking ~10^5 objects on every full collection.
        gc.collect()
        gc.freeze()
        self._service(force=True)
        while self.quit_reason is None:
            if self.step >= self.iterations:
                self.quit_reason = "finished"
                break
            if self.paused:
                self._wait_paused()
                continue
            self._train_one()
        return self._finish()

    def _train_one(self) -> None:
        values, nonfinite = self._run_step(self.step)
        self.step = step = self.step + 1
        values[EPOCH_METRIC] = self._feed.epoch_progress
        now = time.perf_counter()
        self._pending.append((step, now, values))
        if nonfinite:
            self._on_nonfinite()
        if self._save_every and step % self._save_every == 0 and step < self.iterations:
            self._run_internal("save")
        if self._eval_every and step % self._eval_every == 0:
            self._run_internal("eval")
        if self.distributed or now >= self._next_poll or self._has_due(step):
            self._service(now=now)

    def flush_metrics(self) -> None:
        """Hand the steps trained since the last flush to the store and the channel.

        Runs at every poll and before anything else the loop says (``say``, ``emit_event``), so
        an event or a result never overtakes the metrics of the steps before it. The rate is
        worked out here from each step's end time, in step order, as ``RateMeter`` expects.
        """
        pending = self._pending
        if not pending:
            return
        self._pending = []
        offset = time.time() - time.perf_counter()
        rates = self.rate.tick_many([at for _, at, _ in pending])
        rows = []
        for (step, at, values), rate in zip(pending, rates, strict=True):
            values[RATE_METRIC] = rate
            rows.append((step, values, at + offset))
        self.s.log_steps(rows)
        self.channel.send_many([{"type": "metrics", "step": step, "time": wall, "values": values}
                                for step, values, wall in rows])

    def say(self, message: dict[str, Any]) -> None:
        """Send ``message`` after the metrics of the steps already trained."""
        self.flush_metrics()
        self.channel.send(message)

    def _run_internal(self, line: str) -> None:
        self.flush_metrics()
        self.controller.submit(f"auto-{line}-{self.step}", line, source="trainer")
        self.rate.mark_idle()

    def _service(self, now: float | None = None, force: bool = False) -> None:
        """Commands, scheduled commands, signals and status, at most every POLL_INTERVAL_S.

        With several ranks the poll is collective, so it happens on a step schedule that every
        rank shares rather than on each rank's own clock.
        """
        self.flush_metrics()
        self.controller.run_due()
        now = time.perf_counter() if now is None else now
        if self.distributed:
            if not force and self.step % DISTRIBUTED_POLL_STEPS:
                return
        elif not force and now < self._next_poll:
            return
        self._next_poll = now + POLL_INTERVAL_S
        requests, stop_signal = self._exchange()
        for request in requests:
            self.controller.submit(request.id, request.line, source="remote")
            self.rate.mark_idle()
        if stop_signal and self.quit_reason is None:
            self.quit_reason = f"signal {stop_signal}"
        if force or now >= self._next_status:
            self._next_status = now + self.cfg.trainer.status_every_s
            self.say(self.status())

    def _exchange(self) -> tuple[list[Any], str | None]:
        """The leader's command requests and stop signal, as every rank sees them."""
        mine = (self.channel.poll(), self.stop.signal_name if self.stop.requested else None)
        if not self.distributed:
            return mine
        return distributed.broadcast_object(mine if self.leader else None)

    def _wait_paused(self) -> None:
        time.sleep(PAUSED_POLL_S)
        self._service(force=True)
        self.rate.mark_idle()

    def _on_nonfinite(self) -> None:
        streak = self.steps.nonfinite_streak
        self.emit_event("alert", {"level": "warning", "message": f"non-finite loss at step {self.step}; update "
                                  f"skipped ({streak} in a row, {self.steps.nonfinite_total} in all)"})
        if streak >= self.cfg.trainer.nonfinite_patience and not self.paused:
            self.set_paused(True)
            self.emit_event("alert", {"level": "error", "message": f"paused: {streak} non-finite losses in a row"})

    def _finish(self) -> int:
        reason = self.quit_reason or "finished"
        t = self.cfg.trainer
        if (reason == "finished" or t.save_on_quit) and self.step != self.last_saved_step:
            self._run_internal("save")
        if reason != "finished" and t.export_on_quit:
            self._run_internal("export")
        self.emit_event("finish", {"exit_code": 0, "reason": reason})
        self.say(self.status(state="finished" if reason == "finished" else "stopped"))
        return 0

    def close(self) -> None:
        gc.unfreeze()
        with contextlib.suppress(Exception):  # steps trained just before an interrupt still reach the store
            self.flush_metrics()
        self.s.close()

    # -- actions (trainer_core.control.Actions) -------------------------------------------------

    def save(self) -> Path:
        parts = self.checkpoint_parts()  # collective: every rank contributes its RNG and data position
        if self.leader:
            path = self.checkpoints.save(self.step, parts)
        else:
            path = self.checkpoints.root / step_dir_name(self.step)
        distributed.barrier()
        self.last_saved_step = self.step
        self.last_checkpoint = str(path)
        if self.leader:
            size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
            self.emit_event("checkpoint", {"path": str(path), "bytes": size})
        if self.cfg.trainer.export_on_save:
            self.export(None)
        return path

    def export(self, name: str | None) -> Path:
        name = name or step_dir_name(self.step)
        if not self.leader:
            return self.s.run_dir / "exports" / f"{name}.safetensors"
        path = self.s.export(name, self.step)
        self.emit_event("export", {"path": str(path), "name": path.stem})
        return path

    def evaluate(self) -> dict[str, float]:
        metrics = self.s.evaluate(self.step)
        values = {f"eval/{k}": v for k, v in metrics.items()}
        self.s.log_metrics(self.step, values)
        self.say({"type": "metrics", "step": self.step, "time": time.time(), "values": values})
        self.emit_event("eval", {"metrics": metrics})
        return metrics

    def request_quit(self, reason: str) -> None:
        self.quit_reason = reason

    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        self.emit_event("pause" if paused else "resume", {})
        self.say(self.status())

    def set_lr(self, value: float) -> float:
        lr = 0.0
        for engine in self.s.engines.values():
            lr = engine.set_lr(value)
        self.emit_event("lr", {"lr": lr})
        return lr

    def set_loss_scale(self, value: float) -> float:
        scale = 0.0
        for engine in self.s.engines.values():
            scale = engine.set_loss_scale(value)
        self.emit_event("loss_scale", {"value": scale})
        return scale

    def eta_s(self, target: int) -> float | None:
        return self.rate.eta_s(target - self.step)

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def status(self, state: str | None = None) -> dict[str, Any]:
        first = next(iter(self.s.engines.values()))
        return {
            "type": "status",
            "state": state or ("paused" if self.paused else "running"),
            "step": self.step,
            "iterations": self.iterations,
            "lr": first.lr,
            "eta_s": self.rate.eta_s(self.iterations - self.step),
            "steps_per_s": self.rate.steps_per_s,
            "epoch": self.s.feed.epoch_progress,
            "last_checkpoint": self.last_checkpoint,
            "scheduled": self.controller.scheduler.show(),
            "nonfinite_total": self.steps.nonfinite_total,
            "pid": os.getpid(),
            "run_dir": str(self.s.run_dir),
        }

    def emit_event(self, kind: str, data: dict[str, Any]) -> dict[str, Any] | None:
        self.flush_metrics()
        if self.s.store is None:
            return None
        row = self.s.store.log_event(kind, self.step, data)
        self.channel.send({"type": "event", **row})
        return row

    # -- checkpoint state ----------------------------------------------------------------------

    def checkpoint_parts(self) -> dict[str, Any]:
        parts: dict[str, Any] = {}
        engine_state = {}
        for name, engine in self.s.engines.items():
            state = engine.state_dict()
            parts[f"model.{name}"] = state.pop("model")
            parts[f"optimizer.{name}"] = state.pop("optimizer")
            engine_state[name] = state
        parts[TRAINER_STATE] = {
            VERSION: STATE_VERSION,
            STEP: self.step,
            SAMPLES: self.steps.samples_seen,
            TOKENS: self.steps.tokens_seen,
            NONFINITE: self.steps.nonfinite_total,
            ENGINES: engine_state,
            RANKS: distributed.gather_objects({"rng": rng.capture(), "data": self.s.feed.state_dict()}),
            COMMANDS: self.controller.scheduler.state_dict(),
            CONFIG: config_to_dict(self.cfg),
        }
        return parts

    def load_parts(self, parts: dict[str, Any]) -> None:
        state = parts.get(TRAINER_STATE)
        if not isinstance(state, dict):
            raise ValueError("checkpoint lacks its trainer_state")
        missing = [k for k in (VERSION, STEP, ENGINES, RANKS, COMMANDS) if k not in state]
        if missing:
            raise ValueError(f"checkpoint trainer_state lacks {', '.join(missing)}")
        ranks = state[RANKS]
        if len(ranks) != distributed.world_size():
            raise ValueError(f"checkpoint was written by {len(ranks)} rank(s); this run has {distributed.world_size()}")
        for name, engine in self.s.engines.items():
            if f"model.{name}" not in parts or name not in state[ENGINES]:
                raise ValueError(f"checkpoint has no engine {name!r} (has {sorted(state[ENGINES])})")
            engine.load_state_dict(
                {"model": parts[f"model.{name}"], "optimizer": parts[f"optimizer.{name}"], **state[ENGINES][name]}
            )
        mine = ranks[distributed.rank()]
        self.s.feed.load_state_dict(mine["data"])
        rng.restore(mine["rng"])
        self.controller.scheduler.load_state_dict(state[COMMANDS])
        self.step = int(state[STEP])
        self.steps.samples_seen = int(state.get(SAMPLES, 0))
        self.steps.tokens_seen = int(state.get(TOKENS, 0))
        self.steps.nonfinite_total = int(state.get(NONFINITE, 0))

