// BaseWebSocketClient: a drop-in for the apps' shared/websocket-client.ts, with the fixes of the
// WebSocket audit. Wire protocol v1 by default, v2 on request (docs/protocol.md §10); see
// docs/client.md for the behaviour.
import { MAX_RECONNECT_ATTEMPTS, backoffDelay } from './backoff.js';
import {
  CLOSE_ABNORMAL, CLOSE_HEARTBEAT_TIMEOUT, CLOSE_NORMAL, HEARTBEAT_TIMEOUT_REASON,
  SOFT_DISCONNECT_REASON, closeDecision,
} from './closecodes.js';
import { RecentKeys, eventKey } from './dedup.js';
import { Listeners } from './listeners.js';
import { createThrottle } from './throttle.js';
import { refreshDelay, sessionIdFromTableToken, tokenExpiry } from './token.js';
import { PROTOCOL_V2, Positions, SUBPROTOCOL } from './v2.js';

export const PING_FRAME = '{"type":"ping"}';
export const PROTOCOL_V1 = 'v1';
export { PROTOCOL_V2, SUBPROTOCOL };
/** How long a v2 socket waits for `refreshed`/`refresh_failed` before falling back to a soft reconnect. */
export const REFRESH_REPLY_TIMEOUT_MS = 5000;
/**
 * A refused automatic refresh is tried again in-band after REFRESH_RETRY_DELAY_MS while more than
 * REFRESH_RETRY_FLOOR_MS is left before `exp`; closer to it, a soft reconnect with a fresh
 * getToken() replaces the socket (v2 resumes it) before the old expiry closes it 4001.
 */
const REFRESH_RETRY_DELAY_MS = 5000;
const REFRESH_RETRY_FLOOR_MS = 10000;
const OPEN = 1;

/** @typedef {import('./index.js').WSEvent} WSEvent */
/** @typedef {import('./index.js').BaseWSClientOptions} BaseWSClientOptions */
/** @typedef {import('./index.js').ConnectionState} ConnectionState */

function defaultBaseUrl() {
  const loc = globalThis.location;
  if (loc && /^https?:$/.test(loc.protocol)) return `${loc.protocol === 'https:' ? 'wss' : 'ws'}://${loc.host}`;
  return 'ws://localhost:8001';
}

/** ws://h/p -> http://h, wss://h/p -> https://h */
export function httpBaseOf(wsUrl) {
  const url = new URL(wsUrl);
  const protocol = url.protocol === 'wss:' ? 'https:' : url.protocol === 'ws:' ? 'http:' : url.protocol;
  return `${protocol}//${url.host}`;
}

/**
 * One socket and everything that belongs to it: its timers die with it.
 * @typedef {object} Conn
 * @property {WebSocket} ws
 * @property {boolean} opened
 * @property {boolean} healthy
 * @property {boolean} catchingUp
 * @property {string[]} queue        frames received while catching up
 * @property {any} pingTimer
 * @property {any[]} pongTimers     one per outstanding ping, oldest first
 * @property {any} healthyTimer
 * @property {any} refreshTimer
 * @property {boolean} v2           the gateway selected integrador.v2 for this socket
 * @property {boolean} welcomed     v2: `welcome` came (the socket is admitted)
 * @property {number | null} exp    v2: the expiry the gateway announced last (Unix seconds)
 * @property {PendingRefresh[]} refreshes  v2: `refresh` messages sent, unanswered, oldest first
 */

/**
 * @typedef {object} PendingRefresh
 * @property {string} token
 * @property {boolean} auto         the automatic refresh before `exp`, not updateToken()'s
 * @property {any} timer            no answer in time: soft reconnect
 */

export class BaseWebSocketClient {
  /** @type {WebSocket | null} the current socket (protected) */
  ws = null;
  /** Set by disconnect()/softDisconnect(); cleared by connect() (protected). */
  isIntentionalClose = false;
  /** Client wall-clock time, Unix seconds, of the last received event (protected). */
  lastEventTimestamp = 0;
  /** Failed attempts since the last healthy socket (protected). */
  reconnectAttempts = 0;

  #o;
  /** @type {string | null} */ #token = null;
  /** @type {number | null} */ #branchId = null;
  /** @type {Conn | null} */ #conn = null;
  #gen = 0;
  #started = false;
  #destroyed = false;
  #everOpened = false;
  #lastOpenAt = 0;
  /** @type {ConnectionState} */ #state = 'disconnected';
  /** @type {{code: number, reason: string} | null} */ #final = null;
  #gaveUp = false;
  /** @type {any} */ #reconnectTimer = null;
  #listeners = new Listeners();
  /** @type {Set<(connected: boolean) => void>} */ #connectionCbs = new Set();
  /** @type {Set<() => void>} */ #maxReconnectCbs = new Set();
  /** @type {Set<(code: number, reason: string) => void>} */ #finalCbs = new Set();
  /** @type {Set<(state: ConnectionState) => void>} */ #stateCbs = new Set();
  /** @type {Set<(ids: number[]) => void>} */ #sectorCbs = new Set();
  /** @type {Set<(streams: string[]) => void>} */ #recoveryCbs = new Set();
  /** @type {Set<(reason: string) => void>} */ #refreshFailedCbs = new Set();
  /** @type {Positions | null} v2 positions, kept across sockets; null with protocol 'v1' */ #positions = null;
  /** @type {Set<import('./throttle.js').Throttled<any>>} */ #throttles = new Set();
  #seen;
  #onVisible = () => {
    if (globalThis.document?.visibilityState === 'visible') this.#wake();
  };
  #onOnline = () => this.#wake();
  #stats = {
    attempts: 0, opens: 0, liveEvents: 0, catchupEvents: 0, catchupRequests: 0, duplicatesDropped: 0,
    pings: 0, pongs: 0, heartbeatTimeouts: 0, tokenRefreshes: 0, getTokenCalls: 0,
    v2Opens: 0, resumes: 0, replayed: 0, recoveryFailures: 0, inbandRefreshes: 0, refreshFailures: 0,
    /** @type {{code: number, reason: string, byClient: boolean, opened: boolean} | null} */ lastClose: null,
  };

  /** @param {BaseWSClientOptions} [options] */
  constructor(options = {}) {
    this.#o = {
      url: options.url ?? defaultBaseUrl(),
      endpoint: options.endpoint ?? null,
      getToken: options.getToken ?? null,
      sessionId: options.sessionId ?? null,
      pingInterval: options.pingInterval ?? 30000,
      pongTimeout: options.pongTimeout ?? 10000,
      maxReconnectAttempts: options.maxReconnectAttempts ?? MAX_RECONNECT_ATTEMPTS,
      baseDelay: options.baseDelay ?? 1000,
      maxDelay: options.maxDelay ?? 30000,
      jitter: options.jitter ?? 0.3,
      healthyAfter: options.healthyAfter ?? 10000,
      reconnectOnVisible: options.reconnectOnVisible ?? options.enableVisibilityHandler ?? true,
      reconnectOnOnline: options.reconnectOnOnline ?? true,
      catchup: options.catchup ?? true,
      catchupMargin: options.catchupMargin ?? 2000,
      catchupTimeout: options.catchupTimeout ?? 5000,
      refreshLead: options.refreshLead ?? 60000,
      WebSocket: options.WebSocket ?? globalThis.WebSocket,
      fetch: options.fetch ?? ((...args) => globalThis.fetch(...args)),
      logger: options.logger === undefined ? globalThis.console : options.logger,
      protocol: options.protocol ?? PROTOCOL_V1,
      random: options.random ?? Math.random,
    };
    if (this.#o.protocol !== PROTOCOL_V1 && this.#o.protocol !== PROTOCOL_V2) {
      throw new Error(`unsupported protocol ${this.#o.protocol}`);
    }
    if (this.#o.protocol === PROTOCOL_V2) this.#positions = new Positions();
    if (options.onRecoveryFailed) this.#recoveryCbs.add(options.onRecoveryFailed);
    if (options.onRefreshFailed) this.#refreshFailedCbs.add(options.onRefreshFailed);
    this.#token = options.token ?? null;
    this.#branchId = options.branchId ?? null;
    this.#seen = new RecentKeys({ size: options.dedupMemory });
    if (this.#o.reconnectOnVisible) globalThis.document?.addEventListener?.('visibilitychange', this.#onVisible);
    if (this.#o.reconnectOnOnline) globalThis.addEventListener?.('online', this.#onOnline);
  }

  // --- public API ---------------------------------------------------------------------------

  /** Open the socket (no-op when open or opening). Starts over after a final close or giving up. */
  connect() {
    if (this.#destroyed) return Promise.resolve();
    this.isIntentionalClose = false;
    this.#started = true;
    if (this.#conn) return Promise.resolve();
    this.#clearReconnectTimer();
    if (this.#final || this.#gaveUp) this.reconnectAttempts = 0;
    this.#final = null;
    this.#gaveUp = false;
    return this.#open('connecting');
  }

  /** Close with 1000 "Soft disconnect"; the application reconnects (connect()) when ready. */
  softDisconnect() {
    this.isIntentionalClose = true;
    this.#stop(SOFT_DISCONNECT_REASON);
  }

  /** Close with 1000 and stay closed until connect(). */
  disconnect() {
    this.isIntentionalClose = true;
    this.#stop('');
    this.#flushThrottles();
  }

  /** disconnect(), drop every listener and callback, and detach from the page. */
  destroy() {
    this.disconnect();
    this.#destroyed = true;
    this.#listeners.clear();
    for (const t of this.#throttles) t.cancel();
    this.#throttles.clear();
    this.#connectionCbs.clear();
    this.#maxReconnectCbs.clear();
    this.#finalCbs.clear();
    this.#stateCbs.clear();
    this.#sectorCbs.clear();
    this.#recoveryCbs.clear();
    this.#refreshFailedCbs.clear();
    globalThis.document?.removeEventListener?.('visibilitychange', this.#onVisible);
    globalThis.removeEventListener?.('online', this.#onOnline);
  }

  /**
   * Use a new credential now, keeping listeners, positions and de-dup memory. On an admitted v2
   * socket it is sent in-band (`refresh`) and the socket stays open; a refusal leaves it running
   * with its old credential and expiry and goes to onRefreshFailed(reason). Otherwise (v1, or no
   * admitted socket yet) it is a soft reconnect without backoff. Without a token, `getToken()` is
   * asked for one (v2), or the next socket calls it (v1).
   * @param {string} [token]
   */
  updateToken(token) {
    const conn = this.#conn;
    if (conn && conn.v2 && conn.welcomed && conn.ws.readyState === OPEN) {
      this.#updateInband(conn, token).catch((error) => this.#log('error', 'in-band refresh failed', error));
      return;
    }
    if (token !== undefined) this.#token = token;
    if (this.#conn || this.#reconnectTimer !== null) this.#softReconnect();
  }

  /** Same as updateToken() without a token: a fresh getToken() result, in-band on a v2 socket. */
  refreshToken() {
    this.updateToken();
  }

  /** The branch whose events staff catch-up fetches. @param {number | null} branchId */
  setBranchId(branchId) {
    this.#branchId = branchId;
  }

  /** @returns {number | null} */
  getBranchId() {
    return this.#branchId;
  }

  /**
   * @param {string} eventType an event type, or '*' for every event
   * @param {(event: WSEvent) => void} callback
   * @returns {() => void} unsubscribe
   */
  on(eventType, callback) {
    return this.#listeners.add(eventType, callback);
  }

  /** @param {string} eventType @param {(event: WSEvent) => void} callback */
  off(eventType, callback) {
    this.#listeners.remove(eventType, callback);
  }

  /**
   * At most one call per `interval` ms: the first event at once, then one trailing call with the
   * latest event held during the interval.
   * @param {string} eventType @param {(event: WSEvent) => void} callback @param {number} [interval]
   */
  onThrottled(eventType, callback, interval = 100) {
    const throttle = createThrottle(callback, interval);
    this.#throttles.add(throttle);
    const unsubscribe = this.#listeners.add(eventType, (event) => throttle.offer(event));
    return () => {
      unsubscribe();
      throttle.cancel();
      this.#throttles.delete(throttle);
    };
  }

  /** @param {(connected: boolean) => void} callback */
  onConnectionChange(callback) {
    this.#connectionCbs.add(callback);
    return () => this.#connectionCbs.delete(callback);
  }

  /** Called after the last reconnect attempt failed, and after a final close (4001/4003/4029). */
  onMaxReconnect(callback) {
    this.#maxReconnectCbs.add(callback);
    return () => this.#maxReconnectCbs.delete(callback);
  }

  /** @param {(code: number, reason: string) => void} callback */
  onFinalClose(callback) {
    this.#finalCbs.add(callback);
    return () => this.#finalCbs.delete(callback);
  }

  /** @param {(state: ConnectionState) => void} callback */
  onStateChange(callback) {
    this.#stateCbs.add(callback);
    return () => this.#stateCbs.delete(callback);
  }

  /** `sectors_updated:` replies to refreshSectors() (waiter sockets). */
  onSectorsUpdated(callback) {
    this.#sectorCbs.add(callback);
    return () => this.#sectorCbs.delete(callback);
  }

  /**
   * v2: called with the streams a `resume` could not recover (refetch their state over REST).
   * @param {(streams: string[]) => void} callback
   */
  onRecoveryFailed(callback) {
    this.#recoveryCbs.add(callback);
    return () => this.#recoveryCbs.delete(callback);
  }

  /**
   * v2: called with the gateway's reason each time it refuses an in-band refresh (updateToken()'s
   * or the automatic one before `exp`). The socket stays open with its old expiry.
   * @param {(reason: string) => void} callback
   */
  onRefreshFailed(callback) {
    this.#refreshFailedCbs.add(callback);
    return () => this.#refreshFailedCbs.delete(callback);
  }

  /** Whether the current socket speaks protocol v2 (the gateway selected `integrador.v2`). */
  isV2() {
    return this.#conn !== null && this.#conn.v2;
  }

  /** v2: the last offset seen per stream (a copy), what the next socket resumes from; {} with v1. */
  getPositions() {
    return this.#positions ? this.#positions.toObject() : {};
  }

  isConnected() {
    return this.#conn !== null && this.#conn.opened && this.#conn.ws.readyState === OPEN;
  }

  /** @returns {ConnectionState} */
  getState() {
    return this.#state;
  }

  /** The final close that stopped the client, if any. */
  getFinalClose() {
    return this.#final;
  }

  /** Send an extra ping now; false when not connected. */
  ping() {
    if (!this.#conn || !this.isConnected()) return false;
    this.#sendPing(this.#conn);
    return true;
  }

  /** Counters, for dashboards and tests. */
  /**
   * The credential this socket connected or was refreshed with; the next socket uses it too.
   * A method, not a `token` property: existing subclasses declare a private `token` of their own.
   */
  getActiveToken() {
    return this.#token;
  }

  get stats() {
    return {
      ...this.#stats,
      state: this.#state,
      reconnectAttempts: this.reconnectAttempts,
      outstandingPings: this.#conn ? this.#conn.pongTimers.length : 0,
      listenerTypes: this.#listeners.types,
      listenerCount: this.#listeners.size,
      dedupKeys: this.#seen.count,
    };
  }

  // --- protected: overridden by the apps' services ------------------------------------------

  /** WebSocket URL without the query, e.g. `ws://localhost:8001/ws/waiter`. */
  getUrl() {
    if (!this.#o.endpoint) throw new Error('BaseWebSocketClient: pass options.endpoint or override getUrl()');
    return `${this.#o.url.replace(/\/+$/, '')}/ws/${this.#o.endpoint}`;
  }

  /** `token=...` / `table_token=...`, or null when there is no credential (then nothing connects). */
  getAuthParam() {
    if (!this.#token) return null;
    const name = this.#o.endpoint === 'diner' ? 'table_token' : 'token';
    return `${name}=${encodeURIComponent(this.#token)}`;
  }

  /** @param {boolean} _wasReconnect true when an earlier socket of this client had opened */
  onOpen(_wasReconnect) {}

  /** @param {number} _code @param {string} _reason */
  onClose(_code, _reason) {}

  /** Every live event, before the listeners. @param {WSEvent} _event */
  onMessage(_event) {}

  /**
   * Dispatch one event to the listeners, once: a copy already seen (live or catch-up) is dropped.
   * @param {WSEvent} event
   * @returns {boolean} false for a duplicate
   */
  notifyListeners(event) {
    if (!this.#seen.add(eventKey(event))) {
      this.#stats.duplicatesDropped++;
      return false;
    }
    this.#listeners.dispatch(event, (error) => this.#log('error', 'listener failed', error));
    return true;
  }

  /**
   * URL of the catch-up request, or null for none. `since` is Unix seconds.
   * @param {number} since
   */
  getCatchupUrl(since) {
    const cred = this.#credential();
    if (!cred) return null;
    const base = httpBaseOf(this.getUrl());
    const s = encodeURIComponent(since.toFixed(3));
    if (cred.name === 'table_token') {
      const session = this.#o.sessionId ?? sessionIdFromTableToken(cred.value);
      if (!session) return null;
      return `${base}/ws/catchup/session?session_id=${session}&since=${s}&table_token=${encodeURIComponent(cred.value)}`;
    }
    if (this.#branchId === null || this.#branchId === undefined) return null;
    return `${base}/ws/catchup?branch_id=${this.#branchId}&since=${s}&token=${encodeURIComponent(cred.value)}`;
  }

  // --- internals ----------------------------------------------------------------------------

  #log(level, ...args) {
    this.#o.logger?.[level]?.('[ws]', ...args);
  }

  /** @param {ConnectionState} state */
  #setState(state) {
    if (this.#state === state) return;
    this.#state = state;
    for (const cb of [...this.#stateCbs]) this.#safe(cb, state);
  }

  #safe(cb, ...args) {
    try {
      cb(...args);
    } catch (error) {
      this.#log('error', 'callback failed', error);
    }
  }

  /** The credential in the query: {name, value}, read back from getAuthParam(). */
  #credential() {
    const auth = this.getAuthParam();
    if (!auth) return null;
    const params = new URLSearchParams(auth);
    for (const name of ['token', 'table_token']) {
      const value = params.get(name);
      if (value) return { name, value };
    }
    return null;
  }

  /** @param {ConnectionState} state */
  async #open(state) {
    const gen = ++this.#gen;
    this.#setState(state);
    if (this.#o.getToken) {
      let token = null;
      this.#stats.getTokenCalls++;
      try {
        token = await this.#o.getToken();
      } catch (error) {
        this.#log('warn', 'getToken failed', error);
        if (gen !== this.#gen) return;
        this.#failedAttempt(CLOSE_ABNORMAL, 'getToken failed');
        return;
      }
      if (gen !== this.#gen || this.isIntentionalClose || this.#destroyed) return;
      this.#token = token ?? null;
    }
    const auth = this.getAuthParam();
    if (!auth) {
      this.#setState('disconnected');
      return;
    }
    const url = `${this.getUrl()}?${auth}`;
    let ws;
    this.#stats.attempts++;
    try {
      ws = this.#positions ? new this.#o.WebSocket(url, [SUBPROTOCOL]) : new this.#o.WebSocket(url);
    } catch (error) {
      this.#log('error', 'cannot open WebSocket', error);
      this.#failedAttempt(CLOSE_ABNORMAL, 'cannot open');
      return;
    }
    /** @type {Conn} */
    const conn = {
      ws, opened: false, healthy: false, catchingUp: false, queue: [],
      pingTimer: null, pongTimers: [], healthyTimer: null, refreshTimer: null, v2: false,
      welcomed: false, exp: null, refreshes: [],
    };
    this.#conn = conn;
    this.ws = ws;
    ws.onopen = () => this.#handleOpen(conn);
    ws.onmessage = (ev) => this.#handleMessage(conn, ev);
    ws.onclose = (ev) => {
      if (this.#conn === conn) this.#handleClose(conn, ev.code, ev.reason ?? '', false);
    };
    ws.onerror = () => {};
  }

  /** @param {Conn} conn */
  #handleOpen(conn) {
    if (this.#conn !== conn) return;
    conn.opened = true;
    this.#stats.opens++;
    const wasReconnect = this.#everOpened;
    const since = Math.max(this.lastEventTimestamp, this.#lastOpenAt) - this.#o.catchupMargin / 1000;
    this.#everOpened = true;
    this.#lastOpenAt = Date.now() / 1000;
    this.#setState('connected');
    conn.v2 = this.#positions !== null && conn.ws.protocol === SUBPROTOCOL;
    if (conn.v2) {
      // The first message of every v2 socket: the gateway holds live events until it comes.
      this.#stats.v2Opens++;
      this.#stats.resumes++;
      conn.ws.send(this.#positions.resumeMessage());
    }
    conn.pingTimer = setInterval(() => this.#sendPing(conn), this.#o.pingInterval);
    // A first ping at once: its pong proves the socket healthy (admitted and served).
    this.#sendPing(conn);
    conn.healthyTimer = setTimeout(() => this.#markHealthy(conn), this.#o.healthyAfter);
    // v2 refreshes in-band once `welcome` announces the expiry, and resumes instead of catch-up.
    if (!conn.v2) this.#scheduleRefresh(conn);
    if (wasReconnect && this.#o.catchup && !conn.v2) {
      const url = this.getCatchupUrl(since);
      if (url) {
        conn.catchingUp = true;
        this.#catchUp(conn, url);
      }
    }
    for (const cb of [...this.#connectionCbs]) this.#safe(cb, true);
    this.#safe(() => this.onOpen(wasReconnect));
  }

  /** @param {Conn} conn @param {string} url */
  async #catchUp(conn, url) {
    this.#stats.catchupRequests++;
    const abort = typeof AbortController === 'function' ? new AbortController() : null;
    const timer = setTimeout(() => abort?.abort(), this.#o.catchupTimeout);
    /** @type {WSEvent[]} */
    let events = [];
    try {
      const response = await this.#o.fetch(url, { signal: abort?.signal, credentials: 'omit' });
      if (response.status === 200) {
        const body = await response.json();
        if (body && Array.isArray(body.events)) events = body.events;
      } else {
        this.#log('warn', `catch-up answered ${response.status}`);
      }
    } catch (error) {
      this.#log('warn', 'catch-up failed', error);
    } finally {
      clearTimeout(timer);
    }
    if (this.#conn !== conn) return;
    for (const event of events) {
      if (event && typeof event === 'object' && typeof event.type === 'string') {
        if (this.notifyListeners(event)) this.#stats.catchupEvents++;
      }
    }
    conn.catchingUp = false;
    const queued = conn.queue.splice(0);
    for (const data of queued) {
      if (this.#conn !== conn) return;
      this.#handleFrame(conn, data);
    }
  }

  /** @param {Conn} conn @param {MessageEvent} ev */
  #handleMessage(conn, ev) {
    if (this.#conn !== conn || typeof ev.data !== 'string') return;
    if (conn.catchingUp) {
      // Pongs are not held back: the heartbeat must not time out during a slow catch-up.
      if (ev.data === '{"type":"pong"}') this.#handlePong(conn);
      else conn.queue.push(ev.data);
      return;
    }
    this.#handleFrame(conn, ev.data);
  }

  /** @param {Conn} conn @param {string} data */
  #handleFrame(conn, data) {
    let event;
    try {
      event = JSON.parse(data);
    } catch {
      if (data.startsWith('sectors_updated:')) {
        const ids = data.slice(16).split(',').filter(Boolean).map(Number);
        for (const cb of [...this.#sectorCbs]) this.#safe(cb, ids);
      }
      return;
    }
    if (event === null || typeof event !== 'object' || Array.isArray(event)) return;
    if (event.type === 'pong') {
      this.#handlePong(conn);
      return;
    }
    if (conn.v2 && this.#handleV2(conn, event)) return;
    this.#markHealthy(conn);
    this.lastEventTimestamp = Date.now() / 1000;
    this.#safe(() => this.onMessage(event));
    if (conn.v2) {
      // Each event arrives exactly once on a v2 socket: no de-duplication. Its key is still
      // remembered, should a later socket fall back to v1 and HTTP catch-up.
      this.#positions?.track(event);
      this.#seen.add(eventKey(event));
      this.#stats.liveEvents++;
      this.#listeners.dispatch(event, (error) => this.#log('error', 'listener failed', error));
      return;
    }
    if (this.notifyListeners(event)) this.#stats.liveEvents++;
  }

  /**
   * The v2 replies (welcome, resumed, refreshed, refresh_failed); false for anything else.
   * @param {Conn} conn @param {any} msg
   */
  #handleV2(conn, msg) {
    switch (msg.type) {
      case 'welcome':
        this.#markHealthy(conn);
        conn.welcomed = true;
        this.#scheduleInbandRefresh(conn, msg.exp);
        return true;
      case 'refreshed': {
        this.#markHealthy(conn);
        this.#stats.inbandRefreshes++;
        const pending = conn.refreshes.shift();
        if (pending) {
          clearTimeout(pending.timer);
          // From now on the socket's credential: the next socket connects with it too.
          this.#token = pending.token;
        }
        this.#scheduleInbandRefresh(conn, msg.exp);
        return true;
      }
      case 'refresh_failed': {
        // The socket keeps its credential and its old expiry.
        const pending = conn.refreshes.shift();
        if (pending) clearTimeout(pending.timer);
        this.#refreshFailed(typeof msg.reason === 'string' ? msg.reason : 'unknown');
        if (pending?.auto) this.#retryRefresh(conn);
        return true;
      }
      case 'resumed': {
        const { failed, replayed } = this.#positions ? this.#positions.resumed(msg.streams) : { failed: [], replayed: 0 };
        this.#stats.replayed += replayed;
        if (failed.length) {
          this.#stats.recoveryFailures++;
          for (const cb of [...this.#recoveryCbs]) this.#safe(cb, failed);
        }
        return true;
      }
      default:
        return false;
    }
  }

  /** @param {string} reason */
  #refreshFailed(reason) {
    this.#stats.refreshFailures++;
    this.#log('warn', `in-band refresh refused: ${reason}`);
    for (const cb of [...this.#refreshFailedCbs]) this.#safe(cb, reason);
  }

  /**
   * Remember the socket's expiry and ask getToken() for a new credential shortly before it, to
   * send as `refresh`.
   * @param {Conn} conn @param {unknown} exp Unix seconds, or null
   */
  #scheduleInbandRefresh(conn, exp) {
    clearTimeout(conn.refreshTimer);
    conn.refreshTimer = null;
    conn.exp = typeof exp === 'number' && Number.isFinite(exp) ? exp : null;
    if (!this.#o.getToken || conn.exp === null) return;
    const delay = refreshDelay(conn.exp, Date.now(), { lead: this.#o.refreshLead });
    conn.refreshTimer = setTimeout(() => this.#refreshInband(conn), delay);
  }

  /** The automatic refresh before `exp`. @param {Conn} conn */
  async #refreshInband(conn) {
    if (this.#conn !== conn) return;
    conn.refreshTimer = null;
    this.#stats.tokenRefreshes++;
    const token = await this.#askToken();
    if (this.#conn !== conn || conn.ws.readyState !== OPEN) return;
    if (!token) {
      this.#softReconnect();
      return;
    }
    this.#sendRefresh(conn, token, true);
  }

  /**
   * A refused automatic refresh: the socket keeps running; try again in-band in a few seconds
   * while time is left, else replace the socket before the old expiry closes it 4001 (a final
   * close, although getToken() may well have a good credential by then).
   * @param {Conn} conn
   */
  #retryRefresh(conn) {
    if (this.#conn !== conn || conn.refreshTimer !== null || conn.exp === null) return;
    const remaining = conn.exp * 1000 - Date.now();
    if (remaining <= REFRESH_RETRY_FLOOR_MS) {
      this.#softReconnect();
      return;
    }
    conn.refreshTimer = setTimeout(() => this.#refreshInband(conn), REFRESH_RETRY_DELAY_MS);
  }

  /** getToken()'s answer, or null when it has none or fails. */
  async #askToken() {
    this.#stats.getTokenCalls++;
    try {
      return (await this.#o.getToken()) ?? null;
    } catch (error) {
      this.#log('warn', 'getToken failed', error);
      return null;
    }
  }

  /**
   * updateToken() on an admitted v2 socket.
   * @param {Conn} conn @param {string | undefined} token
   */
  async #updateInband(conn, token) {
    if (token === undefined) token = this.#o.getToken ? (await this.#askToken()) ?? undefined : this.#token ?? undefined;
    if (this.#conn !== conn || conn.ws.readyState !== OPEN) {
      // The socket went while getToken() answered: the next one connects with the new credential.
      if (token !== undefined) this.#token = token;
      return;
    }
    if (!token) {
      this.#refreshFailed('missing_token');
      return;
    }
    this.#sendRefresh(conn, token, false);
  }

  /**
   * Send `refresh`; its answer comes in the order of the requests (#handleV2). No answer in time:
   * a soft reconnect with the new credential replaces the socket.
   * @param {Conn} conn @param {string} token @param {boolean} auto
   */
  #sendRefresh(conn, token, auto) {
    const timer = setTimeout(() => {
      if (this.#conn === conn) this.#softReconnect();
    }, REFRESH_REPLY_TIMEOUT_MS);
    conn.refreshes.push({ token, auto, timer });
    conn.ws.send(JSON.stringify({ type: 'refresh', token }));
  }

  /**
   * A socket closed with refreshes unanswered: the newest credential is the one to connect with,
   * as updateToken() on v1 does.
   * @param {Conn} conn
   */
  #settleRefreshes(conn) {
    const pending = conn.refreshes.splice(0);
    for (const p of pending) clearTimeout(p.timer);
    if (pending.length) this.#token = pending[pending.length - 1].token;
  }

  /** @param {Conn} conn */
  #handlePong(conn) {
    this.#stats.pongs++;
    const timer = conn.pongTimers.shift();
    if (timer !== undefined) clearTimeout(timer);
    this.#markHealthy(conn);
  }

  /** The socket proved it is admitted and served: the backoff starts over. @param {Conn} conn */
  #markHealthy(conn) {
    if (conn.healthy || this.#conn !== conn) return;
    conn.healthy = true;
    clearTimeout(conn.healthyTimer);
    conn.healthyTimer = null;
    this.reconnectAttempts = 0;
  }

  /** @param {Conn} conn */
  #sendPing(conn) {
    if (this.#conn !== conn || conn.ws.readyState !== OPEN) return;
    conn.ws.send(PING_FRAME);
    this.#stats.pings++;
    conn.pongTimers.push(setTimeout(() => {
      if (this.#conn !== conn) return;
      this.#stats.heartbeatTimeouts++;
      this.#log('warn', 'heartbeat timeout');
      this.#closeConn(conn, CLOSE_HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_REASON, false);
    }, this.#o.pongTimeout));
  }

  /** @param {Conn} conn */
  #scheduleRefresh(conn) {
    if (!this.#o.getToken) return;
    const cred = this.#credential();
    const delay = cred ? refreshDelay(tokenExpiry(cred.value), Date.now(), { lead: this.#o.refreshLead }) : null;
    if (delay === null) return;
    conn.refreshTimer = setTimeout(() => {
      if (this.#conn !== conn) return;
      this.#stats.tokenRefreshes++;
      this.#softReconnect();
    }, delay);
  }

  /** Close the current socket (if any) and open a new one at once, not counted as an attempt. */
  #softReconnect() {
    if (this.isIntentionalClose || this.#destroyed) return;
    this.#clearReconnectTimer();
    if (this.#conn) this.#closeConn(this.#conn, CLOSE_NORMAL, SOFT_DISCONNECT_REASON, true);
    this.#open('connecting');
  }

  /** @param {Conn} conn */
  #clearConnTimers(conn) {
    clearInterval(conn.pingTimer);
    clearTimeout(conn.healthyTimer);
    clearTimeout(conn.refreshTimer);
    for (const t of conn.pongTimers) clearTimeout(t);
    conn.pongTimers = [];
    conn.queue = [];
  }

  /**
   * Close a socket from this side and handle the close at once (a dead peer may never answer
   * the close handshake).
   * @param {Conn} conn @param {number} code @param {string} reason @param {boolean} soft
   */
  #closeConn(conn, code, reason, soft) {
    const ws = conn.ws;
    ws.onopen = ws.onmessage = ws.onclose = null;
    try {
      ws.close(code, reason);
    } catch (error) {
      this.#log('warn', 'close failed', error);
    }
    this.#handleClose(conn, code, reason, true, soft);
  }

  /**
   * @param {Conn} conn @param {number} code @param {string} reason
   * @param {boolean} byClient @param {boolean} [soft] a soft reconnect follows: no decision here
   */
  #handleClose(conn, code, reason, byClient, soft = false) {
    this.#clearConnTimers(conn);
    this.#settleRefreshes(conn);
    if (this.#conn === conn) {
      this.#conn = null;
      this.ws = null;
    }
    this.#stats.lastClose = { code, reason, byClient, opened: conn.opened };
    if (conn.opened) for (const cb of [...this.#connectionCbs]) this.#safe(cb, false);
    this.#safe(() => this.onClose(code, reason));
    if (soft) return;
    const decision = closeDecision(code, { intentional: this.isIntentionalClose && byClient });
    if (decision === 'stop' || this.isIntentionalClose) {
      this.#setState('disconnected');
      return;
    }
    if (decision === 'final') {
      this.#final = { code, reason };
      this.#setState('closed');
      this.#log('warn', `closed for good: ${code} ${reason}`);
      for (const cb of [...this.#finalCbs]) this.#safe(cb, code, reason);
      for (const cb of [...this.#maxReconnectCbs]) this.#safe(cb);
      return;
    }
    this.#scheduleReconnect();
  }

  /** An attempt that failed before any socket existed. */
  #failedAttempt(code, reason) {
    this.#stats.lastClose = { code, reason, byClient: true, opened: false };
    this.#scheduleReconnect();
  }

  #scheduleReconnect() {
    if (this.reconnectAttempts >= this.#o.maxReconnectAttempts) {
      this.#gaveUp = true;
      this.#setState('closed');
      this.#log('error', `gave up after ${this.reconnectAttempts} reconnect attempts`);
      for (const cb of [...this.#maxReconnectCbs]) this.#safe(cb);
      return;
    }
    this.reconnectAttempts++;
    const delay = backoffDelay(this.reconnectAttempts, {
      baseDelay: this.#o.baseDelay, maxDelay: this.#o.maxDelay, jitter: this.#o.jitter, random: this.#o.random,
    });
    this.#setState('reconnecting');
    this.#clearReconnectTimer();
    this.#reconnectTimer = setTimeout(() => {
      this.#reconnectTimer = null;
      // The library's own path: never this.connect(), whose override may take other defaults.
      this.#open('reconnecting');
    }, delay);
  }

  #clearReconnectTimer() {
    if (this.#reconnectTimer !== null) clearTimeout(this.#reconnectTimer);
    this.#reconnectTimer = null;
  }

  /** The page became visible or the network came back. */
  #wake() {
    if (!this.#started || this.isIntentionalClose || this.#final || this.#destroyed) return;
    if (this.#conn) {
      if (this.#conn.opened) this.#sendPing(this.#conn);
      return;
    }
    this.#clearReconnectTimer();
    if (this.#gaveUp) {
      this.#gaveUp = false;
      this.reconnectAttempts = 0;
    }
    this.#open('reconnecting');
  }

  /** @param {string} reason */
  #stop(reason) {
    this.#gen++;
    this.#clearReconnectTimer();
    if (this.#conn) this.#closeConn(this.#conn, CLOSE_NORMAL, reason, false);
    this.#setState('disconnected');
  }

  #flushThrottles() {
    for (const t of this.#throttles) t.flush();
  }
}
