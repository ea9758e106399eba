// Reconnect backoff: attempt n (1-based) waits min(base * 2^(n-1), cap) plus 0-30 % jitter.

/** @typedef {{baseDelay?: number, maxDelay?: number, jitter?: number, random?: () => number}} BackoffOptions */

export const BASE_DELAY_MS = 1000;
export const MAX_DELAY_MS = 30000;
export const JITTER = 0.3;
export const MAX_RECONNECT_ATTEMPTS = 50;

/**
 * Nominal delay of attempt n, without jitter.
 * @param {number} attempt 1-based attempt number
 * @param {BackoffOptions} [options]
 */
export function nominalDelay(attempt, options = {}) {
  const base = options.baseDelay ?? BASE_DELAY_MS;
  const cap = options.maxDelay ?? MAX_DELAY_MS;
  const n = Math.max(1, Math.floor(attempt));
  // 2^(n-1) overflows to Infinity for large n; min() keeps the cap.
  return Math.min(base * 2 ** (n - 1), cap);
}

/**
 * Delay before attempt n: nominal(n) * (1 + jitter * U[0,1)), rounded to whole milliseconds.
 * @param {number} attempt 1-based attempt number
 * @param {BackoffOptions} [options]
 */
export function backoffDelay(attempt, options = {}) {
  const jitter = options.jitter ?? JITTER;
  const random = options.random ?? Math.random;
  const nominal = nominalDelay(attempt, options);
  return Math.round(nominal + nominal * jitter * random());
}
