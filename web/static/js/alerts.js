// Alerts pinned to the top of the page: a non-finite loss, a trainer crash with its traceback.
// The same problem reported twice (an alert event and the crashed status) is shown once.

const MAX_ALERTS = 5;
const NONFINITE_KEY = "nonfinite";

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
  }

  /**
   * Show an alert unless one with the same key is already up.
   * @param {{key: string, level?: string, message: string, traceback?: string}} alert
   */
  show({ key, level = "error", message, traceback }) {
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
    dismiss.addEventListener("click", () => {
      box.remove();
      this.keys.delete(key);
    });
    box.append(text, dismiss);
    this.container.prepend(box);
    if (traceback) this.addTraceback(key, traceback);
    while (this.container.children.length > MAX_ALERTS) this.container.lastElementChild.remove();
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

  /** Remove alerts whose key starts with `prefix` (a crash alert once the trainer runs again). */
  clear(prefix) {
    for (const el of [...this.container.children]) {
      if (el.dataset.key?.startsWith(prefix)) {
        el.remove();
        this.keys.delete(el.dataset.key);
      }
    }
  }

  /**
   * An event of kind alert. Repeats of one alert (a non-finite loss on every step of a streak)
   * update a single box rather than stacking: alerts are keyed by their message without numbers.
   */
  fromEvent(event) {
    const d = event.data && typeof event.data === "object" ? event.data : {};
    const message = String(d.message ?? "alert");
    const step = typeof event.step === "number" && !message.includes(String(event.step)) ? ` (step ${event.step})` : "";
    this.show({
      key: alertKey(message, Boolean(d.traceback)),
      level: d.level === "warning" ? "warning" : "error",
      message: `${message}${step}`,
      traceback: d.traceback,
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
