// The console page served by the gateway: open a socket, publish an event, see it arrive; screenshot.
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { after, before, test } from 'node:test';
import { ARTIFACTS, environment, waitFor } from './harness.js';

let env;
before(async () => { env = await environment(); });
after(async () => env?.close());

test('console: connect as a waiter and a diner, publish ROUND_READY, see it end to end (screenshot)', async () => {
  const page = await env.browser.context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(e.message));
  await page.setViewportSize({ width: 1280, height: 900 });
  await page.goto(`${env.gw.url}/ws/console`);
  await page.waitForSelector('body[data-ready="true"]', { timeout: 30000 });
  // A waiter of sector 3, then a diner of session 9 (legacy token).
  await page.selectOption('#role', 'waiter');
  await page.fill('#sectors', '3');
  await page.click('#connect-btn');
  await page.selectOption('#role', 'diner-legacy');
  await page.click('#connect-btn');
  await page.waitForFunction(() => document.querySelectorAll('.socket-card[data-state="connected"]').length === 2,
    null, { timeout: 30000 });
  assert.notEqual(await page.inputValue('#publish-token'), '', 'the dev endpoint filled the publish token');
  await page.fill('#publish-type', 'ROUND_READY');
  await page.fill('#publish-sector', '3');
  await page.fill('#publish-session', '9');
  await page.click('#publish-btn');
  await page.waitForSelector('#publish-result[data-status="202"]', { timeout: 30000 });
  await waitFor(() => page.evaluate(() => document.querySelectorAll('.event-row[data-type="ROUND_READY"]').length === 2),
    { message: 'the event in both cards' });
  const row = await page.evaluate(() => [...document.querySelector('.socket-card[data-role="waiter"] .event-row').cells]
    .map((td) => td.textContent));
  assert.deepEqual(row.slice(1, 6), ['ROUND_READY', '1', '2', '3', '9']);
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  const file = path.join(ARTIFACTS, 'console.png');
  await page.screenshot({ path: file, fullPage: true });
  const png = fs.readFileSync(file);
  assert.deepEqual([...png.subarray(1, 4)].map((c) => String.fromCharCode(c)).join(''), 'PNG');
  assert.equal(png.readUInt32BE(16), 1280, 'PNG width');
  assert.ok(png.length > 10000, `a real page, ${png.length} bytes`);
  assert.deepEqual(errors, []);
  // The state badges as shown in the screenshot.
  assert.deepEqual(await page.$$eval('.socket-card .state', (els) => els.map((e) => e.textContent)), ['connected', 'connected']);
  await page.close();
});
