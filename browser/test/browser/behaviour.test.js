// Final close codes, catch-up without duplicates (legacy table token), getToken before expiry,
// backoff that keeps growing against accept-then-close (1008), and the BaseWebSocketClient drop-in.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { envelope, environment, labAttempts, labEventIds, mint, publishChannel, publishStream, sleep, waitFor } from './harness.js';

let env;
let page;
before(async () => {
  env = await environment();
  page = await env.browser.newLab(env.stat);
});
after(async () => env?.close());

const ids = (name) => labEventIds(page, name);
const attemptsFor = (token) => labAttempts(page, token);

test('4001 and 4003 are final: one attempt, state closed, onMaxReconnect and onFinalClose called', async () => {
  const kitchen = await mint(env.gw, { kind: 'staff', user: 31, roles: ['KITCHEN'], branches: [2] });
  const table = await mint(env.gw, { kind: 'table', session: 31 });
  const tampered = table.slice(0, -3) + (table.endsWith('AAA') ? 'BBB' : 'AAA');
  await page.evaluate(({ ws, kitchen, tampered }) => {
    // A kitchen token on /ws/admin: 4003 Access denied. A tampered table token: 4001.
    track('denied', new lib.AdminClient({ url: ws, token: kitchen, baseDelay: 100 })).connect();
    track('badtoken', new lib.DinerClient({ url: ws, token: tampered, baseDelay: 100 })).connect();
  }, { ws: env.gw.ws, kitchen, tampered });
  await waitFor(() => page.evaluate(() => log.denied.final && log.badtoken.final), { message: 'final closes' });
  await sleep(1500); // ten times the backoff base: a retry would have happened
  const [denied, bad] = await page.evaluate(() => [log.denied, log.badtoken]);
  assert.deepEqual(denied.final, { code: 4003, reason: 'Access denied' });
  assert.deepEqual(bad.final, { code: 4001, reason: 'Authentication failed' });
  for (const entry of [denied, bad]) {
    assert.equal(entry.states.at(-1), 'closed');
    assert.equal(entry.maxReconnect, 1);
  }
  assert.equal(await attemptsFor(kitchen), 1);
  assert.equal(await attemptsFor(tampered), 1);
});

test('4029 (flood) is final too', async () => {
  const token = await mint(env.gw, { kind: 'staff', user: 32, roles: ['WAITER'], branches: [2] });
  await page.evaluate(({ ws, token }) => track('flood', new lib.WaiterClient({ url: ws, token, baseDelay: 100 })).connect(),
    { ws: env.gw.ws, token });
  await waitFor(() => page.evaluate(() => clients.flood.stats.pongs >= 1), { message: 'admitted' });
  await page.evaluate(() => { for (let i = 0; i < 40; i++) clients.flood.ws.send('hello'); });
  await waitFor(() => page.evaluate(() => log.flood.final), { message: '4029' });
  await sleep(1000);
  assert.deepEqual(await page.evaluate(() => [log.flood.final.code, clients.flood.getState()]), [4029, 'closed']);
  assert.equal(await attemptsFor(token), 1);
});

test('diner with a legacy table token: catch-up after a reconnect, no duplicates, order kept', async () => {
  const token = await mint(env.gw, { kind: 'legacy', branch: 2, table: 7, session: 33, ttl: 3600 });
  assert.ok(!token.includes('.'));
  await page.evaluate(({ ws, token }) => track('diner', new lib.DinerClient({ url: ws, token, baseDelay: 3000, jitter: 0, protocol: 'v1' })).connect(),
    { ws: env.gw.ws, token });
  await waitFor(() => page.evaluate(() => clients.diner.stats.pongs >= 1), { message: 'admitted' });
  assert.equal(await page.evaluate(() => clients.diner.getSessionId()), 33);
  const session = (id, type = 'CART_ITEM_ADDED') => envelope(type, { session_id: 33, table_id: 7, entity: { id } });
  // Pub/sub and the stream are separate paths with no order between them: one at a time.
  await publishChannel(env.redis, 'session:33', session('c1'));
  await waitFor(async () => (await ids('diner')).length === 1, { message: 'c1 live' });
  await publishStream(env.redis, session('c2', 'ROUND_SUBMITTED'));
  await waitFor(async () => (await ids('diner')).length === 2, { message: 'c2 live' });
  // The socket drops (as a network change would): the client reconnects after its 3 s backoff.
  await page.evaluate(() => clients.diner.ws.close(4000, 'network change'));
  await waitFor(() => page.evaluate(() => clients.diner.getState() === 'reconnecting'), { message: 'reconnecting' });
  for (const id of ['c3', 'c4']) await publishChannel(env.redis, 'session:33', session(id));
  await publishStream(env.redis, session('c5', 'ROUND_READY'));
  await waitFor(() => page.evaluate(() => clients.diner.stats.catchupRequests >= 1 && clients.diner.getState() === 'connected'),
    { message: 'reconnected with catch-up' });
  await publishChannel(env.redis, 'session:33', session('c6'));
  await waitFor(async () => (await ids('diner')).includes('c6'), { message: 'c6' });
  await sleep(300);
  const got = await ids('diner');
  // c3..c5 come from catch-up, in the order the gateway stored them, before the live c6.
  assert.deepEqual([got.slice(0, 2), [...got.slice(2, 5)].sort(), got.slice(5)], [['c1', 'c2'], ['c3', 'c4', 'c5'], ['c6']]);
  const s = await page.evaluate(() => clients.diner.stats);
  assert.ok(s.catchupEvents >= 1, `${s.catchupEvents} events from catch-up`);
  assert.ok(s.duplicatesDropped >= 1, 'c1/c2 came back in the catch-up margin and were dropped');
  await page.evaluate(() => clients.diner.destroy());
});

test('getToken is called before exp: 5 s tokens, the socket keeps receiving, no 4001', async () => {
  await page.evaluate(({ ws, http }) => {
    window.tokenCalls = 0;
    const getToken = async () => {
      window.tokenCalls += 1;
      return mint(http, { kind: 'staff', user: 34, roles: ['WAITER'], branches: [2], ttl: 5 });
    };
    track('short', new lib.WaiterClient({ url: ws, getToken, branchId: 2 })).connect();
  }, { ws: env.gw.ws, http: env.gw.url });
  await waitFor(() => page.evaluate(() => clients.short.stats.pongs >= 1), { message: 'admitted' });
  const sent = [];
  const end = Date.now() + 13000;
  for (let i = 0; Date.now() < end; i++) {
    const id = `t${i}`;
    sent.push(id);
    await publishStream(env.redis, envelope('ROUND_PENDING', { entity: { id } }));
    await sleep(400);
  }
  await waitFor(async () => (await ids('short')).includes(sent.at(-1)), { message: 'last event' });
  await sleep(300);
  const got = await ids('short');
  assert.deepEqual(got, sent, 'every event once, in order');
  const [calls, closes, final] = await page.evaluate(() => [tokenCalls, log.short.closes, log.short.final]);
  assert.ok(calls >= 3, `getToken called ${calls} times`);
  assert.equal(final, null);
  assert.ok(closes.every((c) => c.code === 1000 && c.reason === 'Soft disconnect'), JSON.stringify(closes));
  await page.evaluate(() => clients.short.destroy());
});

test('refused at the per-user limit (HTTP 429 before the upgrade, seen as 1006): the backoff keeps growing', async () => {
  const token = await mint(env.gw, { kind: 'staff', user: 35, roles: ['WAITER'], branches: [2], ttl: 3600 });
  await page.evaluate(({ ws, token }) => {
    for (const n of ['u1', 'u2', 'u3']) track(n, new lib.WaiterClient({ url: ws, token })).connect();
  }, { ws: env.gw.ws, token });
  await waitFor(() => page.evaluate(() => ['u1', 'u2', 'u3'].every((n) => clients[n].stats.pongs >= 1)), { message: 'three admitted' });
  const t0 = await page.evaluate(({ ws, token }) => {
    track('u4', new lib.WaiterClient({ url: ws, token, jitter: 0 })).connect();
    return performance.now();
  }, { ws: env.gw.ws, token });
  await waitFor(() => page.evaluate(() => clients.u4.reconnectAttempts >= 3), { timeout: 40000, message: 'three refusals' });
  const closes = await page.evaluate(() => log.u4.closes.map((c) => [c.code, c.t]));
  // D22: the gateway refuses before the upgrade, so the browser reports 1006 and onopen never runs.
  assert.ok(closes.every(([code]) => code === 1006), JSON.stringify(closes));
  // Attempts 2, 3 and 4 started at least 1, 2 and 4 s after the previous refusal.
  const starts = await page.evaluate(({ t0, token }) => wsAttempts.filter((a) => a.t >= t0 && a.url.includes(token)).map((a) => a.t),
    { t0, token: encodeURIComponent(token) });
  const gaps = starts.slice(1).map((t, i) => t - closes[i][1]);
  gaps.forEach((gap, i) => assert.ok(gap >= 2 ** i * 1000 - 50, `gap ${i + 1}: ${gap} ms`));
  // A slot frees: the waiting client gets in on its next attempt.
  await page.evaluate(() => clients.u1.destroy());
  await waitFor(() => page.evaluate(() => clients.u4.stats.pongs >= 1), { timeout: 40000, message: 'u4 admitted' });
  assert.equal(await page.evaluate(() => clients.u4.reconnectAttempts), 0);
  await page.evaluate(() => ['u2', 'u3', 'u4'].forEach((n) => clients[n].destroy()));
});

test('BaseWebSocketClient drop-in: a subclass written like the apps services keeps its endpoint on reconnect', async () => {
  const token = await mint(env.gw, { kind: 'staff', user: 36, roles: ['KITCHEN'], branches: [2], ttl: 3600 });
  await page.evaluate(({ ws, http, token }) => {
    // Written like Dashboard/src/services/websocket.ts against shared/websocket-client.ts.
    const make = (Base) => class DashboardWebSocket extends Base {
      endpoint = 'admin';
      token = null;
      branchId = null;
      connect(endpoint = 'admin') {
        this.endpoint = endpoint;
        return super.connect();
      }
      getUrl() { return `${ws}/ws/${this.endpoint}`; }
      getAuthParam() { return this.token ? `token=${encodeURIComponent(this.token)}` : null; }
      setToken(t) { this.token = t; }
      setBranchId(id) { this.branchId = id; super.setBranchId?.(id); }
      onOpen(wasReconnect) {
        if (wasReconnect && this.lastEventTimestamp > 0 && this.branchId) this.catchUpEvents();
      }
      async catchUpEvents() {
        const since = this.lastEventTimestamp;
        const r = await fetch(`${http}/ws/catchup?branch_id=${this.branchId}&since=${since}&token=${encodeURIComponent(this.token)}`);
        if (!r.ok) return;
        const data = await r.json();
        for (const event of data.events) this.notifyListeners(event);
        this.lastEventTimestamp = Date.now() / 1000;
      }
    };
    window.NewDashboard = make(lib.BaseWebSocketClient);
    window.OldDashboard = make(legacy.LegacyBaseWebSocketClient);
    for (const [name, Class] of [['dropin', NewDashboard], ['old', OldDashboard]]) {
      const c = new Class(Class === NewDashboard ? { baseDelay: 300, jitter: 0 } : undefined);
      c.setToken(token);
      c.setBranchId(2);
      track(name, c);
      c.connect('kitchen');
    }
  }, { ws: env.gw.ws, http: env.gw.url, token });
  await waitFor(() => page.evaluate(() => clients.dropin.isConnected() && clients.old.isConnected()), { message: 'both open' });
  await sleep(300);
  await publishStream(env.redis, envelope('ROUND_SUBMITTED', { entity: { id: 'k1' } }));
  await waitFor(async () => (await ids('dropin')).length === 1 && (await ids('old')).length === 1, { message: 'k1' });
  // Both lose their socket.
  await page.evaluate(() => { clients.dropin.ws.close(4000, 'drop'); clients.old.ws.close(4000, 'drop'); });
  await publishStream(env.redis, envelope('ROUND_SUBMITTED', { entity: { id: 'k2' } }));
  await waitFor(() => page.evaluate(() => clients.dropin.isConnected() && clients.dropin.stats.catchupRequests >= 1),
    { message: 'drop-in back' });
  await waitFor(async () => (await ids('dropin')).includes('k2'), { message: 'k2 via catch-up' });
  await sleep(500);
  // Its own catch-up and the subclass's both ran; notifyListeners dropped the copies.
  assert.deepEqual(await ids('dropin'), ['k1', 'k2']);
  await waitFor(() => page.evaluate(() => log.old.closes.some((c) => c.code === 4003)), { message: 'old base: 4003 on /ws/admin' });
  const urls = await page.evaluate((t) => wsAttempts.filter((a) => a.url.includes(t)).map((a) => new URL(a.url).pathname),
    encodeURIComponent(token));
  // The drop-in reconnected to /ws/kitchen; the old base called this.connect() and went to /ws/admin,
  // where a kitchen token is refused for good (4003).
  assert.deepEqual(urls.filter((p) => p === '/ws/kitchen').length, 3, urls.join(' '));
  assert.ok(urls.includes('/ws/admin'));
  await page.evaluate(() => { clients.dropin.destroy(); clients.old.destroy(); });
});
