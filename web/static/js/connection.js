// The live WebSocket: reconnects with exponential backoff and tells the page when it came back
// so history can be fetched again (the server may have restarted and missed nothing in its store,
// but this page missed the live messages in between).

import { parseJson } from "./api.js";

const BASE_DELAY_MS = 500;
const MAX_DELAY_MS = 10000;

/** Delay before reconnect attempt `attempt` (0-based): doubling, capped, with up to 25% jitter. */
export function backoffDelay(attempt, random = Math.random) {
  const base = Math.min(MAX_DELAY_MS, BASE_DELAY_MS * 2 ** Math.min(attempt, 20));
  return Math.round(base * (1 + 0.25 * random()));
}

export class Connection {
  /**
   * @param {object} handlers
   *   onMessage(msg)          every parsed server message
   *   onOpen(isReconnect)     the socket is open (isReconnect: it had been open before)
   *   onState(state, detail)  "connecting" | "live" | "reconnecting" | "unauthorized"
   *   checkAuth()             resolves to false when the server rejects our cookie
   */
  constructor({ onMessage, onOpen, onState, checkAuth }) {
    this.onMessage = onMessage;
    this.onOpen = onOpen;
    this.onState = onState;
    this.checkAuth = checkAuth;
    this.socket = null;
    this.attempt = 0;
    this.everOpened = false;
    this.timer = null;
    this.countdown = null;
    this.stopped = false;
  }

  get url() {
    const scheme = window.location.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${window.location.host}/ws`;
  }

  start() {
    this.stopped = false;
    this.connect();
  }

  stop() {
    this.stopped = true;
    clearTimeout(this.timer);
    clearInterval(this.countdown);
    if (this.socket) this.socket.close();
  }

  get isOpen() {
    return this.socket !== null && this.socket.readyState === WebSocket.OPEN;
  }

  send(message) {
    if (!this.isOpen) return false;
    this.socket.send(JSON.stringify(message));
    return true;
  }

  connect() {
    clearInterval(this.countdown);
    this.onState(this.everOpened ? "reconnecting" : "connecting", "connecting…");
    let socket;
    try {
      socket = new WebSocket(this.url);
    } catch {
      this.scheduleReconnect();
      return;
    }
    this.socket = socket;
    socket.addEventListener("open", () => {
      const isReconnect = this.everOpened;
      this.everOpened = true;
      this.attempt = 0;
      this.onState("live", "live");
      this.onOpen(isReconnect);
    });
    socket.addEventListener("message", (event) => {
      if (typeof event.data !== "string") return;
      let msg;
      try {
        msg = parseJson(event.data);
      } catch {
        return;
      }
      if (msg && typeof msg === "object") this.onMessage(msg);
    });
    socket.addEventListener("close", () => {
      if (this.socket !== socket) return;
      this.socket = null;
      if (!this.stopped) this.scheduleReconnect();
    });
  }

  async scheduleReconnect() {
    const delay = backoffDelay(this.attempt);
    this.attempt += 1;
    // A closed socket is either a server that went away or a cookie the server no longer accepts
    // (a restart with a new token): only a plain request can tell them apart.
    let authorized = true;
    try {
      authorized = await this.checkAuth();
    } catch {
      authorized = true;
    }
    if (this.stopped) return;
    const until = Date.now() + delay;
    const label = () => {
      const left = Math.max(0, Math.ceil((until - Date.now()) / 1000));
      return authorized
        ? `reconnecting in ${left} s`
        : "signed out: open the Dashboard link with its token again";
    };
    this.onState(authorized ? "reconnecting" : "unauthorized", label());
    this.countdown = setInterval(() => this.onState(authorized ? "reconnecting" : "unauthorized", label()), 1000);
    this.timer = setTimeout(() => this.connect(), delay);
  }
}
