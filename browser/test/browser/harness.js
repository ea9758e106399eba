// Real components for the browser tests: a private redis-server, the gateway process, a loopback
// static server for the test pages, and Debian's Chromium driven by playwright-core.
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const BROWSER_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const REPO = path.resolve(BROWSER_DIR, '..');
export const ARTIFACTS = path.join(BROWSER_DIR, 'test', 'artifacts');
export const CHROMIUM = process.env.CHROMIUM_PATH ?? '/usr/bin/chromium';
const GATEWAY_BIN = process.env.GATEWAY_BIN ?? path.join(REPO, '.venv', 'bin', 'gateway');
export const PUBLISH_TOKEN = 'browser-test-publish-token';
const JWT_SECRET = 'browser-tests-jwt-secret-0123456789abcdef';
const TABLE_SECRET = 'browser-tests-table-secret-0123456789abcdef';

export const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Poll `fn` until it returns a truthy value; fail only after a generous timeout (hang guard). */
export async function waitFor(fn, { timeout = 30000, interval = 50, message = 'condition' } = {}) {
  const end = Date.now() + timeout;
  let last;
  for (;;) {
    last = await fn();
    if (last) return last;
    if (Date.now() > end) throw new Error(`timed out after ${timeout} ms waiting for ${message}`);
    await sleep(interval);
  }
}

export async function freePort() {
  const server = net.createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address();
  server.close();
  await once(server, 'close');
  return port;
}

// --- Redis (RESP over a socket; no client library) -----------------------------------------
function encode(args) {
  let out = `*${args.length}\r\n`;
  for (const a of args) {
    const s = String(a);
    out += `$${Buffer.byteLength(s)}\r\n${s}\r\n`;
  }
  return out;
}

function parse(buf, i) {
  const end = buf.indexOf('\r\n', i);
  if (end < 0) return null;
  const kind = String.fromCharCode(buf[i]);
  const line = buf.toString('utf8', i + 1, end);
  if (kind === '+') return { value: line, next: end + 2 };
  if (kind === '-') return { value: new Error(line), next: end + 2 };
  if (kind === ':') return { value: Number(line), next: end + 2 };
  if (kind === '$') {
    const n = Number(line);
    if (n < 0) return { value: null, next: end + 2 };
    if (buf.length < end + 2 + n + 2) return null;
    return { value: buf.toString('utf8', end + 2, end + 2 + n), next: end + 2 + n + 2 };
  }
  if (kind === '*') {
    const n = Number(line);
    const items = [];
    let next = end + 2;
    for (let k = 0; k < n; k++) {
      const r = parse(buf, next);
      if (!r) return null;
      items.push(r.value);
      next = r.next;
    }
    return { value: items, next };
  }
  throw new Error(`unexpected RESP ${kind}`);
}

export function redisCommand(port, ...args) {
  return new Promise((resolve, reject) => {
    const sock = net.createConnection({ port, host: '127.0.0.1' });
    let buf = Buffer.alloc(0);
    sock.setTimeout(5000, () => { sock.destroy(); reject(new Error('redis timeout')); });
    sock.on('connect', () => sock.write(encode(args)));
    sock.on('data', (d) => {
      buf = Buffer.concat([buf, d]);
      const r = parse(buf, 0);
      if (!r) return;
      sock.end();
      if (r.value instanceof Error) reject(r.value);
      else resolve(r.value);
    });
    sock.on('error', reject);
  });
}

/** One RESP connection kept open, commands answered in order (steady publishing at a rate). */
export async function redisConnection(port) {
  const sock = net.createConnection({ port, host: '127.0.0.1' });
  await once(sock, 'connect');
  const waiting = [];
  let buf = Buffer.alloc(0);
  sock.on('data', (d) => {
    buf = Buffer.concat([buf, d]);
    for (;;) {
      const r = parse(buf, 0);
      if (!r) return;
      buf = buf.subarray(r.next);
      const w = waiting.shift();
      if (r.value instanceof Error) w?.reject(r.value);
      else w?.resolve(r.value);
    }
  });
  sock.on('error', (error) => { for (const w of waiting.splice(0)) w.reject(error); });
  return {
    command: (...args) => new Promise((resolve, reject) => {
      waiting.push({ resolve, reject });
      sock.write(encode(args));
    }),
    close: () => { sock.end(); sock.destroy(); },
  };
}

export async function startRedis() {
  const port = await freePort();
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'wsclient-redis-'));
  const proc = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '',
    '--appendonly', 'no', '--dir', dir], { stdio: 'ignore' });
  await waitFor(async () => (await redisCommand(port, 'PING').catch(() => null)) === 'PONG',
    { timeout: 15000, message: 'redis-server' });
  return {
    port, url: `redis://127.0.0.1:${port}`, proc,
    pause: () => proc.kill('SIGSTOP'),
    resume: () => proc.kill('SIGCONT'),
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) {
        const exited = once(proc, 'exit');
        proc.kill('SIGCONT');
        proc.kill('SIGTERM');
        const timer = setTimeout(() => proc.kill('SIGKILL'), 5000);
        await exited;
        clearTimeout(timer);
      }
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** XADD to the critical stream, as the backend's publish_to_stream does. */
export function publishStream(redis, envelope) {
  return redisCommand(redis.port, 'XADD', 'events:critical', 'MAXLEN', '~', '50000', '*', 'data', JSON.stringify(envelope));
}

/** PUBLISH on a channel, as the backend's publish_to_* wrappers do. */
export function publishChannel(redis, channel, envelope) {
  return redisCommand(redis.port, 'PUBLISH', channel, JSON.stringify(envelope));
}

let seq = 0;
export function envelope(type, fields = {}) {
  seq += 1;
  return { type, tenant_id: 1, branch_id: 2, entity: { n: seq }, actor: { user_id: 1, role: 'ADMIN' },
    ts: new Date().toISOString(), v: 1, ...fields };
}

// --- gateway -------------------------------------------------------------------------------
export async function startGateway({ redis, port, origins = [], env = {}, name = 'gateway' }) {
  port = port ?? await freePort();
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  const log = fs.openSync(path.join(ARTIFACTS, `${name}-${port}.log`), 'a');
  const fullEnv = {
    PATH: process.env.PATH,
    HOME: process.env.HOME ?? os.tmpdir(),
    REDIS_URL: redis.url,
    WS_GATEWAY_HOST: '127.0.0.1',
    WS_GATEWAY_PORT: String(port),
    ENVIRONMENT: 'development',
    JWT_SECRET,
    TABLE_TOKEN_SECRET: TABLE_SECRET,
    ALLOWED_ORIGINS: [`http://127.0.0.1:${port}`, ...origins].join(','),
    GATEWAY_PUBLISH_TOKEN: PUBLISH_TOKEN,
    GATEWAY_INSTANCE_ID: `browser-test-${port}`,
    GATEWAY_DRAIN_PERIOD: '0.5',
    GATEWAY_SHUTDOWN_TIMEOUT: '5',
    LOG_FORMAT: 'text',
    LOG_LEVEL: 'INFO',
    ...env,
  };
  const proc = spawn(GATEWAY_BIN, ['serve'], { env: fullEnv, stdio: ['ignore', log, log] });
  const url = `http://127.0.0.1:${port}`;
  const exited = once(proc, 'exit');
  await waitFor(async () => {
    if (proc.exitCode !== null) throw new Error(`gateway exited with ${proc.exitCode}; see ${name}-${port}.log`);
    const r = await fetch(`${url}/ws/health`).catch(() => null);
    return r?.status === 200;
  }, { timeout: 30000, message: 'gateway /ws/health' });
  return {
    port, url, ws: `ws://127.0.0.1:${port}`, proc, env: fullEnv,
    /** SIGTERM: drain (1012 to every socket), then exit. */
    async stop(signal = 'SIGTERM') {
      if (proc.exitCode !== null || proc.signalCode !== null) return;
      proc.kill('SIGCONT');
      proc.kill(signal);
      const timer = setTimeout(() => proc.kill('SIGKILL'), 20000);
      await exited;
      clearTimeout(timer);
      try { fs.closeSync(log); } catch { /* already closed */ }
    },
  };
}

export async function mint(gw, body) {
  const r = await fetch(`${gw.url}/ws/dev/token`, {
    method: 'POST', headers: { 'Content-Type': 'application/json' }, body: JSON.stringify(body),
  });
  if (r.status !== 200) throw new Error(`dev token: ${r.status} ${await r.text()}`);
  return (await r.json()).token;
}

export async function health(gw) {
  return (await fetch(`${gw.url}/ws/health`)).json();
}

// --- static server for the test pages ---------------------------------------------------------
const TYPES = { '.js': 'text/javascript', '.html': 'text/html', '.css': 'text/css', '.json': 'application/json' };

export async function startStatic() {
  const server = http.createServer({ keepAliveTimeout: 1000 }, (req, res) => {
    const rel = decodeURIComponent(new URL(req.url, 'http://x').pathname);
    const file = path.resolve(BROWSER_DIR, '.' + rel);
    if (!file.startsWith(BROWSER_DIR + path.sep) || !fs.existsSync(file) || !fs.statSync(file).isFile()) {
      res.writeHead(404).end('not found');
      return;
    }
    res.writeHead(200, { 'content-type': TYPES[path.extname(file)] ?? 'application/octet-stream', 'cache-control': 'no-store' });
    fs.createReadStream(file).pipe(res);
  });
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const { port } = server.address();
  return { port, origin: `http://127.0.0.1:${port}`, close: () => new Promise((r) => { server.close(r); server.closeAllConnections(); }) };
}

// --- Chromium ----------------------------------------------------------------------------------
export async function launchBrowser() {
  const { chromium } = await import('playwright-core');
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'wsclient-chromium-'));
  const context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  return {
    context,
    async newLab(stat) {
      const page = await context.newPage();
      page.on('pageerror', (e) => console.error('page error:', e.message));
      await page.goto(`${stat.origin}/test/pages/lab.html`);
      await page.waitForFunction(() => window.labReady === true, null, { timeout: 30000 });
      return page;
    },
    async close() {
      await context.close();
      fs.rmSync(userDataDir, { recursive: true, force: true });
    },
  };
}

/** Wait for `promise`, at most `ms`; errors are ignored (clean-up must not hang or throw). */
function bounded(promise, ms) {
  let timer;
  return Promise.race([promise.catch(() => {}), new Promise((r) => { timer = setTimeout(r, ms); })])
    .finally(() => clearTimeout(timer));
}

/** Everything a test file needs: redis, one gateway, the static server and the browser. */
export async function environment({ gatewayEnv = {} } = {}) {
  const redis = await startRedis();
  const stat = await startStatic();
  const gw = await startGateway({ redis, origins: [stat.origin], env: gatewayEnv });
  const browser = await launchBrowser();
  const env = {
    redis, stat, gw, browser,
    // Tests replace env.gw when they restart the gateway: stop whichever runs now.
    async close() {
      await bounded(env.browser.close(), 20000);
      await bounded(env.gw.stop(), 25000);
      await bounded(env.stat.close(), 5000);
      await bounded(env.redis.stop(), 10000);
    },
  };
  return env;
}

/** Ids of the events the lab page's client `name` delivered to the app, in order. */
export const labEventIds = (page, name) => page.evaluate((n) => log[n].events.map((e) => e.entity.id), name);

/** How many sockets the lab page tried to open with `token` in their URL. */
export const labAttempts = (page, token) =>
  page.evaluate((t) => wsAttempts.filter((a) => a.url.includes(t)).length, encodeURIComponent(token));
