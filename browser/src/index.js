// @integrador/ws-client: browser client of the Integrador WebSocket gateway (protocol v1, v2 on request).
export {
  BaseWebSocketClient, PING_FRAME, PROTOCOL_V1, PROTOCOL_V2, SUBPROTOCOL, REFRESH_REPLY_TIMEOUT_MS, httpBaseOf,
} from './client.js';
export { Positions, positionOf } from './v2.js';
export { WaiterClient, KitchenClient, AdminClient, DinerClient, endpointForRoles } from './apps.js';
export {
  BASE_DELAY_MS, MAX_DELAY_MS, JITTER, MAX_RECONNECT_ATTEMPTS, backoffDelay, nominalDelay,
} from './backoff.js';
export { FINAL_CLOSE_CODES, isFinalClose, closeDecision } from './closecodes.js';
export { createThrottle } from './throttle.js';
export {
  base64UrlDecode, jwtPayload, legacyTableToken, tokenExpiry, sessionIdFromTableToken, refreshDelay,
} from './token.js';
export { eventKey, RecentKeys } from './dedup.js';
export { Listeners } from './listeners.js';
