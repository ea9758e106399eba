// Each role connects through the library in Chromium and receives exactly its routed events.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';
import { environment, envelope, mint, publishChannel, publishStream, waitFor } from './harness.js';

let env;
let page;
before(async () => {
  env = await environment();
  page = await env.browser.newLab(env.stat);
});
after(async () => env?.close());

const names = ['admin', 'kitchen', 'waiter3', 'waiter4', 'diner9', 'diner10'];

test('admin, kitchen, waiter (sectors) and diner (JWT and legacy token) get their events and no others', async () => {
  const { gw, redis } = env;
  const tokens = {
    admin: await mint(gw, { kind: 'staff', user: 1, roles: ['ADMIN'], branches: [2] }),
    kitchen: await mint(gw, { kind: 'staff', user: 2, roles: ['KITCHEN'], branches: [2] }),
    waiter3: await mint(gw, { kind: 'staff', user: 3, roles: ['WAITER'], branches: [2], sectors: [3] }),
    waiter4: await mint(gw, { kind: 'staff', user: 4, roles: ['WAITER'], branches: [2], sectors: [4] }),
    diner9: await mint(gw, { kind: 'table', branch: 2, table: 5, session: 9 }),
    diner10: await mint(gw, { kind: 'legacy', branch: 2, table: 6, session: 10 }),
  };
  await page.evaluate(({ ws, tokens }) => {
    const { AdminClient, KitchenClient, WaiterClient, DinerClient } = window.lib;
    const make = { admin: AdminClient, kitchen: KitchenClient, waiter3: WaiterClient, waiter4: WaiterClient,
      diner9: DinerClient, diner10: DinerClient };
    for (const [name, Class] of Object.entries(make)) {
      const client = track(name, new Class({ url: ws, token: tokens[name], branchId: 2 }));
      client.connect();
    }
  }, { ws: gw.ws, tokens });
  await waitFor(() => page.evaluate((names) => names.every((n) => clients[n].stats.pongs >= 1), names),
    { message: 'six sockets admitted' });
  const health = await (await fetch(`${gw.url}/ws/health`)).json();
  assert.equal(health.total_connections, 6);

  const sent = [
    // Admin only.
    [null, envelope('ENTITY_UPDATED', { entity: { id: 'e1' } })],
    // Kitchen type, sector 3, session 9: admin, kitchen, waiter3, diner9. Sent on the stream and a
    // channel, as the backend does: delivered once.
    ['both', envelope('ROUND_READY', { sector_id: 3, session_id: 9, table_id: 5, entity: { id: 'r1' } })],
    // Cart of session 10, no sector: admin, both waiters (branch traffic), diner10.
    ['session:10', envelope('CART_ITEM_ADDED', { session_id: 10, table_id: 6, entity: { id: 'c1' } })],
    // Other branch and other tenant: nobody here.
    [null, envelope('ROUND_READY', { branch_id: 3, session_id: 11, sector_id: 3, entity: { id: 'x1' } })],
    [null, envelope('ROUND_READY', { tenant_id: 2, session_id: 9, entity: { id: 'x2' } })],
    // Product availability: everyone but the kitchen.
    [null, envelope('PRODUCT_AVAILABILITY_CHANGED', { entity: { id: 'end' } })],
  ];
  for (const [channel, env_] of sent) {
    if (channel === null) await publishStream(redis, env_);
    else if (channel === 'both') {
      await publishStream(redis, env_);
      await publishChannel(redis, 'branch:2:waiters', env_);
    } else await publishChannel(redis, channel, env_);
  }
  const expected = {
    admin: ['e1', 'r1', 'c1', 'end'],
    kitchen: ['r1'],
    waiter3: ['r1', 'c1', 'end'],
    waiter4: ['c1', 'end'],
    diner9: ['r1', 'end'],
    diner10: ['c1', 'end'],
  };
  await waitFor(() => page.evaluate((expected) => Object.entries(expected).every(
    ([n, ids]) => log[n].events.length >= ids.length), expected), { message: 'routed events' });
  // Everything after 'end' was published before it; a short settle catches a stray late copy.
  await new Promise((r) => setTimeout(r, 500));
  const got = await page.evaluate((names) => Object.fromEntries(names.map((n) => [n, log[n].events.map((e) => e.entity.id)])), names);
  for (const name of names) assert.deepEqual([...got[name]].sort(), [...expected[name]].sort(), name);
  const routing = await page.evaluate(() => log.waiter3.events.find((e) => e.entity.id === 'r1'));
  assert.deepEqual([routing.tenant_id, routing.branch_id, routing.sector_id, routing.session_id, routing.type],
    [1, 2, 3, 9, 'ROUND_READY']);
});

test('10,000 subscribe/unsubscribe cycles leave no listeners', async () => {
  const stats = await page.evaluate(() => {
    const c = clients.admin;
    const before = c.stats.listenerTypes;
    for (let i = 0; i < 10000; i++) {
      const off = c.on(`T${i % 50}`, () => {});
      const offT = c.onThrottled(`U${i % 7}`, () => {}, 50);
      const cb = () => {};
      c.on('*', cb);
      c.off('*', cb);
      off();
      offT();
    }
    return { before, after: c.stats.listenerTypes, count: c.stats.listenerCount };
  });
  assert.equal(stats.after, stats.before);
  assert.equal(stats.count, 1, 'only the test log listener on *');
});
