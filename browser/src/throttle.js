// Leading-edge throttle whose trailing call carries the LATEST suppressed value.

/**
 * @template T
 * @typedef {object} Throttled
 * @property {(value: T) => void} offer  deliver now, or hold until the interval ends
 * @property {() => void} flush          deliver a held value now (used when stopping)
 * @property {() => void} cancel         drop a held value and stop the timer
 * @property {() => boolean} pending     whether a trailing call is scheduled
 */

/**
 * @template T
 * @param {(value: T) => void} callback
 * @param {number} [interval] milliseconds, default 100
 * @param {{now?: () => number, setTimeout?: typeof setTimeout, clearTimeout?: typeof clearTimeout}} [clock]
 * @returns {Throttled<T>}
 */
export function createThrottle(callback, interval = 100, clock = {}) {
  const now = clock.now ?? (() => Date.now());
  const setT = clock.setTimeout ?? ((fn, ms) => setTimeout(fn, ms));
  const clearT = clock.clearTimeout ?? ((id) => clearTimeout(id));
  let last = -Infinity;
  /** @type {any} */ let timer = null;
  let held = false;
  /** @type {T | undefined} */ let latest;

  const fire = () => {
    timer = null;
    if (!held) return;
    const value = /** @type {T} */ (latest);
    held = false;
    latest = undefined;
    last = now();
    // The trailing call opens a new interval: a value offered now waits for its end.
    timer = setT(fire, interval);
    callback(value);
  };

  return {
    offer(value) {
      const t = now();
      if (timer === null && t - last >= interval) {
        last = t;
        timer = setT(fire, interval);
        callback(value);
        return;
      }
      held = true;
      latest = value;
      if (timer === null) timer = setT(fire, Math.max(0, interval - (t - last)));
    },
    flush() {
      if (timer !== null) clearT(timer);
      timer = null;
      if (held) {
        const value = /** @type {T} */ (latest);
        held = false;
        latest = undefined;
        last = now();
        callback(value);
      }
    },
    cancel() {
      if (timer !== null) clearT(timer);
      timer = null;
      held = false;
      latest = undefined;
    },
    pending() {
      return held;
    },
  };
}
