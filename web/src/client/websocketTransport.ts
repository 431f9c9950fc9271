import { backoffDelay } from './backoff';
import type { ProgressError, ServerMessage } from './types';
import {
  describeError,
  isJobState,
  type Transport,
  type TransportContext,
  type TransportHandlers,
  type WebSocketLike,
} from './transport';
import { apiUrl, redactToken, toWebSocketUrl } from './urls';

const OPEN = 1;
/** After the browser comes back online, how long the server gets to answer our ping. */
const ONLINE_CHECK_MS = 5_000;

/**
 * One WebSocket carrying every watched job. Single-use: when the socket ends it reports
 * one `failure` and is done; the ProgressClient decides whether to retry, fall back or stop.
 */
export class WebSocketTransport implements Transport {
  readonly kind = 'websocket' as const;
  private socket: WebSocketLike | null = null;
  private readonly jobs = new Set<string>();
  private healthy = false;
  private finished = false;
  private stopLiveness: (() => void) | null = null;
  private readonly retryCancels = new Map<string, () => void>();
  private retryAttempts = new Map<string, number>();

  constructor(
    private readonly ctx: TransportContext,
    private readonly handlers: TransportHandlers,
    jobIds: Iterable<string>,
  ) {
    for (const jobId of jobIds) this.jobs.add(jobId);
    void this.connect();
  }

  add(jobId: string): void {
    if (this.jobs.has(jobId)) return;
    this.jobs.add(jobId);
    this.sendSubscribe(jobId);
  }

  remove(jobId: string, tellServer: boolean): void {
    if (!this.jobs.delete(jobId)) return;
    this.retryCancels.get(jobId)?.();
    this.retryCancels.delete(jobId);
    if (tellServer) this.send({ op: 'unsubscribe', job_id: jobId });
  }

  /**
   * The network came back: the socket may have died silently while we were away (a new
   * Wi-Fi means the old TCP connection is gone, yet no close event comes for minutes). Ask
   * the server for a pong and give it a few seconds instead of the full ping timeout.
   */
  retryNow(): void {
    const socket = this.socket;
    if (this.finished || !socket || socket.readyState !== OPEN) return;
    this.send({ op: 'ping' });
    this.armLiveness(Math.min(this.ctx.pingTimeoutMs, ONLINE_CHECK_MS));
  }

  close(): void {
    this.finished = true;
    this.cleanup();
    const socket = this.socket;
    this.socket = null;
    // Closing in CONNECTING state is allowed and aborts the handshake.
    socket?.close(1000, 'client closed');
  }

  private async connect(): Promise<void> {
    // Always await first, so no callback runs inside the constructor.
    let token: string | null;
    try {
      token = await this.ctx.token();
    } catch (error) {
      this.fail({ code: 'token', message: `The token function failed: ${describeError(error)}` }, false);
      return;
    }
    if (this.finished) return;
    const Ctor = this.ctx.WebSocket;
    if (!Ctor) {
      this.fail({ code: 'ws_unavailable', message: 'This environment has no WebSocket; using SSE or polling instead.' }, false);
      return;
    }
    const url = toWebSocketUrl(apiUrl(this.ctx.baseUrl, '/v1/ws', { access_token: token }));
    let socket: WebSocketLike;
    try {
      socket = new Ctor(url);
    } catch (error) {
      // Some privacy tools replace WebSocket with a constructor that throws.
      this.fail({
        code: 'ws_blocked',
        message: `Could not create a WebSocket to ${redactToken(url)}: ${describeError(error)}. Falling back to SSE.`,
      }, false);
      return;
    }
    this.socket = socket;
    socket.addEventListener('open', () => this.onOpen());
    socket.addEventListener('message', (event: MessageEvent) => this.onMessage(event));
    socket.addEventListener('close', (event: CloseEvent) => this.onClose(event, url));
    // 'error' is always followed by 'close', which carries the useful code.
    socket.addEventListener('error', () => undefined);
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
      this.handlers.healthy();
    }
    switch (message.type) {
      case 'state':
        if (isJobState(message.job)) {
          this.retryAttempts.delete(message.job.job_id);
          this.handlers.state(message.job);
        }
        break;
      case 'error':
        this.onServerError(message);
        break;
      default:
        // subscribed / unsubscribed / ping / pong only prove the link is alive.
        break;
    }
  }

  private onServerError(message: Extract<ServerMessage, { type: 'error' }>): void {
    const jobId = message.job_id;
    if (jobId === null || !this.jobs.has(jobId)) return;
    if (message.code === 'unavailable') {
      // The engine is briefly unreachable: ask again later on the same socket.
      const attempt = this.retryAttempts.get(jobId) ?? 0;
      this.retryAttempts.set(jobId, attempt + 1);
      const delay = backoffDelay(attempt, this.ctx.streamBackoff, this.ctx.random);
      this.retryCancels.set(jobId, this.ctx.timers.after(delay, () => {
        this.retryCancels.delete(jobId);
        this.sendSubscribe(jobId);
      }));
      return;
    }
    this.jobs.delete(jobId);
    this.handlers.jobError({ code: message.code, message: message.message, jobId });
  }

  private onClose(event: CloseEvent, url: string): void {
    if (this.finished) return;
    this.socket = null;
    this.fail(closeError(event.code, event.reason, this.healthy, redactToken(url)), isFatalClose(event.code));
  }

  private armLiveness(timeout: number = this.ctx.pingTimeoutMs): void {
    this.stopLiveness?.();
    this.stopLiveness = this.ctx.timers.after(timeout, () => {
      // No ping for longer than the server's interval: the TCP link may look open while
      // nothing gets through (sleeping laptop, dropped NAT entry). Start afresh.
      const socket = this.socket;
      this.socket = null;
      socket?.close(4000, 'no ping from server');
      this.fail({
        code: 'dead_link',
        message: `No message from the server for ${timeout / 1000} s (it pings every 15 s); reconnecting.`,
      }, false);
    });
  }

  private sendSubscribe(jobId: string): void {
    const since = this.ctx.since(jobId);
    this.send(since > 0 ? { op: 'subscribe', job_id: jobId, since } : { op: 'subscribe', job_id: jobId });
  }

  private send(message: Record<string, unknown>): void {
    const socket = this.socket;
    if (socket && socket.readyState === OPEN) socket.send(JSON.stringify(message));
  }

  private fail(error: ProgressError, fatal: boolean): void {
    if (this.finished) return;
    this.finished = true;
    this.cleanup();
    this.handlers.failure(error, { healthyBefore: this.healthy, fatal });
  }

  private cleanup(): void {
    this.stopLiveness?.();
    this.stopLiveness = null;
    for (const cancel of this.retryCancels.values()) cancel();
    this.retryCancels.clear();
  }
}

function isFatalClose(code: number): boolean {
  return code === 4401 || code === 4403;
}

function closeError(code: number, reason: string, wasHealthy: boolean, url: string): ProgressError {
  const why = reason ? ` (${reason})` : '';
  switch (code) {
    case 4401:
      return {
        code: 'unauthorized',
        status: code,
        message: `The server refused the token (WebSocket close 4401${why}): it is missing, invalid or expired. Give ProgressClient a valid token, or a token function that returns a fresh one, then call setToken().`,
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
