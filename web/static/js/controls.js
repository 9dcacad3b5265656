// Command buttons and forms. Every command goes through POST /command/{name} (or POST /command
// with a line), its answer lands in the event log, and every control is disabled while one
// command is in flight so a double click cannot send it twice.

import { errorText } from "./api.js";
import { ENDED_STATES } from "./status.js";

/** The learning rate typed by the user as a number, or an error message. */
export function parseLearningRate(text) {
  const trimmed = String(text ?? "").trim();
  const value = Number(trimmed);
  if (trimmed === "" || !Number.isFinite(value)) return { error: `Learning rate must be a number, got "${trimmed}"` };
  if (value < 0) return { error: `Learning rate must not be negative, got ${trimmed}` };
  return { value };
}

/** The "at step" field: null when empty, an integer step, or an error message. */
export function parseAtStep(text) {
  const trimmed = String(text ?? "").trim();
  if (trimmed === "") return { value: null };
  const value = Number(trimmed);
  if (!Number.isInteger(value) || value < 0) return { error: `"At step" must be a whole step number, got "${trimmed}"` };
  return { value };
}

export class Controls {
  /**
   * @param {Document} doc
   * @param {object} deps  api (command, commandLine, restart), log (EventLog), readOnly
   */
  constructor(doc, { api, log, readOnly }) {
    this.api = api;
    this.log = log;
    this.readOnly = readOnly;
    this.busy = false;
    this.state = "starting";
    this.root = doc.querySelector(".controls");
    this.scheduledList = doc.getElementById("scheduled");
    this.scheduledEmpty = doc.getElementById("scheduled-empty");
    this.restartButton = doc.getElementById("restart-button");
    if (!this.root || readOnly) return;
    this.pauseButton = doc.getElementById("pause-button");
    this.atStep = doc.getElementById("at-step");
    this.dialog = doc.getElementById("quit-dialog");
    this.wire(doc);
  }

  wire(doc) {
    for (const name of ["save", "eval"]) {
      this.root.querySelector(`button[data-command="${name}"]`).addEventListener("click", () => this.send(name));
    }
    this.pauseButton.addEventListener("click", () => this.send(this.state === "paused" ? "resume" : "pause"));
    doc.getElementById("quit-button").addEventListener("click", () => {
      this.dialog.returnValue = "";
      this.dialog.showModal();
    });
    this.dialog.addEventListener("close", () => {
      if (this.dialog.returnValue === "confirm") this.send("quit");
    });
    this.restartButton.addEventListener("click", () => this.restart());
    this.onSubmit(doc.getElementById("export-form"), (form) => {
      const name = form.elements.name.value.trim();
      return this.send("export", name ? { name } : {}).then((ok) => ok && (form.elements.name.value = ""));
    });
    this.onSubmit(doc.getElementById("lr-form"), (form) => {
      const input = form.elements.lr;
      const lr = parseLearningRate(input.value);
      input.setAttribute("aria-invalid", String(Boolean(lr.error)));
      if (lr.error) return this.log.addLocal(`✗ lr: ${lr.error}`, { ok: false });
      return this.send("lr", { value: lr.value });
    });
    this.onSubmit(doc.getElementById("line-form"), (form) => {
      const line = form.elements.line.value.trim();
      if (!line) return undefined;
      return this.run(line, () => this.api.commandLine(line)).then((ok) => ok && (form.elements.line.value = ""));
    });
  }

  onSubmit(form, handler) {
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      if (!this.busy) handler(form);
    });
  }

  /** Send a named command, scheduled at the "at step" field's step when it is filled in. */
  async send(name, body = {}) {
    const at = parseAtStep(this.atStep.value);
    this.atStep.setAttribute("aria-invalid", String(Boolean(at.error)));
    if (at.error) {
      this.log.addLocal(`✗ ${name}: ${at.error}`, { ok: false });
      return false;
    }
    const payload = { ...body };
    if (at.value !== null) payload.at_step = at.value;
    const label = at.value === null ? name : `${name}@${at.value}`;
    const ok = await this.run(label, () => this.api.command(name, payload));
    if (ok && at.value !== null) this.atStep.value = "";
    return ok;
  }

  /** Run one request with every control disabled; returns whether the command was accepted. */
  async run(label, call) {
    if (this.busy) return false;
    this.setBusy(true);
    try {
      return this.report(label, await call());
    } catch (err) {
      this.log.addLocal(`✗ ${label}: ${err.message}`, { ok: false });
      return false;
    } finally {
      this.setBusy(false);
    }
  }

  report(label, res) {
    const body = res.body && typeof res.body === "object" && res.body.result ? res.body.result : res.body;
    if (res.status === 202) {
      const id = body && typeof body === "object" ? body.id : undefined;
      const ref = id === undefined ? "" : ` (id ${id})`;
      this.log.addLocal(`… ${label}: accepted${ref}; its result appears here when the trainer applies it`);
      return true;
    }
    if (res.ok) {
      if (body && typeof body === "object" && "ok" in body) {
        this.log.addResult({ command: label, ...body });
        return Boolean(body.ok);
      }
      const text = body && typeof body === "object" ? JSON.stringify(body) : String(body ?? "done");
      this.log.addLocal(`✓ ${label}: ${text}`, { ok: true });
      return true;
    }
    const fallback = res.status === 409 ? "no trainer is running" : `request failed (HTTP ${res.status})`;
    this.log.addLocal(`✗ ${label}: ${errorText(res.body, fallback)}`, { ok: false });
    return false;
  }

  async restart() {
    if (this.busy) return;
    this.setBusy(true);
    try {
      const res = await this.api.restart();
      if (res.ok) this.log.addLocal("✓ restart: the trainer is starting again", { ok: true });
      else this.log.addLocal(`✗ restart: ${errorText(res.body, `HTTP ${res.status}`)}`, { ok: false });
    } catch (err) {
      this.log.addLocal(`✗ restart: ${err.message}`, { ok: false });
    } finally {
      this.setBusy(false);
    }
  }

  setBusy(busy) {
    this.busy = busy;
    if (this.root) this.root.setAttribute("aria-busy", String(busy));
    this.updateDisabled();
  }

  updateDisabled() {
    if (!this.root || this.readOnly) return;
    const ended = ENDED_STATES.has(this.state);
    for (const button of this.root.querySelectorAll("button[data-command]")) button.disabled = this.busy || ended;
    document.getElementById("quit-button").disabled = this.busy || ended;
    this.restartButton.disabled = this.busy;
    for (const button of this.scheduledList.querySelectorAll("button")) button.disabled = this.busy;
  }

  /** Follow the trainer's state: Pause/Resume label, Restart visibility, scheduled commands. */
  setStatus(status) {
    this.state = status.state ?? this.state;
    if (Array.isArray(status.scheduled)) this.renderScheduled(status.scheduled);
    if (!this.root || this.readOnly) return;
    const paused = this.state === "paused";
    this.pauseButton.textContent = paused ? "Resume" : "Pause";
    this.pauseButton.dataset.command = paused ? "resume" : "pause";
    this.restartButton.hidden = !ENDED_STATES.has(this.state);
    this.updateDisabled();
  }

  renderScheduled(items) {
    // Status messages arrive several times a second: rebuild only on change, so a button is
    // never swapped out from under a click.
    const key = JSON.stringify(items);
    if (key === this.scheduledKey) return;
    this.scheduledKey = key;
    const lis = items.map((item) => {
      const li = document.createElement("li");
      const entry = typeof item === "object" && item !== null ? item : { line: String(item) };
      const line = String(entry.line ?? entry.command ?? "?");
      const when = typeof entry.step === "number" && !line.includes("@") ? `@${entry.step}` : "";
      const code = document.createElement("code");
      code.textContent = `${entry.id !== undefined ? `#${entry.id} ` : ""}${line}${when}`;
      li.dataset.id = String(entry.id ?? "");
      li.append(code);
      if (!this.readOnly && this.root && entry.id !== undefined && entry.id !== null) {
        const cancel = document.createElement("button");
        cancel.type = "button";
        cancel.textContent = "Cancel";
        cancel.setAttribute("aria-label", `Cancel scheduled ${line}${when}`);
        cancel.disabled = this.busy;
        const cancelLine = `event cancel ${entry.id}`;
        cancel.addEventListener("click", () => this.run(cancelLine, () => this.api.commandLine(cancelLine)));
        li.append(cancel);
      }
      return li;
    });
    this.scheduledList.replaceChildren(...lis);
    this.scheduledEmpty.hidden = items.length > 0;
  }
}
