// Heartbeat, drain and restart (1012) with nothing lost, visibilitychange and online.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { envelope, environment, labEventIds, mint, publishStream, sleep, startGateway, waitFor } from './harness.js';

let env;
let page;
before(async () => {
  env = await environment();
  page = await env.browser.newLab(env.stat);
});
after(async () => env?.close());

async function restartGateway() {
  await env.gw.stop('SIGTERM');
  env.gw = await startGateway({ redis: env.redis, port: env.gw.port, origins: [env.stat.origin] });
}

const ids = (name) => labEventIds(page, name);

test('heartbeat: {"type":"ping"} every interval, one timer per ping, 4000 when pongs stop', async () => {
  const token = await mint(env.gw, { kind: 'staff', user: 21, roles: ['KITCHEN'], branches: [2] });
  await page.evaluate(({ ws, token }) => {
    const c = track('hb', new lib.KitchenClient({ url: ws, token, pingInterval: 300, pongTimeout: 3000, baseDelay: 200 }));
    c.connect();
  }, { ws: env.gw.ws, token });
  await waitFor(() => page.evaluate(() => clients.hb.stats.pongs >= 5), { message: 'pongs' });
  // Extra pings in a burst (the visibility ping of the old clients): no timer is orphaned.
  await page.evaluate(() => { for (let i = 0; i < 5; i++) clients.hb.ping(); });
  // An orphaned timer would fire within the pong timeout (3 s) and close the healthy socket.
  await sleep(4000);
  let s = await page.evaluate(() => clients.hb.stats);
  assert.equal(s.heartbeatTimeouts, 0);
  assert.equal(s.state, 'connected');
  assert.equal(s.opens, 1);
  assert.ok(s.outstandingPings <= 3, `outstanding ${s.outstandingPings}`);
  // A frozen gateway answers no pong: the client gives up on the socket with 4000 and reconnects.
  env.gw.proc.kill('SIGSTOP');
  try {
    await waitFor(() => page.evaluate(() => clients.hb.stats.heartbeatTimeouts >= 1), { message: 'heartbeat timeout' });
  } finally {
    env.gw.proc.kill('SIGCONT');
  }
  const closes = await page.evaluate(() => log.hb.closes.map((c) => [c.code, c.reason]));
  assert.deepEqual(closes[0], [4000, 'Heartbeat timeout']);
  await waitFor(() => page.evaluate(() => clients.hb.stats.state === 'connected' && clients.hb.stats.opens >= 2),
    { message: 'reconnected after the freeze' });
  s = await page.evaluate(() => { clients.hb.destroy(); return clients.hb.stats; });
  assert.equal(s.state, 'disconnected');
});

test('drain (SIGTERM, 1012) and restart: reconnect, catch-up, nothing lost, nothing twice', async () => {
  const token = await mint(env.gw, { kind: 'staff', user: 22, roles: ['WAITER'], branches: [2], ttl: 3600 });
  await page.evaluate(({ ws, token }) => {
    const c = track('drain', new lib.WaiterClient({ url: ws, token, protocol: 'v1' }));  // v1: HTTP catch-up
    c.setBranchId(2);
    c.connect();
  }, { ws: env.gw.ws, token });
  await waitFor(() => page.evaluate(() => clients.drain.stats.pongs >= 1), { message: 'admitted' });
  for (const id of ['d1', 'd2', 'd3']) await publishStream(env.redis, envelope('ROUND_PENDING', { entity: { id } }));
  await waitFor(async () => (await ids('drain')).length === 3, { message: 'live events' });
  // d3 arrived just now, so it is inside the catch-up margin: catch-up returns it again.
  await env.gw.stop('SIGTERM');
  await waitFor(() => page.evaluate(() => log.drain.closes.length >= 1), { message: 'the 1012 close' });
  const closes = await page.evaluate(() => log.drain.closes.map((c) => [c.code, c.reason]));
  assert.deepEqual(closes, [[1012, 'Server restart']]);
  // Published while no gateway runs: the stream keeps them for the restarted instance.
  for (const id of ['d4', 'd5']) await publishStream(env.redis, envelope('ROUND_PENDING', { entity: { id } }));
  env.gw = await startGateway({ redis: env.redis, port: env.gw.port, origins: [env.stat.origin] });
  await publishStream(env.redis, envelope('ROUND_PENDING', { entity: { id: 'd6' } }));
  await waitFor(() => page.evaluate(() => clients.drain.stats.state === 'connected' && clients.drain.stats.catchupRequests >= 1),
    { message: 'reconnected and caught up' });
  await publishStream(env.redis, envelope('ROUND_PENDING', { entity: { id: 'd7' } }));
  await waitFor(async () => (await ids('drain')).includes('d7'), { message: 'd7' });
  await sleep(300);
  const got = await ids('drain');
  assert.deepEqual([...got].sort(), ['d1', 'd2', 'd3', 'd4', 'd5', 'd6', 'd7']);
  const s = await page.evaluate(() => clients.drain.stats);
  assert.ok(s.duplicatesDropped >= 1, 'the catch-up overlap was de-duplicated');
  assert.ok(s.catchupEvents >= 1);
  // Catch-up events are dispatched before live frames of the new socket: d1..d6 in order.
  assert.deepEqual(got.filter((x) => x !== 'd7'), ['d1', 'd2', 'd3', 'd4', 'd5', 'd6']);
  await page.evaluate(() => clients.drain.destroy());
});

test('visibilitychange and online reconnect at once, but not after a final or intentional close', async () => {
  const staff = (user) => mint(env.gw, { kind: 'staff', user, roles: ['WAITER'], branches: [2], ttl: 3600 });
  const tokens = { vis: await staff(23), off: await staff(24), fin: 'not-a-jwt' };
  await page.evaluate(({ ws, tokens }) => {
    // A long backoff: only the page events can bring these sockets back within the test.
    for (const name of ['vis', 'off', 'fin']) {
      track(name, new lib.WaiterClient({ url: ws, token: tokens[name], baseDelay: 120000, maxDelay: 120000 })).connect();
    }
  }, { ws: env.gw.ws, tokens });
  await waitFor(() => page.evaluate(() => clients.vis.stats.pongs >= 1 && clients.off.stats.pongs >= 1
    && clients.fin.getState() === 'closed'), { message: 'two admitted, one refused' });
  await page.evaluate(() => clients.off.disconnect());
  await restartGateway();
  await waitFor(() => page.evaluate(() => clients.vis.getState() === 'reconnecting'), { message: 'vis reconnecting' });
  const attemptsBefore = await page.evaluate(() => wsAttempts.length);
  await page.evaluate(() => { setVisibility('hidden'); setVisibility('visible'); });
  await waitFor(() => page.evaluate(() => clients.vis.getState() === 'connected'), { message: 'visible: reconnected' });
  await restartGateway();
  await waitFor(() => page.evaluate(() => clients.vis.getState() === 'reconnecting'), { message: 'vis reconnecting again' });
  await env.browser.context.setOffline(true);
  await env.browser.context.setOffline(false);
  await waitFor(() => page.evaluate(() => clients.vis.getState() === 'connected'), { message: 'online: reconnected' });
  await sleep(500);
  const attempts = await page.evaluate((n) => wsAttempts.slice(n).map((a) => a.url), attemptsBefore);
  const of = (name) => attempts.filter((u) => u.includes(encodeURIComponent(tokens[name]))).length;
  assert.equal(of('vis'), 2, 'one attempt per page event');
  assert.equal(of('off'), 0, 'not after disconnect()');
  assert.equal(of('fin'), 0, 'not after a final 4001');
  assert.deepEqual(await page.evaluate(() => [clients.off.getState(), clients.fin.getState()]), ['disconnected', 'closed']);
  await page.evaluate(() => ['vis', 'off', 'fin'].forEach((n) => clients[n].destroy()));
});
