// Test page: the library and the legacy reproduction on window, WebSocket constructions counted
// and every frame each socket received recorded as it came off the wire, before the library.
import * as lib from '../../src/index.js';
import * as legacy from '../legacy/legacy-client.js';

const NativeWebSocket = window.WebSocket;
window.wsAttempts = [];
window.WebSocket = class CountingWebSocket extends NativeWebSocket {
  constructor(url, protocols) {
    super(url, protocols);
    // frames: the type of every JSON frame (events included); ids: each event's entity id or seq.
    const attempt = { t: performance.now(), url: String(url), frames: [], ids: [] };
    window.wsAttempts.push(attempt);
    this.addEventListener('message', (ev) => {
      let msg;
      try { msg = JSON.parse(ev.data); } catch { return; }
      if (!msg || typeof msg !== 'object') return;
      attempt.frames.push(msg.type);
      if (msg.entity && typeof msg.entity === 'object') attempt.ids.push(msg.entity.id ?? msg.entity.seq);
    });
  }
};

window.lib = lib;
window.legacy = legacy;
window.clients = {};
window.log = {};

/** Record a client's events, states and closes under `name`. */
window.track = (name, client) => {
  const entry = { events: [], states: [], closes: [], maxReconnect: 0, final: null, connection: [] };
  window.log[name] = entry;
  window.clients[name] = client;
  client.on('*', (e) => entry.events.push(e));
  client.onStateChange?.((s) => entry.states.push(s));
  client.onMaxReconnect(() => { entry.maxReconnect += 1; });
  client.onFinalClose?.((code, reason) => { entry.final = { code, reason }; });
  client.onConnectionChange((c) => entry.connection.push(c));
  const onClose = client.onClose.bind(client);
  client.onClose = (code, reason) => { entry.closes.push({ code, reason, t: performance.now() }); onClose(code, reason); };
  return client;
};

/** Visibility: a hidden-then-visible page, as when a phone unlocks. */
window.setVisibility = (state) => {
  Object.defineProperty(document, 'visibilityState', { configurable: true, get: () => state });
  Object.defineProperty(document, 'hidden', { configurable: true, get: () => state !== 'visible' });
  document.dispatchEvent(new Event('visibilitychange'));
};

window.mint = async (gatewayUrl, body) => {
  const r = await fetch(`${gatewayUrl}/ws/dev/token`, {
    method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body),
  });
  return (await r.json()).token;
};
window.labReady = true;
