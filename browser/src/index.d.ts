// Types of @integrador/ws-client (protocol v1; v2 with `protocol: 'v2'`). Hand-written; the source is src/*.js.

/** An event frame: the envelope as the backend published it (docs/protocol.md §3). */
export interface WSEvent {
  type: string;
  tenant_id?: number;
  branch_id?: number | null;
  table_id?: number | null;
  session_id?: number | null;
  sector_id?: number | null;
  entity?: Record<string, unknown> | null;
  actor?: { user_id?: number; role?: string; [key: string]: unknown } | null;
  ts?: string;
  v?: number;
  /** Protocol v2 only: the event's position in its stream (docs/protocol.md §10). */
  _pos?: StreamPosition;
  [key: string]: unknown;
}

/** Protocol v2: `stream` is "<tenant>:<branch>" (branch 0: tenant-wide); `offset` is opaque. */
export interface StreamPosition { stream: string; offset: string }
/** Protocol v2: called with the streams a `resume` could not recover (refetch their state). */
export type RecoveryFailedCallback = (streams: string[]) => void;
/**
 * Protocol v2: called with the gateway's reason when it refuses an in-band refresh (`expired`,
 * `bad_signature`, `other_principal`, `revoked`, `unavailable`, ...; `missing_token` when
 * getToken() had none). The socket stays open with its old expiry.
 */
export type RefreshFailedCallback = (reason: string) => void;

export type EventCallback = (event: WSEvent) => void;
export type ConnectionCallback = (isConnected: boolean) => void;
export type MaxReconnectCallback = () => void;
export type FinalCloseCallback = (code: number, reason: string) => void;
export type ConnectionState = 'disconnected' | 'connecting' | 'connected' | 'reconnecting' | 'closed';
export type Endpoint = 'waiter' | 'kitchen' | 'admin' | 'diner';
/** Returns the credential to connect with; null means "none now" (nothing connects). */
export type TokenProvider = () => string | null | Promise<string | null>;

export interface BaseWSClientOptions {
  /** WebSocket base, e.g. `wss://ws.example.com`. Default: the page's host, else ws://localhost:8001. */
  url?: string;
  /** Used by the default getUrl()/getAuthParam(); subclasses that override both may omit it. */
  endpoint?: Endpoint;
  /** A fixed credential (staff JWT or table token). */
  token?: string | null;
  /** Called before every connect and before `exp`; wins over `token`. */
  getToken?: TokenProvider;
  /** Staff catch-up branch (also setBranchId()). Without one there is no staff catch-up. */
  branchId?: number | null;
  /** Diner catch-up session; default: read from the table token. */
  sessionId?: number | null;
  /** Heartbeat interval, ms (30000). */
  pingInterval?: number;
  /** Per-ping pong timeout, ms (10000); then close 4000 "Heartbeat timeout" and reconnect. */
  pongTimeout?: number;
  /** Reconnect attempts before giving up (50). */
  maxReconnectAttempts?: number;
  /** Backoff base and cap, ms (1000, 30000), and jitter fraction (0.3). */
  baseDelay?: number;
  maxDelay?: number;
  jitter?: number;
  /** A socket counts as healthy (backoff reset) at its first pong or event, or after this many ms open (10000). */
  healthyAfter?: number;
  /** Reconnect when the page becomes visible (true). `enableVisibilityHandler` is the old name. */
  reconnectOnVisible?: boolean;
  enableVisibilityHandler?: boolean;
  /** Reconnect when the browser goes back online (true). */
  reconnectOnOnline?: boolean;
  /** HTTP catch-up after every reconnect (true), `since` minus this margin in ms (2000), timeout ms (5000). */
  catchup?: boolean;
  catchupMargin?: number;
  catchupTimeout?: number;
  /** Replace the credential this long before `exp`, ms (60000; at most a fifth of its remaining life). */
  refreshLead?: number;
  /** Recent event keys kept for de-duplication (2048). */
  dedupMemory?: number;
  /**
   * Wire protocol: 'v1' (default, byte for byte what the apps speak today) or 'v2': offer
   * `integrador.v2`; when the gateway selects it, resume from the last position per stream
   * instead of catch-up and de-dup, and refresh `getToken()` in-band before `exp`.
   * A gateway that does not select it is spoken to as v1. Default: 'v2' for the ready-made
   * WaiterClient, KitchenClient, AdminClient and DinerClient; 'v1' for BaseWebSocketClient.
   */
  protocol?: 'v1' | 'v2';
  /** Protocol v2: streams a `resume` could not recover (also onRecoveryFailed()). */
  onRecoveryFailed?: RecoveryFailedCallback;
  /** Protocol v2: refused in-band refreshes (also onRefreshFailed()); the socket stays open. */
  onRefreshFailed?: RefreshFailedCallback;
  /** Injection points (tests, non-browser hosts). */
  WebSocket?: typeof WebSocket;
  fetch?: typeof fetch;
  logger?: Pick<Console, 'error' | 'warn'> | null;
  random?: () => number;
}

export type StaffClientOptions = Omit<BaseWSClientOptions, 'endpoint'>;
export type DinerClientOptions = Omit<BaseWSClientOptions, 'endpoint' | 'branchId'>;

export interface ClientStats {
  attempts: number;
  opens: number;
  liveEvents: number;
  catchupEvents: number;
  catchupRequests: number;
  duplicatesDropped: number;
  pings: number;
  pongs: number;
  heartbeatTimeouts: number;
  tokenRefreshes: number;
  getTokenCalls: number;
  /** Protocol v2: sockets the gateway opened as v2, `resume` messages sent, events replayed,
   * resumes with a stream not recovered, in-band refreshes accepted and refused. */
  v2Opens: number;
  resumes: number;
  replayed: number;
  recoveryFailures: number;
  inbandRefreshes: number;
  refreshFailures: number;
  lastClose: { code: number; reason: string; byClient: boolean; opened: boolean } | null;
  state: ConnectionState;
  reconnectAttempts: number;
  outstandingPings: number;
  listenerTypes: number;
  listenerCount: number;
  dedupKeys: number;
}

export declare const PING_FRAME: '{"type":"ping"}';
export declare const PROTOCOL_V1: 'v1';
export declare const PROTOCOL_V2: 'v2';
export declare const SUBPROTOCOL: 'integrador.v2';
export declare const REFRESH_REPLY_TIMEOUT_MS: number;
export declare function httpBaseOf(wsUrl: string): string;

export declare class BaseWebSocketClient {
  constructor(options?: BaseWSClientOptions);
  protected ws: WebSocket | null;
  protected isIntentionalClose: boolean;
  /** Client wall-clock Unix seconds of the last received event. */
  protected lastEventTimestamp: number;
  protected reconnectAttempts: number;

  connect(): Promise<void>;
  softDisconnect(): void;
  disconnect(): void;
  destroy(): void;
  /**
   * Use a new credential now. On an admitted v2 socket: in-band `refresh`, the socket stays open;
   * a refusal keeps the old credential and expiry and goes to onRefreshFailed(). Otherwise a soft
   * reconnect. Without a token, getToken() is asked.
   */
  updateToken(token?: string): void;
  refreshToken(): void;
  setBranchId(branchId: number | null): void;
  getBranchId(): number | null;

  on(eventType: string, callback: EventCallback): () => void;
  off(eventType: string, callback: EventCallback): void;
  onThrottled(eventType: string, callback: EventCallback, interval?: number): () => void;
  onConnectionChange(callback: ConnectionCallback): () => void;
  onMaxReconnect(callback: MaxReconnectCallback): () => void;
  onFinalClose(callback: FinalCloseCallback): () => void;
  onStateChange(callback: (state: ConnectionState) => void): () => void;
  onSectorsUpdated(callback: (sectorIds: number[]) => void): () => void;
  /** Protocol v2: streams a `resume` could not recover. */
  onRecoveryFailed(callback: RecoveryFailedCallback): () => void;
  /** Protocol v2: every refused in-band refresh (updateToken()'s and the automatic one). */
  onRefreshFailed(callback: RefreshFailedCallback): () => void;
  /** Whether the current socket speaks protocol v2. */
  isV2(): boolean;
  /** Protocol v2: the last offset per stream, what the next socket resumes from ({} with v1). */
  getPositions(): Record<string, string>;
  isConnected(): boolean;
  getState(): ConnectionState;
  getFinalClose(): { code: number; reason: string } | null;
  ping(): boolean;
  /** The credential in use; a token refused in-band (refresh_failed) never becomes it. */
  getActiveToken(): string | null;
  readonly stats: ClientStats;

  protected getUrl(): string;
  protected getAuthParam(): string | null;
  protected onOpen(wasReconnect: boolean): void;
  protected onClose(code: number, reason: string): void;
  protected onMessage(event: WSEvent): void;
  /** Dispatches once; returns false for a duplicate (already seen live or in catch-up). */
  protected notifyListeners(event: WSEvent): boolean;
  protected getCatchupUrl(since: number): string | null;
}

export declare class WaiterClient extends BaseWebSocketClient {
  constructor(options?: StaffClientOptions);
  refreshSectors(): boolean;
}
export declare class KitchenClient extends BaseWebSocketClient {
  constructor(options?: StaffClientOptions);
}
export declare class AdminClient extends BaseWebSocketClient {
  constructor(options?: StaffClientOptions);
}
export declare class DinerClient extends BaseWebSocketClient {
  constructor(options?: DinerClientOptions);
  readonly tableToken: string | null;
  getSessionId(): number | null;
}
export declare function endpointForRoles(roles: readonly string[]): 'admin' | 'kitchen';

// Pure building blocks.
export declare const BASE_DELAY_MS: number;
export declare const MAX_DELAY_MS: number;
export declare const JITTER: number;
export declare const MAX_RECONNECT_ATTEMPTS: number;
export interface BackoffOptions { baseDelay?: number; maxDelay?: number; jitter?: number; random?: () => number }
export declare function nominalDelay(attempt: number, options?: BackoffOptions): number;
export declare function backoffDelay(attempt: number, options?: BackoffOptions): number;

export declare const FINAL_CLOSE_CODES: readonly number[];
export declare function isFinalClose(code: number): boolean;
export declare function closeDecision(code: number, context?: { intentional?: boolean }): 'stop' | 'final' | 'reconnect';

export declare function positionOf(event: unknown): StreamPosition | null;
export declare class Positions {
  track(event: unknown): boolean;
  toObject(): Record<string, string>;
  readonly size: number;
  resumeMessage(): string;
  resumed(streams: unknown): { failed: string[]; replayed: number };
  clear(): void;
}

export interface Throttled<T> { offer(value: T): void; flush(): void; cancel(): void; pending(): boolean }
export declare function createThrottle<T>(
  callback: (value: T) => void,
  interval?: number,
  clock?: { now?: () => number; setTimeout?: typeof setTimeout; clearTimeout?: typeof clearTimeout },
): Throttled<T>;

export declare function base64UrlDecode(text: string): string | null;
export declare function jwtPayload(token: string): Record<string, unknown> | null;
export declare function legacyTableToken(token: string): {
  tenantId: number; branchId: number; tableId: number; sessionId: number; expiresAt: number;
} | null;
export declare function tokenExpiry(token: string): number | null;
export declare function sessionIdFromTableToken(token: string): number | null;
export declare function refreshDelay(exp: number | null, nowMs: number, options?: { lead?: number; minDelay?: number }): number | null;

export declare function eventKey(event: Record<string, unknown>): string;
export declare class RecentKeys {
  constructor(options?: { size?: number; maxAge?: number; now?: () => number });
  add(key: string): boolean;
  clear(): void;
  readonly count: number;
}
export declare class Listeners {
  add(type: string, callback: EventCallback): () => void;
  remove(type: string, callback: EventCallback): void;
  dispatch(event: { type?: unknown }, onError?: (error: unknown) => void): void;
  readonly types: number;
  readonly size: number;
  clear(): void;
}
