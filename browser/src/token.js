// Reading credentials without verifying them: expiry and table session, for scheduling and catch-up.

/**
 * Decode base64url (or base64) text to a string, restoring the padding.
 * @param {string} text
 * @returns {string | null}
 */
export function base64UrlDecode(text) {
  if (typeof text !== 'string' || !/^[A-Za-z0-9_\-+/]*={0,2}$/.test(text)) return null;
  let b64 = text.replace(/=+$/, '').replace(/-/g, '+').replace(/_/g, '/');
  if (b64.length % 4 === 1) return null;
  b64 += '='.repeat((4 - (b64.length % 4)) % 4);
  try {
    const binary = atob(b64);
    const bytes = Uint8Array.from(binary, (c) => c.charCodeAt(0));
    return new TextDecoder('utf-8', { fatal: true }).decode(bytes);
  } catch {
    return null;
  }
}

/**
 * The payload of a JWT (three dot-separated parts), or null.
 * @param {string} token
 * @returns {Record<string, unknown> | null}
 */
export function jwtPayload(token) {
  if (typeof token !== 'string') return null;
  const parts = token.split('.');
  if (parts.length !== 3) return null;
  const text = base64UrlDecode(parts[1]);
  if (text === null) return null;
  try {
    const value = JSON.parse(text);
    return value !== null && typeof value === 'object' && !Array.isArray(value) ? value : null;
  } catch {
    return null;
  }
}

/** @param {unknown} value */
function positiveInt(value) {
  if (typeof value === 'number' && Number.isSafeInteger(value) && value > 0) return value;
  if (typeof value === 'string' && /^[0-9]{1,15}$/.test(value)) {
    const n = Number(value);
    return n > 0 ? n : null;
  }
  return null;
}

/**
 * The fields of a legacy table token `tenant:branch:table:session:expires_at:signature`, or null.
 * @param {string} token
 */
export function legacyTableToken(token) {
  if (typeof token !== 'string' || token.includes('.')) return null;
  const fields = token.split(':');
  if (fields.length !== 6 || !fields.slice(0, 5).every((f) => /^[0-9]{1,19}$/.test(f))) return null;
  const [tenantId, branchId, tableId, sessionId, expiresAt] = fields.slice(0, 5).map(Number);
  return { tenantId, branchId, tableId, sessionId, expiresAt };
}

/**
 * Expiry of a staff JWT or a table token (JWT or legacy), in Unix seconds; null when unknown.
 * @param {string} token
 * @returns {number | null}
 */
export function tokenExpiry(token) {
  const claims = jwtPayload(token);
  if (claims) {
    const exp = claims.exp;
    return typeof exp === 'number' && Number.isFinite(exp) ? exp : null;
  }
  const legacy = legacyTableToken(token);
  return legacy ? legacy.expiresAt : null;
}

/**
 * The table session of a table token: the `session_id` claim of a JWT, or the fourth field of a
 * legacy token.
 * @param {string} token
 * @returns {number | null}
 */
export function sessionIdFromTableToken(token) {
  const claims = jwtPayload(token);
  if (claims) return positiveInt(claims.session_id);
  const legacy = legacyTableToken(token);
  return legacy ? positiveInt(legacy.sessionId) : null;
}

export const REFRESH_LEAD_MS = 60000;
export const MIN_REFRESH_DELAY_MS = 1000;

/**
 * Milliseconds from now until a credential expiring at `exp` (Unix seconds) should be replaced:
 * `lead` before expiry, but never more than a fifth of the remaining life early, and never sooner
 * than `minDelay` (so a token that is already about to expire cannot cause a tight loop).
 * Returns null when there is no expiry.
 * @param {number | null} exp
 * @param {number} nowMs
 * @param {{lead?: number, minDelay?: number}} [options]
 */
export function refreshDelay(exp, nowMs, options = {}) {
  if (exp === null || !Number.isFinite(exp)) return null;
  const lead = options.lead ?? REFRESH_LEAD_MS;
  const minDelay = options.minDelay ?? MIN_REFRESH_DELAY_MS;
  const remaining = exp * 1000 - nowMs;
  const early = Math.min(lead, Math.max(0, remaining) / 5);
  return Math.max(minDelay, Math.round(remaining - early));
}
