// Protocol v2 in Chromium against the real gateway: resume across a gateway crash (SIGKILL) and
// restart, and the in-band credential refresh that keeps one socket open past its token's expiry.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { envelope, environment, mint, publishStream, sleep, startGateway, waitFor } from './harness.js';

let env;
let page;
before(async () => {
  env = await environment();
  page = await env.browser.newLab(env.stat);
});
after(async () => env?.close());

const ids = (name) => page.evaluate((n) => log[n].events.map((e) => e.entity.id), name);
const attemptsFor = (token) => page.evaluate((t) => wsAttempts.filter((a) => a.url.includes(t)).length, encodeURIComponent(token));

test('v2 across a gateway SIGKILL and restart on the same port: every event once, in order, no catch-up', async () => {
  const token = await mint(env.gw, { kind: 'staff', user: 41, roles: ['WAITER'], branches: [2], ttl: 3600 });
  await page.evaluate(({ ws, token }) => {
    window.recoveryFailed = [];
    const c = track('crash', new lib.WaiterClient({
      url: ws, token, branchId: 2, protocol: 'v2', baseDelay: 300, maxDelay: 1500,
      onRecoveryFailed: (streams) => window.recoveryFailed.push(streams),
    }));
    c.connect();
  }, { ws: env.gw.ws, token });
  await waitFor(() => page.evaluate(() => clients.crash.stats.pongs >= 1), { message: 'admitted' });
  assert.deepEqual(await page.evaluate(() => [clients.crash.isV2(), clients.crash.ws.protocol]), [true, 'integrador.v2']);
  const sent = [];
  const publish = async (id) => {
    sent.push(id);
    await publishStream(env.redis, envelope('ROUND_PENDING', { entity: { id } }));
  };
  for (const id of ['k1', 'k2', 'k3']) await publish(id);
  await waitFor(async () => (await ids('crash')).length === 3, { message: 'live events' });
  // A crash, not a drain: no 1012, the browser sees the TCP connection die (1006).
  await env.gw.stop('SIGKILL');
  await waitFor(() => page.evaluate(() => log.crash.closes.length >= 1), { message: 'the close' });
  // Published while no gateway runs: the restarted instance stores them, the resume replays them.
  for (const id of ['k4', 'k5', 'k6']) await publish(id);
  env.gw = await startGateway({ redis: env.redis, port: env.gw.port, origins: [env.stat.origin] });
  await publish('k7');
  await waitFor(() => page.evaluate(() => clients.crash.getState() === 'connected' && clients.crash.stats.v2Opens >= 2),
    { message: 'reconnected as v2' });
  for (const id of ['k8', 'k9']) await publish(id);
  await waitFor(async () => (await ids('crash')).includes('k9'), { message: 'k9' });
  await sleep(500);
  assert.deepEqual(await ids('crash'), sent, 'every event exactly once, in order');
  const [s, positions, failed, closes] = await page.evaluate(() => [
    clients.crash.stats, clients.crash.getPositions(), window.recoveryFailed, log.crash.closes.map((c) => c.code)]);
  assert.equal(s.catchupRequests, 0, 'no HTTP catch-up on v2 sockets');
  assert.equal(s.duplicatesDropped, 0);
  assert.ok(s.resumes >= 2, `${s.resumes} resumes`);
  assert.deepEqual(failed, [], 'the resume recovered the stream');
  assert.deepEqual(Object.keys(positions), ['1:2']);
  assert.ok(closes.every((code) => code === 1006), JSON.stringify(closes));
  const events = await page.evaluate(() => log.crash.events);
  assert.ok(events.every((e) => e._pos?.stream === '1:2' && typeof e._pos.offset === 'string'));
  assert.equal(positions['1:2'], events.at(-1)._pos.offset);
  await page.evaluate(() => clients.crash.destroy());
});

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
