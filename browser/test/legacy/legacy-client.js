// A faithful JavaScript reproduction of the EXISTING shared/websocket-client.ts (spec §7.1), bugs
// included, so tests can show how unchanged front ends behave against the gateway:
// - onopen resets the attempt counter (a server that accepts and then closes 1008/1013 is retried
//   every ~1 s forever);
// - only the latest heartbeat timer id is kept (an extra ping orphans the previous timer);
// - reconnects call this.connect(), so a subclass's connect(endpoint) default applies;
// - no de-duplication, catch-up left to the subclasses.
const NON_RECOVERABLE_CLOSE_CODES = new Set([4001, 4003, 4029]);
const MAX_RECONNECT_ATTEMPTS = 50;
const BASE_RECONNECT_DELAY = 1000;
const MAX_RECONNECT_DELAY = 30000;
const JITTER_FACTOR = 0.3;
const HEARTBEAT_INTERVAL = 30000;
const HEARTBEAT_TIMEOUT = 10000;

export class LegacyBaseWebSocketClient {
  ws = null;
  reconnectAttempts = 0;
  reconnectTimeout = null;
  heartbeatInterval = null;
  heartbeatTimeout = null;
  listeners = new Map();
  connectionCallbacks = new Set();
  maxReconnectCallbacks = new Set();
  isIntentionalClose = false;
  lastEventTimestamp = 0;

  constructor(options = {}) {
    this.options = options;
    if (options.enableVisibilityHandler && typeof document !== 'undefined') {
      document.addEventListener('visibilitychange', () => this.handleVisibilityChange());
    }
  }

  getUrl() { throw new Error('getUrl() must be implemented'); }
  getAuthParam() { throw new Error('getAuthParam() must be implemented'); }
  onOpen(_wasReconnect) {}
  onClose(_code, _reason) {}
  onMessage(_event) {}

  connect() {
    if (this.ws && (this.ws.readyState === WebSocket.OPEN || this.ws.readyState === WebSocket.CONNECTING)) return;
    const auth = this.getAuthParam();
    if (!auth) return;
    this.isIntentionalClose = false;
    try {
      this.ws = new WebSocket(`${this.getUrl()}?${auth}`);
      this.ws.onopen = () => {
        const wasReconnect = this.reconnectAttempts > 0;
        this.reconnectAttempts = 0;
        this.startHeartbeat();
        this.notifyConnectionChange(true);
        this.onOpen(wasReconnect);
      };
      this.ws.onmessage = (event) => {
        let data;
        try {
          data = JSON.parse(event.data);
        } catch {
          return;
        }
        if (data.type === 'pong') {
          if (this.heartbeatTimeout) {
            clearTimeout(this.heartbeatTimeout);
            this.heartbeatTimeout = null;
          }
          return;
        }
        this.lastEventTimestamp = Date.now() / 1000;
        this.onMessage(data);
        this.notifyListeners(data);
      };
      this.ws.onclose = (event) => {
        this.stopHeartbeat();
        this.notifyConnectionChange(false);
        this.onClose(event.code, event.reason);
        if (this.isIntentionalClose) return;
        if (NON_RECOVERABLE_CLOSE_CODES.has(event.code)) {
          this.maxReconnectCallbacks.forEach((cb) => cb());
          return;
        }
        this.scheduleReconnect();
      };
      this.ws.onerror = () => {};
    } catch {
      this.scheduleReconnect();
    }
  }

  scheduleReconnect() {
    if (this.reconnectAttempts >= MAX_RECONNECT_ATTEMPTS) {
      this.maxReconnectCallbacks.forEach((cb) => cb());
      return;
    }
    this.reconnectAttempts++;
    const delay = Math.min(BASE_RECONNECT_DELAY * Math.pow(2, this.reconnectAttempts - 1), MAX_RECONNECT_DELAY);
    const jitter = delay * JITTER_FACTOR * Math.random();
    this.reconnectTimeout = setTimeout(() => this.connect(), Math.round(delay + jitter));
  }

  startHeartbeat() {
    this.stopHeartbeat();
    this.heartbeatInterval = setInterval(() => this.sendPing(), HEARTBEAT_INTERVAL);
  }

  sendPing() {
    if (this.ws?.readyState === WebSocket.OPEN) {
      this.ws.send(JSON.stringify({ type: 'ping' }));
      // Quirk kept: only the latest timer id is remembered.
      this.heartbeatTimeout = setTimeout(() => {
        this.ws?.close(4000, 'Heartbeat timeout');
      }, HEARTBEAT_TIMEOUT);
    }
  }

  stopHeartbeat() {
    if (this.heartbeatInterval) clearInterval(this.heartbeatInterval);
    if (this.heartbeatTimeout) clearTimeout(this.heartbeatTimeout);
    this.heartbeatInterval = null;
    this.heartbeatTimeout = null;
  }

  handleVisibilityChange() {
    if (document.visibilityState !== 'visible') return;
    if (!this.isIntentionalClose && !this.isConnected()) {
      this.reconnectAttempts = 1;
      this.connect();
    } else if (this.isConnected()) {
      this.sendPing();
    }
  }

  softDisconnect() {
    this.isIntentionalClose = true;
    if (this.reconnectTimeout) clearTimeout(this.reconnectTimeout);
    this.stopHeartbeat();
    this.ws?.close(1000, 'Soft disconnect');
    this.ws = null;
  }

  disconnect() {
    this.isIntentionalClose = true;
    if (this.reconnectTimeout) clearTimeout(this.reconnectTimeout);
    this.stopHeartbeat();
    this.ws?.close(1000);
    this.ws = null;
    this.reconnectAttempts = 0;
  }

  destroy() {
    this.disconnect();
    this.listeners.clear();
    this.connectionCallbacks.clear();
    this.maxReconnectCallbacks.clear();
  }

  on(eventType, callback) {
    if (!this.listeners.has(eventType)) this.listeners.set(eventType, new Set());
    this.listeners.get(eventType).add(callback);
    return () => this.off(eventType, callback);
  }

  off(eventType, callback) {
    const set = this.listeners.get(eventType);
    set?.delete(callback);
    if (set?.size === 0) this.listeners.delete(eventType);
  }

  notifyListeners(event) {
    this.listeners.get(event.type)?.forEach((cb) => { try { cb(event); } catch { /* logged */ } });
    this.listeners.get('*')?.forEach((cb) => { try { cb(event); } catch { /* logged */ } });
  }

  onConnectionChange(callback) {
    this.connectionCallbacks.add(callback);
    return () => this.connectionCallbacks.delete(callback);
  }

  onMaxReconnect(callback) {
    this.maxReconnectCallbacks.add(callback);
    return () => this.maxReconnectCallbacks.delete(callback);
  }

  notifyConnectionChange(connected) {
    this.connectionCallbacks.forEach((cb) => cb(connected));
  }

  isConnected() {
    return this.ws?.readyState === WebSocket.OPEN;
  }
}

/** pwaWaiter's service as it is: /ws/waiter, token not encoded, visibility handler on. */
export class LegacyWaiterService extends LegacyBaseWebSocketClient {
  token = null;

  constructor(baseUrl) {
    super({ enableVisibilityHandler: true });
    this.baseUrl = baseUrl;
  }

  getUrl() { return `${this.baseUrl}/ws/waiter`; }
  getAuthParam() { return this.token ? `token=${this.token}` : null; }

  connectWith(token) {
    this.token = token;
    this.connect();
  }
}
