// Protocol v2's pure part (positions per stream, resume, resumed) and the client's v2 decisions
// with a scripted WebSocket: subprotocol offered, resume first, no catch-up, in-band refresh.
import assert from 'node:assert/strict';
import { mock, test } from 'node:test';
import { BaseWebSocketClient, DinerClient, Positions, SUBPROTOCOL, positionOf } from '../../src/index.js';

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
/** Let promise callbacks and the scripted socket's microtasks run (setImmediate is never mocked). */
const flush = () => new Promise((r) => setImmediate(r));
const ev = (id, stream, offset) => ({ type: 'ROUND_PENDING', entity: { id }, _pos: { stream, offset } });

test('positionOf reads _pos; anything malformed is no position', () => {
  assert.deepEqual(positionOf(ev(1, '1:2', '7:1-0')), { stream: '1:2', offset: '7:1-0' });
  for (const bad of [null, 'x', {}, { _pos: null }, { _pos: [] }, { _pos: { stream: '1:2' } },
    { _pos: { stream: 1, offset: 'a' } }, { _pos: { stream: '1:2', offset: 5 } }]) {
    assert.equal(positionOf(bad), null, JSON.stringify(bad));
  }
});

test('Positions keeps the last offset per stream and builds resume (empty at first)', () => {
  const p = new Positions();
  assert.equal(p.resumeMessage(), '{"type":"resume","positions":{}}');
  assert.equal(p.track(ev(1, '1:2', 'e:1-0')), true);
  assert.equal(p.track(ev(2, '1:0', 'e:2-0')), true);
  assert.equal(p.track(ev(3, '1:2', 'e:3-0')), true);
  assert.equal(p.track({ type: 'X' }), false);
  // Offsets are opaque: the last one seen wins, never compared.
  assert.equal(p.track(ev(4, '1:0', 'a:0-0')), true);
  assert.deepEqual(p.toObject(), { '1:2': 'e:3-0', '1:0': 'a:0-0' });
  assert.equal(p.size, 2);
  assert.deepEqual(JSON.parse(p.resumeMessage()), { type: 'resume', positions: { '1:2': 'e:3-0', '1:0': 'a:0-0' } });
  const copy = p.toObject();
  copy['1:2'] = 'changed';
  assert.equal(p.toObject()['1:2'], 'e:3-0');
});

test('Positions.resumed: failed streams are reported and forgotten, replayed counted', () => {
  const p = new Positions();
  p.track(ev(1, '1:2', 'e:1-0'));
  p.track(ev(2, '1:3', 'e:2-0'));
  p.track(ev(3, '1:0', 'e:3-0'));
  const r = p.resumed({ '1:2': { recovered: true, replayed: 4 }, '1:3': { recovered: false, replayed: 0 }, '1:0': 'junk' });
  assert.deepEqual(r, { failed: ['1:3', '1:0'], replayed: 4 });
  assert.deepEqual(p.toObject(), { '1:2': 'e:1-0' });
  assert.deepEqual(p.resumed(null), { failed: [], replayed: 0 });
  assert.deepEqual(p.resumed([]), { failed: [], replayed: 0 });
});

function fakeSocketClass({ selected = SUBPROTOCOL } = {}) {
  const sockets = [];
  class FakeWebSocket {
    static OPEN = 1;
    readyState = 0;
    sent = [];
    protocol = '';
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      sockets.push(this);
      queueMicrotask(() => {
        this.readyState = 1;
        this.protocol = protocols?.includes(selected) ? selected : '';
        this.onopen?.();
      });
    }
    receive(msg) { this.onmessage?.({ data: typeof msg === 'string' ? msg : JSON.stringify(msg) }); }
    serverClose(code, reason = '') { this.readyState = 3; this.onclose?.({ code, reason }); }
    send(data) { this.sent.push(data); }
    close(code, reason) { this.readyState = 3; this.closedWith = [code, reason]; }
  }
  return { FakeWebSocket, sockets };
}

const options = (WebSocket, extra = {}) => ({
  url: 'ws://gw', endpoint: 'waiter', token: 'tok', WebSocket, logger: null, baseDelay: 1, maxDelay: 2,
  jitter: 0, branchId: 2, ...extra,
});

test('protocol v1 (default) offers no subprotocol; an unknown protocol is refused', async () => {
  const { FakeWebSocket, sockets } = fakeSocketClass();
  const client = new BaseWebSocketClient(options(FakeWebSocket));
  await client.connect();
  await sleep(5);
  assert.equal(sockets[0].protocols, undefined);
  assert.equal(client.isV2(), false);
  assert.deepEqual(sockets[0].sent, ['{"type":"ping"}']);
  client.destroy();
  assert.throws(() => new BaseWebSocketClient(options(FakeWebSocket, { protocol: 'v3' })), /unsupported protocol/);
});

test('v2: resume first on every socket, positions kept, no catch-up, no de-dup, onRecoveryFailed', async () => {
  const { FakeWebSocket, sockets } = fakeSocketClass();
  const fetched = [];
  const failed = [];
  const client = new BaseWebSocketClient(options(FakeWebSocket, {
    protocol: 'v2', fetch: async (url) => { fetched.push(url); return { status: 200, json: async () => ({ events: [] }) }; },
    onRecoveryFailed: (s) => failed.push(['option', s]),
  }));
  client.onRecoveryFailed((s) => failed.push(['method', s]));
  const got = [];
  client.on('*', (e) => got.push(e.entity.id));
  await client.connect();
  await sleep(5);
  const [first] = sockets;
  assert.deepEqual(first.protocols, [SUBPROTOCOL]);
  assert.equal(client.isV2(), true);
  assert.deepEqual(first.sent, ['{"type":"resume","positions":{}}', '{"type":"ping"}']);
  first.receive({ type: 'welcome', protocol: 2, exp: null });
  first.receive({ type: 'resumed', streams: {} });
  first.receive(ev('a', '1:2', 'x:1'));
  first.receive(ev('a', '1:2', 'x:2')); // same body, another position: v2 does not de-duplicate
  first.receive(ev('b', '1:0', 'x:3'));
  assert.deepEqual(got, ['a', 'a', 'b']);
  assert.deepEqual(client.getPositions(), { '1:2': 'x:2', '1:0': 'x:3' });
  first.serverClose(1012, 'Server restart');
  await sleep(30);
  const second = sockets[1];
  assert.ok(second, 'reconnected');
  assert.deepEqual(JSON.parse(second.sent[0]), { type: 'resume', positions: { '1:2': 'x:2', '1:0': 'x:3' } });
  second.receive({ type: 'resumed', streams: { '1:2': { recovered: true, replayed: 1 }, '1:0': { recovered: false, replayed: 0 } } });
  assert.deepEqual(failed, [['option', ['1:0']], ['method', ['1:0']]]);
  assert.deepEqual(client.getPositions(), { '1:2': 'x:2' });
  await sleep(10);
  assert.deepEqual(fetched, [], 'no HTTP catch-up on a v2 socket');
  const s = client.stats;
  assert.deepEqual([s.v2Opens, s.resumes, s.replayed, s.recoveryFailures, s.duplicatesDropped, s.catchupRequests], [2, 2, 1, 1, 0, 0]);
  client.destroy();
});

test('v2 offered but not selected: exactly v1 (no resume, catch-up after a reconnect)', async () => {
  const { FakeWebSocket, sockets } = fakeSocketClass({ selected: 'none' });
  const fetched = [];
  const client = new BaseWebSocketClient(options(FakeWebSocket, {
    protocol: 'v2', fetch: async (url) => { fetched.push(url); return { status: 200, json: async () => ({ events: [] }) }; },
  }));
  await client.connect();
  await sleep(5);
  assert.equal(client.isV2(), false);
  assert.deepEqual(sockets[0].sent, ['{"type":"ping"}']);
  sockets[0].serverClose(1012);
  await sleep(30);
  assert.deepEqual(sockets[1].sent, ['{"type":"ping"}']);
  assert.equal(fetched.length, 1);
  client.destroy();
});

test('v2 in-band refresh before exp with getToken; a refused one keeps the socket and is tried again', async () => {
  mock.timers.enable({ apis: ['setTimeout', 'setInterval', 'Date'], now: Date.now() });
  try {
    const { FakeWebSocket, sockets } = fakeSocketClass();
    let calls = 0;
    const refused = [];
    const client = new BaseWebSocketClient(options(FakeWebSocket, {
      protocol: 'v2', token: undefined, getToken: async () => `t${++calls}`, onRefreshFailed: (r) => refused.push(r),
      pingInterval: 3600000, pongTimeout: 3600000,
    }));
    client.connect();
    await flush();
    const [first] = sockets;
    assert.equal(calls, 1);
    const lastSent = () => JSON.parse(first.sent.at(-1));
    // exp in 100 s: refreshed in-band 20 s before it (a fifth of the remaining life).
    first.receive({ type: 'welcome', protocol: 2, exp: Date.now() / 1000 + 100 });
    mock.timers.tick(80000);
    await flush();
    assert.deepEqual(lastSent(), { type: 'refresh', token: 't2' });
    first.receive({ type: 'refresh_failed', reason: 'unavailable' });
    // Refused with 20 s left: the socket stays, the reason is surfaced, getToken() again in 5 s.
    assert.equal(first.closedWith, undefined);
    assert.deepEqual(refused, ['unavailable']);
    mock.timers.tick(4900);
    await flush();
    assert.equal(calls, 2);
    mock.timers.tick(100);
    await flush();
    assert.deepEqual(lastSent(), { type: 'refresh', token: 't3' });
    first.receive({ type: 'refresh_failed', reason: 'unavailable' });
    mock.timers.tick(5000);
    await flush();
    assert.deepEqual(lastSent(), { type: 'refresh', token: 't4' });
    assert.equal(sockets.length, 1);
    // Refused with 10 s left: replace the socket before the old expiry closes it 4001.
    first.receive({ type: 'refresh_failed', reason: 'revoked' });
    await flush();
    assert.deepEqual(first.closedWith, [1000, 'Soft disconnect']);
    assert.equal(sockets.length, 2);
    assert.ok(sockets[1].url.endsWith('token=t5'));
    const second = sockets[1];
    second.receive({ type: 'welcome', protocol: 2, exp: Date.now() / 1000 + 100 });
    mock.timers.tick(80000);
    await flush();
    assert.deepEqual(JSON.parse(second.sent.at(-1)), { type: 'refresh', token: 't6' });
    second.receive({ type: 'refreshed', exp: Date.now() / 1000 + 3600 });
    assert.deepEqual(refused, ['unavailable', 'unavailable', 'revoked']);
    assert.deepEqual([client.stats.inbandRefreshes, client.stats.refreshFailures, sockets.length], [1, 3, 2]);
    client.destroy();
  } finally {
    mock.timers.reset();
  }
});

test('updateToken on a v2 socket: in-band, same socket; refused: socket kept with its old token', async () => {
  const { FakeWebSocket, sockets } = fakeSocketClass();
  const refused = [];
  const client = new BaseWebSocketClient(options(FakeWebSocket, { protocol: 'v2', token: 'old' }));
  client.onRefreshFailed((r) => refused.push(r));
  await client.connect();
  await sleep(5);
  const [first] = sockets;
  // Not admitted yet (no welcome): a soft reconnect, as on v1.
  client.updateToken('early');
  await sleep(5);
  assert.deepEqual(first.closedWith, [1000, 'Soft disconnect']);
  const second = sockets[1];
  assert.ok(second.url.endsWith('token=early'));
  second.receive({ type: 'welcome', protocol: 2, exp: Date.now() / 1000 + 3600 });
  second.receive({ type: 'resumed', streams: {} });
  client.updateToken('good');
  await sleep(5);
  assert.deepEqual(JSON.parse(second.sent.at(-1)), { type: 'refresh', token: 'good' });
  second.receive({ type: 'refreshed', exp: Date.now() / 1000 + 7200 });
  client.updateToken('bad');
  await sleep(5);
  assert.deepEqual(JSON.parse(second.sent.at(-1)), { type: 'refresh', token: 'bad' });
  second.receive({ type: 'refresh_failed', reason: 'other_principal' });
  second.receive(ev('a', '1:2', 'x:1'));
  assert.equal(sockets.length, 2, 'never reconnected for a refresh');
  assert.equal(second.closedWith, undefined);
  assert.equal(client.isConnected(), true);
  assert.deepEqual(refused, ['other_principal']);
  assert.deepEqual([client.stats.inbandRefreshes, client.stats.refreshFailures, client.stats.opens], [1, 1, 2]);
  // The next socket connects with the credential the gateway accepted last, not the refused one.
  second.serverClose(1012, 'Server restart');
  await sleep(30);
  assert.ok(sockets[2].url.endsWith('token=good'), sockets[2].url);
  client.destroy();
});

test('updateToken on v2: a socket lost before the answer reconnects with the new token; v1 soft-reconnects', async () => {
  const { FakeWebSocket, sockets } = fakeSocketClass();
  const client = new BaseWebSocketClient(options(FakeWebSocket, { protocol: 'v2', token: 'old' }));
  await client.connect();
  await sleep(5);
  sockets[0].receive({ type: 'welcome', protocol: 2, exp: null });
  client.updateToken('new');
  await sleep(5);
  assert.deepEqual(JSON.parse(sockets[0].sent.at(-1)), { type: 'refresh', token: 'new' });
  sockets[0].serverClose(1006);
  await sleep(30);
  assert.ok(sockets[1].url.endsWith('token=new'), sockets[1].url);
  client.destroy();

  const v1 = fakeSocketClass();
  const plain = new BaseWebSocketClient(options(v1.FakeWebSocket, { token: 'old' }));
  await plain.connect();
  await sleep(5);
  plain.updateToken('new');
  await sleep(5);
  assert.deepEqual(v1.sockets[0].closedWith, [1000, 'Soft disconnect']);
  assert.ok(v1.sockets[1].url.endsWith('token=new'));
  assert.equal(v1.sockets[0].sent.some((m) => m.includes('refresh')), false);
  plain.destroy();
});

test('updateToken() without a token on v2 asks getToken(); none is a refusal that keeps the socket', async () => {
  const { FakeWebSocket, sockets } = fakeSocketClass();
  let next = 'fresh';
  const refused = [];
  const client = new BaseWebSocketClient(options(FakeWebSocket, {
    protocol: 'v2', token: undefined, getToken: async () => next, onRefreshFailed: (r) => refused.push(r),
  }));
  await client.connect();
  await sleep(5);
  sockets[0].receive({ type: 'welcome', protocol: 2, exp: null });
  client.refreshToken();
  await sleep(5);
  assert.deepEqual(JSON.parse(sockets[0].sent.at(-1)), { type: 'refresh', token: 'fresh' });
  next = null;
  client.refreshToken();
  await sleep(5);
  assert.deepEqual(refused, ['missing_token']);
  assert.equal(sockets.length, 1);
  assert.equal(sockets[0].closedWith, undefined);
  client.destroy();
});

test('DinerClient.tableToken is the token in use: a refused in-band refresh never becomes it', async () => {
  const { FakeWebSocket, sockets } = fakeSocketClass();
  const diner = new DinerClient(options(FakeWebSocket, { endpoint: undefined, token: 'table-old' }));
  await diner.connect();
  await sleep(5);
  const [socket] = sockets;
  socket.receive({ type: 'welcome', protocol: 2, exp: Date.now() / 1000 + 3600 });
  socket.receive({ type: 'resumed', streams: {} });
  diner.updateToken('table-bad');
  await sleep(5);
  socket.receive({ type: 'refresh_failed', reason: 'other_principal' });
  assert.equal(diner.tableToken, 'table-old');
  diner.updateToken('table-new');
  await sleep(5);
  socket.receive({ type: 'refreshed', exp: Date.now() / 1000 + 7200 });
  assert.equal(diner.tableToken, 'table-new');
  assert.equal(diner.getActiveToken(), 'table-new');
  diner.destroy();
});
