// De-duplication of events: the key of an envelope and a bounded memory of recent keys.

/** @param {unknown} value */
function canonical(value) {
  if (Array.isArray(value)) return '[' + value.map(canonical).join(',') + ']';
  if (value !== null && typeof value === 'object') {
    const obj = /** @type {Record<string, unknown>} */ (value);
    return '{' + Object.keys(obj).sort().filter((k) => obj[k] !== undefined)
      .map((k) => JSON.stringify(k) + ':' + canonical(obj[k])).join(',') + '}';
  }
  return JSON.stringify(value) ?? 'null';
}

/**
 * The de-duplication key of an event: its JSON with keys sorted (at every level) and the
 * top-level fields starting with `_` left out, so a copy that carried `_enqueued_at` still matches.
 * @param {Record<string, unknown>} event
 */
export function eventKey(event) {
  /** @type {Record<string, unknown>} */
  const body = {};
  for (const k of Object.keys(event)) if (!k.startsWith('_')) body[k] = event[k];
  return canonical(body);
}

export const DEDUP_MEMORY = 2048;
export const DEDUP_MAX_AGE_MS = 10 * 60 * 1000;

/**
 * Recent keys, forgetting the oldest first: at most `size` keys, none older than `maxAge` ms
 * (the catch-up window is 5 minutes, so older copies cannot come back).
 */
export class RecentKeys {
  /** @param {{size?: number, maxAge?: number, now?: () => number}} [options] */
  constructor(options = {}) {
    this.size = options.size ?? DEDUP_MEMORY;
    this.maxAge = options.maxAge ?? DEDUP_MAX_AGE_MS;
    this.now = options.now ?? (() => Date.now());
    /** @type {Map<string, number>} key -> time added (insertion order = age order) */
    this.keys = new Map();
  }

  /**
   * Remember `key`; false when it was already known (a duplicate).
   * @param {string} key
   */
  add(key) {
    const t = this.now();
    this.expire(t);
    if (this.keys.has(key)) return false;
    this.keys.set(key, t);
    while (this.keys.size > this.size) this.keys.delete(this.keys.keys().next().value);
    return true;
  }

  /** @param {number} t */
  expire(t) {
    for (const [key, added] of this.keys) {
      if (t - added <= this.maxAge) break;
      this.keys.delete(key);
    }
  }

  clear() {
    this.keys.clear();
  }

  get count() {
    return this.keys.size;
  }
}
