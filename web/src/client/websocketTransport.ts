import type { ProgressError, ServerMessage } from './types';
import { isJobState, type LinkEnd, type Transport, type TransportContext, type TransportEvents, type WebSocketLike } from './transport';
import { apiUrl, redactToken, toWebSocketUrl } from './urls';

const OPEN = 1;
/** After the browser comes back online, how long the server gets to answer our ping. */
const ONLINE_CHECK_MS = 5_000;

/**
 * One WebSocket carrying every watched job. Single-use: when the socket ends it reports
 * `ended` once and is done; the ProgressClient decides whether to retry, fall back, refresh
 * the token or stop.
 */
export class WebSocketTransport implements Transport {
  readonly kind = 'websocket' as const;
  private socket: WebSocketLike | null = null;
  private readonly jobs: Set<string>;
  private healthy = false;
  private finished = false;
  private stopLiveness: (() => void) | null = null;

  constructor(
    private readonly ctx: TransportContext,
    private readonly events: TransportEvents,
    jobIds: Iterable<string>,
    private readonly token: string | null,
  ) {
    this.jobs = new Set(jobIds);
  }

  start(): void {
    const Ctor = this.ctx.WebSocket;
    const url = toWebSocketUrl(apiUrl(this.ctx.baseUrl, '/v1/ws', { access_token: this.token }));
    if (!Ctor) {
      this.end({ code: 'ws_unavailable', message: 'This environment has no WebSocket; using SSE or polling instead.' }, 'failed');
      return;
    }
    let socket: WebSocketLike;
    try {
      socket = new Ctor(url);
    } catch (error) {
      // Some privacy tools replace WebSocket with a constructor that throws.
      this.end({
        code: 'ws_blocked',
        message: `Could not create a WebSocket to ${redactToken(url)}: ${error instanceof Error ? error.message : String(error)}. Falling back to SSE.`,
      }, 'failed');
      return;
    }
    this.socket = socket;
    socket.addEventListener('open', () => this.onOpen());
    socket.addEventListener('message', (event: MessageEvent) => this.onMessage(event));
    socket.addEventListener('close', (event: CloseEvent) => this.onClose(event, redactToken(url)));
    // 'error' is always followed by 'close', which carries the useful code.
    socket.addEventListener('error', () => undefined);
  }

  add(jobId: string): boolean {
    if (!this.jobs.has(jobId)) {
      this.jobs.add(jobId);
      this.sendSubscribe(jobId);
    }
    return true;
  }

  remove(jobId: string, tellServer: boolean): boolean {
    if (this.jobs.delete(jobId) && tellServer) this.send({ op: 'unsubscribe', job_id: jobId });
    return true;
  }

  reauth(token: string): boolean {
    if (this.finished || this.socket?.readyState !== OPEN) return false;
    this.send({ op: 'auth', token });
    return true;
  }

  /**
   * The network came back: the socket may have died silently while we were away (a new
   * Wi-Fi means the old TCP connection is gone, yet no close event comes for minutes). Ask
   * the server for a pong and give it a few seconds instead of the full ping timeout.
   */
  check(): void {
    if (this.finished || this.socket?.readyState !== OPEN) return;
    this.send({ op: 'ping' });
    this.armLiveness(Math.min(this.ctx.pingTimeoutMs, ONLINE_CHECK_MS));
  }

  close(): void {
    this.finished = true;
    this.stopLiveness?.();
    const socket = this.socket;
    this.socket = null;
    // Closing in CONNECTING state is allowed and aborts the handshake.
    socket?.close(1000, 'client closed');
  }

  private onOpen(): void {
    if (this.finished) return;
    this.armLiveness();
    for (const jobId of this.jobs) this.sendSubscribe(jobId);
  }

  private onMessage(event: MessageEvent): void {
    if (this.finished) return;
    this.armLiveness();
    let message: ServerMessage;
    try {
      message = JSON.parse(String(event.data)) as ServerMessage;
    } catch {
      return; // Not JSON: nothing in the protocol sends that, so ignore rather than drop the link.
    }
    if (!this.healthy) {
      // Counted only once the server has spoken: a proxy that accepts the upgrade and then
      // closes straight away must still count as "WebSockets do not work here".
      this.healthy = true;
      this.events.heard();
      if (this.finished) return;
    }
    switch (message.type) {
      case 'state':
        if (isJobState(message.job)) this.events.state(message.job);
        break;
      case 'authenticated':
        this.events.authenticated(typeof message.expires_at === 'number' && Number.isFinite(message.expires_at) ? message.expires_at : null);
        break;
      case 'error':
        if (message.job_id !== null && this.jobs.delete(message.job_id)) {
          this.events.jobError({ code: message.code, message: message.message, jobId: message.job_id });
        }
        break;
      default:
        // subscribed / unsubscribed / ping / pong only prove the link is alive.
        break;
    }
  }

  private onClose(event: CloseEvent, url: string): void {
    if (this.finished) return;
    this.socket = null;
    const reason = event.code === 4401 ? 'refused' : event.code === 4403 ? 'forbidden' : 'failed';
    this.end(closeError(event.code, event.reason, this.healthy, url), reason);
  }

  private armLiveness(timeout: number = this.ctx.pingTimeoutMs): void {
    this.stopLiveness?.();
    this.stopLiveness = this.ctx.timers.after(timeout, () => {
      // No ping for longer than the server's interval: the TCP link may look open while
      // nothing gets through (sleeping laptop, dropped NAT entry).
      const socket = this.socket;
      this.socket = null;
      socket?.close(4000, 'no ping from server');
      this.end({ code: 'dead_link', message: `No message from the server for ${timeout / 1000} s (it pings every 15 s); reconnecting.` }, 'failed');
    });
  }

  private sendSubscribe(jobId: string): void {
    const since = this.ctx.since(jobId);
    const epoch = this.ctx.epoch(jobId);
    // With the epoch, a resume after a store loss is recognised (the server sends the full state).
    this.send(since > 0 ? { op: 'subscribe', job_id: jobId, since, ...(epoch ? { epoch } : {}) } : { op: 'subscribe', job_id: jobId });
  }

  private send(message: Record<string, unknown>): void {
    const socket = this.socket;
    if (socket && socket.readyState === OPEN) socket.send(JSON.stringify(message));
  }

  private end(error: ProgressError, reason: LinkEnd['reason']): void {
    if (this.finished) return;
    this.finished = true;
    this.stopLiveness?.();
    this.stopLiveness = null;
    this.events.ended({ error, healthyBefore: this.healthy, reason });
  }
}

function closeError(code: number, reason: string, wasHealthy: boolean, url: string): ProgressError {
  const why = reason ? ` (${reason})` : '';
  switch (code) {
    case 4401:
      return {
        code: 'unauthorized',
        status: code,
        message: `The server refused the token (WebSocket close 4401${why}): it is missing, invalid or expired. Give ProgressClient a token function that returns a fresh one (it is asked again once before giving up), or call setToken() with a valid token.`,
      };
    case 4403:
      return {
        code: 'forbidden',
        status: code,
        message: `The token may not watch jobs (WebSocket close 4403${why}): mint it with the jobs:read scope.`,
      };
    case 1012:
      return { code: 'server_restart', status: code, message: 'The server is restarting; reconnecting with backoff.' };
    default:
      return wasHealthy
        ? { code: 'ws_closed', status: code, message: `The WebSocket closed (code ${code}${why}); reconnecting.` }
        : {
            code: 'ws_connect_failed',
            status: code,
            message: `Could not open a WebSocket to ${url} (code ${code}${why}). Check that the server is up; if a proxy blocks WebSockets the client falls back to SSE.`,
          };
  }
}
