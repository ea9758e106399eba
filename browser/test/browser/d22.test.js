// D22 with the LEGACY client unchanged: the gateway refuses recoverable cases before the upgrade
// (HTTP 429/503 + Retry-After), so the browser sees 1006, onopen never fires, and the legacy attempt
// counter grows: 1, 2, 4, 8 s instead of a retry every second.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { backoffViolations, limitScenario, redisPauseScenario } from './d22.js';
import { environment } from './harness.js';

let env;
let page;
before(async () => {
  env = await environment();
  page = await env.browser.newLab(env.stat);
});
after(async () => env?.close());

test('D22 legacy client at the per-user connection limit backs off 1, 2, 4, 8 s and is admitted once a slot frees',
  async (t) => {
    const r = await limitScenario(env, page, { windowMs: 16000 });
    t.diagnostic(`per-user limit: ${JSON.stringify(r)}`);
    assert.deepEqual(backoffViolations(r.gapsMs), [], `gaps ${r.gapsMs}`);
    assert.ok(r.attempts <= 5, `${r.attempts} attempts in 16 s (1, 2, 4, 8 s backoff allows 5)`);
    assert.equal(r.attemptsAfterCause, 1, 'admitted on its next attempt');
  });

test('D22 legacy client during a Redis pause backs off 1, 2, 4, 8 s and is admitted after Redis returns',
  async (t) => {
    const r = await redisPauseScenario(env, page, { pauseMs: 15000 });
    t.diagnostic(`redis pause: ${JSON.stringify(r)}`);
    assert.deepEqual(backoffViolations(r.gapsMs), [], `gaps ${r.gapsMs}`);
    assert.ok(r.attempts <= 5, `${r.attempts} attempts in 15 s`);
    assert.ok(r.attemptsAfterCause <= 2, `admitted within ${r.attemptsAfterCause} attempts after Redis returned`);
  });
