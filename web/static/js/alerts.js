// Alerts pinned to the top of the page: a non-finite loss, a trainer crash with its traceback.
// The same problem reported twice (an alert event and the crashed status) is shown once.
//
// History and the live socket race on every page load: /api/events may answer after live
// messages arrived. So each alert remembers where it came from (the id of the event that raised
// it, or LIVE for metrics and status, which are current), and a trainer start read from history
// clears only alerts raised by older events: a live alert is newer than anything history holds.

const MAX_ALERTS = 5;
const NONFINITE_KEY = "nonfinite";
/** The kinds of alert that a new trainer process makes history of. */
const CLEARED_BY_START = ["crash", NONFINITE_KEY];
export const LIVE = Number.POSITIVE_INFINITY;

/** One key per kind of alert: the crash, non-finite losses, or the message with its numbers masked. */
export function alertKey(message, isCrash) {
  if (isCrash) return "crash";
  if (/non-?finite|\bnan\b/i.test(message)) return NONFINITE_KEY;
  return `alert:${message.replace(/[-+]?\d+(\.\d+)?(e[-+]?\d+)?/gi, "#")}`;
}

export class Alerts {
  constructor(container) {
    this.container = container;
    this.keys = new Set();
    this.origins = new Map();
    this.shownEvents = new Set();
    this.latestStart = Number.NEGATIVE_INFINITY;
  }

  /**
   * Show an alert unless one with the same key is already up.
   * @param {{key: string, level?: string, message: string, traceback?: string, origin?: number}} alert
   *   origin: the id of the event that raised it, or LIVE
   */
  show({ key, level = "error", message, traceback, origin = LIVE }) {
    this.origins.set(key, Math.max(origin, this.origins.get(key) ?? Number.NEGATIVE_INFINITY));
    if (this.keys.has(key)) {
      const box = this.find(key);
      if (box) {
        box.querySelector(".alert-text").textContent = message;
        box.dataset.level = level === "error" ? "error" : box.dataset.level;
      }
      if (traceback) this.addTraceback(key, traceback);
      return;
    }
    this.keys.add(key);
    const box = document.createElement("div");
    box.className = "alert";
    box.dataset.level = level;
    box.dataset.key = key;
    box.setAttribute("role", "alert");
    const text = document.createElement("span");
    text.className = "alert-text";
    text.textContent = message;
    const dismiss = document.createElement("button");
    dismiss.type = "button";
    dismiss.textContent = "Dismiss";
    dismiss.setAttribute("aria-label", "Dismiss alert");
    dismiss.addEventListener("click", () => this.remove(box));
    box.append(text, dismiss);
    this.container.prepend(box);
    if (traceback) this.addTraceback(key, traceback);
    while (this.container.children.length > MAX_ALERTS) this.remove(this.container.lastElementChild);
  }

  remove(box) {
    box.remove();
    this.keys.delete(box.dataset.key);
    this.origins.delete(box.dataset.key);
  }

  find(key) {
    return [...this.container.children].find((el) => el.dataset.key === key);
  }

  addTraceback(key, traceback) {
    const box = this.find(key);
    if (!box || box.querySelector("details")) return;
    const details = document.createElement("details");
    details.open = true;
    const summary = document.createElement("summary");
    summary.textContent = "Traceback";
    const pre = document.createElement("pre");
    pre.textContent = traceback;
    details.append(summary, pre);
    box.append(details);
  }

  /** Remove alerts whose key starts with `prefix` and that were raised before `origin`. */
  clear(prefix, origin = LIVE) {
    for (const el of [...this.container.children]) {
      const key = el.dataset.key;
      if (key?.startsWith(prefix) && (origin === LIVE || (this.origins.get(key) ?? LIVE) < origin)) this.remove(el);
    }
  }

  /**
   * A trainer start event: the previous process's crash and non-finite losses are history now.
   * Read live, it clears them all; read from history, only those raised by older events.
   */
  trainerStarted(event, live) {
    const id = typeof event.id === "number" ? event.id : LIVE;
    if (id !== LIVE) this.latestStart = Math.max(this.latestStart, id);
    for (const prefix of CLEARED_BY_START) this.clear(prefix, live ? LIVE : id);
  }

  /**
   * An event of kind alert. Repeats of one alert (a non-finite loss on every step of a streak)
   * update a single box rather than stacking: alerts are keyed by their message without numbers.
   */
  fromEvent(event) {
    const id = typeof event.id === "number" ? event.id : LIVE;
    const d = event.data && typeof event.data === "object" ? event.data : {};
    const message = String(d.message ?? "alert");
    const key = alertKey(message, Boolean(d.traceback));
    if (id !== LIVE) {
      // Seen already (live, then again in history), or made history by a start already seen.
      if (this.shownEvents.has(id) || (CLEARED_BY_START.includes(key) && id < this.latestStart)) return;
      this.shownEvents.add(id);
    }
    const step = typeof event.step === "number" && !message.includes(String(event.step)) ? ` (step ${event.step})` : "";
    this.show({
      key,
      level: d.level === "warning" ? "warning" : "error",
      message: `${message}${step}`,
      traceback: d.traceback,
      origin: id,
    });
  }

  /** A live {"type":"crash"} message, or a status whose state is crashed. */
  crashed(traceback, exitCode) {
    const code = exitCode === null || exitCode === undefined ? "" : ` (exit code ${exitCode})`;
    this.show({ key: "crash", level: "error", message: `The trainer crashed${code}.`, traceback });
  }

  /** A loss value that is not a finite number (NaN or ±inf reached us as null or a string). */
  nonFinite(name, step) {
    this.show({ key: NONFINITE_KEY, level: "warning", message: `non-finite ${name} at step ${step}` });
  }
}
