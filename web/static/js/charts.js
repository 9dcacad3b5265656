// All metric charts: grouped by prefix (train/*, eval/*, ...), created as names appear, fed with
// history and live points. Live points are appended to each chart's buffer at once; drawing is
// batched to one redraw per chart per animation frame, and charts scrolled out of view wait.

import { MetricChart, readTheme, zoomSeries } from "./chart.js";
import { markerFromEvent } from "./markers.js";

const MAX_HISTORY_POINTS = 2000;
const HISTORY_CONCURRENCY = 4;
const NEW_NAME_DELAY_MS = 250;
// Charts scrolled out of view are redrawn at most this often (they catch up when they scroll in).
const OFFSCREEN_REDRAW_MS = 1000;

/** How many points to ask the server for: about two per pixel of a full-width chart, at most 2000. */
export function historyPoints(viewportWidth) {
  return Math.min(MAX_HISTORY_POINTS, Math.max(500, Math.round(2 * viewportWidth)));
}

const GROUP_ORDER = ["train", "eval"];
const METRIC_ORDER = ["loss", "lr", "grad_norm", "steps_per_s", "throughput"];

export function groupOf(name) {
  const slash = name.indexOf("/");
  return slash > 0 ? name.slice(0, slash) : "other";
}

function groupRank(group) {
  const i = GROUP_ORDER.indexOf(group);
  return i === -1 ? GROUP_ORDER.length : i;
}

function metricRank(name) {
  const rest = name.slice(name.indexOf("/") + 1);
  const head = rest.split("/")[0];
  const i = METRIC_ORDER.indexOf(head);
  return i === -1 ? METRIC_ORDER.length : i;
}

/** Chart order: loss first, then lr, grad_norm, throughput, then the rest by name. */
export function compareMetrics(a, b) {
  return metricRank(a) - metricRank(b) || (a < b ? -1 : a > b ? 1 : 0);
}

function compareGroups(a, b) {
  return groupRank(a) - groupRank(b) || (a < b ? -1 : a > b ? 1 : 0);
}

/** Group order first (train, eval, others), then metric order. */
export function compareNames(a, b) {
  return compareGroups(groupOf(a), groupOf(b)) || compareMetrics(a, b);
}

/** Run `task` over `items` with at most `limit` running at once; rejects with the first error. */
export async function forEachLimited(items, limit, task) {
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const item = items[next];
      next += 1;
      await task(item);
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
}

function titleCase(s) {
  return s.charAt(0).toUpperCase() + s.slice(1);
}

export class ChartBoard {
  /**
   * @param {HTMLElement} root  container for the chart groups
   * @param {object} deps
   *   fetchMetrics(params)  -> Promise<{name: {step, value, min, max}}>
   *   onZoom(range|null)    the zoom range changed
   *   onError(message)      a fetch failed
   *   onFirstPaint()        the first chart with data was drawn
   */
  constructor(root, { fetchMetrics, onZoom, onError, onFirstPaint, settings, initialNames = null }) {
    this.root = root;
    this.fetchMetrics = fetchMetrics;
    this.initialNames = initialNames;
    this.onZoom = onZoom;
    this.onError = onError;
    this.onFirstPaint = onFirstPaint;
    this.settings = { smoothing: 0.6, log: false, ...settings };
    this.theme = readTheme();
    this.charts = new Map();
    this.groups = new Map();
    this.markers = [];
    this.markerIds = new Set();
    this.zoom = null;
    this.zoomToken = 0;
    this.frame = 0;
    this.painted = false;
    this.offscreenDrawn = 0;
    this.offscreenTimer = null;
    this.pendingNames = new Set();
    this.pendingTimer = null;
    this.emptyNote = root.querySelector("#charts-empty");
    this.resizer = new ResizeObserver((entries) => {
      for (const entry of entries) entry.target.chart?.resize(entry.contentRect.width);
    });
    this.viewport = new IntersectionObserver((entries) => {
      for (const entry of entries) {
        const chart = entry.target.chart;
        if (!chart) continue;
        chart.visible = entry.isIntersecting;
        if (chart.visible && chart.dirty) this.schedule();
      }
    });
  }

  get names() {
    return [...this.charts.keys()];
  }

  get maxPoints() {
    return historyPoints(window.innerWidth);
  }

  groupFor(name) {
    const key = groupOf(name);
    let group = this.groups.get(key);
    if (group) return group;
    const section = document.createElement("section");
    section.className = "chart-group";
    section.dataset.group = key;
    const heading = document.createElement("h2");
    heading.id = `group-${key}`;
    heading.textContent = titleCase(key);
    section.setAttribute("aria-labelledby", heading.id);
    const grid = document.createElement("div");
    grid.className = "chart-grid";
    section.append(heading, grid);
    group = { key, section, grid };
    const after = [...this.groups.values()].filter((g) => compareGroups(g.key, key) > 0);
    const before = after.sort((a, b) => compareGroups(a.key, b.key))[0];
    this.root.insertBefore(section, before ? before.section : null);
    this.groups.set(key, group);
    return group;
  }

  /** The chart for `name`, created (in sorted position) when it is new. */
  ensure(name) {
    let chart = this.charts.get(name);
    if (chart) return chart;
    chart = new MetricChart(name, this);
    const { grid } = this.groupFor(name);
    const next = [...grid.children].find((el) => compareMetrics(el.dataset.metric, name) > 0);
    grid.insertBefore(chart.figure, next ?? null);
    chart.plotEl.chart = chart;
    chart.figure.chart = chart;
    this.charts.set(name, chart);
    if (this.emptyNote) this.emptyNote.hidden = true;
    chart.create();
    this.resizer.observe(chart.plotEl);
    this.viewport.observe(chart.figure);
    return chart;
  }

  /** Replace every chart's points with downsampled history (after load or a reconnect). */
  loadHistory(history) {
    for (const [name, h] of Object.entries(history ?? {})) {
      const chart = this.ensure(name);
      chart.series.loadHistory(h);
      chart.dirty = true;
    }
    this.schedule();
  }

  /**
   * Fetch every metric's downsampled history. The names come with the page on the first load
   * (later from an empty step range, which is cheap). The first chart's history is fetched
   * alone, so it paints without competing for the server; the rest follow a few at a time.
   */
  async reload() {
    let names = this.initialNames;
    this.initialNames = null;
    if (!Array.isArray(names)) {
      const probe = await this.fetchMetrics({ from_step: 0, to_step: 0, max_points: 1 });
      names = Object.keys(probe ?? {});
    }
    names = [...names].sort(compareNames);
    for (const name of names) this.ensure(name);
    const maxPoints = this.maxPoints;
    const load = async (name) => this.loadHistory(await this.fetchMetrics({ names: name, max_points: maxPoints }));
    if (names.length > 0) await load(names[0]);
    await forEachLimited(names.slice(1), HISTORY_CONCURRENCY, load);
    if (this.zoom) await this.zoomTo(this.zoom.from, this.zoom.to);
    await this.nextPaint();
  }

  /** Resolves once the pending redraws are on screen (the flush runs first in the same frame). */
  nextPaint() {
    this.schedule();
    return new Promise((resolve) => requestAnimationFrame(() => resolve()));
  }

  /** A live {"type":"metrics"} message: append now, draw on the next animation frame. */
  appendMetrics(msg) {
    const values = msg.values;
    if (!values || typeof values !== "object" || typeof msg.step !== "number") return;
    for (const [name, value] of Object.entries(values)) {
      let chart = this.charts.get(name);
      if (!chart) {
        chart = this.ensure(name);
        this.fetchNewHistory(name);
      }
      chart.series.append(msg.step, value);
      chart.dirty = true;
    }
    this.schedule();
  }

  /** A name first seen live may have older points in the store: fetch them, batched. */
  fetchNewHistory(name) {
    this.pendingNames.add(name);
    if (this.pendingTimer) return;
    this.pendingTimer = setTimeout(async () => {
      this.pendingTimer = null;
      const names = [...this.pendingNames];
      this.pendingNames.clear();
      try {
        const history = await this.fetchMetrics({ names: names.join(","), max_points: this.maxPoints });
        this.loadHistory(history);
      } catch (err) {
        this.onError(`could not load history of ${names.join(", ")}: ${err.message}`);
      }
    }, NEW_NAME_DELAY_MS);
  }

  schedule() {
    if (this.frame) return;
    this.frame = requestAnimationFrame(() => {
      this.frame = 0;
      this.flush();
    });
  }

  flush() {
    let drew = false;
    let waiting = false;
    const now = performance.now();
    const offscreenDue = !this.painted || now - this.offscreenDrawn >= OFFSCREEN_REDRAW_MS;
    if (offscreenDue) this.offscreenDrawn = now;
    for (const chart of this.charts.values()) {
      if (!chart.dirty) continue;
      chart.updateCaption();
      if (chart.visible || offscreenDue) {
        chart.render();
        drew = drew || chart.source.length > 0;
      } else {
        waiting = true;
      }
    }
    if (waiting && !this.offscreenTimer) {
      this.offscreenTimer = setTimeout(() => {
        this.offscreenTimer = null;
        this.schedule();
      }, OFFSCREEN_REDRAW_MS);
    }
    if (drew && !this.painted) {
      this.painted = true;
      this.onFirstPaint?.();
    }
  }

  /** Add marker events (store rows); markers already known by id are ignored. */
  addEvents(events) {
    let added = false;
    for (const event of events) {
      const marker = markerFromEvent(event);
      if (!marker) continue;
      const key = marker.id ?? `${marker.kind}@${marker.step}`;
      if (this.markerIds.has(key)) continue;
      this.markerIds.add(key);
      this.markers.push(marker);
      added = true;
    }
    if (!added) return;
    this.markers.sort((a, b) => a.step - b.step);
    for (const chart of this.charts.values()) if (chart.plot) chart.placeMarkers(chart.plot);
  }

  setSmoothing(weight) {
    const wasOn = this.settings.smoothing > 0;
    this.settings.smoothing = weight;
    if (wasOn !== weight > 0) this.rebuild();
    else this.redrawAll();
  }

  setLog(log) {
    this.settings.log = log;
    this.rebuild();
  }

  /** Recreate every plot (scale type, colour scheme or smoothing on/off changed). */
  rebuild() {
    this.theme = readTheme();
    for (const chart of this.charts.values()) {
      chart.create();
      chart.updateCaption();
    }
  }

  redrawAll() {
    for (const chart of this.charts.values()) chart.dirty = true;
    this.schedule();
  }

  /** Show steps [from, to] on every chart at the best resolution the server gives for that range. */
  async zoomTo(from, to) {
    if (!(to > from)) return;
    const token = ++this.zoomToken;
    this.zoom = { from, to };
    this.onZoom(this.zoom);
    let data;
    try {
      data = await this.fetchMetrics({
        names: this.names.join(","),
        from_step: from,
        to_step: to,
        max_points: this.maxPoints,
      });
    } catch (err) {
      if (token === this.zoomToken) this.onError(`zoom failed: ${err.message}`);
      return;
    }
    if (token !== this.zoomToken) return;
    for (const chart of this.charts.values()) {
      chart.zoomed = zoomSeries(data?.[chart.name] ?? {});
      chart.dirty = true;
    }
    this.schedule();
  }

  resetZoom() {
    if (!this.zoom) return;
    this.zoomToken += 1;
    this.zoom = null;
    for (const chart of this.charts.values()) {
      chart.zoomed = null;
      chart.dirty = true;
    }
    this.onZoom(null);
    this.schedule();
  }
}
