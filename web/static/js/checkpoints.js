// The table of checkpoints and exports (GET /api/checkpoints), refreshed when one is written.

import { formatBytes, formatTime } from "./format.js";

/**
 * Rows from the server's answer: a list of checkpoints (exports have "name" instead of "step"),
 * or an object holding both lists.
 */
export function checkpointRows(body) {
  const list = [];
  if (Array.isArray(body)) list.push(...body);
  else if (body && typeof body === "object") {
    for (const key of ["checkpoints", "exports"]) if (Array.isArray(body[key])) list.push(...body[key]);
  }
  return list
    .filter((r) => r && typeof r === "object")
    .map((r) => ({
      kind: typeof r.step === "number" ? "checkpoint" : "export",
      label: typeof r.step === "number" ? String(r.step) : String(r.name ?? ""),
      step: typeof r.step === "number" ? r.step : null,
      time: r.time,
      bytes: r.bytes,
      path: r.path ?? "",
    }))
    .sort((a, b) => (b.time ?? 0) - (a.time ?? 0));
}

export class CheckpointTable {
  constructor(table, emptyNote, fetchList, onError) {
    this.body = table.tBodies[0];
    this.emptyNote = emptyNote;
    this.fetchList = fetchList;
    this.onError = onError;
    this.timer = null;
    this.asked = 0;
    this.shown = 0;
  }

  render(rows) {
    const cells = (row) => [
      [row.kind, ""],
      [row.label, row.step === null ? "" : "num"],
      [formatTime(row.time), "num"],
      [formatBytes(row.bytes), "num"],
      [row.path, "path"],
    ];
    const trs = rows.map((row) => {
      const tr = document.createElement("tr");
      tr.dataset.kind = row.kind;
      for (const [text, cls] of cells(row)) {
        const td = document.createElement("td");
        td.textContent = text;
        if (cls) td.className = cls;
        tr.append(td);
      }
      return tr;
    });
    this.body.replaceChildren(...trs);
    this.emptyNote.hidden = rows.length > 0;
  }

  /** Fetch and draw the list; an answer older than one already drawn is dropped (answers can cross). */
  async refresh() {
    this.asked += 1;
    const ticket = this.asked;
    try {
      const body = await this.fetchList();
      if (ticket < this.shown) return;
      this.shown = ticket;
      this.render(checkpointRows(body));
    } catch (err) {
      if (ticket > this.shown) this.onError(`could not list checkpoints: ${err.message}`);
    }
  }

  /** Refresh soon; several checkpoint events in a burst cause one request. */
  refreshSoon(delayMs = 300) {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.refresh(), delayMs);
  }
}
