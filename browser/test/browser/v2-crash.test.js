// The crash test of tests/test_faults_v2.py in Chromium: a v2 AdminClient keeps 1,000 events
// published at 200/s while the gateway process is killed with SIGKILL at about event 300 and
// started again on the same port at about 600. Every event must reach the app exactly once and in
// order, and the wire must carry each exactly once too: the client does no de-duplication on v2,
// so nothing but the resume can be what saves it.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { environment, envelope, mint, redisCommand, redisConnection, sleep, startGateway, waitFor } from './harness.js';

const TOTAL = 1000;
const RATE = 200;
const KILL_AT = 300;
const RESTART_AT = 600;
// As crash_env() in tests/test_faults.py: the restarted process finds its own consumer group (the
// instance id follows the port) and reclaims what the killed one read but never acknowledged.
const CRASH_ENV = { GATEWAY_RECLAIM_IDLE: '0.5', GATEWAY_RECLAIM_INTERVAL: '0.5', GATEWAY_STREAM_BLOCK_MS: '100' };

let env;
let page;
before(async () => {
  env = await environment({ gatewayEnv: CRASH_ENV });
  page = await env.browser.newLab(env.stat);
});
after(async () => env?.close());

/** Wait until the gateway's consumer group exists: from then on nothing published is skipped. */
async function waitForGroup(gw) {
  const group = `ws_gateway_group:${gw.env.GATEWAY_INSTANCE_ID}`;
  await waitFor(async () => {
    const groups = await redisCommand(env.redis.port, 'XINFO', 'GROUPS', 'events:critical').catch(() => []);
    return groups.some((fields) => fields[fields.indexOf('name') + 1] === group);
  }, { message: `consumer group ${group}` });
}

test(`v2 across a gateway SIGKILL at ${KILL_AT} and restart at ${RESTART_AT} of ${TOTAL} events at ${RATE}/s: each once, in order, no de-dup`, async () => {
  await waitForGroup(env.gw);
  const token = await mint(env.gw, { kind: 'staff', user: 60, roles: ['ADMIN'], branches: [2], ttl: 3600 });
  await page.evaluate(({ ws, token }) => {
    window.recoveryFailed = [];
    track('crash', new lib.AdminClient({
      url: ws, token, branchId: 2, baseDelay: 100, maxDelay: 500,
      onRecoveryFailed: (streams) => window.recoveryFailed.push(streams),
    })).connect();
  }, { ws: env.gw.ws, token });
  await waitFor(() => page.evaluate(() => clients.crash.stats.pongs >= 1), { message: 'admitted' });
  assert.deepEqual(await page.evaluate(() => [clients.crash.isV2(), clients.crash.ws.protocol]), [true, 'integrador.v2']);

  const redis = await redisConnection(env.redis.port);
  let restarting = null;
  let gatewayStarts = 1;
  try {
    const start = Date.now();
    for (let seq = 0; seq < TOTAL; seq++) {
      if (seq === KILL_AT) {
        // A crash, not a drain: no 1012; the browser sees the TCP connection die (1006).
        await env.gw.stop('SIGKILL');
      } else if (seq === RESTART_AT) {
        restarting = startGateway({ redis: env.redis, port: env.gw.port, origins: [env.stat.origin], env: CRASH_ENV });
        gatewayStarts++;
      }
      const due = start + (seq * 1000) / RATE;
      if (due > Date.now()) await sleep(due - Date.now());
      const event = envelope('ROUND_PENDING', { table_id: 5, entity: { seq } });
      await redis.command('XADD', 'events:critical', 'MAXLEN', '~', '50000', '*', 'data', JSON.stringify(event));
    }
  } finally {
    redis.close();
    if (restarting) env.gw = await restarting;
  }
  await waitFor(() => page.evaluate((n) => log.crash.events.length >= n, TOTAL), { message: `${TOTAL} events at the app` });
  await sleep(500); // anything sent twice would arrive by now

  const expected = Array.from({ length: TOTAL }, (_, i) => i);
  const [app, wire, s, positions, failed, closes, lastOffset, unpositioned] = await page.evaluate((t) => [
    log.crash.events.map((e) => e.entity.seq),
    wsAttempts.filter((a) => a.url.includes(t)).map((a) => ({ ids: a.ids, frames: a.frames.filter((f) => f !== 'ROUND_PENDING' && f !== 'pong') })),
    clients.crash.stats, clients.crash.getPositions(), window.recoveryFailed, log.crash.closes.map((c) => c.code),
    log.crash.events.at(-1)._pos?.offset, log.crash.events.filter((e) => !e._pos || e._pos.stream !== '1:2').length,
  ], encodeURIComponent(token));
  const wireSeqs = wire.flatMap((w) => w.ids);
  const delivered = app.length;
  const duplicatesAtApp = delivered - new Set(app).size;
  const lost = TOTAL - new Set(app).size;
  const opened = wire.filter((w) => w.frames.includes('welcome')).length;
  console.log(`v2 browser crash test: published=${TOTAL} delivered=${delivered} duplicates_at_app=${duplicatesAtApp} `
    + `lost=${lost} wire_event_frames=${wireSeqs.length} sockets_attempted=${wire.length} sockets_opened=${opened} `
    + `resumes=${s.resumes} replayed=${s.replayed} duplicates_dropped_by_client=${s.duplicatesDropped} `
    + `gateway_starts=${gatewayStarts} events_per_opened_socket=${wire.filter((w) => w.ids.length).map((w) => w.ids.length).join('+')}`);

  assert.equal(gatewayStarts, 2);
  assert.deepEqual(app, expected, 'the app got every event exactly once, in order');
  // What came off the wire, socket after socket, before the library: already exactly once and in
  // order, so no de-duplication was needed, and the library did none (nothing dropped).
  assert.deepEqual(wireSeqs, expected, 'the wire carried every event exactly once, in order');
  assert.equal(s.duplicatesDropped, 0);
  assert.equal(s.liveEvents, TOTAL);
  assert.equal(s.catchupRequests, 0, 'no HTTP catch-up on v2 sockets');
  assert.ok(opened >= 2 && s.resumes === opened, `${opened} sockets opened, ${s.resumes} resumes`);
  assert.ok(wire[0].ids.length > 0 && wire[0].ids.length <= KILL_AT, 'the first socket died mid-stream');
  assert.deepEqual(failed, [], 'every resume recovered the stream');
  assert.equal(s.recoveryFailures, 0);
  assert.ok(closes.length >= 1 && closes.every((code) => code === 1006), JSON.stringify(closes));
  assert.equal(unpositioned, 0, 'every event carried its position');
  assert.deepEqual(Object.keys(positions), ['1:2']);
  assert.equal(positions['1:2'], lastOffset);
  for (const w of wire.filter((x) => x.frames.includes('welcome'))) {
    assert.deepEqual(w.frames, ['welcome', 'resumed'], 'one welcome and one resumed per socket');
  }
  await page.evaluate(() => clients.crash.destroy());
});
