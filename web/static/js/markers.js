// Vertical markers at the steps where commands took effect, drawn over every chart.
//
// Markers are a few DOM elements per chart (hover shows a tooltip, screen readers get a label).
// Markers closer together than a few pixels are merged into one so a run with thousands of
// periodic checkpoints still draws a handful of elements.

import { formatBytes, formatLr, formatValue } from "./format.js";

export const MARKER_KINDS = new Set(["lr", "checkpoint", "eval", "export", "pause", "resume"]);

const MERGE_PX = 6;
// How close the cursor must come to a marker to show its tooltip.
const HOVER_PX = 5;
const MAX_TIP_LINES = 6;

function basename(path) {
  if (typeof path !== "string") return "";
  const parts = path.split(/[\\/]/).filter(Boolean);
  return parts.length ? parts[parts.length - 1] : path;
}

/**
 * What a marker's tooltip says for one event, step first ("step 120: lr → 1e-4"). The wording
 * avoids the labels of the page's form fields so label lookups stay unambiguous.
 */
export function describeMarker(kind, data, step) {
  const d = data && typeof data === "object" ? data : {};
  return `step ${step}: ${markerText(kind, d)}`;
}

function markerText(kind, d) {
  switch (kind) {
    case "lr":
      return `lr → ${formatLr(d.lr)}`;
    case "checkpoint":
      return `checkpoint ${basename(d.path)}${d.bytes ? ` (${formatBytes(d.bytes)})` : ""}`;
    case "eval": {
      const metrics = d.metrics && typeof d.metrics === "object" ? d.metrics : {};
      const parts = Object.entries(metrics)
        .slice(0, 4)
        .map(([k, v]) => `${k}=${formatValue(typeof v === "number" ? v : null)}`);
      return `eval${parts.length ? ` ${parts.join(", ")}` : ""}`;
    }
    case "export":
      return `export ${d.name ?? basename(d.path)}`;
    case "pause":
      return "paused";
    case "resume":
      return "resumed";
    default:
      return kind;
  }
}

/** A marker for a store event row, or null when the event kind is not drawn. */
export function markerFromEvent(event) {
  if (!event || !MARKER_KINDS.has(event.kind) || typeof event.step !== "number") return null;
  return { id: event.id, step: event.step, kind: event.kind, text: describeMarker(event.kind, event.data, event.step) };
}

/**
 * Group markers by pixel position: markers sorted by x, each group spans at most MERGE_PX.
 * `toX(step)` maps a step to a pixel; markers outside [0, width] are left out.
 */
export function clusterMarkers(markers, toX, width) {
  const placed = [];
  for (const m of markers) {
    const x = toX(m.step);
    if (Number.isFinite(x) && x >= -1 && x <= width + 1) placed.push({ x, m });
  }
  placed.sort((a, b) => a.x - b.x);
  const groups = [];
  for (const p of placed) {
    const g = groups[groups.length - 1];
    if (g && p.x - g.x0 <= MERGE_PX) {
      g.items.push(p.m);
      g.x = (g.x0 + p.x) / 2;
    } else {
      groups.push({ x0: p.x, x: p.x, items: [p.m] });
    }
  }
  return groups;
}

function groupTip(items) {
  const lines = items.slice(0, MAX_TIP_LINES).map((m) => m.text);
  if (items.length > MAX_TIP_LINES) lines.push(`… and ${items.length - MAX_TIP_LINES} more`);
  return lines.join("\n");
}

/**
 * Keeps one chart's marker elements in sync with the markers and its current x scale. The
 * elements never take the pointer (a drag to zoom may start anywhere); the chart reports the
 * cursor position instead and the nearest marker shows its tooltip.
 */
export class MarkerLayer {
  constructor(host) {
    this.layer = document.createElement("div");
    this.layer.className = "markers";
    host.appendChild(this.layer);
    this.pool = [];
    this.placed = [];
  }

  /** Show the tooltip of the marker nearest to x (CSS pixels in the plot), if one is close. */
  hover(x) {
    let best = null;
    for (const p of this.placed) {
      const d = Math.abs(p.x - x);
      if (d <= HOVER_PX && (best === null || d < best.d)) best = { d, el: p.el };
    }
    for (const p of this.placed) p.el.classList.toggle("active", best !== null && p.el === best.el);
  }

  render(markers, toX, width) {
    const groups = clusterMarkers(markers, toX, width);
    while (this.pool.length < groups.length) {
      const el = document.createElement("span");
      el.className = "marker";
      el.setAttribute("role", "img");
      this.layer.appendChild(el);
      this.pool.push(el);
    }
    this.placed = groups.map((g, i) => ({ x: g.x, el: this.pool[i] }));
    groups.forEach((g, i) => {
      const el = this.pool[i];
      const first = g.items[0];
      const kind = g.items.every((m) => m.kind === first.kind) ? first.kind : "mixed";
      const tip = groupTip(g.items);
      el.hidden = false;
      el.style.left = `${g.x}px`;
      el.dataset.kind = kind;
      el.dataset.step = String(first.step);
      el.dataset.tip = tip;
      el.setAttribute("aria-label", tip);
      el.classList.toggle("tip-left", g.x > width / 2);
    });
    for (let i = groups.length; i < this.pool.length; i += 1) {
      this.pool[i].hidden = true;
      this.pool[i].classList.remove("active");
    }
  }
}
