// Ready-made clients doing what the apps' services do.
import { BaseWebSocketClient } from './client.js';
import { sessionIdFromTableToken } from './token.js';

/** Staff socket on /ws/waiter. Set the branch the UI shows (setBranchId) so catch-up runs. */
export class WaiterClient extends BaseWebSocketClient {
  /** @param {import('./index.js').StaffClientOptions} [options] */
  constructor(options = {}) {
    super({ protocol: 'v2', ...options, endpoint: 'waiter' });
  }

  /** Ask the gateway to re-read this waiter's sectors; the reply goes to onSectorsUpdated(). */
  refreshSectors() {
    if (!this.isConnected() || !this.ws) return false;
    this.ws.send('refresh_sectors');
    return true;
  }
}

/** Staff socket on /ws/kitchen (Dashboard's kitchen page). */
export class KitchenClient extends BaseWebSocketClient {
  /** @param {import('./index.js').StaffClientOptions} [options] */
  constructor(options = {}) {
    super({ protocol: 'v2', ...options, endpoint: 'kitchen' });
  }
}

/** Staff socket on /ws/admin (Dashboard for managers and admins). */
export class AdminClient extends BaseWebSocketClient {
  /** @param {import('./index.js').StaffClientOptions} [options] */
  constructor(options = {}) {
    super({ protocol: 'v2', ...options, endpoint: 'admin' });
  }
}

/**
 * Diner socket on /ws/diner with a table token (JWT or legacy). Its state machine is
 * disconnected → connecting → connected ⇄ reconnecting, and ends in `closed` after a final close
 * (4001/4003/4029) or the last failed attempt.
 */
export class DinerClient extends BaseWebSocketClient {
  /** @param {import('./index.js').DinerClientOptions} [options] */
  constructor(options = {}) {
    super({ protocol: 'v2', ...options, endpoint: 'diner' });
  }

  /** The table token in use: a token refused in-band (refresh_failed) never becomes it. */
  get tableToken() {
    return this.getActiveToken();
  }

  /** The table session of the current token, for catch-up. */
  getSessionId() {
    return this.tableToken ? sessionIdFromTableToken(this.tableToken) : null;
  }
}

/**
 * Dashboard-style client: connect(endpoint) picks `admin` or `kitchen`; reconnects keep it.
 * `endpointForRoles(roles)` is the Dashboard's rule (admin for ADMIN/MANAGER, else kitchen).
 */
export function endpointForRoles(roles) {
  return roles.includes('ADMIN') || roles.includes('MANAGER') ? 'admin' : 'kitchen';
}
