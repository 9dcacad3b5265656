// One metric's chart: a uPlot instance drawing the raw line (faint when smoothed), its EMA,
// the min/max envelope of each downsampled bucket, and the command markers.

import { formatTick, formatValue } from "./format.js";
import { MarkerLayer } from "./markers.js";
import { ema, positiveOnly, Series } from "./series.js";

const PLOT_HEIGHT = 200;
// Schedules, not noisy measurements: an EMA would only blur their steps.
const UNSMOOTHED = /(^|\/)(lr|epoch)(\/|$)/;
const MIN_SELECT_PX = 4;

/** Chart colours, read from the page's CSS variables so charts follow the colour scheme. */
export function readTheme() {
  const style = getComputedStyle(document.documentElement);
  const read = (name, fallback) => style.getPropertyValue(name).trim() || fallback;
  return {
    axis: read("--axis", "#888"),
    grid: read("--grid", "rgba(128,128,128,0.15)"),
    series: read("--series", "#1f6feb"),
    raw: read("--series-raw", "rgba(31,111,235,0.3)"),
    band: read("--band", "rgba(31,111,235,0.12)"),
  };
}

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

/** A series-like holder for one zoomed range (no cap: the server already bounded it). */
export function zoomSeries(history) {
  const s = new Series(Number.MAX_SAFE_INTEGER);
  s.loadHistory(history);
  return s;
}

export class MetricChart {
  /**
   * @param {string} name  metric name, e.g. "train/loss"
   * @param {object} board the owner: settings {smoothing, log}, theme, markers, zoomTo(), resetZoom()
   */
  constructor(name, board) {
    this.name = name;
    this.board = board;
    this.series = new Series();
    this.zoomed = null;
    this.plot = null;
    this.dirty = true;
    this.visible = true;
    this.smoothable = !UNSMOOTHED.test(name);
    this.smoothed = this.smoothing > 0;

    this.figure = element("figure", "chart");
    this.figure.dataset.metric = name;
    this.figure.setAttribute("aria-label", name);
    const caption = element("figcaption");
    caption.append(element("h3", "", name));
    this.latest = element("span", "latest", "—");
    this.latest.setAttribute("aria-label", `${name} latest value`);
    this.readout = element("span", "readout muted");
    caption.append(this.latest, this.readout);
    this.plotEl = element("div", "plot");
    this.figure.append(caption, this.plotEl);
    this.markerLayer = null;
    this.dragging = false;
    this.pointerX = null;
  }

  get source() {
    return this.zoomed ?? this.series;
  }

  get smoothing() {
    return this.smoothable ? this.board.settings.smoothing : 0;
  }

  /** Arrays for uPlot. Always fresh copies: uPlot keeps them and redraws from them on resize. */
  buildData() {
    const src = this.source;
    const { log } = this.board.settings;
    const smoothing = this.smoothing;
    const shown = log ? positiveOnly : (a) => a.slice();
    const smooth = smoothing > 0 ? ema(src.value, smoothing) : src.value;
    return [src.step.slice(), shown(src.value), shown(smooth), shown(src.min), shown(src.max)];
  }

  options(width) {
    const { theme, settings } = this.board;
    const smoothing = this.smoothing > 0;
    const axis = {
      stroke: theme.axis,
      grid: { stroke: theme.grid, width: 1 },
      ticks: { stroke: theme.grid, width: 1 },
      values: (u, splits) => splits.map(formatTick),
    };
    const line = { points: { show: false } };
    return {
      width,
      height: PLOT_HEIGHT,
      legend: { show: false },
      scales: { x: { time: false }, y: settings.log ? { distr: 3, log: 10 } : { auto: true } },
      axes: [{ ...axis, size: 32 }, { ...axis, size: 56 }],
      series: [
        { label: "step" },
        { ...line, label: this.name, stroke: smoothing ? theme.raw : theme.series, width: smoothing ? 1 : 1.5 },
        { ...line, label: "smoothed", stroke: theme.series, width: 2, show: smoothing, spanGaps: true },
        { ...line, label: "min", stroke: "transparent", width: 0 },
        { ...line, label: "max", stroke: "transparent", width: 0 },
      ],
      bands: [{ series: [4, 3], fill: theme.band }],
      cursor: { drag: { x: true, y: false, setScale: false }, sync: { key: "traindeck" } },
      hooks: {
        setSelect: [(u) => this.onSelect(u)],
        draw: [(u) => this.placeMarkers(u)],
        setCursor: [(u) => this.onCursor(u)],
      },
    };
  }

  /** Create the uPlot instance once the figure is in the page and has a width. */
  create() {
    this.destroy();
    this.smoothed = this.smoothing > 0;
    const width = Math.max(120, Math.floor(this.plotEl.clientWidth || 320));
    this.plot = new window.uPlot(this.options(width), this.buildData(), this.plotEl);
    this.markerLayer = new MarkerLayer(this.plot.over);
    this.plot.over.addEventListener("dblclick", () => this.board.resetZoom());
    // Synced charts mirror the selection; only the chart the user dragged on asks for the zoom.
    this.plot.over.addEventListener("mousedown", () => {
      this.dragging = true;
    });
    // Marker tips follow the real pointer (uPlot's cursor snaps to data points and is mirrored
    // on synced charts): only the chart under the pointer shows one.
    const over = this.plot.over;
    over.addEventListener("mousemove", (e) => {
      this.pointerX = e.clientX - over.getBoundingClientRect().left;
      this.markerLayer?.hover(this.pointerX);
    });
    over.addEventListener("mouseleave", () => {
      this.pointerX = null;
      this.markerLayer?.hover(-Infinity);
    });
    this.placeMarkers(this.plot);
    this.dirty = false;
  }

  destroy() {
    if (this.plot) this.plot.destroy();
    this.plot = null;
    this.markerLayer = null;
  }

  resize(width) {
    if (this.plot && width > 0 && Math.abs(width - this.plot.width) >= 1) {
      this.plot.setSize({ width: Math.floor(width), height: PLOT_HEIGHT });
    }
  }

  /** Redraw with the current points (one canvas redraw; the chart itself is kept). */
  render() {
    this.dirty = false;
    if (this.plot) this.plot.setData(this.buildData());
  }

  /** The caption and data attributes always follow the newest live point, even while zoomed. */
  updateCaption() {
    const s = this.series;
    this.latest.textContent = formatValue(s.lastValue);
    this.figure.dataset.points = String(this.source.length);
    this.figure.dataset.lastStep = s.lastStep === null ? "" : String(s.lastStep);
    this.figure.dataset.lastValue = s.lastValue === null ? "" : String(s.lastValue);
  }

  placeMarkers(u) {
    if (!this.markerLayer) return;
    const width = u.over.clientWidth || u.bbox.width / (window.devicePixelRatio || 1);
    this.markerLayer.render(this.board.markers, (step) => u.valToPos(step, "x"), width);
    if (this.pointerX !== null) this.markerLayer.hover(this.pointerX);
  }

  onSelect(u) {
    const { left, width } = u.select;
    const mine = this.dragging;
    this.dragging = false;
    if (width < MIN_SELECT_PX) return;
    const from = Math.max(0, Math.floor(u.posToVal(left, "x")));
    const to = Math.ceil(u.posToVal(left + width, "x"));
    u.setSelect({ left: 0, top: 0, width: 0, height: 0 }, false);
    if (mine && Number.isFinite(from) && Number.isFinite(to)) this.board.zoomTo(from, to);
  }

  onCursor(u) {
    const i = u.cursor.idx;
    const src = this.source;
    if (i === null || i === undefined || i >= src.length) {
      this.readout.textContent = "";
      return;
    }
    const raw = formatValue(src.value[i]);
    const smooth = this.smoothed ? u.data[2][i] : null;
    const smoothText = smooth === null || smooth === undefined ? "" : ` · ema ${formatValue(smooth)}`;
    this.readout.textContent = `step ${src.step[i]}: ${raw}${smoothText}`;
  }
}
