// Dashboard entry point: wires the panels to the REST API and the live socket.
// The template passes its settings as data attributes (no inline script, so a strict CSP works).

import { Alerts } from "./alerts.js";
import { api } from "./api.js";
import { ChartBoard } from "./charts.js";
import { CheckpointTable } from "./checkpoints.js";
import { Connection } from "./connection.js";
import { Controls } from "./controls.js";
import { EventLog } from "./eventlog.js";
import { StatusPanel } from "./status.js";

const EVENTS_PAGE = 1000;
const MAX_EVENT_PAGES = 50;
const SETTINGS_KEY = "traindeck.chart-settings";

const $ = (id) => document.getElementById(id);
const readOnly = document.body.dataset.readOnly === "true";

function loadSettings() {
  try {
    const saved = JSON.parse(localStorage.getItem(SETTINGS_KEY) ?? "{}");
    const smoothing = Number(saved.smoothing);
    return {
      smoothing: Number.isFinite(smoothing) && smoothing >= 0 && smoothing < 1 ? smoothing : 0.6,
      log: saved.log === true,
    };
  } catch {
    return { smoothing: 0.6, log: false };
  }
}

function saveSettings(settings) {
  try {
    localStorage.setItem(SETTINGS_KEY, JSON.stringify(settings));
  } catch {
    // Storage may be disabled; the settings then last for this page only.
  }
}

const log = new EventLog($("event-log"));
const alerts = new Alerts($("alerts"));
const statusPanel = new StatusPanel(document);
const controls = new Controls(document, { api, log, readOnly });
const reportError = (message) => log.addLocal(message, { level: "warning" });
const checkpoints = new CheckpointTable($("checkpoints"), $("checkpoints-empty"), api.checkpoints, reportError);

/** The metric names the server put in the page, or null (then the board asks for them). */
function initialMetricNames() {
  try {
    const names = JSON.parse($("metric-names")?.textContent ?? "null");
    return Array.isArray(names) ? names.filter((name) => typeof name === "string") : null;
  } catch {
    return null;
  }
}

const board = new ChartBoard($("charts"), {
  fetchMetrics: api.metrics,
  initialNames: initialMetricNames(),
  settings: loadSettings(),
  onError: reportError,
  onZoom: (range) => {
    $("reset-zoom").hidden = range === null;
    $("zoom-range").hidden = range === null;
    $("zoom-range").textContent = range ? `steps ${range.from}–${range.to}` : "";
  },
  onFirstPaint: () => {
    performance.mark("traindeck:first-paint");
    document.documentElement.dataset.firstPaintMs = performance.now().toFixed(0);
  },
});

let lastEventId = 0;
let lastCheckpoint = null;

let liveStatuses = 0;

/**
 * /api/status, unless a live status arrived while the request was out: that one is at least as
 * new, and a late REST answer must not put a stopped trainer back to "running".
 */
async function loadStatus() {
  const before = liveStatuses;
  const status = await api.status();
  if (liveStatuses === before) handleStatus(status);
}

function handleStatus(status) {
  const current = statusPanel.update(status);
  controls.setStatus(current);
  if (current.state === "crashed") alerts.crashed(current.traceback, current.exit_code);
  else if (current.state === "running" || current.state === "starting") alerts.clear("crash");
  const checkpoint = JSON.stringify(current.last_checkpoint ?? null);
  if (checkpoint !== lastCheckpoint) {
    if (lastCheckpoint !== null) checkpoints.refreshSoon();
    lastCheckpoint = checkpoint;
  }
}

/** One store event; `live` when it came over the socket rather than from /api/events. */
function handleEvent(event, live) {
  if (!event || typeof event !== "object") return;
  if (typeof event.id === "number" && event.id > lastEventId) lastEventId = event.id;
  log.addEvent(event);
  board.addEvents([event]);
  if (event.kind === "alert") alerts.fromEvent(event);
  if (event.kind === "start") alerts.trainerStarted(event, live);
  if (event.kind === "checkpoint" || event.kind === "export") checkpoints.refreshSoon();
}

function handleMetrics(msg) {
  board.appendMetrics(msg);
  for (const [name, value] of Object.entries(msg.values ?? {})) {
    if (name.includes("loss") && !(typeof value === "number" && Number.isFinite(value))) {
      alerts.nonFinite(name, msg.step);
    }
  }
}

function handleMessage(msg) {
  switch (msg.type) {
    case "metrics":
      handleMetrics(msg);
      break;
    case "status":
      liveStatuses += 1;
      handleStatus(msg);
      break;
    case "event":
      handleEvent(msg.event ?? msg, true);
      break;
    case "result":
      log.addResult(msg.result ?? msg);
      break;
    case "crash":
      alerts.crashed(msg.traceback, msg.exit_code);
      break;
    default:
      break;
  }
}

let historyCursor = 0;
let eventsLoaded = Promise.resolve();

/** Pages of /api/events after id `since`; moves historyCursor to the newest id read. */
async function fetchEventPages(since) {
  let cursor = since;
  for (let page = 0; page < MAX_EVENT_PAGES; page += 1) {
    const body = await api.events(cursor);
    const events = Array.isArray(body) ? body : Array.isArray(body?.events) ? body.events : [];
    const before = cursor;
    for (const event of events) {
      handleEvent(event, false);
      if (typeof event.id === "number" && event.id > cursor) cursor = event.id;
    }
    if (events.length < EVENTS_PAGE || cursor === before) break;
  }
  historyCursor = Math.max(historyCursor, cursor);
}

/**
 * Events after id `since` and after the newest one history already gave, one fetch at a time.
 * The cursor is not lastEventId: live events that arrive meanwhile must not skip the ones before them.
 */
function loadEvents(since = 0) {
  const run = () => fetchEventPages(Math.max(since, historyCursor));
  eventsLoaded = eventsLoaded.then(run, run);
  return eventsLoaded;
}

/** Fetch everything the page shows; after a reconnect this fills what the socket missed. */
async function loadAll(sinceEvent = 0) {
  const history = board.reload().then(() => {
    if (document.documentElement.dataset.historyPaintMs === undefined) {
      performance.mark("traindeck:history-painted");
      document.documentElement.dataset.historyPaintMs = performance.now().toFixed(0);
    }
  });
  const tasks = [
    ["history", history],
    ["status", loadStatus()],
    ["events", loadEvents(sinceEvent)],
    ["checkpoints", checkpoints.refresh()],
  ];
  const results = await Promise.allSettled(tasks.map(([, task]) => task));
  results.forEach((result, i) => {
    if (result.status === "rejected") reportError(`could not load ${tasks[i][0]}: ${result.reason?.message}`);
  });
  // How many loads have finished (the first one, and one per reconnect): tests wait on it.
  const root = document.documentElement;
  root.dataset.loads = String(Number(root.dataset.loads ?? 0) + 1);
}

function setConnection(state, detail) {
  const el = $("connection");
  el.dataset.state = state;
  el.textContent = detail;
}

function wireChartOptions(settings) {
  const slider = $("smoothing");
  const output = $("smoothing-value");
  const log10 = $("log-scale");
  slider.value = String(settings.smoothing);
  output.textContent = settings.smoothing.toFixed(2);
  log10.checked = settings.log;
  slider.addEventListener("input", () => {
    const weight = Number(slider.value);
    output.textContent = weight.toFixed(2);
    board.setSmoothing(weight);
    saveSettings(board.settings);
  });
  log10.addEventListener("change", () => {
    board.setLog(log10.checked);
    saveSettings(board.settings);
  });
  $("reset-zoom").addEventListener("click", () => board.resetZoom());
  window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", () => board.rebuild());
}

wireChartOptions(board.settings);
const connection = new Connection({
  onMessage: handleMessage,
  onOpen: (isReconnect) => {
    // Everything up to lastEventId was seen; the first load ran before the socket opened, so it
    // may have missed the events stored in between.
    if (isReconnect) loadAll(lastEventId);
    else loadEvents(lastEventId).catch((error) => reportError(`could not load events: ${error?.message}`));
  },
  onState: setConnection,
  checkAuth: async () => {
    const res = await fetch("/api/status", { credentials: "same-origin", cache: "no-store" });
    return res.status !== 401 && res.status !== 403;
  },
});
loadAll();
connection.start();
