// BaseWebSocketClient's decisions with a scripted WebSocket (no network): attempts, final codes,
// the healthy reset, the per-ping timers. The real gateway and Chromium are in test/browser/.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { BaseWebSocketClient, PING_FRAME } from '../../src/index.js';

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A WebSocket whose behaviour each test scripts through `script(ws)`. */
function fakeSocketClass(script) {
  const sockets = [];
  class FakeWebSocket {
    static OPEN = 1;
    readyState = 0;
    sent = [];
    constructor(url) {
      this.url = url;
      sockets.push(this);
      queueMicrotask(() => script(this, sockets.length));
    }
    open() { this.readyState = 1; this.onopen?.(); }
    receive(data) { this.onmessage?.({ data }); }
    serverClose(code, reason = '') { this.readyState = 3; this.onclose?.({ code, reason }); }
    send(data) { this.sent.push(data); }
    close(code, reason) { this.readyState = 3; this.closedWith = [code, reason]; }
  }
  return { FakeWebSocket, sockets };
}

const options = (WebSocket, extra = {}) => ({
  url: 'ws://gw', endpoint: 'waiter', token: 'tok', WebSocket, logger: null, baseDelay: 1, maxDelay: 2,
  jitter: 0, catchup: false, ...extra,
});

test('refused before open every time: 50 reconnect attempts, then closed and onMaxReconnect', async () => {
  const { FakeWebSocket, sockets } = fakeSocketClass((ws) => ws.serverClose(1006));
  const client = new BaseWebSocketClient(options(FakeWebSocket));
  let gaveUp = 0;
  client.onMaxReconnect(() => { gaveUp += 1; });
  client.connect();
  for (let i = 0; i < 400 && client.getState() !== 'closed'; i++) await sleep(5);
  assert.equal(client.getState(), 'closed');
  assert.equal(gaveUp, 1);
  assert.equal(sockets.length, 51, 'the first attempt and 50 reconnects');
  assert.equal(sockets[0].url, 'ws://gw/ws/waiter?token=tok');
  // connect() starts over.
  client.connect();
  await sleep(5);
  assert.ok(sockets.length > 51);
  client.destroy();
});

test('accept then close (1008): the counter keeps growing; a pong resets it', async () => {
  let admit = false;
  const { FakeWebSocket, sockets } = fakeSocketClass((ws) => {
    ws.open();
    if (admit) ws.receive('{"type":"pong"}');
    else ws.serverClose(1008, 'Too many connections');
  });
  const client = new BaseWebSocketClient(options(FakeWebSocket, { maxDelay: 5 }));
  const attempts = [];
  client.onClose = () => attempts.push(client.reconnectAttempts);
  client.connect();
  while (sockets.length < 5) await sleep(2);
  assert.deepEqual(attempts.slice(0, 4), [0, 1, 2, 3], 'open does not reset the counter');
  admit = true;
  await sleep(30);
  assert.equal(client.getState(), 'connected');
  assert.equal(client.reconnectAttempts, 0);
  assert.equal(sockets.at(-1).sent[0], PING_FRAME, 'a ping at open proves the socket healthy');
  client.destroy();
});

for (const code of [4001, 4003, 4029]) {
  test(`${code} is final: no reconnect, state closed, callbacks`, async () => {
    const { FakeWebSocket, sockets } = fakeSocketClass((ws) => { ws.open(); ws.serverClose(code, 'x'); });
    const client = new BaseWebSocketClient(options(FakeWebSocket));
    const seen = [];
    client.onFinalClose((c) => seen.push(c));
    client.onMaxReconnect(() => seen.push('max'));
    client.connect();
    await sleep(30);
    assert.equal(sockets.length, 1);
    assert.equal(client.getState(), 'closed');
    assert.deepEqual(seen, [code, 'max']);
    assert.deepEqual(client.getFinalClose(), { code, reason: 'x' });
    client.destroy();
  });
}

test('heartbeat: one timer per ping, FIFO; a missing pong closes 4000 and reconnects', async () => {
  let answer = true;
  const { FakeWebSocket, sockets } = fakeSocketClass((ws) => {
    const send = ws.send.bind(ws);
    ws.send = (data) => { send(data); if (answer) queueMicrotask(() => ws.receive('{"type":"pong"}')); };
    ws.open();
  });
  const client = new BaseWebSocketClient(options(FakeWebSocket, { pingInterval: 10, pongTimeout: 40 }));
  client.connect();
  await sleep(100);
  for (let i = 0; i < 5; i++) client.ping();
  await sleep(100);
  assert.equal(client.stats.heartbeatTimeouts, 0);
  assert.equal(sockets.length, 1);
  assert.ok(sockets[0].sent.every((f) => f === PING_FRAME) && sockets[0].sent.length > 10);
  answer = false;
  await sleep(120);
  assert.ok(client.stats.heartbeatTimeouts >= 1);
  assert.deepEqual(sockets[0].closedWith, [4000, 'Heartbeat timeout']);
  assert.ok(sockets.length >= 2, 'reconnected');
  client.destroy();
});

test('intentional close never reconnects; softDisconnect + connect() reopens', async () => {
  const { FakeWebSocket, sockets } = fakeSocketClass((ws) => ws.open());
  const client = new BaseWebSocketClient(options(FakeWebSocket));
  client.connect();
  await sleep(5);
  client.softDisconnect();
  assert.deepEqual(sockets[0].closedWith, [1000, 'Soft disconnect']);
  await sleep(20);
  assert.equal(sockets.length, 1);
  assert.equal(client.getState(), 'disconnected');
  client.connect();
  await sleep(5);
  assert.equal(client.getState(), 'connected');
  client.disconnect();
  assert.deepEqual(sockets[1].closedWith, [1000, '']);
  client.destroy();
});

test('catch-up URL: staff branch, diner session from a legacy token, http base, margin', async () => {
  const urls = [];
  const fetch = async (url) => { urls.push(url); return { status: 200, json: async () => ({ events: [] }) }; };
  let n = 0;
  const { FakeWebSocket } = fakeSocketClass((ws) => { ws.open(); if (++n === 1) ws.serverClose(1012); });
  const diner = new BaseWebSocketClient(options(FakeWebSocket, {
    url: 'wss://gw.example', endpoint: 'diner', token: '1:2:5:9:1800000000:abc', catchup: true, fetch,
  }));
  diner.connect();
  await sleep(30);
  assert.equal(urls.length, 1);
  const u = new URL(urls[0]);
  assert.equal(`${u.origin}${u.pathname}`, 'https://gw.example/ws/catchup/session');
  assert.equal(u.searchParams.get('session_id'), '9');
  assert.equal(u.searchParams.get('table_token'), '1:2:5:9:1800000000:abc');
  const since = Number(u.searchParams.get('since'));
  assert.ok(Math.abs(Date.now() / 1000 - 2 - since) < 1, `since ${since} is the last open minus 2 s`);
  diner.destroy();
});
