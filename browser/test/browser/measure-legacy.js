// Attempts per minute of the LEGACY client (unchanged existing front end) against the gateway in
// this checkout: at the per-user connection limit, and during a Redis pause. Prints JSON and writes
// test/artifacts/legacy-attempts.json. Usage: node test/browser/measure-legacy.js [seconds]
import fs from 'node:fs';
import path from 'node:path';
import { limitScenario, redisPauseScenario } from './d22.js';
import { ARTIFACTS, environment } from './harness.js';

const seconds = Number(process.argv[2] ?? 60);
const env = await environment();
try {
  const page = await env.browser.newLab(env.stat);
  const limit = await limitScenario(env, page, { windowMs: seconds * 1000 });
  const redis = await redisPauseScenario(env, page, { pauseMs: seconds * 1000 });
  const result = { measuredAt: new Date().toISOString(), windowSeconds: seconds, perUserLimit: limit, redisPause: redis };
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  fs.writeFileSync(path.join(ARTIFACTS, 'legacy-attempts.json'), JSON.stringify(result, null, 2) + '\n');
  console.log(JSON.stringify(result, null, 2));
} finally {
  await env.close();
}
