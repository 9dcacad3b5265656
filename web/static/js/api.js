// REST calls to the server. Same origin only: authentication rides on the HttpOnly cookie the
// server set when the page was opened with ?token=, so nothing here handles the token.

const DEFAULT_TIMEOUT_MS = 15000;
// Commands wait for the trainer's result on the server side (then answer 202), so allow longer.
const COMMAND_TIMEOUT_MS = 120000;

export class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.name = "ApiError";
    this.status = status;
    this.body = body;
  }
}

/**
 * JSON.parse that also accepts the bare NaN / Infinity tokens Python's json module writes for
 * non-finite floats (they become null, which the charts draw as gaps).
 */
export function parseJson(text) {
  try {
    return JSON.parse(text);
  } catch (err) {
    const patched = text.replace(/(?<=[[,:]\s*)-?(?:NaN|Infinity)(?=\s*[,\]}])/g, "null");
    if (patched === text) throw err;
    return JSON.parse(patched);
  }
}

/** The human-readable error in a FastAPI-style body ({"detail": ...}) or ours ({"message": ...}). */
export function errorText(body, fallback) {
  if (body === null || body === undefined) return fallback;
  if (typeof body === "string") return body || fallback;
  const detail = body.detail ?? body.message ?? body.error;
  if (typeof detail === "string") return detail;
  if (Array.isArray(detail)) {
    return detail.map((d) => (typeof d === "string" ? d : d?.msg ?? JSON.stringify(d))).join("; ");
  }
  if (detail && typeof detail === "object") return detail.message ?? JSON.stringify(detail);
  return fallback;
}

async function request(method, path, { body, timeoutMs = DEFAULT_TIMEOUT_MS } = {}) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeoutMs);
  const init = {
    method,
    credentials: "same-origin",
    cache: "no-store",
    signal: controller.signal,
    headers: { Accept: "application/json" },
  };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    const reason = err?.name === "AbortError" ? `timed out after ${timeoutMs / 1000} s` : "server unreachable";
    throw new ApiError(0, `${method} ${path}: ${reason}`, null);
  } finally {
    clearTimeout(timer);
  }
  const text = await response.text();
  let parsed = null;
  if (text) {
    try {
      parsed = parseJson(text);
    } catch {
      parsed = text;
    }
  }
  return { status: response.status, ok: response.ok, body: parsed };
}

/** GET a JSON resource; throws ApiError for any non-2xx answer. */
export async function getJson(path, params = {}) {
  const query = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") query.set(key, String(value));
  }
  const qs = query.toString();
  const url = qs ? `${path}?${qs}` : path;
  const res = await request("GET", url);
  if (!res.ok) throw new ApiError(res.status, errorText(res.body, `GET ${path} failed (${res.status})`), res.body);
  return res.body;
}

/** POST JSON and return {status, ok, body} without throwing on HTTP errors (callers show them). */
export function postJson(path, body) {
  return request("POST", path, { body, timeoutMs: COMMAND_TIMEOUT_MS });
}

export const api = {
  status: () => getJson("/api/status"),
  metrics: (params) => getJson("/api/metrics", params),
  events: (sinceId) => getJson("/api/events", { since_id: sinceId }),
  checkpoints: () => getJson("/api/checkpoints"),
  command: (name, body) => postJson(`/command/${encodeURIComponent(name)}`, body ?? {}),
  commandLine: (line) => postJson("/command", { line }),
  restart: () => postJson("/run/restart", {}),
};
