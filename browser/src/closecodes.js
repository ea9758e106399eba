// Close-code policy: which closes end reconnecting.

/** Codes after which the client stays closed until the application starts it again. */
export const FINAL_CLOSE_CODES = Object.freeze([4001, 4003, 4029]);

export const CLOSE_NORMAL = 1000;
export const CLOSE_ABNORMAL = 1006;
export const CLOSE_HEARTBEAT_TIMEOUT = 4000;
export const SOFT_DISCONNECT_REASON = 'Soft disconnect';
export const HEARTBEAT_TIMEOUT_REASON = 'Heartbeat timeout';

/** @param {number} code */
export function isFinalClose(code) {
  return FINAL_CLOSE_CODES.includes(code);
}

/**
 * What to do after a close.
 * @param {number} code
 * @param {{intentional?: boolean}} [context]
 * @returns {'stop' | 'final' | 'reconnect'}
 */
export function closeDecision(code, context = {}) {
  if (context.intentional) return 'stop';
  if (isFinalClose(code)) return 'final';
  return 'reconnect';
}
