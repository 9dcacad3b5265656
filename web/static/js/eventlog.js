// The event log (role="log"): commands, their results, checkpoints, alerts, lr changes.
//
// A command's result can reach the page up to three ways: the REST answer, a live "result"
// message and a "result" event in the store. Each is shown once, keyed by the command id.

import { formatLr, formatTime } from "./format.js";

const MAX_ENTRIES = 500;

function resultText(r) {
  const command = r.command ?? "command";
  const data = r.data && typeof r.data === "object" ? r.data : {};
  const parts = [];
  if (r.message) parts.push(r.message);
  if (data.path && !String(r.message ?? "").includes(data.path)) parts.push(data.path);
  if (typeof data.lr === "number" && !String(r.message ?? "").includes("lr")) parts.push(`lr ${formatLr(data.lr)}`);
  const body = parts.join(" · ") || (r.ok ? "done" : "failed");
  return `${r.ok ? "✓" : "✗"} ${command}: ${body}`;
}

// Kinds whose news also arrives as the result of the command that caused them ("saved PATH",
// "lr set to X", "scheduled ..."): logging both would say everything twice. They still get markers.
const SHOWN_BY_RESULT = new Set(["checkpoint", "export", "eval", "lr", "loss_scale", "pause", "resume", "schedule"]);

/** The log line for one store event, or null for kinds the log does not show. */
export function describeEvent(event) {
  const d = event.data && typeof event.data === "object" ? event.data : {};
  if (SHOWN_BY_RESULT.has(event.kind)) return null;
  switch (event.kind) {
    case "command":
      // Periodic saves and evals are announced by their results alone.
      if (d.source === "trainer") return null;
      return { text: `› ${d.line ?? "?"}${d.source ? ` (${d.source})` : ""}` };
    case "result":
      return { text: resultText(d), ok: Boolean(d.ok), resultId: d.id };
    case "alert":
      return { text: `${d.level === "warning" ? "warning" : "alert"}: ${d.message ?? ""}`, level: d.level ?? "error" };
    case "start":
      return { text: d.resume_from ? `trainer started, resuming from ${d.resume_from}` : "trainer started" };
    case "finish": {
      const reason = d.reason ? `, ${d.reason}` : "";
      return { text: `trainer finished (exit code ${d.exit_code ?? "?"}${reason})`, level: d.exit_code ? "error" : undefined };
    }
    default:
      return { text: `${event.kind}${Object.keys(d).length ? `: ${JSON.stringify(d)}` : ""}` };
  }
}

export class EventLog {
  constructor(list) {
    this.list = list;
    this.shownResults = new Set();
    this.shownEvents = new Set();
  }

  /** Add one line; keeps the view pinned to the newest entry unless the user scrolled up. */
  add({ text, time, step, ok, level, kind }) {
    const atBottom = this.list.scrollHeight - this.list.scrollTop - this.list.clientHeight < 24;
    const li = document.createElement("li");
    if (ok !== undefined) li.dataset.ok = String(ok);
    if (level) li.dataset.level = level;
    if (kind) li.dataset.kind = kind;
    const meta = document.createElement("span");
    meta.className = "meta";
    const when = formatTime(typeof time === "number" ? time : Date.now() / 1000);
    meta.textContent = typeof step === "number" ? `${when} · ${step}` : when;
    const body = document.createElement("span");
    body.className = "text";
    body.textContent = text;
    li.append(meta, body);
    this.list.append(li);
    while (this.list.children.length > MAX_ENTRIES) this.list.firstElementChild.remove();
    if (atBottom) this.list.scrollTop = this.list.scrollHeight;
  }

  /** A store event (from /api/events or a live "event" message). */
  addEvent(event) {
    if (event.id !== undefined && event.id !== null) {
      if (this.shownEvents.has(event.id)) return;
      this.shownEvents.add(event.id);
    }
    const line = describeEvent(event);
    if (line === null) return;
    if (line.resultId !== undefined && line.resultId !== null) {
      if (this.shownResults.has(line.resultId)) return;
      this.shownResults.add(line.resultId);
    }
    this.add({ ...line, time: event.time, step: event.step, kind: event.kind });
  }

  /** A command result ({"id","ok","command","message","data"}), from REST or a live message. */
  addResult(result) {
    if (result.id !== undefined && result.id !== null) {
      if (this.shownResults.has(result.id)) return;
      this.shownResults.add(result.id);
    }
    this.add({ text: resultText(result), ok: Boolean(result.ok), step: result.step, kind: "result" });
  }

  /** A line from the page itself (a request that failed before reaching the trainer). */
  addLocal(text, { ok, level } = {}) {
    this.add({ text, ok, level, kind: "local" });
  }
}
