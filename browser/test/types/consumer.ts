// Compiled by test/unit/types.test.js (tsc --noEmit): the declarations accept code written like the
// apps' services against shared/websocket-client.ts, and the ready-made clients.
import {
  AdminClient, BaseWebSocketClient, DinerClient, KitchenClient, WaiterClient, endpointForRoles,
  type BaseWSClientOptions, type ConnectionCallback, type EventCallback, type MaxReconnectCallback, type WSEvent,
} from '@integrador/ws-client';

type Endpoint = 'admin' | 'kitchen';

class DashboardWebSocket extends BaseWebSocketClient {
  private endpoint: Endpoint = 'admin';
  private token: string | null = null;
  private branchId: number | null = null;

  constructor(options?: BaseWSClientOptions) {
    super({ reconnectOnVisible: false, ...options });
  }

  connect(endpoint: Endpoint = 'admin'): Promise<void> {
    this.endpoint = endpoint;
    return super.connect();
  }

  protected getUrl(): string {
    return `ws://localhost:8001/ws/${this.endpoint}`;
  }

  protected getAuthParam(): string | null {
    return this.token ? `token=${encodeURIComponent(this.token)}` : null;
  }

  protected onOpen(wasReconnect: boolean): void {
    if (wasReconnect && this.lastEventTimestamp > 0 && this.branchId !== null) void this.catchUp();
  }

  protected onClose(code: number, reason: string): void {
    if (code === 4001) console.warn(reason, this.isIntentionalClose, this.ws);
  }

  protected onMessage(event: WSEvent): void {
    if (event.branch_id === this.branchId) this.lastEventTimestamp = Date.now() / 1000;
  }

  private async catchUp(): Promise<void> {
    const r = await fetch(`http://localhost:8001/ws/catchup?branch_id=${this.branchId}&since=${this.lastEventTimestamp}`);
    const data = (await r.json()) as { events: WSEvent[] };
    data.events.forEach((e) => this.notifyListeners(e));
  }

  setToken(token: string): void {
    this.token = token;
  }

  // The apps' services define their own updateToken(newToken): void; it still overrides.
  updateToken(newToken: string): void {
    this.token = newToken;
    super.updateToken(newToken);
  }
}

const dash = new DashboardWebSocket();
void dash.connect(endpointForRoles(['KITCHEN']));
const cb: EventCallback = (e) => console.log(e.type, e.entity?.round_id, e.sector_id);
const off: () => void = dash.on('*', cb);
dash.off('*', cb);
off();
const conn: ConnectionCallback = (connected) => console.log(connected);
const max: MaxReconnectCallback = () => console.log('gave up');
dash.onConnectionChange(conn);
dash.onMaxReconnect(max);
const connected: boolean = dash.isConnected();
dash.softDisconnect();
dash.disconnect();
dash.destroy();

const waiter = new WaiterClient({ url: 'ws://localhost:8001', getToken: async () => 'jwt', branchId: 2 });
waiter.onThrottled('CART_ITEM_UPDATED', (e) => console.log(e), 100);
waiter.onStateChange((s) => { if (s === 'closed') console.log(waiter.getFinalClose()?.code); });
waiter.refreshSectors();
const diner = new DinerClient({ token: '1:2:5:9:1800000000:sig' });
const session: number | null = diner.getSessionId();
new KitchenClient({ token: 'jwt' }).setBranchId(2);
new AdminClient().stats.duplicatesDropped.toFixed();
console.log(connected, session);

// Protocol v2: the option, the recovery callback and the positions.
const v2 = new WaiterClient({
  protocol: 'v2', getToken: async () => 'jwt', onRecoveryFailed: (streams: string[]) => streams.length,
});
v2.onRecoveryFailed((streams) => streams.join(','));
const offRefusals: () => void = v2.onRefreshFailed((reason: string) => console.warn(reason));
v2.updateToken('new-jwt');
v2.refreshToken();
new KitchenClient({ protocol: 'v2', onRefreshFailed: (reason) => reason.length });
offRefusals();
const positions: Record<string, string> = v2.getPositions();
const speaking: boolean = v2.isV2();
const posOf = (e: WSEvent): string | undefined => e._pos?.offset;
void positions; void speaking; void posOf;
