// D22 scenarios with the LEGACY client (test/legacy/legacy-client.js) unchanged: how fast does an
// existing front end retry when the gateway refuses it for a reason that will pass?
import { mint, sleep, waitFor } from './harness.js';

let users = 900;

/** Attempt start times (ms, page clock) of the legacy client using `token`, from `t0` on. */
async function attempts(page, token, t0) {
  return page.evaluate(({ t, t0 }) => wsAttempts.filter((a) => a.t >= t0 && a.url.includes(t)).map((a) => a.t),
    { t: token, t0 });
}

/** Wait until the legacy client has stayed open for `stableMs` (admitted, not accept-then-close). */
async function admitted(page, name, { timeout, stableMs = 1500 }) {
  let since = null;
  let openedAt = null;
  await waitFor(async () => {
    const [open, now] = await page.evaluate((n) => [clients[n].isConnected(), performance.now()], name);
    if (!open) { since = null; return false; }
    if (since === null) { since = Date.now(); openedAt = now; }
    return Date.now() - since >= stableMs;
  }, { timeout, interval: 100, message: `${name} admitted` });
  return openedAt;
}

function summary(times, windowMs) {
  const gaps = times.slice(1).map((t, i) => Math.round(t - times[i]));
  return { attempts: times.length, perMinute: Math.round((times.length * 60000) / windowMs), gapsMs: gaps };
}

/**
 * Per-user limit: three staff sockets of one user hold the slots; the legacy client is the 4th.
 * After `windowMs` one slot is freed and the time until the legacy client is admitted is measured.
 */
export async function limitScenario(env, page, { windowMs = 16000, admitTimeout = 60000 } = {}) {
  users += 1;
  const token = await mint(env.gw, { kind: 'staff', user: users, roles: ['WAITER'], branches: [2], ttl: 3600 });
  const holders = ['h1', 'h2', 'h3'].map((h) => `${h}-${users}`);
  const name = `legacy-limit-${users}`;
  await page.evaluate(({ ws, token, holders }) => {
    for (const h of holders) track(h, new lib.WaiterClient({ url: ws, token })).connect();
  }, { ws: env.gw.ws, token, holders });
  await waitFor(() => page.evaluate((hs) => hs.every((h) => clients[h].stats.pongs >= 1), holders), { message: 'three holders' });
  const t0 = await page.evaluate(({ ws, token, name }) => {
    const c = new legacy.LegacyWaiterService(ws);
    track(name, c);
    c.connectWith(token);
    return performance.now();
  }, { ws: env.gw.ws, token, name });
  await sleep(windowMs);
  const during = await attempts(page, token, t0);
  const released = await page.evaluate((h) => { clients[h].destroy(); return performance.now(); }, holders[0]);
  const openedAt = (await admitted(page, name, { timeout: admitTimeout })) - released;
  const all = await attempts(page, token, t0);
  await page.evaluate(({ holders, name }) => [...holders.slice(1), name].forEach((n) => clients[n].destroy()), { holders, name });
  return { ...summary(during, windowMs), attemptsAfterCause: all.length - during.length, admittedWithinMs: Math.round(openedAt) };
}

/** Redis paused (SIGSTOP) for `pauseMs` while the legacy client starts; then SIGCONT. */
export async function redisPauseScenario(env, page, { pauseMs = 15000, admitTimeout = 90000 } = {}) {
  users += 1;
  const token = await mint(env.gw, { kind: 'staff', user: users, roles: ['WAITER'], branches: [2], ttl: 3600 });
  const name = `legacy-redis-${users}`;
  env.redis.pause();
  let t0;
  try {
    t0 = await page.evaluate(({ ws, token, name }) => {
      const c = new legacy.LegacyWaiterService(ws);
      track(name, c);
      c.connectWith(token);
      return performance.now();
    }, { ws: env.gw.ws, token, name });
    await sleep(pauseMs);
  } finally {
    env.redis.resume();
  }
  const resumedAt = await page.evaluate(() => performance.now());
  const during = await attempts(page, token, t0);
  const openedAfter = (await admitted(page, name, { timeout: admitTimeout })) - resumedAt;
  const all = await attempts(page, token, t0);
  await page.evaluate((n) => clients[n].destroy(), name);
  return { ...summary(during, pauseMs), attemptsAfterCause: all.length - during.length, admittedWithinMs: Math.round(openedAfter) };
}

/** D22: consecutive attempts at least 1, 2, 4, 8 … s apart (10 % tolerance for timer slack). */
export function backoffViolations(gapsMs) {
  return gapsMs.map((gap, i) => ({ attempt: i + 2, gap, min: 0.9 * Math.min(1000 * 2 ** i, 30000) }))
    .filter((g) => g.gap < g.min);
}
