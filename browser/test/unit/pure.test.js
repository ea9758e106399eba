import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  FINAL_CLOSE_CODES, Listeners, RecentKeys, backoffDelay, base64UrlDecode, closeDecision, createThrottle,
  eventKey, isFinalClose, jwtPayload, legacyTableToken, nominalDelay, refreshDelay,
  sessionIdFromTableToken, tokenExpiry,
} from '../../src/index.js';

const b64url = (obj) => Buffer.from(JSON.stringify(obj)).toString('base64url');
const jwt = (claims) => `${b64url({ alg: 'HS256', typ: 'JWT' })}.${b64url(claims)}.sig`;

test('backoff: 1, 2, 4, 8, 16, 30 s nominal, capped at 30 s', () => {
  assert.deepEqual([1, 2, 3, 4, 5, 6, 7, 50, 5000].map((n) => nominalDelay(n)),
    [1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000, 30000]);
});

test('backoff: jitter adds 0-30 %', () => {
  assert.equal(backoffDelay(1, { random: () => 0 }), 1000);
  assert.equal(backoffDelay(1, { random: () => 0.999999 }), 1300);
  assert.equal(backoffDelay(4, { random: () => 0.5 }), 9200);
  assert.equal(backoffDelay(9, { random: () => 0.999999 }), 39000);
  for (let n = 1; n <= 50; n++) {
    const d = backoffDelay(n);
    assert.ok(d >= nominalDelay(n) && d <= nominalDelay(n) * 1.3, `${n}: ${d}`);
  }
});

test('close codes: 4001, 4003, 4029 final; everything else reconnects; intentional stops', () => {
  assert.deepEqual([...FINAL_CLOSE_CODES], [4001, 4003, 4029]);
  for (const code of [4001, 4003, 4029]) assert.equal(closeDecision(code), 'final');
  for (const code of [1000, 1001, 1006, 1008, 1011, 1012, 1013, 4000, 4002]) {
    assert.equal(isFinalClose(code), false);
    assert.equal(closeDecision(code), 'reconnect');
  }
  assert.equal(closeDecision(4001, { intentional: true }), 'stop');
});

function fakeClock() {
  let t = 0;
  const timers = new Map();
  let next = 1;
  return {
    now: () => t,
    setTimeout: (fn, ms) => { timers.set(next, { at: t + ms, fn }); return next++; },
    clearTimeout: (id) => timers.delete(id),
    advance(ms) {
      const end = t + ms;
      for (;;) {
        const due = [...timers.entries()].filter(([, v]) => v.at <= end).sort((a, b) => a[1].at - b[1].at)[0];
        if (!due) break;
        timers.delete(due[0]);
        t = due[1].at;
        due[1].fn();
      }
      t = end;
    },
  };
}

test('throttle: first at once, one trailing call with the latest value', () => {
  const clock = fakeClock();
  const calls = [];
  const th = createThrottle((v) => calls.push([clock.now(), v]), 100, clock);
  th.offer(1);
  clock.advance(10); th.offer(2);
  clock.advance(10); th.offer(3);
  clock.advance(10); th.offer(4);
  assert.deepEqual(calls, [[0, 1]]);
  clock.advance(100);
  assert.deepEqual(calls, [[0, 1], [100, 4]]);
  // The trailing call opened a new interval.
  th.offer(5);
  assert.equal(calls.length, 2);
  clock.advance(100);
  assert.deepEqual(calls.at(-1), [200, 5]);
  clock.advance(500);
  th.offer(6);
  assert.deepEqual(calls.at(-1), [730, 6]);
  assert.equal(calls.length, 4);
});

test('throttle: flush delivers the held value, cancel drops it', () => {
  const clock = fakeClock();
  const calls = [];
  const th = createThrottle((v) => calls.push(v), 100, clock);
  th.offer('a'); th.offer('b'); th.offer('c');
  th.flush();
  assert.deepEqual(calls, ['a', 'c']);
  clock.advance(1000);
  th.offer('d'); th.offer('e'); th.cancel();
  clock.advance(1000);
  assert.deepEqual(calls, ['a', 'c', 'd']);
});

test('token: base64url payload with - and _ and no padding', () => {
  // A payload whose base64 form has '+'/'/' (so base64url has '-'/'_') and needs padding.
  const claims = { session_id: 9, exp: 1700000000, name: '¿ñ?>>>' };
  const token = jwt(claims);
  assert.match(token.split('.')[1], /[-_]/);
  assert.deepEqual(jwtPayload(token), claims);
  assert.equal(tokenExpiry(token), 1700000000);
  assert.equal(sessionIdFromTableToken(token), 9);
  assert.equal(base64UrlDecode('%%%'), null);
  assert.equal(jwtPayload('a.b'), null);
  assert.equal(jwtPayload('a.!!.c'), null);
});

test('token: legacy table tokens (no dots) give session and expiry', () => {
  const legacy = '1:2:5:9:1800000000:0123456789abcdef0123456789abcdef';
  assert.deepEqual(legacyTableToken(legacy), { tenantId: 1, branchId: 2, tableId: 5, sessionId: 9, expiresAt: 1800000000 });
  assert.equal(sessionIdFromTableToken(legacy), 9);
  assert.equal(tokenExpiry(legacy), 1800000000);
  assert.equal(legacyTableToken('1:2:5:x:1:sig'), null);
  assert.equal(sessionIdFromTableToken('1:2:5:0:1800000000:sig'), null);
  assert.equal(sessionIdFromTableToken(jwt({ session_id: '7' })), 7);
  assert.equal(sessionIdFromTableToken(jwt({ session_id: true })), null);
});

test('refreshDelay: lead before exp, at most a fifth of the life early, never below 1 s', () => {
  const now = 1_000_000_000_000;
  assert.equal(refreshDelay(now / 1000 + 900, now), 840_000);
  assert.equal(refreshDelay(now / 1000 + 5, now), 4000);
  assert.equal(refreshDelay(now / 1000 + 0.5, now), 1000);
  assert.equal(refreshDelay(now / 1000 - 10, now), 1000);
  assert.equal(refreshDelay(null, now), null);
  assert.equal(refreshDelay(now / 1000 + 900, now, { lead: 10_000 }), 890_000);
});

test('eventKey: key order and top-level _ fields do not matter', () => {
  const a = { type: 'ROUND_READY', tenant_id: 1, entity: { b: 1, a: [1, { y: 2, x: 1 }] } };
  const b = { entity: { a: [1, { x: 1, y: 2 }], b: 1 }, tenant_id: 1, type: 'ROUND_READY', _enqueued_at: 5 };
  assert.equal(eventKey(a), eventKey(b));
  assert.notEqual(eventKey(a), eventKey({ ...a, ts: 'x' }));
  assert.notEqual(eventKey(a), eventKey({ ...a, entity: { ...a.entity, _c: 1 } }));
});

test('RecentKeys: bounded, oldest forgotten first, and by age', () => {
  let t = 0;
  const keys = new RecentKeys({ size: 3, maxAge: 1000, now: () => t });
  assert.equal(keys.add('a'), true);
  assert.equal(keys.add('a'), false);
  keys.add('b'); keys.add('c'); keys.add('d');
  assert.equal(keys.count, 3);
  assert.equal(keys.add('a'), true, 'a was forgotten');
  t = 5000;
  assert.equal(keys.add('d'), true, 'expired by age');
  assert.equal(keys.count, 1);
});

test('Listeners: type then *, errors isolated, empty sets removed; 10,000 cycles leave nothing', () => {
  const reg = new Listeners();
  const seen = [];
  const offA = reg.add('A', (e) => seen.push(`A:${e.type}`));
  reg.add('A', () => { throw new Error('boom'); });
  const offStar = reg.add('*', (e) => seen.push(`*:${e.type}`));
  const errors = [];
  reg.dispatch({ type: 'A' }, (e) => errors.push(e));
  reg.dispatch({ type: 'B' });
  assert.deepEqual(seen, ['A:A', '*:A', '*:B']);
  assert.equal(errors.length, 1);
  offA(); offStar();
  assert.equal(reg.types, 1);
  reg.clear();
  for (let i = 0; i < 10000; i++) {
    const off = reg.add(`T${i % 37}`, () => {});
    off();
    off();
  }
  assert.equal(reg.types, 0);
  assert.equal(reg.size, 0);
});
