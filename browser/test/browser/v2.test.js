// Protocol v2 in Chromium against the real gateway: the in-band credential refresh, automatic
// (getToken() before exp) and by updateToken(), that keeps one socket open; a refused one leaves
// the socket on its old expiry. The crash and restart test is v2-crash.test.js.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { envelope, environment, labAttempts, labEventIds, mint, publishStream, sleep, waitFor } from './harness.js';

let env;
let page;
before(async () => {
  env = await environment();
  page = await env.browser.newLab(env.stat);
});
after(async () => env?.close());

const ids = (name) => labEventIds(page, name);
const attemptsFor = (token) => labAttempts(page, token);

test('v2 in-band refresh: 5 s tokens, one socket still open and receiving at 10 s, never reconnected', async () => {
  await page.evaluate(({ ws, http }) => {
    window.tokens = [];
    const getToken = async () => {
      const t = await mint(http, { kind: 'staff', user: 42, roles: ['WAITER'], branches: [2], ttl: 5 });
      window.tokens.push(t);
      return t;
    };
    track('inband', new lib.WaiterClient({ url: ws, getToken, branchId: 2, protocol: 'v2' })).connect();
  }, { ws: env.gw.ws, http: env.gw.url });
  await waitFor(() => page.evaluate(() => clients.inband.stats.pongs >= 1), { message: 'admitted' });
  const started = Date.now();
  assert.equal(await page.evaluate(() => clients.inband.isV2()), true);
  const sent = [];
  for (let i = 0; Date.now() - started < 11000; i++) {
    const id = `r${i}`;
    sent.push(id);
    await publishStream(env.redis, envelope('ROUND_PENDING', { entity: { id } }));
    await sleep(400);
  }
  await waitFor(async () => (await ids('inband')).includes(sent.at(-1)), { message: 'last event' });
  await sleep(300);
  assert.deepEqual(await ids('inband'), sent, 'every event once, in order');
  const [s, closes, connected, firstToken] = await page.evaluate(() => [
    clients.inband.stats, log.inband.closes, clients.inband.isConnected(), window.tokens[0]]);
  assert.equal(connected, true);
  assert.equal(s.opens, 1, 'one onopen');
  assert.deepEqual(closes, []);
  assert.equal(await attemptsFor(firstToken), 1);
  // The later tokens went in-band: no socket was ever opened with one of them.
  assert.equal(await page.evaluate(() => wsAttempts.filter((a) => tokens.slice(1).some((t) => a.url.includes(encodeURIComponent(t)))).length), 0);
  assert.ok(s.inbandRefreshes >= 2, `${s.inbandRefreshes} in-band refreshes`);
  assert.equal(s.refreshFailures, 0);
  assert.equal(s.getTokenCalls, s.inbandRefreshes + 1);
  await page.evaluate(() => clients.inband.destroy());
});

/** The raw frames (JSON `type`s) and event ids each socket opened with `token` received. */
const socketsOf = (token) => page.evaluate((t) => wsAttempts.filter((a) => a.url.includes(t)).map((a) => ({ frames: a.frames, ids: a.ids })),
  encodeURIComponent(token));

test('v2 updateToken(): refreshed in-band on the same socket, no new welcome, events keep arriving', async () => {
  const token = await mint(env.gw, { kind: 'staff', user: 43, roles: ['WAITER'], branches: [2], ttl: 600 });
  await page.evaluate(({ ws, token }) => {
    window.refusals43 = [];
    track('update', new lib.WaiterClient({ url: ws, token, branchId: 2, onRefreshFailed: (r) => refusals43.push(r) })).connect();
  }, { ws: env.gw.ws, token });
  await waitFor(() => page.evaluate(() => clients.update.stats.pongs >= 1), { message: 'admitted' });
  assert.equal(await page.evaluate(() => clients.update.isV2()), true);
  const sent = [];
  const publish = async (id) => {
    sent.push(id);
    await publishStream(env.redis, envelope('ROUND_PENDING', { entity: { id } }));
  };
  for (const id of ['u1', 'u2', 'u3']) await publish(id);
  await waitFor(async () => (await ids('update')).length === 3, { message: 'events before the update' });
  const fresh = await mint(env.gw, { kind: 'staff', user: 43, roles: ['WAITER'], branches: [2], ttl: 1800 });
  await page.evaluate((t) => clients.update.updateToken(t), fresh);
  await waitFor(() => page.evaluate(() => clients.update.stats.inbandRefreshes === 1), { message: 'refreshed' });
  for (const id of ['u4', 'u5', 'u6']) await publish(id);
  await waitFor(async () => (await ids('update')).length === 6, { message: 'events after the update' });
  await sleep(300);
  assert.deepEqual(await ids('update'), sent, 'every event once, in order');
  const [s, closes, connected, refusals] = await page.evaluate(() => [
    clients.update.stats, log.update.closes, clients.update.isConnected(), refusals43]);
  assert.equal(connected, true);
  assert.deepEqual(closes, [], 'the socket was never closed');
  assert.equal(s.opens, 1);
  assert.deepEqual([s.inbandRefreshes, s.refreshFailures], [1, 0]);
  assert.deepEqual(refusals, []);
  // One socket in all, with one welcome and one refreshed; none was opened with the new token.
  const [socket, ...others] = await socketsOf(token);
  assert.deepEqual(others, []);
  assert.deepEqual(await socketsOf(fresh), []);
  const count = (type) => socket.frames.filter((f) => f === type).length;
  assert.deepEqual([count('welcome'), count('resumed'), count('refreshed'), count('refresh_failed')], [1, 1, 1, 0]);
  assert.deepEqual(socket.ids, sent);
  await page.evaluate(() => clients.update.destroy());
});

test('v2 updateToken() with a refused token: refresh_failed, the socket runs on until its old exp closes it 4001', async () => {
  const token = await mint(env.gw, { kind: 'staff', user: 44, roles: ['WAITER'], branches: [2], ttl: 6 });
  await page.evaluate(({ ws, token }) => {
    window.refusals44 = [];
    const c = track('refused', new lib.WaiterClient({ url: ws, token, branchId: 2 }));
    c.onRefreshFailed((reason) => refusals44.push({ reason, connected: c.isConnected() }));
    c.connect();
  }, { ws: env.gw.ws, token });
  await waitFor(() => page.evaluate(() => clients.refused.stats.pongs >= 1), { message: 'admitted' });
  // Another user's valid token: the gateway refuses it as another principal.
  const other = await mint(env.gw, { kind: 'staff', user: 45, roles: ['WAITER'], branches: [2], ttl: 3600 });
  await page.evaluate((t) => clients.refused.updateToken(t), other);
  await waitFor(() => page.evaluate(() => refusals44.length === 1), { message: 'refresh_failed' });
  const sent = [];
  for (const id of ['f1', 'f2', 'f3']) {
    sent.push(id);
    await publishStream(env.redis, envelope('ROUND_PENDING', { entity: { id } }));
  }
  await waitFor(async () => (await ids('refused')).length === 3, { message: 'events after the refusal' });
  const [refusals, stillOpen] = await page.evaluate(() => [refusals44, clients.refused.isConnected()]);
  assert.deepEqual(refusals, [{ reason: 'other_principal', connected: true }]);
  assert.equal(stillOpen, true, 'a refused refresh leaves the socket open');
  // The old expiry still stands: the gateway closes the socket at it, a final 4001.
  await waitFor(() => page.evaluate(() => log.refused.final !== null), { message: 'the 4001 at the old exp' });
  const [s, closes, final, state] = await page.evaluate(() => [
    clients.refused.stats, log.refused.closes, log.refused.final, clients.refused.getState()]);
  assert.deepEqual(final, { code: 4001, reason: 'Token expired or revoked' });
  assert.deepEqual(closes.map((c) => c.code), [4001]);
  assert.equal(state, 'closed');
  assert.deepEqual([s.opens, s.inbandRefreshes, s.refreshFailures], [1, 0, 1]);
  assert.deepEqual(await ids('refused'), sent);
  const sockets = await socketsOf(token);
  assert.equal(sockets.length, 1, 'never reconnected');
  assert.deepEqual(sockets[0].frames.filter((f) => f !== 'ROUND_PENDING' && f !== 'pong'), ['welcome', 'resumed', 'refresh_failed']);
  assert.deepEqual(await socketsOf(other), []);
  await page.evaluate(() => clients.refused.destroy());
});
