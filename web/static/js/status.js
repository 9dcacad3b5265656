// The status strip: state badge, step / iterations with progress, ETA, steps/s, lr, last checkpoint.
// Live status messages may carry only some fields (the server merges the supervisor's state into
// the trainer's), so they are merged into the last known status.

import { formatDuration, formatLr, formatRate } from "./format.js";

export const STATES = ["starting", "running", "paused", "stopped", "finished", "crashed"];
/** States in which the trainer process is gone and can be started again. */
export const ENDED_STATES = new Set(["stopped", "finished", "crashed"]);

function checkpointText(last) {
  if (!last) return "—";
  if (typeof last === "string") return last;
  if (typeof last === "object") {
    const where = last.path ?? last.name ?? "";
    return typeof last.step === "number" ? `step ${last.step}: ${where}` : where || "—";
  }
  return String(last);
}

export class StatusPanel {
  constructor(doc) {
    const $ = (id) => doc.getElementById(id);
    this.badge = $("state-badge");
    this.step = $("status-step");
    this.iterations = $("status-iterations");
    this.progress = $("status-progress");
    this.percent = $("status-percent");
    this.eta = $("status-eta");
    this.speed = $("status-speed");
    this.lr = $("status-lr");
    this.checkpoint = $("status-checkpoint");
    this.current = {};
  }

  /** Merge a status (full from /api/status, partial from the live socket) and redraw. */
  update(status) {
    this.current = { ...this.current, ...status };
    const s = this.current;
    const state = typeof s.state === "string" ? s.state : "starting";
    this.badge.textContent = state;
    this.badge.dataset.state = state;
    const step = typeof s.step === "number" ? s.step : 0;
    const total = typeof s.iterations === "number" && s.iterations > 0 ? s.iterations : null;
    this.step.textContent = String(step);
    this.iterations.textContent = total === null ? "?" : String(total);
    const fraction = total === null ? 0 : Math.min(1, step / total);
    this.progress.value = fraction;
    this.percent.textContent = `${(fraction * 100).toFixed(fraction < 0.1 ? 1 : 0)}%`;
    this.eta.textContent = state === "running" ? formatDuration(s.eta_s) : "—";
    this.speed.textContent = state === "running" ? formatRate(s.steps_per_s) : "—";
    this.lr.textContent = formatLr(s.lr);
    this.checkpoint.textContent = checkpointText(s.last_checkpoint);
    return this.current;
  }

  get state() {
    return this.current.state ?? "starting";
  }
}
